"""The two bitsandbytes CPU paths, chosen on purpose on any CPU.

bitsandbytes picks a 4-bit layer's CPU path when the layer is built, from its probe `has_avx512bf16()`: on a CPU
with AVX512-BF16 the layer repacks its weight on its first no-grad pass outside training mode and computes with a
bf16 kernel of its own; elsewhere it keeps the plain layout. `described(path)` sets the probe's answer while
layers are built, so a test runs the path of the machine it describes, not the one CI landed on.

As a script it runs the pipeline's command line on a described CPU:
`python tests/pipeline/bnb_cpu.py avx512bf16 run JOB_DIR`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

CPU_PATHS = ("plain", "avx512bf16")


def describe(path: str) -> None:
    """From now on, this process's new 4-bit layers take `path`."""
    import bitsandbytes.nn.modules as modules

    if path not in CPU_PATHS:
        raise ValueError(f"unknown bitsandbytes CPU path {path!r}; choose from {CPU_PATHS}")
    modules.has_avx512bf16 = (lambda: True) if path == "avx512bf16" else (lambda: False)


@contextlib.contextmanager
def described(path: str):
    """4-bit layers built inside take `path`; the probe is restored after."""
    import bitsandbytes.nn.modules as modules

    probe = modules.has_avx512bf16
    describe(path)
    try:
        yield
    finally:
        modules.has_avx512bf16 = probe


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    describe(sys.argv[1])
    from tinyllama_mcp.pipeline.__main__ import main

    sys.exit(main(sys.argv[2:]))
