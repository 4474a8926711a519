"""The engine's configuration: checked values, CPU defaults, and the environment variables read in one place."""

from __future__ import annotations

import pytest

from tinyllama_mcp.pipeline.engine import Engine, EngineConfig
from tinyllama_mcp.pipeline.engine.config import resolve_config


def test_compile_mode_is_checked_and_cpu_defaults_to_eager(model):
    with pytest.raises(ValueError):
        Engine(model, None, EngineConfig(max_batch=1, max_len=64, compile_mode="fast"))
    eng = Engine(model, None, EngineConfig(max_batch=1, max_len=64))
    assert eng.info.compile_mode == "none" and eng.info.attention == "sdpa"
    eng.close()


def resolve(config: EngineConfig, on_cuda: bool) -> EngineConfig:
    return resolve_config(config, on_cuda=on_cuda, model_context=8192, model_eos_ids=[2])


def test_environment_sets_what_the_config_leaves_open(monkeypatch):
    monkeypatch.setenv("TINYLLAMA_MCP_ENGINE_COMPILE", "0")
    monkeypatch.setenv("TINYLLAMA_MCP_ENGINE_ATTENTION", "reduce")
    monkeypatch.setenv("TINYLLAMA_MCP_ENGINE_GEMV", "0")
    cuda = resolve(EngineConfig(), on_cuda=True)
    assert (cuda.compile_mode, cuda.attention, cuda.batch1_gemv, cuda.cuda_graphs) == ("none", "reduce", False, True)
    assert (cuda.max_batch, cuda.chunk, cuda.max_len, cuda.eos_token_ids) == (32, 8, 4096, (2,))
    explicit = resolve(EngineConfig(compile_mode="helpers", attention="sdpa", batch1_gemv=True), on_cuda=True)
    assert (explicit.compile_mode, explicit.attention, explicit.batch1_gemv) == ("helpers", "sdpa", True)
    monkeypatch.setenv("TINYLLAMA_MCP_ENGINE_COMPILE", "fast")
    with pytest.raises(ValueError):
        resolve(EngineConfig(), on_cuda=True)


def test_cpu_defaults_ignore_the_compile_variable(monkeypatch):
    monkeypatch.setenv("TINYLLAMA_MCP_ENGINE_COMPILE", "layer")
    monkeypatch.delenv("TINYLLAMA_MCP_ENGINE_ATTENTION", raising=False)
    monkeypatch.delenv("TINYLLAMA_MCP_ENGINE_GEMV", raising=False)
    cpu = resolve(EngineConfig(max_len=100, prefill_tokens=10, eos_token_ids=[]), on_cuda=False)
    assert (cpu.compile_mode, cpu.cuda_graphs, cpu.batch1_gemv, cpu.attention) == ("none", False, False, None)
    assert (cpu.max_batch, cpu.chunk, cpu.max_len, cpu.prefill_tokens, cpu.eos_token_ids) == (8, 4, 100, 100, ())
    assert resolve(EngineConfig(cuda_graphs=True), on_cuda=False).cuda_graphs is False
