"""EngineInfo: resolved modes and fallbacks, written under the keys the benches' result files use."""

from __future__ import annotations

from tinyllama_mcp.pipeline.engine import Batch1Gemv, EngineInfo
from tinyllama_mcp.pipeline.engine.info import BATCH1_GEMV, CAPTURE_LAYER, CUDA_GRAPHS


def test_fallbacks_fill_the_legacy_keys():
    info = EngineInfo(compile_mode="layer", cuda_graphs=True)
    assert info.as_dict()["graph_error"] is None and info.as_dict()["batch1_gemv"] is None
    info.batch1_gemv = Batch1Gemv(choice="mm", bucket=256, mm_step_ms=1.5)
    info.fell_back(BATCH1_GEMV, "cuBLAS projections", "RuntimeError('gemv')")
    info.fell_back(CAPTURE_LAYER, "helpers", "RuntimeError('capture')")
    info.fell_back(CUDA_GRAPHS, "eager decode", "RuntimeError('graphs')")
    d = info.as_dict()
    assert d["batch1_gemv"] == {"choice": "mm", "bucket": 256, "mm_step_ms": 1.5, "error": "RuntimeError('gemv')"}
    assert d["layer_compile_error"] == "capture: RuntimeError('capture')"
    assert d["graph_error"] == "RuntimeError('graphs')"
    assert d["compile_error"] is None and d["prefill_graph_error"] is None
    assert [f["stage"] for f in d["fallbacks"]] == [BATCH1_GEMV, CAPTURE_LAYER, CUDA_GRAPHS]
    assert {"cuda_graphs", "compiled_helpers", "lora_merged_privately", "compile_mode", "attention",
            "compile_s"} <= set(d)
