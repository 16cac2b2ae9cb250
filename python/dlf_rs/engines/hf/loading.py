"""Loading checkpoints for :meth:`FusedGenerator.from_pretrained`: paths, hub ids, safety, dtype.

Where it sits: the first step of the driver's flow; returns loaded Hugging Face causal LMs and the
shared tokenizer. Decisions (README "Loading checkpoints"):
- A string that names an existing directory is loaded from there. A string that looks like a
  path (starts with ``.``, ``/`` or ``~``, ends with ``/``, has a backslash or more than one
  ``/``, or whose first component is an existing local directory, e.g. the mistyped
  ``default_family/large_bse``) and does not exist fails at once, naming the argument.
  Anything else is a hub id, resolved **only from the local Hugging Face cache** unless the
  caller passes ``local_files_only=False``: dlf_rs never downloads unless asked to, and with
  ``local_files_only=True`` (the default) loading makes no network request at all (see
  :func:`hub_scope`: transformers' adapter lookup and huggingface_hub's request headers would
  otherwise reach the hub even for a local-only load).
- Safetensors only: a checkpoint with only pickle weights (``pytorch_model.bin``) is refused
  unless ``allow_pickle=True`` (pickle can run code when loaded).
- ``trust_remote_code`` is False unless the caller passes True explicitly (it runs the
  checkpoint's Python code).
- ``device``: a CUDA device is checked (CUDA usable, index in range) when the options are built,
  before any model loads, as a ``ValueError`` naming ``device``.
- dtype: float32 on CPU unless asked otherwise (float16 matrix work is slow on most CPUs and
  makes padded batches differ from single prompts); on an accelerator the checkpoint's own dtype.
  A ``device_map`` on a machine without CUDA counts as CPU.
- Per-model settings: ``gguf_file``, ``device_map``, ``max_memory`` and ``offload_folder`` take
  one value for every model or a dict keyed by model ("large", "small", "experts" for every
  expert, "expert:<i>" for one), see :func:`per_model`. A GGUF model is a directory (or hub id)
  plus ``gguf_file``, or the path of the ``.gguf`` file itself; transformers de-quantises it.
- LoRA adapters among the experts run as :mod:`dlf_rs.engines.hf.lora` says (``lora_mode``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ...hub import hub_scope
from .runner import oom_hint

__all__ = ["LoadOptions", "check_device", "gguf_to_safetensors", "hub_scope", "load_family",
           "load_model", "load_tokenizer", "parse_dtype", "per_model", "resolve_source"]  # fmt: skip

PER_MODEL = ("gguf_file", "device_map", "max_memory", "offload_folder")


def _is_model_key(key: object) -> bool:
    return isinstance(key, str) and (
        key in ("large", "small", "experts") or (key.startswith("expert:") and key[7:].isdigit())
    )


def per_model(arg: str, value: Any, name: str) -> Any:
    """``value`` for the model ``name`` ("large", "small", "expert:<i>"): a dict whose keys are
    all model names ("large", "small", "experts", "expert:<i>") is per model (a missing model
    gets None; "expert:<i>" beats "experts"), anything else applies to every model (so a
    device_map or max_memory dict of modules or devices is passed as it is)."""
    if isinstance(value, dict) and value and all(_is_model_key(k) for k in value):
        if name in value:
            return value[name]
        return value.get("experts") if name.startswith("expert:") else None
    if isinstance(value, dict) and any(_is_model_key(k) for k in value):
        bad = sorted(str(k) for k in value if not _is_model_key(k))
        raise ValueError(
            f"{arg}: a dict mixing model names and other keys ({bad}); per model use only "
            "'large', 'small', 'experts', 'expert:<i>'"
        )
    return value


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
        gguf_file: Any = None,
        max_memory: Any = None,
        offload_folder: Any = None,
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
        check_device("device", self.device)
        self.device_map = device_map
        self.local_files_only = local_files_only
        self.allow_pickle = allow_pickle
        self.trust_remote_code = trust_remote_code
        self.per_model = {"gguf_file": gguf_file, "device_map": device_map,
                          "max_memory": max_memory, "offload_folder": offload_folder}  # fmt: skip
        for key in ("gguf_file", "offload_folder"):
            for name in ("large", "small", "expert:0"):
                v = per_model(key, self.per_model[key], name)
                if v is not None and not isinstance(v, (str, os.PathLike)):
                    raise TypeError(f"{key}: expected a path string, got {type(v).__name__}")
        dtype = parse_dtype(torch_dtype)
        no_cuda = not torch.cuda.is_available()
        on_cpu = (device_map is None or no_cuda) and (
            self.device is None or self.device.type == "cpu"
        )
        if dtype is None:
            dtype = torch.float32 if on_cpu else "auto"
        # transformers' AutoModel looks for adapter_config.json on the hub with adapter_kwargs,
        # which do not inherit local_files_only (transformers 5.x, auto_factory.from_pretrained).
        adapter_kwargs = dict(extra.get("adapter_kwargs") or {})
        adapter_kwargs.setdefault("local_files_only", local_files_only)
        self.kwargs: dict[str, Any] = {
            **extra,
            "dtype": dtype,
            "local_files_only": local_files_only,
            "trust_remote_code": trust_remote_code,
            "adapter_kwargs": adapter_kwargs,
        }

    def kwargs_for(self, name: str) -> dict[str, Any]:
        """The ``from_pretrained`` keywords of the model ``name`` ("large", "small", ...)."""
        kwargs = dict(self.kwargs)
        for key, value in self.per_model.items():
            v = per_model(key, value, name)
            if v is not None:
                kwargs[key] = os.fspath(v) if key in ("gguf_file", "offload_folder") else v
        return kwargs

    def place(self, model: Any, name: str = "large") -> Any:
        if per_model("device_map", self.device_map, name) is None and self.device is not None:
            model = model.to(self.device)
        return model.eval()


def check_device(arg: str, device: str | torch.device | None) -> None:
    """Refuse a CUDA device that this process cannot use, before any model loads (torch would
    only fail at the first ``.to(device)``, after every checkpoint was read): ``ValueError``
    naming ``arg``."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"{arg}: {str(dev)!r} requested but CUDA is not available here (no NVIDIA GPU or "
            "driver visible to torch); use cpu"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"{arg}: {str(dev)!r} requested but this machine has {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1})"
        )


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
    if os.path.isfile(s) and s.endswith(".gguf"):
        return s  # load_model splits it into its directory and gguf_file
    if os.path.exists(s):
        raise FileNotFoundError(
            f"{arg}: {s!r} is a file; expected a model directory (or a .gguf file)"
        )
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


