"""The vLLM tests run only in the vLLM environment (`make test-vllm`); the family builder is
imported by name, so this directory goes on the path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
