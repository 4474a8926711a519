"""GPU benchmarks, run from a checkout (`python -m bench.<name>`): the project's packages come from src/."""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)
