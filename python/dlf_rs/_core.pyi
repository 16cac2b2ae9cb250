"""Typed stub of the Rust extension `dlf_rs._core` (rust/python.rs). Call it through the checked
wrappers in `dlf_rs` (`fuse_step`, `fuse_logits`, `sample`): they convert and check the inputs
this layer expects (C-contiguous float32 2-D numpy arrays)."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__version__: str

class DlfError(ValueError):
    """Invalid input to the decode core; the message names the argument, expected and actual."""

class StepResult:
    """Per-row results of one `fuse_step`; every array getter returns a fresh copy."""

    @property
    def batch(self) -> int: ...
    @property
    def n_experts(self) -> int: ...
    @property
    def tokens(self) -> npt.NDArray[np.int64]: ...
    @property
    def alphas(self) -> npt.NDArray[np.float32]: ...
    @property
    def loss(self) -> npt.NDArray[np.float32]: ...
    @property
    def active(self) -> npt.NDArray[np.int64]: ...
    @property
    def kl_fused_large(self) -> npt.NDArray[np.float32]: ...
    @property
    def kl_large_fused(self) -> npt.NDArray[np.float32]: ...
    @property
    def kl_expert_small(self) -> npt.NDArray[np.float32]: ...
    @property
    def kl_small_expert(self) -> npt.NDArray[np.float32]: ...
    @property
    def support_size(self) -> npt.NDArray[np.uint32]: ...
    def __len__(self) -> int: ...

def fuse_step(
    large: npt.NDArray[np.float32],
    small: npt.NDArray[np.float32],
    experts: Sequence[npt.NDArray[np.float32]],
    *,
    alpha: Sequence[float] | None = None,
    alpha_min: float = 0.0,
    alpha_max: float = 2.0,
    grid_step: float = 0.1,
    solver: str = "grid",
    multi_expert: str = "one-active",
    support_k: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
) -> StepResult: ...
def fuse_logits(
    large: npt.NDArray[np.float32],
    small: npt.NDArray[np.float32],
    experts: Sequence[npt.NDArray[np.float32]],
    alphas: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]: ...
def sample(
    logits: npt.NDArray[np.float32],
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
) -> npt.NDArray[np.int64]: ...
