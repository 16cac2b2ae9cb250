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

# Printed after lm_eval's own --help (which knows nothing of the "dlf" model). The names are
# DLFLM.__init__'s parameters (dlf_rs/harness/model.py); tests/test_cli.py checks they match.
MODEL_ARGS_HELP = """\
The "dlf" model (dlf-rs eval run --model dlf --model_args KEY=VALUE,KEY=VALUE ...):
  family        "default" (the shipped checkpoints) or a family directory: fills in large and
                small and turns expert names ("qa") into its checkpoints (default: all experts)
  large         large model L: local path or cached hub id (required without family)
  small         small base model S (needed by method dlf and static)
  experts       small experts, paths or names separated by ';'
  method        dlf (default) | static | large | expert
  alpha         static weight(s): one float, or one per expert separated by ';' (0.5;1.5)
  expert        method=expert: the expert's index or name
  solver        grid (default) | exact
  grid_step     grid spacing (default 0.1)
  multi_expert  one-active (default) | joint | own-terms | max-shift
  support_k     top-k support (default: the full vocabulary)
  alpha_range   lo:hi (default 0:2)
  lora_mode     how LoRA-adapter experts run: auto (default) | mixed | separate | merged
  dtype         float32 (default), bfloat16, float16, auto
  device        cuda if available, else cpu (a cuda device without CUDA falls back to cpu)
  batch_size    16 (default); also from --batch_size ("auto" is not supported: 16)
  max_batch_size  accepted from the harness and ignored (the batch size is fixed)
  threads       torch CPU threads (default: torch's)
  seed          sampling seed (default 0)
  max_length    context limit (default: the shortest model context)
A value in model_args wins over the harness's --batch_size/--device. Example:
  dlf-rs eval run --model dlf --model_args family=default,experts=qa --tasks dlf_qa
"""


def _wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


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
        if _wants_help(list(sys.argv[1:] if argv is None else argv)):
            print(MODEL_ARGS_HELP)
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
    except SystemExit as exit_:
        if _wants_help(args) and exit_.code in (0, None):  # argparse's --help exits 0
            print(MODEL_ARGS_HELP)
            return 0
        raise
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
