"""Fixtures of the speed-lever tests; tests/pipeline/conftest.py provides tiny_demo, tokenizer and cpu_path."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def demo_model(tiny_demo):
    """tiny-demo in fp32, eval mode, no adapter."""
    from tinyllama_mcp.pipeline.modeling import load_base
    from tinyllama_mcp.pipeline.specs import QuantSpec

    torch.manual_seed(0)
    return load_base(tiny_demo, QuantSpec(quantization="none"), torch.float32).eval()


@pytest.fixture(scope="module")
def demo_config(tiny_demo):
    """tiny-demo's model config (what the planner reads)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_demo)
