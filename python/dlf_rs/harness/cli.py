"""``dlf-rs eval``: lm-evaluation-harness's own command line with the "dlf" model registered.

The harness finds models only in its own registry (it has no plugin discovery), so this entry
point imports :mod:`dlf_rs.harness.model` (which registers "dlf") and then hands the arguments to
``lm_eval``'s CLI unchanged. The shipped family's tasks (``dlf_math``, ``dlf_qa``, ...) are made
visible by adding ``--include_path`` to a run when the caller gives none. Data parallel:
``accelerate launch -m dlf_rs.harness ...`` (or ``torchrun --nproc_per_node N -m dlf_rs.harness``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dlf_rs.harness import TASKS_DIR

_SUBCOMMANDS = ("run", "ls", "validate")


def _with_tasks(argv: list[str]) -> list[str]:
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    if argv and argv[0] in ("ls", "validate", "run"):
        return [*argv, "--include_path", str(TASKS_DIR)]
    if len(argv) >= 2:  # the harness's legacy form: options without a subcommand mean "run"
        return ["run", *argv, "--include_path", str(TASKS_DIR)]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm_eval's CLI on ``argv`` (default: ``sys.argv[1:]``) with the "dlf" model known."""
    try:
        import lm_eval.models  # noqa: F401  (the harness's own models, registered lazily)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        print(
            f"dlf-rs eval needs lm-evaluation-harness ({err}): pip install 'dlf_rs[eval]'",
            file=sys.stderr,
        )
        return 2
    import dlf_rs.harness.model  # noqa: F401  (registers "dlf")

    args = _with_tasks(list(sys.argv[1:] if argv is None else argv))
    saved = sys.argv
    sys.argv = ["dlf-rs eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
