"""One record for every option of a decoding step: :class:`StepOptions`.

Where it sits: the first thing every entry point builds (``fuse_step``, ``sample``,
``FusedGenerator.generate`` and ``score``, the CLI, the bench), then passes down whole; no layer
below re-defaults a field. The defaults come from the Rust core (``dlf_rs._core.DEFAULTS``, built
from ``rust/config.rs``), the value rules are the core's own: the record builds the core's options
object once (``_core.CoreOptions``, ``rust/python/options.rs``), which checks every value and is
what ``fuse_step``, ``fuse_verify`` and ``sample`` take. This file adds only what the core cannot
see: Python types.

Type rules (decided once, here): no coercion that turns a wrong value into a right-looking one.
A float where an int is expected is a ``TypeError`` (2.7 is not 2); ``bool`` is never an int or a
float; numpy scalars count as the Python numbers they hold. Values are the core's business
(``DlfError``, a ``ValueError``): see the field list below, and README "Options".

Seeds are not part of the record (they change every call and every step); their one rule is
:func:`check_seed`.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, overload

import numpy as np

# The rule and solver names are the core's enums' (rust/python/options.rs); MULTI_EXPERT_RULES is
# also this module's name for them ("one-active", the paper's rule, is the default).
from ._core import DEFAULTS, MULTI_EXPERT_RULES, SOLVERS, CoreOptions, DlfError

__all__ = [
    "METHODS", "MULTI_EXPERT_RULES", "StepOptions", "check_int", "check_real", "check_seed",
]  # fmt: skip

METHODS = ("dlf", "static", "large", "expert")

_D: dict[str, Any] = dict(DEFAULTS)
_INT_LIMIT = 1 << 63  # counts (top_k, support_k) must fit the core's usize on every platform
_U64 = 1 << 64


def check_real(x: object, name: str) -> float:
    """A real number (int, float or numpy scalar; not bool, not complex) as a float."""
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf":
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__} {x!r}")
    try:
        return float(x)
    except OverflowError:  # an int beyond the float range
        raise DlfError(
            f"{name}: expected a finite number, got an int of {int(x).bit_length()} bits"  # type: ignore[call-overload]
        ) from None


def check_int(x: object, name: str, low: int = 0, high: int = _INT_LIMIT) -> int:
    """An int in [low, high) (int or numpy integer; not bool, not a float however round)."""
    if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iu":
        x = x.item()
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected an int, got bool {x!r}")
    try:
        v = operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__} {x!r}") from None
    if not low <= v < high:
        hi = "2**63" if high == _INT_LIMIT else "2**64" if high == _U64 else str(high)
        raise DlfError(f"{name}: expected an int in [{low}, {hi}), got {v}")
    return v


def _check_str(x: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {x!r}")
    return x


def check_seed(seed: object, name: str = "seed") -> int | tuple[int, ...] | None:
    """The seed rule of every entry point: None (fresh entropy), an int in [0, 2**64), or a
    sequence of such ints (one per row / prompt). Negative seeds are refused, never masked."""
    if seed is None:
        return None
    if isinstance(seed, np.ndarray) and seed.ndim == 1:
        seed = seed.tolist()
    if isinstance(seed, (list, tuple)):
        return tuple(check_int(s, f"{name}[{i}]", 0, _U64) for i, s in enumerate(seed))
    if isinstance(seed, (str, bytes)) or not (
        isinstance(seed, (numbers.Integral, np.integer))
        or (isinstance(seed, np.ndarray) and seed.ndim == 0)
    ):
        raise TypeError(
            f"{name}: expected None, an int in [0, 2**64) or a list of such ints, "
            f"got {type(seed).__name__} {seed!r}"
        )
    return check_int(seed, name, 0, _U64)


def _check_alpha(alpha: object) -> float | tuple[float, ...] | None:
    if alpha is None:
        return None
    if isinstance(alpha, np.ndarray):
        if alpha.ndim > 1:
            raise DlfError(
                f"alpha: expected a float or one float per expert, got an array of shape "
                f"{list(alpha.shape)}"
            )
        if alpha.dtype.kind not in "iuf":
            raise TypeError(f"alpha: expected real numbers, got an array of dtype {alpha.dtype}")
        alpha = alpha.item() if alpha.ndim == 0 else alpha.tolist()
    if isinstance(alpha, (list, tuple)):  # [] with no experts: the large model alone
        return tuple(check_real(a, f"alpha[{t}]") for t, a in enumerate(alpha))
    return check_real(alpha, "alpha")


class _Method:
    """The field ``StepOptions.method``: the constructor takes None ("infer": "static" when
    ``alpha`` is given, else "dlf"), ``__post_init__`` stores the inferred name, and from then on
    the field reads as a ``str`` (so no caller re-defaults it, and mypy knows)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: Any) -> None: ...
    @overload
    def __get__(self, obj: object, owner: Any) -> str: ...
    def __get__(self, obj: object | None, owner: Any) -> str | None:
        if obj is None:  # the class attribute: the dataclass default
            return None
        method: str = obj.__dict__[self._name]
        return method

    def __set__(self, obj: object, value: str | None) -> None:
        obj.__dict__[self._name] = value  # frozen: only the dataclass' own __init__ gets here


