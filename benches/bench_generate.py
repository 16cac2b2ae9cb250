"""End-to-end decode benchmark: a thin entry point to :mod:`dlf_rs.bench` (also ``dlf-rs bench``).

The code lives in the package so the installed CLI runs the same benchmark. Examples:

    python benches/bench_generate.py                      # CPU: tiny shapes; CUDA: 13B / 1.1B
    python benches/bench_generate.py --batch 1 8 --experts 1 4 --steps 16
    python benches/bench_generate.py --large-config llama2-13b --small-config tinyllama-1.1b \\
        --batch 1 8 32 --experts 1 4 --bandwidth 3.35e12
"""

from __future__ import annotations

import sys

from dlf_rs.bench import main

if __name__ == "__main__":
    sys.exit(main())
