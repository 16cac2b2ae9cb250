"""Loading checkpoints for :meth:`FusedGenerator.from_pretrained`: paths, hub ids, safety, dtype.

Where it sits: the first step of the driver's flow; returns loaded Hugging Face causal LMs and the
shared tokenizer. Decisions (README "Loading checkpoints"):
- A string that names an existing directory is loaded from there. A string that looks like a
  path (starts with ``.``, ``/`` or ``~``, ends with ``/``, has a backslash or more than one
  ``/``, or whose first component is an existing local directory, e.g. the mistyped
  ``default_family/large_bse``) and does not exist fails at once, naming the argument.
  Anything else is a hub id, resolved **only from the local Hugging Face cache** unless the
  caller passes ``local_files_only=False``: dlf_rs never downloads unless asked to.
- Safetensors only: a checkpoint with only pickle weights (``pytorch_model.bin``) is refused
  unless ``allow_pickle=True`` (pickle can run code when loaded).
- ``trust_remote_code`` is False unless the caller passes True explicitly (it runs the
  checkpoint's Python code).
- dtype: float32 on CPU unless asked otherwise (float16 matrix work is slow on most CPUs and
  makes padded batches differ from single prompts); on an accelerator the checkpoint's own dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["LoadOptions", "load_adapter", "load_model", "load_tokenizer", "parse_dtype",
           "resolve_source"]  # fmt: skip

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


class LoadOptions:
    """The loading settings shared by every model of one ``from_pretrained`` call."""

    def __init__(
        self,
        *,
        device: str | torch.device | None,
        torch_dtype: str | torch.dtype | None,
        device_map: Any,
        local_files_only: bool,
        allow_pickle: bool,
        trust_remote_code: bool,
        extra: dict[str, Any],
    ) -> None:
        for name, flag in (("local_files_only", local_files_only), ("allow_pickle", allow_pickle),
                           ("trust_remote_code", trust_remote_code)):  # fmt: skip
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected True or False, got {flag!r}")
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device: expected a string or torch.device, got {device!r}")
        try:
            self.device = torch.device(device) if device is not None else None
        except RuntimeError as err:
            raise ValueError(f"device: {err}") from None
        self.device_map = device_map
        self.local_files_only = local_files_only
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        dtype = parse_dtype(torch_dtype)
        on_cpu = device_map is None and (self.device is None or self.device.type == "cpu")
        if dtype is None:
            dtype = torch.float32 if on_cpu else "auto"
        self.kwargs: dict[str, Any] = {
            **extra,
            "dtype": dtype,
            "local_files_only": local_files_only,
            "trust_remote_code": trust_remote_code,
        }
        if device_map is not None:
            self.kwargs["device_map"] = device_map

    def place(self, model: Any) -> Any:
        if self.device_map is None and self.device is not None:
            model = model.to(self.device)
        return model.eval()


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"torch_dtype: unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_like_path(s: str) -> bool:
    if s.startswith((".", "/", "~")) or "\\" in s or s.count("/") > 1 or s.endswith("/"):
        return True
    head = s.split("/", 1)[0]
    return os.path.isabs(s) or ("/" in s and os.path.isdir(head))


def resolve_source(arg: str, value: object) -> str:
    """A local directory for ``value`` when one exists, else the string as a hub id."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a path or hub id string, got {type(value).__name__}")
    s = os.path.expanduser(os.fspath(value))
    if not s:
        raise ValueError(f"{arg}: empty path")
    if os.path.isdir(s):
        return s
    if os.path.exists(s):
        raise FileNotFoundError(f"{arg}: {s!r} is a file; expected a model directory")
    if _looks_like_path(s):
        raise FileNotFoundError(f"{arg}: model directory {s!r} does not exist")
    return s


def resolve_sources(arg: str, values: object) -> list[str]:
    """A list of sources (``experts``): a str is refused, not iterated character by character."""
    if values is None:
        return []
    if isinstance(values, (str, os.PathLike)):
        raise TypeError(f"{arg}: expected a list of paths or hub ids, got one string {values!r}; "
                        f"pass [{os.fspath(values)!r}]")  # fmt: skip
    if not isinstance(values, Sequence):
        raise TypeError(f"{arg}: expected a list of paths or hub ids, got {type(values).__name__}")
    return [resolve_source(f"{arg}[{i}]", v) for i, v in enumerate(values)]


