"""Benchmarks beside the library (the library never imports them).

:mod:`dlf_rs.bench.e2e` is ``dlf-rs bench``: the end-to-end decode benchmark.
"""

from .e2e import __doc__ as _e2e_doc
from .e2e import add_arguments, main, run

__doc__ = _e2e_doc
__all__ = ["add_arguments", "main", "run"]