def load_model(arg: str, src: str, opts: LoadOptions, name: str | None = None) -> Any:
    """A causal LM from a directory, a cached hub id or a GGUF file, with the rules of this
    module; ``name`` ("large", "small", "expert:<i>", default ``arg``) picks per-model settings."""
    from transformers import AutoModelForCausalLM

    name = name or arg
    kwargs = opts.kwargs_for(name)
    if os.path.isfile(src) and src.endswith(".gguf"):
        src, kwargs["gguf_file"] = os.path.split(os.path.abspath(src))
    gguf = kwargs.get("gguf_file")
    if gguf is not None:
        _require_gguf(arg)
        if os.path.isdir(src) and not os.path.isfile(os.path.join(src, gguf)):
            raise FileNotFoundError(f"gguf_file: {gguf!r} is not in {arg}'s directory {src!r}")
    elif os.path.isdir(src):
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
    if not opts.allow_pickle and gguf is None:
        kwargs["use_safetensors"] = True
    try:
        with hub_scope(opts.local_files_only):
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
    return opts.place(model, name)


def _require_gguf(arg: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{arg}: loading a GGUF file needs the gguf package: pip install gguf"
        ) from err


def is_adapter(src: str) -> bool:
    return os.path.isfile(os.path.join(src, "adapter_config.json"))


def has_tokenizer_files(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )


