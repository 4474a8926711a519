"""What this machine can run, read once per stage and handed to the planner (tests describe a machine instead)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

NO_CUDA = "no CUDA device"


@dataclass(frozen=True)
class Machine:
    """The facts the levers depend on. Each `*_missing` is None when that piece can run here, else why not."""

    cuda: bool = False
    free_memory: Optional[int] = None  # bytes free on the GPU (None: no GPU)
    triton_missing: Optional[str] = None  # inductor's GPU kernels (compiled layers on CUDA)
    liger_missing: Optional[str] = NO_CUDA + " (Liger's kernels are Triton GPU kernels)"
    varlen_missing: Optional[str] = None  # torch's varlen flash attention (CUDA; a CPU runs it per sequence)

    @classmethod
    def read(cls) -> "Machine":
        import torch

        from tinyllama_mcp.pipeline.speed import compiled_layers, varlen_attention

        if not torch.cuda.is_available():
            return cls()
        free, _total = torch.cuda.mem_get_info()
        return cls(cuda=True, free_memory=free, triton_missing=compiled_layers.gpu_kernels_unavailable(),
                   liger_missing=_liger_missing(), varlen_missing=varlen_attention.unavailable(True))

    @classmethod
    def gpu(cls, free_gib: float = 80) -> "Machine":
        """A CUDA machine with `free_gib` free and every optional kernel installed (what tests describe)."""
        return cls(cuda=True, free_memory=int(free_gib * 2**30), liger_missing=None)


def _liger_missing() -> Optional[str]:
    try:
        import liger_kernel  # noqa: F401
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        return f"liger-kernel/triton cannot be imported ({type(exc).__name__}: {exc})"
    return None
