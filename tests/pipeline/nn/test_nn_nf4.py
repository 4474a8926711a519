"""NF4 weights read true on both bitsandbytes CPU paths (bnb_cpu.py), whatever CPU runs the tests."""

from __future__ import annotations

import pytest
import torch

from tinyllama_mcp.pipeline.nn import nf4
from tinyllama_mcp.pipeline.specs import QuantSpec

from bnb_cpu import CPU_PATHS, described


def nf4_layer(weight: torch.Tensor):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                     module=layer)
    return layer.to("cpu")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_a_weight_bitsandbytes_repacked_reads_back_true():
    """The AVX512-BF16 path repacks on a no-grad eval pass; dequantize_4bit then reads garbage, nf4.dequantized
    does not (it restores bitsandbytes' plain layout, bf16 block scales and all), and the layer stays plain."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    with described("avx512bf16"):
        layer = nf4_layer(torch.randn(64, 128))
    true = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes release keeps one CPU layout (nothing to restore)")
    assert relative_error(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state), true) > 0.5

    assert relative_error(nf4.dequantized(layer), true) < 1e-2  # the block scales went through bf16
    assert not layer.weight.quant_state.packing_format_for_cpu
    x = torch.randn(3, 128)
    with torch.no_grad():
        out = layer(x)  # eval, no grad: where it repacked before
    assert not layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(out, x @ nf4.dequantized(layer).t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_loaded_models_compute_the_same_on_every_cpu_path(tiny_demo, path):
    """A base the pipeline loads keeps the plain layout on either path: eval and training passes, and both paths,
    give the same logits, and every weight reads back as it was quantized."""
    from tinyllama_mcp.pipeline import modeling

    def load():
        return modeling.load_base(str(tiny_demo), QuantSpec(quantization="nf4", compute_dtype="fp32"), torch.float32)

    with described("plain"):
        plain = load()
    with described(path):
        model = load()
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    ids = torch.arange(3, 30).view(1, -1)
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    model.train()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    with torch.no_grad():
        reference = plain.train()(input_ids=ids).logits
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    torch.testing.assert_close(evaluated, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, reference, rtol=0, atol=0)
    for ours, theirs in zip(layers, [m for m in plain.modules() if hasattr(m, "support_avx512bf16_for_cpu")]):
        assert torch.equal(nf4.dequantized(ours), nf4.dequantized(theirs))
