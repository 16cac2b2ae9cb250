"""PEFT LoRA experts on one small base: a mixed batch, separate forwards, or merged copies.

Where it sits: :meth:`FusedGenerator.from_pretrained` (or a caller building a generator by hand)
turns the small base and T LoRA adapters into the ``small`` and ``experts`` the generator takes,
with :func:`lora_experts`. Three ways to run them (``lora_mode``):

- ``"mixed"``: the base weights are loaded once into one ``PeftModel`` holding every adapter; the
  small base and all experts run as ONE forward over a batch of ``(1 + T) * B`` rows, each row
  tagged with its adapter (peft's ``adapter_names=[...]``, ``"__base__"`` for the base rows).
  :func:`group_slots` makes the runner's slots for it: one slot whose logits are split back into
  the base's and each expert's staging buffers.
- ``"separate"``: the same shared ``PeftModel``, one forward per model and step (the base rows
  with ``"__base__"``); the memory of one base, ``1 + T`` forwards.
- ``"merged"``: each adapter merged into its own copy of the base (``merge_and_unload``): plain
  forwards with no LoRA work, ``T + 1`` copies of the weights.

``"auto"`` chooses by :func:`choose_mode`'s rule, read from ``benches/bench_lora.py`` (CPU, one
thread, T = 4, r = 16 on the attention projections; numbers in docs/lora.md): from a small base of
:data:`MIXED_MIN_PARAMS` parameters up, mixed costs 1.5-2.7x less per step than merged and 2.0-3.3x
less than separate; below it (the shipped 24k-parameter base) the three are within the timing
noise of a few milliseconds and merged (plain forwards, no peft at decode time) is chosen.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .runner import ModelSlot, cache_keyword

__all__ = [
    "BASE", "LORA_MODES", "MIXED_MIN_PARAMS", "AdapterView", "MixedLora", "choose_mode",
    "group_slots", "lora_experts",
]  # fmt: skip

BASE = "__base__"  # peft's name for "no adapter" in adapter_names
LORA_MODES = ("auto", "mixed", "separate", "merged")
# From this size up the mixed batch was measured cheapest (11.8M: 3.4x one small forward per step
# against 5.0x merged and 8.0x separate; 135M: see docs/lora.md); benches/bench_lora.py.
MIXED_MIN_PARAMS = 10_000_000


def _require_peft(arg: str) -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"{arg}: LoRA adapters need peft: pip install 'dlf_rs[peft]'") from err
    return peft


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def choose_mode(small: Any, n_adapters: int) -> str:
    """The rule behind ``lora_mode="auto"``: ``"mixed"`` for a small base of at least
    :data:`MIXED_MIN_PARAMS` parameters (one read of the base weights for all rows, one forward
    instead of ``1 + T``), else ``"merged"`` (tiny bases: T + 1 copies cost little memory and plain
    forwards carry no LoRA dispatch). Measured on CPU (benches/bench_lora.py); on CUDA decode is
    launch- and memory-bound, which favours one forward more, but that is not measured here.
    ``"separate"`` is never chosen: force it where T merged copies do not fit and a mixed batch
    is not wanted (e.g. with ``fast=True``, which runs LoRA members as separate forwards)."""
    if n_adapters == 0:
        return "separate"
    return "mixed" if n_params(small) >= MIXED_MIN_PARAMS else "merged"


class MixedLora:
    """The small base and T adapters of one ``PeftModel`` as one model over ``(1 + T) * B`` rows,
    member-major (rows ``k * B .. (k + 1) * B - 1`` belong to ``members[k]``). Everything else
    (config, embeddings, parameters, generation config) is the shared base model's. The forward
    names its keywords because the driver reads the signature (position ids, logits_to_keep)."""

    def __init__(self, peft_model: Any, members: Sequence[str]) -> None:
        self.peft_model = peft_model
        self.members = list(members)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> Any:
        ref = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        rows = int(ref.shape[0]) // len(self.members)
        names = [m for m in self.members for _ in range(rows)]
        # The driver passes ``cache`` (it is named first); the base model gets the KV cache under
        # the name its own transformers takes (runner.cache_keyword), ``past_key_values`` on 4.x.
        kwargs[cache_keyword(self.base())] = cache if cache is not None else past_key_values
        return self.peft_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
            position_ids=position_ids, logits_to_keep=logits_to_keep, adapter_names=names,
            **kwargs,
        )  # fmt: skip

    __call__ = forward

    def base(self) -> Any:
        return self.peft_model.get_base_model()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set in __init__: config, get_input_embeddings, ...
        return getattr(self.__dict__["peft_model"].get_base_model(), name)


class AdapterView(MixedLora):
    """One member (``"__base__"`` or one adapter) of a shared ``PeftModel``, called like a causal
    LM: a mixed batch of one member, every row tagged with its adapter."""

    def __init__(self, peft_model: Any, adapter: str) -> None:
        super().__init__(peft_model, [adapter])
        self.adapter = adapter

    def __repr__(self) -> str:
        return f"AdapterView({self.adapter!r})"


def _adapter_name(i: int, src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        stem = os.path.basename(os.path.normpath(os.fspath(src))) or "adapter"
        return f"e{i}_{stem}".replace(".", "_")
    return f"e{i}"


@contextlib.contextmanager
def _peft_quiet() -> Iterator[None]:
    """peft's PeftModel constructor reads ``is_gradient_checkpointing``, which transformers 5.x
    deprecates with a FutureWarning on every adapter load; it is peft's call, not the user's,
    so that one message is hidden (every other warning still shows)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated",
                                category=FutureWarning)  # fmt: skip
        yield


