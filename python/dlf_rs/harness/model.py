"""The lm-evaluation-harness model "dlf": DLF (or static fusion, or one model) as an ``lm_eval`` LM.

Where it sits: between lm-evaluation-harness and ``dlf_rs``. The harness builds requests from its
tasks and calls ``loglikelihood`` (multiple choice: TruthfulQA MC2, MMLU), ``loglikelihood_rolling``
(perplexity) and ``generate_until`` (GSM8K, TriviaQA, CNN/DM); this class answers them with
:mod:`dlf_rs.engines.hf.scoring` (one forward per model over context + continuation, the core over every
continuation position) and ``FusedGenerator.generate`` (greedy or sampled fused decoding).

Configured by the harness's ``model_args`` string (``lm_eval --model dlf --model_args ...``):
  large, small, experts   paths or hub ids; experts separated by ';'
  family                  "default" (the shipped checkpoints) or a family directory: fills in
                          large/small and resolves expert names such as "qa" (default: all)
  method                  dlf (default) | static | large | expert
  alpha                   static weight(s): one float or T floats separated by ';'
  expert                  method=expert: index or name of the expert
  solver, grid_step, multi_expert, support_k, alpha_range (lo:hi)   passed to fuse_step
  dtype (float32), device (cuda if available, else cpu), batch_size (16), threads, seed,
  max_length (default: the shortest model context)
batch_size and device may also come from the harness's --batch_size/--device; a value in
model_args wins. A cuda device without CUDA falls back to cpu (the harness's default is cuda:0).
Data parallel: under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1) every process loads
the models, the harness gives each rank its share of the documents (as for its own ``hf`` model)
and gathers the metrics through ``all_gather`` / ``gather_object`` below.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

# lm_eval fills its registry with its own models only while it is empty: registering "dlf"
# first would hide "hf" and the others from in-process callers, so they go in first.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dlf_rs.engines.hf import scoring
from dlf_rs.options import StepOptions

from . import _family

log = logging.getLogger(__name__)



def _split_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected names separated by ';', got {type(value).__name__}")
    return [v.strip() for v in value.split(";") if v.strip()]


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {value!r}") from None


def _int(value: Any, name: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return value


def parse_alpha(value: Any) -> float | list[float] | None:
    """``1.0`` -> 1.0; ``"0.5;1.5"`` -> [0.5, 1.5] (one per expert); None -> None."""
    if value is None:
        return None
    if isinstance(value, str) and ";" in value:
        return [_float(v, f"alpha[{i}]") for i, v in enumerate(_split_list(value, "alpha"))]
    return _float(value, "alpha")


def parse_alpha_range(value: Any) -> tuple[float, float]:
    """``"0:2"`` -> (0.0, 2.0)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (_float(value[0], "alpha_range[0]"), _float(value[1], "alpha_range[1]"))
    if not isinstance(value, str) or value.count(":") != 1:
        raise ValueError(f"alpha_range: expected 'lo:hi' (for example 0:2), got {value!r}")
    lo, hi = value.split(":")
    return (_float(lo, "alpha_range[0]"), _float(hi, "alpha_range[1]"))


