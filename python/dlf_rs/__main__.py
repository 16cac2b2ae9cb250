"""``python -m dlf_rs``: the same as the ``dlf-rs`` command."""

import sys

from .cli import main

sys.exit(main())
