"""Fixtures of the engine tests (CPU, tiny-demo in fp32); tests/pipeline/conftest.py provides tiny_demo and tokenizer."""

from __future__ import annotations

import pytest
import torch

from tinyllama_mcp.pipeline.engine import Engine, EngineConfig


@pytest.fixture(scope="module")
def model(tiny_demo):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    eng = Engine(model, tokenizer, EngineConfig(max_batch=2, max_len=256, chunk=3, max_queue=16))
    yield eng
    eng.close()