def load_tokenizer(arg: str, src: str, opts: LoadOptions, gguf_file: str | None = None) -> Any:
    """A tokenizer from a directory or hub id, or rebuilt from a GGUF file (slow: seconds for a
    49k vocabulary; pass tokenizer= a directory to skip it)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if os.path.isfile(src) and src.endswith(".gguf"):
        src, gguf_file = os.path.split(os.path.abspath(src))
    if gguf_file is not None:
        _require_gguf(arg)
        kwargs["gguf_file"] = os.fspath(gguf_file)
    elif os.path.isdir(src) and not has_tokenizer_files(src):
        raise FileNotFoundError(f"{arg}: {src!r} holds no tokenizer files (tokenizer.json, ...)")
    try:
        with hub_scope(opts.local_files_only):
            return AutoTokenizer.from_pretrained(
                src,
                local_files_only=opts.local_files_only,
                trust_remote_code=opts.trust_remote_code,
                **kwargs,
            )
    except OSError as err:
        if os.path.isdir(src):
            raise OSError(f"{arg}: no tokenizer could be loaded from {src!r}: {err}") from err
        raise _not_found(arg, src, opts, err) from None


def gguf_to_safetensors(
    gguf: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
) -> str:
    """Converts a GGUF file once into a plain safetensors directory with its tokenizer
    (transformers de-quantises on load; the directory then loads in seconds, without gguf).
    ``dtype``: the saved weights' dtype, float32 by default; "bfloat16" halves the file (a
    1.5B model: 3.6 GB instead of ~7; converting it peaked at 6.0 GB resident). Returns ``out``."""
    opts = LoadOptions(device=None, torch_dtype=dtype, device_map=None, local_files_only=True,
                       allow_pickle=False, trust_remote_code=False, extra={})  # fmt: skip
    src = os.fspath(gguf)
    model = load_model("gguf", src, opts)
    model.hf_quantizer = None  # de-quantised already: plain weights of ``dtype``
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(os.fspath(out))
    load_tokenizer("gguf", src, opts).save_pretrained(os.fspath(out))
    return os.fspath(out)


def _is_peft_model(value: object) -> bool:
    return type(value).__module__.startswith("peft.")


def load_family(
    large: Any, small: Any, experts: Any, tokenizer: Any, opts: LoadOptions, lora_mode: str
) -> tuple[Any, Any, list[Any], Any, list[str], dict[str, Any]]:
    """The models of :meth:`FusedGenerator.from_pretrained`: ``(large, small, experts,
    tokenizer, expert_names, model_tokenizers)``. Every argument is checked before the first
    (slow) load. Experts that are PEFT adapters (directories with ``adapter_config.json`` or
    ``PeftModel`` objects) run on the small base as ``lora_mode`` says (:mod:`dlf_rs.engines.hf.lora`)."""
    from .lora import LORA_MODES, lora_experts

    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode: expected one of {LORA_MODES}, got {lora_mode!r}")
    large_src = resolve_source("large", large)
    small_src = resolve_source("small", small) if small is not None else None
    if isinstance(experts, Sequence) and not isinstance(experts, (str, os.PathLike)):
        peft_at = {i for i, e in enumerate(experts) if _is_peft_model(e)}
        paths = [e for i, e in enumerate(experts) if i not in peft_at]
        srcs = iter(resolve_sources("experts", paths))
        expert_srcs: list[Any] = [
            experts[i] if i in peft_at else next(srcs) for i in range(len(experts))
        ]
    else:
        expert_srcs = list(resolve_sources("experts", experts))
    adapters = [i for i, s in enumerate(expert_srcs) if not isinstance(s, str) or is_adapter(s)]
    if adapters and small_src is None:
        raise ValueError(f"experts[{adapters[0]}]: a LoRA adapter needs the small base (small=)")
    gguf_large = per_model("gguf_file", opts.per_model["gguf_file"], "large")
    if isinstance(tokenizer, (str, os.PathLike)):
        tok_src: str | None = resolve_source("tokenizer", tokenizer)
    else:
        tok_src = large_src if tokenizer is None else None

    large_model = load_model("large", large_src, opts)
    small_model = load_model("small", small_src, opts) if small_src else None
    loaded: dict[int, Any] = {}
    for i, src in enumerate(expert_srcs):
        if i not in adapters:
            loaded[i] = load_model(f"experts[{i}]", src, opts, f"expert:{i}")
    if adapters:
        small_model, lora, _ = lora_experts(
            small_model, [expert_srcs[i] for i in adapters], lora_mode, arg="experts",
            local_files_only=opts.local_files_only,
        )  # fmt: skip
        loaded.update(zip(adapters, lora))
    expert_models = [loaded[i] for i in range(len(expert_srcs))]
    if tok_src is None:
        tok = tokenizer
    elif tok_src == large_src:
        tok = load_tokenizer("tokenizer", tok_src, opts, gguf_large)
    else:
        tok = load_tokenizer("tokenizer", tok_src, opts)
    sources: dict[str, str] = {"large": large_src}
    if small_src:
        sources["small"] = small_src
    sources.update((f"expert:{i}", s) for i, s in enumerate(expert_srcs) if isinstance(s, str))
    model_tokenizers: dict[str, Any] = {}
    for name, src in sources.items():
        if os.path.isdir(src) and has_tokenizer_files(src) and src != tok_src:
            try:
                model_tokenizers[f"{name} ({src})"] = load_tokenizer(name, src, opts)
            except (OSError, ValueError):
                continue
    names = [
        (os.path.basename(os.path.normpath(s)) or s) if isinstance(s, str) else f"expert:{i}"
        for i, s in enumerate(expert_srcs)
    ]
    return large_model, small_model, expert_models, tok, names, model_tokenizers
