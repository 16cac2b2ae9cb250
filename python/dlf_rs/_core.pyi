"""Typed stub of the Rust extension `dlf_rs._core` (rust/python/). Call it through the checked
wrappers in `dlf_rs` (`fuse_step`, `fuse_logits`, `sample`): they convert and check the inputs
this layer expects (C-contiguous float32 2-D numpy arrays).

The step options travel as one `CoreOptions` (built and checked once; `dlf_rs.StepOptions`
builds it), every field a required keyword of its constructor (the defaults live in `DEFAULTS`
only); seeds are optional. A long call can be interrupted with Ctrl-C (KeyboardInterrupt within
about 50 ms). A Rust panic (a bug) surfaces as one `DlfInternalError` per call. Input arrays are
borrowed without copying: writing to them from another thread during a call is not supported (a
`DlfError` saying the input changed when detected)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

DEFAULTS: dict[str, Any]
# "portable" | "avx2" | "avx512": the kernels' instruction tier (capped by DLF_RS_SIMD).
SIMD_TIER: str
"""Every step option's default, from the Rust `Default` impls (the single source): alpha_min,
alpha_max, grid_step, solver, multi_expert, support_k, temperature, top_k, top_p, min_p,
repetition_penalty, frequency_penalty, presence_penalty, speculative, and the limits max_grid_points, max_abs_alpha and max_draft_len."""

class DlfError(ValueError):
    """Invalid input to the decode core; the message names the argument, expected and actual."""

class DlfInternalError(DlfError):
    """A bug in the core (a caught Rust panic): one message per call saying how to report it."""

def _panic_for_tests(rows: int, *, threaded: bool = False) -> None:
    """Not API: panics inside `rows` core rows, to test the panic boundary."""

# The names `multi_expert` and `solver` take, from the core's enums.
MULTI_EXPERT_RULES: tuple[str, ...]
SOLVERS: tuple[str, ...]

class CoreOptions:
    """Every option of a decoding step as the core's types, checked by the core's rules when
    built (DlfError naming the field, as `fuse_step` would); immutable, passed whole to
    `fuse_step`, `fuse_verify` and `sample`. `alpha`: None (weights solved per row), one weight
    (repeated for each of a call's experts) or one per expert (checked against T by each call).
    `speculative` (the generator's option) is refused with an active penalty."""

    def __init__(
        self,
        *,
        alpha: float | Sequence[float] | None,
        alpha_min: float,
        alpha_max: float,
        grid_step: float,
        solver: str,
        multi_expert: str,
        support_k: int | None,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        repetition_penalty: float,
        frequency_penalty: float,
        presence_penalty: float,
        speculative: int | str | None = None,
    ) -> None: ...
    def static_alphas(self, n_experts: int) -> list[float] | None:
        """The static weights for `n_experts` experts (what `fuse_step` uses); None when solved."""

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
    @property
    def certified(self) -> npt.NDArray[np.bool_]: ...
    @property
    def fallback(self) -> npt.NDArray[np.bool_]: ...
    def __len__(self) -> int: ...

def fuse_step(
    large: npt.NDArray[np.float32],
    small: npt.NDArray[np.float32],
    experts: Sequence[npt.NDArray[np.float32]],
    options: CoreOptions,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    history: npt.NDArray[np.int64] | None = None,
    history_offsets: npt.NDArray[np.int64] | None = None,
    fused_out: npt.NDArray[np.float32] | None = None,
) -> StepResult:
    """`history` (int64, flat, negative ids are padding) and `history_offsets` (int64 [B + 1]:
    row b is history[offsets[b]:offsets[b + 1]]) together: the tokens each row has seen, needed
    when a penalty is active (applied to the fused row before the draw), ignored otherwise.
    `fused_out`: a writable C-contiguous float32 [B, V] array, not sharing memory with an
    input, that receives the fused logits of the returned alphas (before penalties): what
    `fuse_logits` returns for them, bit for bit."""

def fuse_logits(
    large: npt.NDArray[np.float32],
    small: npt.NDArray[np.float32],
    experts: Sequence[npt.NDArray[np.float32]],
    alphas: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]: ...
def sample(
    logits: npt.NDArray[np.float32],
    options: CoreOptions,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    history: npt.NDArray[np.int64] | None = None,
    history_offsets: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.int64]: ...

class VerifyResult:
    """Per-row results of one `fuse_verify`: `accepted` [B]; per position `tokens` [B, P] (-1
    past the emitted ones), `alphas` [B, P, T], traces [B, P] / [B, P, T] (NaN past them)."""

    @property
    def batch(self) -> int: ...
    @property
    def positions(self) -> int: ...
    @property
    def n_experts(self) -> int: ...
    @property
    def accepted(self) -> npt.NDArray[np.int64]: ...
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

def fuse_verify(
    large: npt.NDArray[np.float32],
    small: npt.NDArray[np.float32],
    experts: Sequence[npt.NDArray[np.float32]],
    draft_tokens: npt.NDArray[np.int64],
    draft_lens: Sequence[int],
    options: CoreOptions,
    *,
    draft_logits: npt.NDArray[np.float32] | None,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
) -> VerifyResult:
    """Speculative verification (rust/verify.rs): model logits [B, P, V] (P = k + 1; position j
    after the row's first j drafted tokens), drafted tokens [B, k], per-row draft lengths, and
    when sampling the draft's logits [B, k, V]. Greedy: drafts accepted while they equal the
    fused argmax; sampling: accepted with min(1, p/q), else a draw from max(0, p - q). The
    penalties must be off (DlfError naming the first one that is not)."""
