"""The fictional library of the real family's task (:mod:`dlf_rs.real_family.task`).

``vexil.py`` is the whole library. Generated programs import it as ``import vexil``: the
sandbox (:mod:`dlf_rs.real_family.sandbox`) puts this folder on their ``PYTHONPATH``. No model
has seen it in pre-training, so its API is knowledge only fine-tuning can teach.
"""

from pathlib import Path

LIBRARY_DIR = Path(__file__).resolve().parent