def _add_adapter(peft_model: Any, arg: str, name: str, src: Any) -> Any:
    """Load ``src`` (an adapter directory or a ``PeftModel``) into ``peft_model`` as ``name``;
    returns the PeftModel (created from the plain base for the first adapter)."""
    peft = _require_peft(arg)
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(
                f"{arg}: {path!r} is not a PEFT adapter (no adapter_config.json)"
            )
        try:
            if isinstance(peft_model, peft.PeftModel):
                peft_model.load_adapter(path, adapter_name=name)
                return peft_model
            with _peft_quiet():
                return peft.PeftModel.from_pretrained(peft_model, path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as err:
            msg = " ".join(str(err).split())[:400]
            raise ValueError(
                f"{arg}: the adapter {path!r} does not fit the small base: {msg}"
            ) from err
    if isinstance(src, peft.PeftModel):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        config = copy.deepcopy(src.peft_config[src.active_adapter])
        state = get_peft_model_state_dict(src, adapter_name=src.active_adapter)
        if isinstance(peft_model, peft.PeftModel):
            peft_model.add_adapter(name, config)
        else:
            with _peft_quiet():
                peft_model = peft.get_peft_model(peft_model, config, adapter_name=name)
        try:
            set_peft_model_state_dict(peft_model, state, adapter_name=name)
        except RuntimeError as err:
            msg = " ".join(str(err).split())[:400]
            raise ValueError(
                f"{arg}: the PeftModel's adapter does not fit the small base: {msg}"
            ) from err
        return peft_model
    raise TypeError(
        f"{arg}: expected a PEFT adapter directory or a peft.PeftModel, got {type(src).__name__}"
    )


def lora_experts(
    small: Any, adapters: Sequence[Any], mode: str = "auto", *, arg: str = "experts",
    local_files_only: bool = True,
) -> tuple[Any, list[Any], str]:
    """``(small, experts, mode)`` for :class:`FusedGenerator` from a loaded small base and T
    adapters (directories or ``PeftModel`` instances), run as ``mode`` (see the module doc).

    With "mixed" or "separate" the base is wrapped in place (LoRA layers injected into
    ``small``): pass a model the caller does not use elsewhere. "merged" copies it per adapter.
    Adapters are local directories; with ``local_files_only`` (the default) peft runs in the
    hub's offline mode (:func:`dlf_rs.hub.hub_scope`), so an adapter directory without its
    weights fails instead of peft fetching them from the hub under the directory's name.
    """
    from ...hub import hub_scope

    with hub_scope(local_files_only):
        return _lora_experts(small, adapters, mode, arg)


def _lora_experts(
    small: Any, adapters: Sequence[Any], mode: str, arg: str
) -> tuple[Any, list[Any], str]:
    if mode not in LORA_MODES:
        raise ValueError(f"lora_mode: expected one of {LORA_MODES}, got {mode!r}")
    if isinstance(adapters, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a list of adapters, got one string {adapters!r}")
    adapters = list(adapters)
    if mode == "auto":
        mode = choose_mode(small, len(adapters))
    _require_peft(arg)
    if mode == "merged":
        experts = []
        for i, src in enumerate(adapters):
            pm = _add_adapter(copy.deepcopy(small), f"{arg}[{i}]", _adapter_name(i, src), src)
            experts.append(pm.merge_and_unload().eval())
        return small, experts, mode
    names = [_adapter_name(i, src) for i, src in enumerate(adapters)]
    model: Any = small
    for i, (name, src) in enumerate(zip(names, adapters)):
        model = _add_adapter(model, f"{arg}[{i}]", name, src)
    model.eval()
    experts = [AdapterView(model, n) for n in names]
    mark_mixed(experts, mode == "mixed")
    return AdapterView(model, BASE), experts, mode


def group_slots(slots: list[ModelSlot]) -> list[ModelSlot]:
    """Replace the slots of a small base and its experts that are :class:`AdapterView` members
    of one ``PeftModel`` marked mixed (see :func:`mark_mixed`) by one slot over all their rows.
    Slots after the first are contiguous in the runner's order (small, expert:0, ...), so the
    staging order is unchanged. The fast path keeps separate slots (its static caches and
    compiled calls are per model)."""
    members = [
        s for s in slots
        if isinstance(s.model, AdapterView) and getattr(s.model.peft_model, "_dlf_mixed", False)
        and s.fast is None
    ]  # fmt: skip
    if len(members) < 2 or len({id(s.model.peft_model) for s in members}) != 1:
        return slots
    first = slots.index(members[0])
    if slots[first : first + len(members)] != members:
        return slots
    peft_model = members[0].model.peft_model
    model = MixedLora(peft_model, [s.model.adapter for s in members])
    prompts = [p for s in members for p in s.prompts]
    group = ModelSlot.of("+".join(s.name for s in members), model, prompts, None)
    group.group = len(members)
    return slots[:first] + [group] + slots[first + len(members) :]


def mark_mixed(experts: Sequence[Any], mixed: bool = True) -> None:
    """Mark the ``PeftModel`` behind ``experts`` (AdapterViews) to run as one mixed batch."""
    for e in experts:
        if isinstance(e, AdapterView):
            e.peft_model._dlf_mixed = mixed
