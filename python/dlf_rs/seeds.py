"""Reproducible seeds for sampled decoding, independent of how prompts are batched.

Where it sits: used by the generation loop (:mod:`dlf_rs.engines.hf.generate`) and the CLI; the core draws
row ``b`` of one call from ChaCha8(seed of that row). The rule for what a seed may be is
:func:`dlf_rs.options.check_seed` (ints in [0, 2**64); negative seeds are refused).

Derivation: row ``b`` of a call made with integer ``seed`` uses ``row_seed(seed, b)``; step ``s``
of that row draws with ``step_seed(row_seed, s)``, where ``mix(a, b) = splitmix64(a ^
splitmix64(b))`` masked to 63 bits. A list of per-prompt seeds gives the row seeds directly, so a
prompt's output does not depend on its batch.
"""

from __future__ import annotations

import secrets

from ._core import DlfError
from .options import check_seed

__all__ = ["row_seed", "row_seeds", "splitmix64", "step_seed", "step_seeds"]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def splitmix64(x: int) -> int:
    """One splitmix64 output for state ``x`` (Steele, Lea, Flood 2014)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix(a: int, b: int) -> int:
    # 63 bits so the value fits a signed int64 as well as a u64 on the Rust side.
    return splitmix64((a & _MASK64) ^ splitmix64(b)) & _MASK63


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row`` of a call made with integer ``seed``."""
    return _mix(seed, row)


def step_seed(row_seed_value: int, step: int) -> int:
    """The seed passed to the core for one row at decoding step ``step`` (0-based)."""
    return _mix(row_seed_value, step)


def row_seeds(seed: object, batch: int, name: str = "seed") -> list[int]:
    """Row seeds of a call: fresh entropy for None, derived from an int, or given per prompt."""
    checked = check_seed(seed, name)
    if checked is None:
        base = secrets.randbits(63)
        return [row_seed(base, b) for b in range(batch)]
    if isinstance(checked, int):
        return [row_seed(checked, b) for b in range(batch)]
    if len(checked) != batch:
        raise DlfError(f"{name}: {len(checked)} seeds given for {batch} prompts")
    return list(checked)


def step_seeds(rows: list[int], step: int) -> list[int]:
    """The per-row seeds of one decoding step."""
    return [_mix(s, step) for s in rows]
