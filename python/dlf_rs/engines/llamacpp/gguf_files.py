"""Writing GGUF files for the llama.cpp engine with the ``gguf`` package (no llama.cpp needed).

- :func:`derive_model`: a copy of a GGUF model with fewer layers and/or its normalisation weights
  perturbed: the tests' small model and expert from one shipped GGUF, and the benchmark's stand-in
  expert on a real family (a same-vocabulary model that disagrees with the small one).
- :func:`write_lora`: a LoRA adapter GGUF as llama.cpp's ``llama_adapter_lora_init`` reads it
  (``general.type`` "adapter", ``adapter.type`` "lora", ``adapter.lora.alpha``; per adapted weight
  ``<tensor>.lora_a`` [rank, in] and ``<tensor>.lora_b`` [out, rank], float32), from arrays keyed
  by GGUF tensor name.
- :func:`lora_from_peft`: a PEFT LoRA adapter directory (``adapter_model.safetensors``) as such a
  file: the Llama/Qwen2 module names mapped to GGUF's (``model.layers.3.self_attn.q_proj`` ->
  ``blk.3.attn_q.weight``). llama.cpp's own ``convert_lora_to_gguf.py`` does the same for every
  architecture, from a checkout of llama.cpp.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["derive_model", "lora_from_peft", "write_lora"]

_PEFT_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _gguf() -> Any:
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ImportError('writing GGUF files needs the gguf package: pip install "dlf_rs[gguf]"',
                          name="gguf") from err  # fmt: skip
    return gguf


def _copy_fields(reader: Any, writer: Any, changed: Mapping[str, Any]) -> None:
    gguf = _gguf()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = changed.get(field.name, field.contents())
        writer.add_key_value(field.name, value, vtype, sub_type=sub)


def derive_model(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                 n_layers: int | None = None, perturb: float = 0.0, seed: int = 0,
                 name: str | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """Write ``dst``: ``src`` with only its first ``n_layers`` blocks (default: all) and every
    float32 normalisation weight multiplied by ``1 + perturb * N(0, 1)`` (seeded). Quantised
    tensors are copied byte for byte; the tokenizer and chat template are kept unless
    ``metadata`` (header key -> new value of the same type) replaces them."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    blocks = int(reader.fields[f"{arch}.block_count"].contents())
    keep = blocks if n_layers is None else int(n_layers)
    if not 1 <= keep <= blocks:
        raise ValueError(f"n_layers: expected 1..{blocks} (the model's blocks), got {n_layers}")
    writer = gguf.GGUFWriter(str(dst), arch)
    changed: dict[str, Any] = {f"{arch}.block_count": keep}
    if name is not None:
        changed["general.name"] = name
    changed.update(metadata or {})
    _copy_fields(reader, writer, changed)
    rng = np.random.default_rng(seed)
    tensors = []
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= keep:
            continue
        data = t.data
        if perturb and t.tensor_type == gguf.GGMLQuantizationType.F32 and t.name.endswith(
                "norm.weight"):  # fmt: skip
            noise = rng.standard_normal(data.shape).astype(np.float32)
            data = (data * (1.0 + np.float32(perturb) * noise)).astype(np.float32)
        tensors.append((t, data))
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _t, data in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return Path(dst)


def write_lora(dst: str | os.PathLike[str], architecture: str,
               pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], alpha: float,
               name: str = "lora") -> Path:  # fmt: skip
    """Write a LoRA adapter GGUF: ``pairs`` maps a base tensor's GGUF name (``blk.0.attn_q.weight``)
    to (A [rank, in], B [out, rank]); the update is ``alpha / rank * B @ A``, as PEFT's."""
    gguf = _gguf()
    if not pairs:
        raise ValueError("pairs: expected at least one adapted tensor")
    writer = gguf.GGUFWriter(str(dst), architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", name)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for base, (a, b) in pairs.items():
        a32 = np.ascontiguousarray(a, dtype=np.float32)
        b32 = np.ascontiguousarray(b, dtype=np.float32)
        if a32.ndim != 2 or b32.ndim != 2 or a32.shape[0] != b32.shape[1]:
            raise ValueError(f"pairs[{base!r}]: expected A [rank, in] and B [out, rank], got "
                             f"{a32.shape} and {b32.shape}")  # fmt: skip
        writer.add_tensor(f"{base}.lora_a", a32)
        writer.add_tensor(f"{base}.lora_b", b32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def lora_from_peft(adapter_dir: str | os.PathLike[str], dst: str | os.PathLike[str],
                   architecture: str) -> Path:  # fmt: skip
    """A PEFT LoRA adapter (Llama/Qwen2 module names) as a LoRA adapter GGUF for llama.cpp."""
    from safetensors.torch import load_file  # PEFT writes bfloat16, which numpy cannot hold

    root = Path(adapter_dir)
    cfg = json.loads((root / "adapter_config.json").read_text())
    weights = {k: v.float().numpy() for k, v in
               load_file(str(root / "adapter_model.safetensors")).items()}  # fmt: skip
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pattern = re.compile(r"layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)\.lora_A\.weight$")
    for key, a in weights.items():
        m = pattern.search(key)
        if not m:
            continue
        module = _PEFT_MODULES.get(m.group(2))
        if module is None:
            raise ValueError(f"adapter_dir: module {m.group(2)!r} has no GGUF name here")
        b = weights[key.replace("lora_A", "lora_B")]
        pairs[f"blk.{m.group(1)}.{module}.weight"] = (a, b)
    if not pairs:
        raise ValueError(f"adapter_dir: no LoRA weights with Llama/Qwen2 module names in {root}")
    return write_lora(dst, architecture, pairs, float(cfg.get("lora_alpha", cfg.get("r", 8))),
                      name=root.name)  # fmt: skip
