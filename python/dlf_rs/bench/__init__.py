"""Benchmarks beside the library (the library never imports them).

:mod:`dlf_rs.bench.e2e` is ``dlf-rs bench``: the end-to-end decode benchmark.
"""

import os

# Before e2e imports torch: OpenMP reads its wait policy once, when torch loads it (see
# dlf_rs.threads.passive_omp, which `dlf-rs bench` has already run; this covers direct imports).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .e2e import __doc__ as _e2e_doc
from .e2e import add_arguments, main, run

__doc__ = _e2e_doc
__all__ = ["add_arguments", "main", "run"]