def _weight_files(path: str) -> tuple[bool, bool]:
    names = os.listdir(path)
    safe = any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names)
    pickle = any(n.endswith((".bin", ".bin.index.json", ".pt")) for n in names)
    return safe, pickle


def _not_found(arg: str, src: str, opts: LoadOptions, err: BaseException) -> FileNotFoundError:
    if opts.local_files_only:
        how = ("dlf_rs does not download unless asked: pass local_files_only=False "
               "(CLI: --allow-download) to fetch it from the hub")  # fmt: skip
    else:
        how = f"fetching it from the hub failed ({type(err).__name__}: {err})"
    return FileNotFoundError(
        f"{arg}: {src!r} is not a local directory and not in the Hugging Face cache; {how}"
    )


def oom_hint(name: str, err: BaseException) -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(
        f"CUDA out of memory in the {name} model ({err}). Try a smaller batch "
        "(fewer prompts per call / --batch-size), device_map='auto' to shard the models over "
        "devices, or a lower dtype (torch_dtype=torch.bfloat16 / --dtype bfloat16)."
    )


def load_model(arg: str, src: str, opts: LoadOptions) -> Any:
    """A causal LM from a directory or a cached hub id, with the rules of this module."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(opts.kwargs)
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise FileNotFoundError(
                f"{arg}: {src!r} holds no model (no config.json); expected a Hugging Face "
                "model directory"
            )
        safe, pickle = _weight_files(src)
        if not safe and pickle and not opts.allow_pickle:
            raise ValueError(
                f"{arg}: {src!r} has only pickle weights (pytorch_model.bin), which can run code "
                "when loaded; convert them to safetensors, or pass allow_pickle=True "
                "(CLI: --allow-pickle) if you trust the files"
            )
        if not safe and not pickle:
            raise FileNotFoundError(f"{arg}: {src!r} holds no weights (*.safetensors)")
    if not opts.allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except torch.cuda.OutOfMemoryError as err:
        raise oom_hint(arg, err) from err
    except OSError as err:
        if os.path.isdir(src):
            msg = " ".join(str(err).split())
            raise OSError(f"{arg}: could not load a causal LM from {src!r}: {msg}") from err
        raise _not_found(arg, src, opts, err) from None
    except ValueError as err:  # e.g. an unknown model type in config.json
        msg = " ".join(str(err).split())
        raise ValueError(f"{arg}: could not load a causal LM from {src!r}: {msg}") from err
    return opts.place(model)


def load_adapter(arg: str, src: str, small_src: str | None, opts: LoadOptions) -> Any:
    """A PEFT LoRA adapter applied to its own copy of the small base and merged."""
    if small_src is None:
        raise ValueError(f"{arg}: a LoRA adapter needs the small base model (small=)")
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError(
            f"{arg}: {src!r} is a PEFT LoRA adapter (adapter_config.json); loading it needs "
            "peft: pip install 'dlf_rs[peft]'"
        ) from err
    with open(os.path.join(src, "adapter_config.json"), encoding="utf-8") as fh:
        json.load(fh)  # a clear JSON error here beats a deep one inside peft
    # Each adapter gets its own copy of the small base: merging LoRA modifies the weights.
    base = load_model("small", small_src, opts)
    return opts.place(PeftModel.from_pretrained(base, src).merge_and_unload())


def is_adapter(src: str) -> bool:
    return os.path.isfile(os.path.join(src, "adapter_config.json"))


def has_tokenizer_files(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )


def load_tokenizer(arg: str, src: str, opts: LoadOptions) -> Any:
    from transformers import AutoTokenizer

    if os.path.isdir(src) and not has_tokenizer_files(src):
        raise FileNotFoundError(f"{arg}: {src!r} holds no tokenizer files (tokenizer.json, ...)")
    try:
        return AutoTokenizer.from_pretrained(
            src, local_files_only=opts.local_files_only, trust_remote_code=opts.trust_remote_code
        )
    except OSError as err:
        if os.path.isdir(src):
            raise OSError(f"{arg}: no tokenizer could be loaded from {src!r}: {err}") from err
        raise _not_found(arg, src, opts, err) from None
