"""The ``dlf-rs`` command line (also ``python -m dlf_rs``): the outermost layer of the flow.

``dlf-rs generate`` checks every argument and builds the options record first, then loads the
models with :meth:`FusedGenerator.from_pretrained`, reads prompts from ``--prompt`` or a JSONL
file, decodes them in batches and writes one JSON line per prompt. ``dlf-rs demo`` delegates to
:mod:`dlf_rs.family.demo` and ``dlf-rs bench`` to :mod:`dlf_rs.bench` (imported only when used).
Errors print one line to stderr and exit with status 2, no traceback (``DLF_RS_DEBUG=1`` shows
it for an unexpected error). :func:`main` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set) before
anything imports torch (:func:`passive_omp`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .flags import (
    add_fusion_flags,
    add_member_flags,
    fusion_fields,
    int_at_least,
    member_sources,
    step_options,
)
from .threads import passive_omp, set_threads, threads_argument

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Dynamic Logit Fusion (arXiv 2406.15480): decode with a large model L, its small base S and small
experts (S fine-tuned per task), fusing next-token logits z_L + sum_t alpha_t (z_t - z_S) with the
weights alpha solved per row and step by the Rust core.

commands:
  generate   fused generation with Hugging Face checkpoints (local paths or cached hub ids)
  demo       the shipped tiny model family: DLF vs the baselines, tables and alpha plots
  bench      end-to-end decode benchmark: per-step breakdown, tokens/s, ratios to a naive
             loop, to the models' own decode steps and to the bandwidth floor
  eval       lm-evaluation-harness with the fused model "dlf" registered (dlf_rs[eval]);
             arguments go to lm_eval, e.g. --model dlf --model_args family=default --tasks dlf_qa
  serve      the fused model in vLLM's OpenAI-compatible server (dlf_rs[vllm]); arguments
             after -- go to `vllm serve`, e.g. -- --port 8000 --tensor-parallel-size 2

examples:
  dlf-rs generate --family default --expert qa \\
      --prompt "question : where does kubrai moulos live ? answer :" --max-new-tokens 12
  dlf-rs generate --large L --small S --expert MATH --expert QA --prompts in.jsonl -o out.jsonl
"""


GENERATE_EPILOG = """\
--family default: the shipped tiny family (python/dlf_rs/family/checkpoints); --large and
--small default to its large_base and small_base, and --expert takes its task names (math, qa,
summary). Its vocabulary is the words of its synthetic world; prompts follow its task formats,
e.g. "question : where does kubrai moulos live ? answer :" (a person of that world; more in
dlf_rs.family.example_prompts("qa"), README "The shipped family's prompts").
Hub ids are read from the local Hugging Face cache only, with no network request at all, unless
--allow-download is given.
--prompts FILE.jsonl: one JSON object per line with a "prompt" field (or a bare JSON string),
or a "messages" field (a chat conversation: a list of {"role", "content"} objects).
--chat: every prompt is a user message, rendered with each model's own chat template and the
generation prompt (--system adds a system message first); JSONL "messages" need no --chat.
--stream: print the text as it is decided, for one prompt (the default when there is one
prompt, no --output and stdout is a terminal); the JSON line then goes only to --output.
Output (--output, default stdout): one JSON object per prompt with "prompt", "text",
"token_ids", "alphas" ([steps][T] weights), "active", "finish_reason", "method"; with
--speculative also "acceptance_rate" (accepted / tested drafted tokens, null if none was tested)
and "accepted_draft" (per token: a drafted token the large model accepted).
Seeds: row seeds are derived from --seed and the prompt's index in the whole input, so the
output does not depend on --batch-size; --seed matters only when sampling (--temperature > 0).
Threads: --threads N sets torch's CPU threads and the core's worker threads (see --threads).
"""


