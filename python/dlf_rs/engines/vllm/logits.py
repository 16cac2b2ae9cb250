"""``DlfLogitsProcessor``: per-request DLF options and alpha logs in vLLM (V1 model runner).

Pass it to vLLM (``LLM(dir, logits_processors=[dlf_rs.engines.vllm.PROCESSOR])`` or ``vllm serve dir
--logits-processors dlf_rs.engines.vllm.logits:DlfLogitsProcessor``; ``dlf-rs serve`` does it). It is
not registered through vLLM's entry points on purpose: vLLM refuses every custom logits
processor when speculative decoding is on, so an automatic one would break that for every model.
A fused engine that speculates runs without it: the model fuses every position with the
directory's defaults, and requests that set ``dlf_*`` options are refused (HTTP 400; docs/vllm.md,
"Speculative decoding").

- ``validate_params`` runs in vLLM's frontend when a request arrives: a bad ``dlf_*`` value is a
  ``ValueError`` naming the field, which vLLM's server answers with HTTP 400.
- ``update_state`` tracks, per batch row, the request's options (``dlf_*`` extra arguments over
  the directory's defaults) and its alpha-log tag.
- ``apply`` runs after the fused model's ``compute_logits`` on the same rows: rows whose options
  differ from the defaults are fused again from the member logits the model kept
  (:mod:`dlf_rs.engines.vllm.state`); the change is added to vLLM's logits, so masks vLLM applied before
  (allowed tokens, bad words, grammar, logit bias) stay. Tagged rows append their alphas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..fusion import fuse_rows
from .spec import FusedConfigError, alpha_dir, frontend_spec, request_options
from .state import STATE

logger = init_logger(__name__)

__all__ = ["DlfLogitsProcessor"]


class DlfLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Every value, and with ``$DLF_RS_FUSED_DIR`` (set by ``dlf-rs serve`` and
        :func:`dlf_rs.engines.vllm.llm`) the expert count too; ``FusedConfigError`` is a ValueError,
        which vLLM's server answers with HTTP 400 naming the field."""
        spec = frontend_spec()
        request_options(
            sampling_params.extra_args,
            None if spec is None else spec.options,
            None if spec is None else len(spec.experts),
        )

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # batch row -> (options or None for the defaults, alpha-log tag, the output token list)
        self.rows: dict[int, tuple[Any, str | None, list[int]]] = {}
        self.logs: dict[str, IO[str]] = {}
        try:  # with tensor parallelism every rank samples the same rows: rank 0 writes the logs
            from vllm.distributed import get_tensor_model_parallel_rank

            self.writes_logs = get_tensor_model_parallel_rank() == 0
        except (ImportError, AssertionError, RuntimeError):
            self.writes_logs = True

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, params, _prompt, out in batch_update.added:
            self.rows.pop(i, None)
            if params is None or not params.extra_args:
                continue
            try:
                opts, tag = request_options(
                    params.extra_args, STATE.defaults,
                    None if STATE.spec is None else len(STATE.spec.experts),
                )  # fmt: skip
            except FusedConfigError as e:
                # Passed a frontend that did not know the expert count (no $DLF_RS_FUSED_DIR):
                # raising here would stop the engine, so the row keeps the defaults, loudly.
                logger.error("dlf_rs: request options refused, the defaults apply: %s", e)
                opts, tag = None, None
            if opts is not None and opts == STATE.defaults:
                opts = None
            if opts is not None or tag is not None:
                self.rows[i] = (opts, tag, out)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows or STATE.spec is None:
            return logits
        n = logits.shape[0]
        large, small, experts, alphas = STATE.take(n)
        refuse = sorted(i for i, (o, _, _) in self.rows.items() if o is not None and i < n)
        if refuse:
            idx = torch.as_tensor(refuse, device=large.device)
            sub = [x.index_select(0, idx) for x in (large, small, *experts)]
            before = STATE.fused.index_select(0, idx)
            after, a_rows = fuse_rows(sub[0], sub[1], sub[2:], [self.rows[i][0] for i in refuse])
            delta = (after - before).to(device=logits.device, dtype=logits.dtype)
            logits.index_add_(0, idx.to(logits.device), delta)
            alphas = alphas.copy()
            alphas[refuse] = a_rows
        for i, (_, tag, out) in self.rows.items():
            if tag is not None and i < n and self.writes_logs:
                self._log(tag, len(out), alphas[i])
        return logits

    def _log(self, tag: str, step: int, alphas: np.ndarray) -> None:
        f = self.logs.get(tag)
        if f is None:
            d = alpha_dir(STATE.spec)
            d.mkdir(parents=True, exist_ok=True)
            f = self.logs[tag] = Path(d, f"{tag}.jsonl").open("a")  # noqa: SIM115 - kept open
        vals = [None if not np.isfinite(a) else float(a) for a in alphas]
        f.write(json.dumps({"step": step, "alphas": vals}) + "\n")
        f.flush()
