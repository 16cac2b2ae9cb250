"""Task arithmetic: one small expert merged from several, theta_S + sum_t lambda_t (theta_t - theta_S).

Where it sits: before decoding. :func:`task_arithmetic` reads the small base and T experts
(full checkpoints or PEFT LoRA adapters, safetensors only) and writes the merged weights as
safetensors; written into a directory it also copies the base's config and tokenizer files, so
the result loads as an expert like any other (``FusedGenerator.from_pretrained(...,
experts=[out])``). The paper combines DLF with experts made this way ("combine experts from task
arithmetic"); method.md's single lambda is ``lambdas=lam`` (one float for every expert).

A LoRA adapter's task vector is its weight update, computed here from its own files:
``delta W = s * B @ A`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA),
transposed for ``fan_in_fan_out`` layers; per-module rank or alpha patterns are applied. DoRA
and other adapter types are refused (merge them with peft's ``merge_and_unload`` first).
Arithmetic runs in float32 (float64 for float64 weights) and is cast back to the base's dtype.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["load_state", "merged_model", "task_arithmetic", "task_arithmetic_state"]

_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")  # fmt: skip


def _files(arg: str, path: str) -> list[str]:
    """The safetensors files of a checkpoint: a file, or a directory's ``*.safetensors``."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"{arg}: {path!r} is not a .safetensors file (safetensors only)")
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{arg}: {path!r} does not exist")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{arg}: {path!r} holds no *.safetensors weights (safetensors only)"
        )
    return files


