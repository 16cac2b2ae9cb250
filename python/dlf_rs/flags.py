"""The command-line flags ``dlf-rs generate`` and ``dlf-rs serve`` share, built in one place.

- the members: ``--family``, ``--large``, ``--small``, ``--expert`` (:func:`add_member_flags`),
  with ``--family`` names resolved to checkpoint directories (:func:`member_sources`);
- the fusion options of :class:`dlf_rs.StepOptions`: ``--method``, ``--alpha`` (one value for
  every expert or one per expert, given as ``--alpha 1.0 0.5`` or ``--alpha 1.0 --alpha 0.5``),
  ``--expert-index``, ``--solver``, ``--support-k`` (>= 1; the full vocabulary when not given),
  ``--alpha-range``, ``--grid-step``, ``--multi-expert`` (:func:`add_fusion_flags`), and the
  record built from the given flags with a bad value named by its flag (:func:`step_options`).

The flags default to None ("not given"): the options record holds the defaults, which the help
strings quote from it. A wrong value raises :class:`UsageError` (a ``ValueError``) whose message
starts with the flag; both commands print it as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "add_fusion_flags", "add_member_flags", "int_at_least",
           "member_sources", "step_options"]  # fmt: skip


class UsageError(ValueError):
    """A command-line flag's value is wrong; the message starts with the flag."""


def int_at_least(low: int) -> Any:
    """An argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def add_member_flags(group: Any, *, expert_help: str) -> None:
    """--family, --large, --small and --expert (repeatable)."""
    group.add_argument("--family", help='"default" (the shipped family) or a family directory')
    group.add_argument("--large", help="large model L: local path or cached hub id "
                       "(default with --family: its large_base)")  # fmt: skip
    group.add_argument("--small", help="small base model S, needed by dlf and static "
                       "(default with --family: its small_base)")  # fmt: skip
    group.add_argument("--expert", action="append", default=[], metavar="PATH", help=expert_help)


def member_sources(args: argparse.Namespace) -> tuple[str, str | None, list[str]]:
    """(large, small, experts) from --large/--small/--expert, resolving --family names to its
    checkpoint directories (--large and --small default to its large_base and small_base)."""
    if args.family is None:
        if args.large is None:
            raise UsageError("--large: required (or --family default for the shipped family)")
        return args.large, args.small, list(args.expert)
    from dlf_rs.family import CHECKPOINTS

    root = CHECKPOINTS if args.family == "default" else Path(args.family)
    if not (root / "manifest.json").is_file() and not (root / "large_base").is_dir():
        raise UsageError(f"--family: {args.family!r} is not a model family directory "
                         "(expected 'default' or a directory with large_base/ and small_base/)")

    tasks = sorted(
        p.name[len("small_expert_"):] for p in root.glob("small_expert_*")
        if (p / "config.json").is_file()
    )  # fmt: skip

    def pick(name: str) -> str:
        for cand in (name, f"small_expert_{name}"):
            if (root / cand / "config.json").is_file():
                return str(root / cand)
        # A path or an "owner/name" hub id is the user's own model; a bare word can only mean
        # one of the family's tasks (it would otherwise be looked up as a hub id).
        if "/" in name or os.sep in name or os.path.exists(os.path.expanduser(name)):
            return name
        raise UsageError(f"--expert: unknown expert {name!r}; expected {', '.join(tasks)}")

    return (args.large or str(root / "large_base"), args.small or str(root / "small_base"),
            [pick(e) for e in args.expert])  # fmt: skip


def add_fusion_flags(group: Any) -> None:
    """The flags of the fusion fields of :class:`dlf_rs.StepOptions` (how the weights are
    chosen; sampling is the caller's own group)."""
    from dlf_rs.options import METHODS, MULTI_EXPERT_RULES, SOLVERS, StepOptions

    d = StepOptions()
    lo, hi = d.alpha_range
    group.add_argument("--method", default=None, choices=METHODS,
                       help="default: dlf, or static when --alpha is given")  # fmt: skip
    group.add_argument(
        "--alpha", type=float, nargs="+", action="extend", default=None, metavar="A",
        help="static weight(s) (method static): one value for every expert or one per expert, "
        "e.g. --alpha 1.0 0.5 or --alpha 1.0 --alpha 0.5 (default: none)",
    )  # fmt: skip
    group.add_argument("--expert-index", type=int, default=None,
                       help="expert for method expert (default: none)")  # fmt: skip
    group.add_argument("--solver", choices=SOLVERS, default=None,
                       help=f"DLF weight solver (default: {d.solver})")  # fmt: skip
    group.add_argument("--support-k", type=int_at_least(1), default=None,
                       help="top-k support (default: the full vocabulary)")  # fmt: skip
    group.add_argument("--alpha-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                       help=f"DLF weights' range (default: {lo:g} {hi:g})")  # fmt: skip
    group.add_argument("--grid-step", type=float, default=None,
                       help=f"grid spacing (default: {d.grid_step:g})")  # fmt: skip
    group.add_argument("--multi-expert", choices=MULTI_EXPERT_RULES, default=None,
                       help=f"rule for several experts (default: {d.multi_expert})")  # fmt: skip


def fusion_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fusion fields given on the command line, as :class:`StepOptions` keywords."""
    fields: dict[str, Any] = {
        "method": args.method, "expert": args.expert_index, "solver": args.solver,
        "support_k": args.support_k, "grid_step": args.grid_step,
        "multi_expert": args.multi_expert,
        "alpha_range": tuple(args.alpha_range) if args.alpha_range else None,
    }  # fmt: skip
    if args.alpha is not None:
        fields["alpha"] = args.alpha[0] if len(args.alpha) == 1 else tuple(args.alpha)
    return {k: v for k, v in fields.items() if v is not None}


def step_options(fields: dict[str, Any]) -> Any:
    """The :class:`StepOptions` of the given fields; a bad value names its flag."""
    from dlf_rs.options import StepOptions

    try:
        return StepOptions(**fields)
    except (TypeError, ValueError) as err:
        name, _, rest = str(err).partition(":")
        flag = {"expert": "expert-index"}.get(name.split("[")[0], name.split("[")[0])
        raise UsageError(f"--{flag.replace('_', '-')}:{rest}") from None
