"""What the engine ended up running, and each optimisation that failed on the way, with its reason.

The engine tries its fastest path first (compiled decode layers in CUDA graphs) and falls back step by step
when compiling or capturing fails; every fallback is recorded here so that a slow engine says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

# Fallback stages, and the keys the benches have always written their reasons under.
COMPILE_HELPERS = "compile_helpers"  # torch.compile of RMSNorm/RoPE/SiLU*mul
COMPILE_LAYER = "compile_layer"  # compiling the whole decode layer, or its check against eager
CAPTURE_LAYER = "capture_layer"  # capturing the compiled decode layer in a CUDA graph
BATCH1_GEMV = "batch1_gemv"  # the batch-1 Triton GEMV variant (compile, check, capture)
CUDA_GRAPHS = "cuda_graphs"  # capturing decode graphs at all, or the synchronize after a failed capture
PREFILL_GRAPH = "prefill_graph"  # capturing a batch-1 prefill graph


@dataclass(frozen=True)
class Fallback:
    stage: str  # one of the stages above
    now: str  # what runs instead
    reason: str  # the error, shortened


@dataclass
class Batch1Gemv:
    """The timing that chose batch 1's projections: cuBLAS ("mm") or Triton reductions ("gemv")."""

    bucket: Optional[int] = None  # the context bucket both graphs were timed at
    mm_step_ms: Optional[float] = None
    gemv_step_ms: Optional[float] = None
    choice: str = "mm"


@dataclass
class EngineInfo:
    compile_mode: str = "none"  # the decode path running now: layer | helpers | none
    attention: str = "sdpa"  # decode attention, e.g. "sdpa" or "reduce at batch 1, sdpa above"
    cuda_graphs: bool = False  # whether decode (and batch-1 prefill) replay CUDA graphs now
    compiled_helpers: bool = False
    lora_merged_privately: bool = False  # a PEFT model: its live adapter is merged into the engine's own copy
    compile_s: float = 0.0
    batch1_gemv: Optional[Batch1Gemv] = None  # set once batch 1's first graph was timed
    fallbacks: list[Fallback] = field(default_factory=list)

    def fell_back(self, stage: str, now: str, reason: str) -> None:
        self.fallbacks.append(Fallback(stage, now, reason))

    def failed(self, stage: str) -> bool:
        return any(f.stage == stage for f in self.fallbacks)

    def _reasons(self, *stages: str) -> Optional[str]:
        reasons = [("capture: " if f.stage == CAPTURE_LAYER else "") + f.reason
                   for f in self.fallbacks if f.stage in stages]
        return "; ".join(reasons) or None

    def as_dict(self) -> dict:
        """Flat JSON, under the keys the benches' result files have always used (plus `fallbacks`)."""
        gemv = {k: v for k, v in asdict(self.batch1_gemv).items() if v is not None} if self.batch1_gemv else {}
        if self.failed(BATCH1_GEMV):
            gemv["error"] = self._reasons(BATCH1_GEMV)
        return {
            "cuda_graphs": self.cuda_graphs,
            "compiled_helpers": self.compiled_helpers,
            "graph_error": self._reasons(CUDA_GRAPHS),
            "compile_error": self._reasons(COMPILE_HELPERS),
            "lora_merged_privately": self.lora_merged_privately,
            "compile_mode": self.compile_mode,
            "attention": self.attention,
            "layer_compile_error": self._reasons(COMPILE_LAYER, CAPTURE_LAYER),
            "compile_s": self.compile_s,
            "batch1_gemv": gemv or None,
            "prefill_graph_error": self._reasons(PREFILL_GRAPH),
            "fallbacks": [asdict(f) for f in self.fallbacks],
        }
