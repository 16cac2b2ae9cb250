"""The rule for the Hugging Face hub: no network request unless the caller asked for one.

Where it sits: :mod:`dlf_rs.engines.hf.loading` (models, tokenizers) and
:mod:`dlf_rs.engines.hf.lora` (adapters) run
every hub-facing load inside :func:`hub_scope`; tests/test_network.py holds the rule with a
socket guard.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["hub_scope"]


@contextlib.contextmanager
def hub_scope(local_files_only: bool) -> Iterator[None]:
    """With ``local_files_only``, the Hugging Face hub's offline mode for the scope of a load.

    Passing ``local_files_only`` is not enough for zero network requests: huggingface_hub
    builds request headers (which fetch its agent registry from the hub once a day) before it
    looks at ``local_files_only``. Its offline switch is read from ``HF_HUB_OFFLINE`` once, at
    import, into ``huggingface_hub.constants.HF_HUB_OFFLINE``, which every request consults; so
    the constant (and the variable, for code that reads it at call time) is set here and
    restored on exit. Other threads loading from the hub during the scope are offline too."""
    if not local_files_only:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        yield
        return
    saved_const = constants.HF_HUB_OFFLINE
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_const
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