@dataclass(frozen=True)
class StepOptions:
    """Every option of a decoding step, with its default, checked when the record is built.

    - ``method``: "dlf" (weights solved per row and step, the paper's method), "static" (fixed
      ``alpha``; proxy-tuning is 1.0 with one expert), "large" (L alone) or "expert" (expert
      number ``expert`` alone). ``None`` infers "static" when ``alpha`` is given, else "dlf".
    - ``alpha``: static weight(s): one float (applied to every expert) or one per expert; each
      finite with ``|alpha| <= 100`` (negative values subtract an expert: an anti-expert).
    - ``expert``: index of the expert for ``method="expert"``.
    - ``alpha_range``: (lo, hi) searched by the solver, finite, ``-100 <= lo <= hi <= 100``.
    - ``grid_step``: spacing of the paper's grid, > 0, at most 10,001 grid points.
    - ``solver``: "grid" (the paper's Algorithm 1) or "exact" (never worse than the grid).
    - ``multi_expert``: "one-active" (the paper's rule for T > 1: one expert per step, every
      candidate scored by the full J), "joint" (J minimised over the whole vector alpha in
      [lo, hi]^T; never a larger J than one-active when 0 is in the range) or "own-terms" (one
      expert per step, candidate a * e_t scored by expert t's own two terms of J) or
      "max-shift" (one expert per step: the one with the largest KL(Q_t||Q) + KL(Q||Q_t) at that
      step, weighted by single-expert DLF).
    - ``support_k``: None (KLs over the full vocabulary: Algorithm 1 exactly; each row is first
      summarised in one pass and its answer proven from rigorous bounds on J, with the full scan
      run only for rows the bounds cannot decide: ``StepResult.certified`` / ``.fallback``) or
      k >= 1 (union of every model's top-k tokens plus an exact tail bucket; faster, approximate).
    - ``temperature`` (0 = greedy), ``top_k`` (0 = off), ``top_p`` in (0, 1], ``min_p`` in
      [0, 1]: how the token is drawn from the fused logits (the weights always use the raw
      logits).
    - ``repetition_penalty`` (> 0, 1 = off), ``frequency_penalty`` and ``presence_penalty``
      (each in [-2, 2], 0 = off): penalties on the tokens a row has already seen (its
      ``history``, given per call), applied to the fused logits before the sampler and the
      greedy argmax, never to the weights. Repetition first (Hugging Face's
      ``RepetitionPenaltyLogitsProcessor``: l / p if l > 0, else l * p, once per distinct
      token), then l -= frequency * count + presence (OpenAI's), the order vLLM uses. Any
      penalty other than off needs ``history`` and ``speculative=None``.
    - ``speculative``: None (off: one large forward per token), a draft length k in [1, 16] or
      "auto" (each row drafts while the draft's top probability is >= 0.5, up to 8 tokens):
      speculative DLF in ``FusedGenerator.generate`` (:mod:`dlf_rs.engines.hf.speculative`) and
      ``LlamaCppGenerator.generate`` (:mod:`dlf_rs.engines.llamacpp.speculative`), both over
      :mod:`dlf_rs.speculation`; same output as sequential DLF.
    """

    method: _Method = _Method()
    alpha: float | tuple[float, ...] | None = None
    expert: int | None = None
    alpha_range: tuple[float, float] = (_D["alpha_min"], _D["alpha_max"])
    grid_step: float = _D["grid_step"]
    solver: str = _D["solver"]
    multi_expert: str = _D["multi_expert"]
    support_k: int | None = _D["support_k"]
    temperature: float = _D["temperature"]
    top_k: int = _D["top_k"]
    top_p: float = _D["top_p"]
    min_p: float = _D["min_p"]
    speculative: int | str | None = _D["speculative"]
    repetition_penalty: float = _D["repetition_penalty"]
    frequency_penalty: float = _D["frequency_penalty"]
    presence_penalty: float = _D["presence_penalty"]

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise the checked values once, here
        alpha = _check_alpha(self.alpha)
        put(self, "alpha", alpha)
        method = self.__dict__["method"]  # None (infer) until set below
        if method is None:
            method = "static" if alpha is not None else "dlf"
        method = _check_str(method, "method", METHODS)
        if method not in METHODS:
            raise DlfError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
        put(self, "method", method)
        if method == "static" and alpha is None:
            raise DlfError("alpha: method='static' needs the static weight(s), e.g. alpha=1.0")
        if method != "static" and alpha is not None:
            raise DlfError(f"alpha: only used by method='static' (method={method!r})")
        if method == "expert":
            if self.expert is None:
                raise DlfError("expert: method='expert' needs the index of the expert to run")
            put(self, "expert", check_int(self.expert, "expert"))
        elif self.expert is not None:
            raise DlfError(f"expert: only used by method='expert' (method={method!r})")
        rng = self.alpha_range
        if isinstance(rng, np.ndarray):
            rng = tuple(rng.tolist())
        if not isinstance(rng, (tuple, list)) or len(rng) != 2:
            raise TypeError(f"alpha_range: expected a (low, high) pair of floats, got {rng!r}")
        put(self, "alpha_range", (check_real(rng[0], "alpha_range[0]"),
                                  check_real(rng[1], "alpha_range[1]")))  # fmt: skip
        put(self, "grid_step", check_real(self.grid_step, "grid_step"))
        _check_str(self.solver, "solver", SOLVERS)
        _check_str(self.multi_expert, "multi_expert", MULTI_EXPERT_RULES)
        if self.support_k is not None:
            put(self, "support_k", check_int(self.support_k, "support_k"))
        put(self, "temperature", check_real(self.temperature, "temperature"))
        put(self, "top_k", check_int(self.top_k, "top_k"))
        put(self, "top_p", check_real(self.top_p, "top_p"))
        put(self, "min_p", check_real(self.min_p, "min_p"))
        for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"):
            put(self, name, check_real(getattr(self, name), name))
        spec = self.speculative
        if spec is not None and not isinstance(spec, str):
            try:
                put(self, "speculative", check_int(spec, "speculative", low=-_INT_LIMIT))
            except TypeError:
                raise TypeError(
                    f"speculative: expected None, an int draft length or 'auto', "
                    f"got {type(spec).__name__} {spec!r}"
                ) from None
        # Values: the core's rules, run now (not at the first call) by building the record that
        # every core call takes.
        self._core  # noqa: B018 - built for its checks

    @classmethod
    def build(cls, options: StepOptions | None = None, **overrides: Any) -> StepOptions:
        """``options`` with ``overrides`` applied (checked), or a new record from the overrides.

        Loose keywords are folded in the way ``GenerationConfig`` does: an unknown name is a
        ``TypeError`` naming it and the known fields.
        """
        if options is not None and not isinstance(options, StepOptions):
            raise TypeError(
                f"options: expected a dlf_rs.StepOptions, got {type(options).__name__}"
            )
        unknown = sorted(set(overrides) - _FIELDS)
        if unknown:
            raise TypeError(
                f"{unknown[0]}: unknown option; expected one of {', '.join(sorted(_FIELDS))}"
            )
        if options is None:
            return _cached_record(cls, overrides)
        if "alpha" in overrides and "method" not in overrides and options.method in (
            "dlf", "static"
        ):  # fmt: skip
            overrides["method"] = None  # re-infer: alpha given -> static, alpha=None -> dlf
        return dataclasses.replace(options, **overrides) if overrides else options

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (temperature 0); computed once from the record."""
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether a penalty on seen tokens is active (then every call needs a ``history``)."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    @property
    def fused(self) -> bool:
        """Whether the step fuses several models ("dlf" or "static")."""
        return self.method in ("dlf", "static")

    @cached_property
    def _core(self) -> CoreOptions:
        """The record as the Rust core takes it (``fuse_step``, ``fuse_verify``, ``sample``), its
        values checked by the core's rules; built by ``__post_init__``, then shared by every call.
        One static ``alpha`` is broadcast to a call's experts by the core."""
        return CoreOptions(
            alpha=self.alpha,
            alpha_min=self.alpha_range[0],
            alpha_max=self.alpha_range[1],
            grid_step=self.grid_step,
            solver=self.solver,
            multi_expert=self.multi_expert,
            support_k=self.support_k,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            speculative=self.speculative,
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickles (and copies) the fields only: the core's record is not picklable, and is
        rebuilt from them on first use."""
        return {k: v for k, v in self.__dict__.items() if k != "_core"}


_FIELDS = frozenset(f.name for f in dataclasses.fields(StepOptions))
_RECORDS: dict[tuple[Any, ...], StepOptions] = {}


def fields_key(fields: Mapping[str, Any]) -> tuple[Any, ...]:
    """A cache key for option keywords that keeps 1, 1.0 and True apart, also inside lists and
    tuples (JSON gives lists); TypeError when a value is not hashable. Used by the record cache
    here and by the vLLM engine's per-request cache."""

    def typed(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return type(v), tuple(typed(x) for x in v)
        hash(v)
        return type(v), v

    return tuple(sorted((k, typed(v)) for k, v in fields.items()))


def _cached_record(cls: type[StepOptions], fields: dict[str, Any]) -> StepOptions:
    """Records are frozen, so one built from the same keywords can be shared: a generation loop
    that passes its options as keywords on every call checks them once (hashable values only;
    the type goes into the key so 1 and 1.0 or True stay apart)."""
    try:
        key = fields_key(fields)
    except TypeError:  # unhashable values (arrays, dicts): build, do not cache
        return cls(**fields)
    record = _RECORDS.get(key)
    if record is None:
        record = cls(**fields)
        if len(_RECORDS) < 256:
            _RECORDS[key] = record
    return record