def resolve_family(
    family: Any, large: Any, small: Any, experts: list[str]
) -> tuple[str, str | None, list[str]]:
    """Paths of the models: ``family`` ("default" or a directory of a trained family) fills in
    the large and small base and turns expert names ("qa") into its checkpoints."""
    if family is None:
        if large is None:
            raise ValueError("large: required (or family=default for the shipped checkpoints)")
        return str(large), None if small is None else str(small), experts
    root = _family.DEFAULT_FAMILY if family == "default" else Path(str(family)).expanduser()
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"family: {str(root)!r} is not a trained family (no manifest.json)")
    names = experts or [f"small_expert_{t}" for t in _family.world.SEEN_TASKS]
    paths = []
    for name in names:
        cand = [root / name, root / f"small_expert_{name}", Path(name).expanduser()]
        hit = next((c for c in cand if (c / "config.json").is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"experts: no checkpoint {name!r} in family {str(root)!r}")
        paths.append(str(hit))
    return (
        str(large) if large is not None else str(root / "large_base"),
        str(small) if small is not None else str(root / "small_base"),
        paths,
    )


@register_model("dlf")
class DLFLM(TemplateLM):
    """lm-evaluation-harness model over :class:`dlf_rs.FusedGenerator` (see the module doc)."""

    def __init__(
        self,
        large: str | None = None,
        small: str | None = None,
        experts: str | None = None,
        family: str | None = None,
        method: str | None = None,
        alpha: Any = None,
        expert: Any = None,
        solver: str | None = None,
        grid_step: Any = None,
        multi_expert: str | None = None,
        support_k: Any = None,
        alpha_range: Any = None,
        lora_mode: str = "auto",
        dtype: str = "float32",
        device: str | None = None,
        batch_size: Any = 16,
        max_batch_size: Any = None,  # accepted from the harness; the batch size is fixed
        threads: Any = None,
        seed: Any = 0,
        max_length: Any = None,
        generator: Any = None,
    ) -> None:
        super().__init__()
        import torch

        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            log.warning("batch_size: 'auto' is not supported by dlf; using 16")
            batch_size = 16
        self.batch_size = _int(batch_size, "batch_size")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {self.batch_size}")
        if threads is not None:
            torch.set_num_threads(_int(threads, "threads"))
        self.seed = _int(seed, "seed")
        # model_args left out take the record's defaults (dlf_rs.StepOptions, the core's).
        given: dict[str, Any] = {
            "method": method,
            "alpha": parse_alpha(alpha),
            "alpha_range": None if alpha_range is None else parse_alpha_range(alpha_range),
            "grid_step": None if grid_step is None else _float(grid_step, "grid_step"),
            "solver": solver,
            "multi_expert": multi_expert,
            "support_k": None if support_k is None else _int(support_k, "support_k"),
        }
        self._given_options = {k: v for k, v in given.items() if v is not None}
        # Checked before any model loads (the expert's name is resolved after loading).
        early: dict[str, Any] = dict(self._given_options)
        if method == "expert":
            early["expert"] = 0
        StepOptions(**early)

        self.accelerator = None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device: %s requested but CUDA is not available; using cpu", device)
            device = "cpu"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            acc = Accelerator(cpu=str(device).startswith("cpu"))
            if acc.num_processes > 1:
                self.accelerator = acc
                self._rank = acc.process_index
                self._world_size = acc.num_processes
                if str(device).startswith("cuda"):
                    device = f"cuda:{acc.local_process_index}"
        self._device = torch.device(device)

        if generator is None:
            from dlf_rs.engines.hf.generate import FusedGenerator

            lpath, spath, epaths = resolve_family(
                family, large, small, _split_list(experts, "experts")
            )
            generator = FusedGenerator.from_pretrained(
                lpath, spath, epaths, device=str(self._device), torch_dtype=dtype,
                lora_mode=lora_mode,
            )  # fmt: skip
        self.gen = generator
        self.tokenizer = generator.tokenizer
        idx = self._expert_index(expert)
        # One record for every request, checked now (not at the first request).
        final: dict[str, Any] = dict(self._given_options)
        if idx is not None:
            final["expert"] = idx
        self.options = StepOptions(**final)
        self.method = self.options.method
        self.expert = self.options.expert
        self.limit = scoring.context_limit(generator, self.method, self.expert)
        self._max_length = None if max_length is None else _int(max_length, "max_length")

    # ------------------------------------------------------------------ harness plumbing
    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> DLFLM:
        # The harness always adds its --batch_size/--device values (1 and cuda:0 by default):
        # a value given in model_args wins instead of colliding with them.
        extra = {
            k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict
        }
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> DLFLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _expert_index(self, expert: Any) -> int | None:
        if expert is None or isinstance(expert, int):
            return expert
        names = list(self.gen.expert_names)
        for i, name in enumerate(names):
            if expert in (name, name.removeprefix("small_expert_")):
                return i
        raise ValueError(f"expert: {expert!r} is not one of the experts {names}")

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.gen.pad_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        if self._max_length is not None:
            return self._max_length
        return self.limit if self.limit is not None else 2048

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "dlf")).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        # Special tokens by default, as FusedGenerator tokenizes prompts: a context is scored
        # the way a prompt is decoded (for Llama: with BOS).
        special = True if add_special_tokens is None else add_special_tokens
        return [int(t) for t in self.tokenizer(string, add_special_tokens=special)["input_ids"]]

    def all_gather(self, tensor: Any) -> Any:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> Any:
        if self.accelerator is None:
            return [obj]
        import torch.distributed as dist

        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _score_options(self) -> dict[str, Any]:
        return {"options": self.options, "batch_size": self.batch_size}

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(
        self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        # Longest first (like the harness's own models): similar lengths share a batch, and the
        # first batch shows at once whether the largest one fits in memory.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        opts = self._score_options()
        step = self.batch_size
        for start in tqdm(range(0, len(order), step), disable=disable_tqdm or self.rank != 0,
                          desc="dlf loglikelihood"):
            idx = order[start : start + step]
            res = scoring.score_ids(
                self.gen, [requests[i][1] for i in idx], [requests[i][2] for i in idx], **opts
            )
            for i, r in zip(idx, res):
                out[i] = (r.total, r.is_greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return [o for o in out if o is not None]

    def loglikelihood_rolling(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[float]:
        texts = [req.args[0] for req in requests]
        res = scoring.score_rolling(
            self.gen, texts, max_length=self.max_length, prefix_token_id=self.prefix_token_id,
            **self._score_options(),
        )  # fmt: skip
        out = []
        for req, r in zip(requests, res):
            out.append(r.total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), r.total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        # Requests with the same generation settings are decoded together, in request order, in
        # batches of batch_size (so a run's batches are those of `dlf-rs demo` on the same set).
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="dlf generate_until")
        for idx in groups.values():
            kwargs = self._generate_kwargs(dict(requests[idx[0]].args[1]))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                prompts = [self._fit(requests[i].args[0], kwargs["max_new_tokens"]) for i in chunk]
                res = self.gen.generate(prompts, **kwargs)
                for i, text in zip(chunk, res.texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return [o if o is not None else "" for o in out]

    def _generate_kwargs(self, gk: dict[str, Any]) -> dict[str, Any]:
        until = gk.pop("until", None)
        stops = [until] if isinstance(until, str) else list(until or [])
        max_new = _int(gk.pop("max_gen_toks", 256), "max_gen_toks")
        do_sample = bool(gk.pop("do_sample", False))
        temperature = _float(gk.pop("temperature", 1.0 if do_sample else 0.0), "temperature")
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "options": self.options,
            "stop": [s for s in stops if s] or None,
            "temperature": temperature if do_sample else 0.0,
        }
        if do_sample:
            kwargs["top_p"] = _float(gk.pop("top_p", 1.0), "top_p")
            kwargs["top_k"] = _int(gk.pop("top_k", 0) or 0, "top_k")
            kwargs["seed"] = self.seed
        for key in ("top_p", "top_k"):
            gk.pop(key, None)
        if gk:
            log.warning("dlf: generation settings ignored: %s", sorted(gk))
        return kwargs

    def _fit(self, context: str, max_new_tokens: int) -> str:
        """The context, cut from the left (in tokens) so that it and the generation fit."""
        room = self.max_length - max_new_tokens
        ids = self.tok_encode(context)
        if len(ids) <= room:
            return context
        if room < 1:
            raise ValueError(
                f"max_gen_toks: {max_new_tokens} leaves no room for a context in {self.max_length}"
            )
        log.warning("dlf: a context of %d tokens was cut to its last %d", len(ids), room - 1)
        kept = self.tokenizer.decode(ids[-(room - 1) :], skip_special_tokens=True)
        return str(kept)