def load_state(arg: str, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (a file or a directory, sharded or not)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _files(arg, os.fspath(path)):
        state.update(load_file(f))
    return state


def _is_adapter(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def _base_key(arg: str, key: str) -> tuple[str, str] | None:
    """``(module, "A"|"B")`` of a LoRA key such as
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    for part in ("A", "B"):
        tag = f".lora_{part}."
        if tag in key:
            module = key.split(tag)[0].removeprefix("base_model.model.")
            return module, part
    if ".lora_" in key or "lora_magnitude" in key:
        raise ValueError(f"{arg}: unsupported adapter tensor {key!r} (only plain LoRA A/B)")
    return None


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pat, value in patterns.items():
        if module == pat or module.endswith("." + pat):
            return value
    return default


def adapter_delta(arg: str, path: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weight update ``theta_t - theta_S`` of a LoRA adapter directory, keyed like ``base``."""
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise ValueError(
            f"{arg}: {path!r} is not a plain LoRA adapter (peft_type={cfg.get('peft_type')!r}, "
            f"use_dora={cfg.get('use_dora')}); merge it with peft's merge_and_unload first"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_state(arg, path).items():
        found = _base_key(arg, key)
        if found is None:
            # modules_to_save: full copies of whole modules; their update is the copy - base.
            target = key.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "")
            if ".modules_to_save." in key or target in base:
                pairs.setdefault(target, {})["full"] = value
                continue
            raise ValueError(f"{arg}: adapter tensor {key!r} matches no base weight")
        module, part = found
        pairs.setdefault(f"{module}.weight", {})[part] = value
    delta: dict[str, torch.Tensor] = {}
    for key, parts in pairs.items():
        if key not in base:
            raise ValueError(f"{arg}: the adapter changes {key!r}, which the base does not have")
        w = base[key]
        if "full" in parts:
            delta[key] = parts["full"].to(_work(w)) - w.to(_work(w))
            continue
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{arg}: {key!r} has lora_{next(iter(parts))} without its partner")
        a, b = parts["A"].to(_work(w)), parts["B"].to(_work(w))
        module = key.removesuffix(".weight")
        r = _pattern(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        d = scale * (b @ a)
        if cfg.get("fan_in_fan_out"):
            d = d.T
        if d.shape != w.shape:
            raise ValueError(
                f"{arg}: the update of {key!r} has shape {tuple(d.shape)} but the base weight "
                f"has {tuple(w.shape)}"
            )
        delta[key] = d
    return delta


def _work(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _lambdas(lambdas: float | Sequence[float], n: int) -> list[float]:
    if isinstance(lambdas, bool):
        raise TypeError(f"lambdas: expected a float or {n} floats, got {lambdas!r}")
    if isinstance(lambdas, (int, float)):
        out = [float(lambdas)] * n
    elif isinstance(lambdas, Sequence) and not isinstance(lambdas, str):
        out = []
        for i, v in enumerate(lambdas):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"lambdas[{i}]: expected a float, got {type(v).__name__}")
            out.append(float(v))
        if len(out) != n:
            raise ValueError(f"lambdas: {len(out)} values for {n} experts")
    else:
        raise TypeError(f"lambdas: expected a float or {n} floats, got {type(lambdas).__name__}")
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise ValueError(f"lambdas[{i}]: expected a finite value, got {v}")
    return out


def task_arithmetic_state(
    base: dict[str, torch.Tensor],
    experts: Sequence[dict[str, torch.Tensor]],
    lambdas: float | Sequence[float],
    *,
    names: Sequence[str] | None = None,
    deltas: Sequence[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """``base + sum_t lambdas[t] * (experts[t] - base)`` over state dicts. An expert marked in
    ``deltas`` is already a task vector (only the keys it changes). Every full expert must have
    the base's keys, shapes and dtypes (errors name ``experts[t]`` and the key)."""
    if not experts:
        raise ValueError("experts: at least one expert is needed")
    lam = _lambdas(lambdas, len(experts))
    names = list(names or [f"experts[{t}]" for t in range(len(experts))])
    is_delta = list(deltas or [False] * len(experts))
    for t, sd in enumerate(experts):
        if is_delta[t]:
            continue
        missing, extra = sorted(set(base) - set(sd)), sorted(set(sd) - set(base))
        if missing or extra:
            raise ValueError(
                f"{names[t]}: tensors differ from the base's (missing {missing[:3]}, "
                f"extra {extra[:3]}); task arithmetic needs one architecture"
            )
        for key, w in base.items():
            if sd[key].shape != w.shape:
                raise ValueError(
                    f"{names[t]}: {key!r} has shape {tuple(sd[key].shape)}, the base's "
                    f"{tuple(w.shape)}"
                )
            if sd[key].dtype != w.dtype:
                raise ValueError(
                    f"{names[t]}: {key!r} is {sd[key].dtype}, the base's is {w.dtype}; convert "
                    "the checkpoints to one dtype first"
                )
    out: dict[str, torch.Tensor] = {}
    for key, w in base.items():
        if not w.is_floating_point():
            out[key] = w.clone()  # integer buffers are not weights
            continue
        acc = w.to(_work(w)).clone()
        for t, sd in enumerate(experts):
            if is_delta[t]:
                if key in sd:
                    acc += lam[t] * sd[key].to(acc.dtype)
            else:
                acc += lam[t] * (sd[key].to(acc.dtype) - w.to(acc.dtype))
        out[key] = acc.to(w.dtype).contiguous()
    return out


def task_arithmetic(
    base: str | os.PathLike[str],
    experts: Sequence[str | os.PathLike[str]],
    lambdas: float | Sequence[float],
    out: str | os.PathLike[str],
) -> str:
    """Write ``theta_S + sum_t lambdas[t] (theta_t - theta_S)`` to ``out`` and return its path.

    ``base``: the small base (a model directory or a ``.safetensors`` file). ``experts``: full
    checkpoints of the same architecture or LoRA adapter directories on that base. ``lambdas``:
    one float for every expert or one per expert. ``out``: a ``.safetensors`` file, or a
    directory that receives ``model.safetensors`` plus the base's config and tokenizer files
    (loadable as an expert). Shapes and dtypes are checked; errors name the argument."""
    from safetensors.torch import save_file

    if isinstance(experts, (str, os.PathLike)):
        raise TypeError(f"experts: expected a list of paths, got one path {os.fspath(experts)!r}")
    base_path = os.fspath(base)
    base_state = load_state("base", base_path)
    states, deltas, names = [], [], []
    for t, e in enumerate(experts):
        if not isinstance(e, (str, os.PathLike)):
            raise TypeError(f"experts[{t}]: expected a path, got {type(e).__name__}")
        path = os.fspath(e)
        arg = f"experts[{t}]"
        if _is_adapter(path):
            states.append(adapter_delta(arg, path, base_state))
            deltas.append(True)
        else:
            states.append(load_state(arg, path))
            deltas.append(False)
        names.append(arg)
    merged = task_arithmetic_state(base_state, states, lambdas, names=names, deltas=deltas)
    out_path = os.fspath(out)
    if out_path.endswith(".safetensors"):
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        target = out_path
    else:
        if os.path.isfile(out_path):
            raise FileExistsError(
                f"out: {out_path!r} is a file; expected a directory or *.safetensors"
            )
        os.makedirs(out_path, exist_ok=True)
        target = os.path.join(out_path, "model.safetensors")
        if os.path.isdir(base_path):
            for name in _COPY:
                src = os.path.join(base_path, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(out_path, name))
    lam = _lambdas(lambdas, len(states))
    meta = {"format": "pt", "dlf_rs": "task_arithmetic", "lambdas": json.dumps(lam)}
    save_file(merged, target, metadata=meta)
    return out_path


def merged_model(base: Any, experts: Sequence[Any], lambdas: float | Sequence[float]) -> Any:
    """A loaded model with task-arithmetic weights: a copy of ``base`` (a torch module) whose
    state is :func:`task_arithmetic_state` of the experts' (same architecture)."""
    import copy

    sd = task_arithmetic_state(base.state_dict(), [e.state_dict() for e in experts], lambdas)
    model = copy.deepcopy(base)
    model.load_state_dict(sd)
    return model.eval()
