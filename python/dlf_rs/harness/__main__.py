"""``python -m dlf_rs.harness ...``: the harness's command line with the "dlf" model registered
(also the module to hand to ``accelerate launch -m`` / ``torchrun -m``)."""

import sys

from dlf_rs.harness.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