class _Failure(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors also exit 2, one line
        self.print_usage(sys.stderr)
        raise _Failure(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The epilog as written, and "(default: X)" after every option that has a real default
    and whose help does not already say it (argparse's ArgumentDefaultsHelpFormatter also
    prints "default: None" for options whose default lives in the options record)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _max_memory(text: str) -> dict[Any, str]:
    """``--max-memory "0=20GiB,cpu=60GiB"`` as accelerate's dict (GPU indices as ints)."""
    out: dict[Any, str] = {}
    for part in text.split(","):
        dev, sep, size = part.strip().partition("=")
        if not sep or not dev or not size:
            raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE[,...], got {text!r}")
        out[int(dev) if dev.isdigit() else dev] = size
    return out


def _draft_length(text: str) -> int | str:
    """--speculative: "auto" or an int (its range is the options record's rule)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from dlf_rs import __version__
    from dlf_rs.options import StepOptions

    parser = _Parser(
        prog="dlf-rs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"dlf-rs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{generate,demo,bench,eval,serve}",
                                parser_class=_Parser)  # fmt: skip

    gen = sub.add_parser(
        "generate",
        help="fused generation with Hugging Face checkpoints",
        description="Fused generation: DLF, static weights (proxy-tuning), or one model alone.",
        epilog=GENERATE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    models = gen.add_argument_group("models")
    add_member_flags(models, expert_help="small expert (checkpoint or LoRA adapter dir; with "
                     "--family a task name: math, qa, summary for the shipped family); repeat")
    models.add_argument(
        "--engine", default="hf", choices=("hf", "llamacpp"),
        help="hf: Hugging Face checkpoints in torch (FusedGenerator); llamacpp: GGUF files on "
        "llama.cpp (dlf_rs[llamacpp]; --large/--small/--expert are .gguf files, an expert may be "
        "a LoRA adapter GGUF over the small model; docs/llamacpp.md) (default: hf)",
    )  # fmt: skip
    models.add_argument("--tokenizer", help="tokenizer path (default: the large model's)")
    models.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, ... (default: cpu); checked before loading")
    models.add_argument("--device-map", default=None,
                        help='e.g. "auto" (needs accelerate; default: none, one --device)')
    models.add_argument("--max-memory", default=None, type=_max_memory, metavar="DEV=SIZE,...",
                        help='with --device-map: e.g. "0=20GiB,cpu=60GiB" (accelerate)')
    models.add_argument("--offload-folder", default=None,
                        help="with --device-map: where weights that fit nowhere go (disk)")
    models.add_argument(
        "--lora-mode", default="auto", choices=("auto", "mixed", "separate", "merged"),
        help="LoRA adapter experts: one mixed-batch forward, separate forwards on one base, "
        "or merged copies (auto: by the small model's size, docs/lora.md; default: auto)",
    )  # fmt: skip
    models.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
        help="weights dtype (default: float32 on CPU, the checkpoint's on a GPU)",
    )  # fmt: skip
    models.add_argument("--allow-download", action="store_true",
                        help="fetch hub ids that are not in the local cache (default: never)")
    models.add_argument("--allow-pickle", action="store_true",
                        help="also load pickle weights (pytorch_model.bin); trusted files only")
    models.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with a checkpoint; trusted files only")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeatable")
    src.add_argument("--prompts", metavar="FILE.jsonl", help="JSONL file of prompts")
    chat = gen.add_argument_group("chat and streaming")
    chat.add_argument("--chat", action="store_true",
                      help="prompts are user messages: apply each model's chat template")
    chat.add_argument("--system", default=None, metavar="TEXT",
                      help="with --chat: a system message before each prompt")
    chat.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                      help="print the text as it is decided (one prompt); default: on for one "
                      "prompt without --output on a terminal")
    # The decoding flags default to None ("not given"): the options record holds the defaults,
    # which their help strings quote from it (no second copy of a default here).
    d = StepOptions()
    step = gen.add_argument_group("decoding (dlf_rs.StepOptions)")
    add_fusion_flags(step)
    step.add_argument("--max-new-tokens", type=int_at_least(1), default=64,
                      help="tokens to generate per prompt at most")
    step.add_argument("--temperature", type=float, default=None,
                      help=f"0 = greedy (default: {d.temperature:g})")
    step.add_argument("--top-k", type=int_at_least(0), default=None,
                      help=f"0 = off (default: {d.top_k})")
    step.add_argument("--top-p", type=float, default=None, help=f"(default: {d.top_p:g})")
    step.add_argument("--min-p", type=float, default=None, help=f"(default: {d.min_p:g})")
    step.add_argument("--repetition-penalty", type=float, default=None,
                      help=f"seen tokens' logits / p if > 0, else * p (default: "
                      f"{d.repetition_penalty:g}, off)")
    step.add_argument("--frequency-penalty", type=float, default=None,
                      help=f"minus this times a token's count so far (default: "
                      f"{d.frequency_penalty:g}, off)")
    step.add_argument("--presence-penalty", type=float, default=None,
                      help=f"minus this for every seen token (default: {d.presence_penalty:g}, off)")
    step.add_argument("--seed", type=int_at_least(0), default=None,
                      help="sampling seed (only with --temperature > 0; default: fresh entropy)")
    step.add_argument("--stop", action="append", default=None,
                      help="stop string; repeatable (default: none)")
    step.add_argument("--speculative", type=_draft_length, default=None, metavar="K|auto",
                      help="speculative DLF: the expert drafts K tokens per large forward "
                      "(1-16, or auto); same output as sequential DLF (default: off)")
    run = gen.add_argument_group("run")
    run.add_argument("--batch-size", type=int_at_least(1), default=8, help="prompts per batch")
    threads_argument(run)
    run.add_argument("--output", "-o", default=None, help="JSONL output file (default: stdout)")
    run.add_argument("--no-progress", action="store_true", help="hide every progress bar")

    # The demo's and bench's own options are parsed by parsers built only when they run, so that
    # `dlf-rs --help` and `dlf-rs generate` never import them (see `_delegate`).
    sub.add_parser("demo", help="run the shipped tiny-family demo (dlf-rs demo --help)",
                   add_help=False)  # fmt: skip
    sub.add_parser("bench", help="end-to-end decode benchmark (dlf-rs bench --help)",
                   add_help=False)  # fmt: skip
    sub.add_parser("eval", help="lm-evaluation-harness with the 'dlf' model (dlf-rs eval --help)",
                   add_help=False)  # fmt: skip
    sub.add_parser("serve", help="serve the fused model with vLLM (dlf-rs serve --help)",
                   add_help=False)  # fmt: skip
    return parser


def _delegate(command: str, argv: list[str]) -> int:
    if command == "demo":
        from dlf_rs.family import demo as module
    elif command == "serve":
        from dlf_rs.engines.vllm import serve as module  # type: ignore[no-redef]
    else:
        from dlf_rs import bench as module  # type: ignore[no-redef]
    parser = _Parser(prog=f"dlf-rs {command}", description=module.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except ValueError as err:  # the tools' own argument errors name their option
        raise _Failure(str(err)) from None


def _read_prompts(path: str) -> list[Any]:
    """Prompts (strings) or chat conversations (lists of message objects) from a JSONL file."""
    prompts: list[Any] = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise _Failure(f"--prompts: cannot read {path!r}: {err}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise _Failure(f"--prompts: {path}:{n}: not JSON ({err.msg})") from None
        if isinstance(item, dict) and "messages" in item:
            item = item["messages"]
            if not isinstance(item, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in item
            ) or not item:  # fmt: skip
                raise _Failure(f'--prompts: {path}:{n}: "messages" must be a list of '
                               '{"role": ..., "content": ...} objects')  # fmt: skip
        elif isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, (str, list)):
            raise _Failure(f'--prompts: {path}:{n}: expected a "prompt" string')
        prompts.append(item)
    kinds = {isinstance(p, str) for p in prompts}
    if len(kinds) > 1:
        raise _Failure(f'--prompts: {path} mixes "prompt" and "messages" lines; use one kind')
    if not prompts:
        raise _Failure(f"--prompts: {path!r} holds no prompts")
    return prompts


def _step_options(args: argparse.Namespace) -> Any:
    """The options record of generate's flags: the shared fusion flags and the sampling ones."""
    sampling = {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "min_p": args.min_p, "speculative": args.speculative,
        "repetition_penalty": args.repetition_penalty,
        "frequency_penalty": args.frequency_penalty, "presence_penalty": args.presence_penalty,
    }  # fmt: skip
    given = {k: v for k, v in sampling.items() if v is not None}
    return step_options({**fusion_fields(args), **given})


def _check_output(path: str | None) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise _Failure(f"--output: {path!r} is a directory; expected a file path")
    if not os.path.isdir(parent):
        raise _Failure(f"--output: the folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise _Failure(f"--output: the folder {parent!r} is not writable")


def _quiet_loading() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError, AttributeError):
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


def _check_device(device: str | None) -> None:
    """--device names a device this process can use (checked before any model loads)."""
    if device is None:
        return
    from dlf_rs.engines.hf.loading import check_device

    try:
        check_device("--device", device)
    except (RuntimeError, ValueError) as err:  # RuntimeError: torch cannot parse the string
        msg = " ".join(str(err).split())
        raise _Failure(msg if msg.startswith("--device") else f"--device: {msg}") from None


def _check_llamacpp_flags(args: argparse.Namespace, opts: Any) -> None:
    """The flags that only the Hugging Face engine reads are refused with --engine llamacpp."""
    hf_only = {"--tokenizer": args.tokenizer, "--device": args.device,
               "--device-map": args.device_map, "--max-memory": args.max_memory,
               "--offload-folder": args.offload_folder, "--dtype": args.dtype}  # fmt: skip
    flags = {"--allow-download": args.allow_download, "--allow-pickle": args.allow_pickle,
             "--trust-remote-code": args.trust_remote_code,
             "--lora-mode": args.lora_mode != "auto"}  # fmt: skip
    for flag, value in {**hf_only, **flags}.items():
        if value:
            raise _Failure(f"{flag}: only used with --engine hf (llama.cpp reads GGUF files as "
                           "they are)")  # fmt: skip
    if args.family is not None:
        raise _Failure("--family: the shipped family is Hugging Face checkpoints; with --engine "
                       "llamacpp give --large/--small/--expert as .gguf files")  # fmt: skip


def _load_generator(args: argparse.Namespace, large: str, small: str | None,
                    experts: list[str]) -> Any:  # fmt: skip
    """The engine --engine names, loaded (every argument was checked before)."""
    if args.engine == "llamacpp":
        try:
            from dlf_rs.engines.llamacpp.generate import LlamaCppGenerator
            from dlf_rs.engines.llamacpp.native import llama_cpp

            llama_cpp()  # names the extra to install when llama-cpp-python is missing
        except ImportError as err:
            raise _Failure(f"--engine llamacpp: {err}") from None
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
        try:
            return LlamaCppGenerator.from_gguf(large, small, experts, n_threads=args.threads)
        except (OSError, ValueError) as err:
            raise _Failure(str(err)) from None
    import dlf_rs

    try:
        fused_generator = dlf_rs.FusedGenerator
    except ImportError as err:  # names the extra to install
        raise _Failure(f"generate: {err}") from None
    set_threads(args.threads)
    if args.no_progress:
        _quiet_loading()
    return fused_generator.from_pretrained(
        large=large, small=small, experts=experts, tokenizer=args.tokenizer,
        device=args.device, torch_dtype=args.dtype, device_map=args.device_map,
        local_files_only=not args.allow_download, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, lora_mode=args.lora_mode,
        max_memory=args.max_memory, offload_folder=args.offload_folder,
    )  # fmt: skip


def _generate(args: argparse.Namespace) -> int:
    # Every argument error comes before the (slow) model loading.
    large, small, experts = member_sources(args)
    opts = _step_options(args)
    if opts.fused and small is None:
        raise _Failure(f"--small: method {opts.method!r} needs the small base model")
    if opts.fused and not experts:
        raise _Failure(f"--expert: method {opts.method!r} needs at least one expert")
    _check_output(args.output)
    items: list[Any] = list(args.prompt) if args.prompt else _read_prompts(args.prompts)
    if args.system is not None and not args.chat:
        raise _Failure("--system: only used with --chat")
    if args.chat and isinstance(items[0], list):
        raise _Failure('--chat: the --prompts file already holds "messages"; drop --chat')
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        items = [[*system, {"role": "user", "content": p}] for p in items]
    chat = isinstance(items[0], list)
    stream = args.stream
    if stream is None:
        stream = len(items) == 1 and args.output is None and sys.stdout.isatty()
    if stream and len(items) != 1:
        raise _Failure(f"--stream: prints one prompt's text as it comes; got {len(items)} prompts")
    if args.engine == "llamacpp":
        _check_llamacpp_flags(args, opts)
    else:
        _check_device(args.device)
    if args.seed is not None and opts.greedy:
        # Hugging Face's generate also accepts a seed with greedy decoding; say it does nothing.
        print("dlf-rs: note: --seed has no effect with greedy decoding (--temperature 0, the "
              "default); pass --temperature > 0 to sample", file=sys.stderr)  # fmt: skip
    from dlf_rs.seeds import row_seed

    gen = _load_generator(args, large, small, experts)
    from tqdm import tqdm
    with contextlib.ExitStack() as stack:
        out: TextIO | None = (
            stack.enter_context(open(args.output, "w", encoding="utf-8"))
            if args.output
            else None if stream else sys.stdout
        )
        starts = range(0, len(items), args.batch_size)
        for start in tqdm(starts, desc="batches", unit="batch",
                          disable=args.no_progress or stream):  # fmt: skip
            batch = items[start : start + args.batch_size]
            seeds = (
                None
                if args.seed is None
                else [row_seed(args.seed, start + i) for i in range(len(batch))]
            )
            given: dict[str, Any] = {"messages": batch} if chat else {"prompts": batch}
            call = {"max_new_tokens": args.max_new_tokens, "options": opts, "seed": seeds,
                    "stop": args.stop, **given}  # fmt: skip
            if stream:
                it = gen.stream(**call)
                for chunk in it:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                assert it.result is not None
                res = it.result
            else:
                res = gen.generate(**call)
            if out is not None:
                key = "messages" if chat else "prompt"
                out.writelines(
                    json.dumps({key: item, **record}) + "\n"
                    for item, record in zip(batch, res.to_records())
                )
                out.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlf-rs``; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    passive_omp()
    try:
        args_list = list(sys.argv[1:] if argv is None else argv)
        if args_list[:1] in (["demo"], ["bench"], ["serve"]):  # own parsers: --help, --x
            return _delegate(args_list[0], args_list[1:])
        if args_list[:1] == ["eval"]:
            try:
                from dlf_rs.harness.cli import main as eval_main
            except ImportError as err:
                raise _Failure(f"eval: needs lm_eval ({err}); pip install 'dlf_rs[eval]'") from None
            return int(eval_main(args_list[1:]) or 0)
        parser = build_parser()
        args = parser.parse_args(args_list)
        if args.command == "generate":
            return _generate(args)
        parser.print_help()
        return 2
    except _Failure as err:
        print(f"dlf-rs: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlf-rs: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, RuntimeError,
            pickle.UnpicklingError) as err:  # fmt: skip
        # OSError covers FileNotFoundError; RuntimeError covers CUDA out of memory (with a hint).
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"dlf-rs: error: {msg}", file=sys.stderr)
        if os.environ.get("DLF_RS_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
