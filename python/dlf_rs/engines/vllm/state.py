"""What a worker's fused model leaves for its logits processor (no vLLM import).

One fused model runs per worker process; its ``compute_logits`` records here the member logits
and the weights it fused with (the directory's default options) for the rows it returned, and
:class:`dlf_rs.engines.vllm.logits.DlfLogitsProcessor`, which vLLM's sampler runs next on those very
rows, re-fuses the rows of requests that carry their own options and logs alphas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...options import StepOptions

PROCESSOR = "dlf_rs.engines.vllm.logits:DlfLogitsProcessor"


@dataclass
class WorkerState:
    spec: Any = None
    per_request: bool = False
    large: Any = None
    small: Any = None
    experts: list[Any] = field(default_factory=list)
    alphas: np.ndarray | None = None
    fused: Any = None

    @property
    def defaults(self) -> StepOptions | None:
        return None if self.spec is None else self.spec.options

    def remember(
        self, large: Any, small: Any, experts: list[Any], alphas: np.ndarray, fused: Any
    ) -> None:
        self.large, self.small, self.experts = large, small, list(experts)
        self.alphas, self.fused = alphas, fused

    def take(self, rows: int) -> tuple[Any, Any, list[Any], np.ndarray]:
        """The last step's member logits and alphas, checked to be for ``rows`` rows."""
        made = -1 if self.large is None else int(self.large.shape[0])
        if made != rows or self.alphas is None:
            raise RuntimeError(
                f"dlf_rs: the logits processor got {rows} rows but the fused model's last "
                f"compute_logits produced {made}; the two must run in one worker, in order"
            )
        return self.large, self.small, self.experts, self.alphas


STATE = WorkerState()


def configure(spec: Any, per_request: bool) -> None:
    """Called by the fused model when vLLM builds it in this worker."""
    STATE.spec = spec
    STATE.per_request = per_request
