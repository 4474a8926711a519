"""speed.compiled_layers (levers torch_compile, cuda_graphs): each decoder layer's forward as one compiled function."""

from __future__ import annotations

import math

import pytest
import torch

from tinyllama_mcp.pipeline.speed import compiled_layers
from tinyllama_mcp.pipeline.speed.packing import PackedRowsCollator

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("variant", ["fp32", "nf4", "checkpointing", "dropout"])
def test_compiled_layer_is_the_eager_layer(tiny_demo, variant, monkeypatch):
    """The compiled decoder layer (traced by dynamo, forward and backward split by AOTAutograd): HF's eager
    layers' loss and LoRA gradients on packed sequences, and DPO's reference pass (adapter off, no gradients) its
    loss; evaluation with the adapter on keeps HF's forward."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.speed import fused_lora, varlen_attention
    from tinyllama_mcp.pipeline.specs import QuantSpec

    calls = []  # layer forwards that took the compiled function
    compiled_fn = compiled_layers._compiled
    monkeypatch.setattr(compiled_layers, "_compiled",
                        lambda *key: lambda *args: calls.append(key) or compiled_fn(*key)(*args))

    batches = [PackedRowsCollator(pad_token_id=0, capacity=10_000, cu_seq_lens=True)(
        [{"input_ids": list(range(start, start + n))} for n in lengths])
        for start, lengths in ((3, (17, 30, 9)), (5, (21, 12, 40, 7)))]  # two packed widths: the graph turns dynamic

    def run(compiled: bool):
        torch.manual_seed(0)
        quantization = "nf4" if variant == "nf4" else "none"
        base = modeling.load_base(str(tiny_demo), QuantSpec(quantization=quantization, compute_dtype="fp32"),
                                  torch.float32)
        torch.manual_seed(0)  # the LoRA init, whatever loading drew
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.3 if variant == "dropout" else 0.0,
                                                init_lora_weights=False,
                                                target_modules=list(compiled_layers.PROJECTIONS)))
        if variant == "checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if variant != "nf4":  # the compiled layer does not need the fused_lora lever (the NF4 case runs without)
            fused_lora.fuse_lora(model)
        if compiled:
            installed = compiled_layers.install(model, compiled_layers.Settings(backend="aot_eager"))
            assert installed == model.config.num_hidden_layers
        model.train()
        losses = []
        with varlen_attention.use(model):
            for batch in batches:
                torch.manual_seed(1)
                loss = model(**batch).loss
                loss.backward()
                losses.append(loss.item())
            trained_calls = len(calls)
            with model.disable_adapter(), torch.no_grad():  # DPO's reference pass: the base projections alone
                reference = model(**batches[0]).loss.item()
            assert len(calls) == trained_calls + (model.config.num_hidden_layers if compiled else 0)
            model.eval()
            with torch.no_grad():  # evaluation with the adapter on: HF's own forward
                model(**batches[0])
            assert len(calls) == trained_calls + (model.config.num_hidden_layers if compiled else 0)
        layers = model.config.num_hidden_layers
        # every layer of both steps (under checkpointing, again in the recompute), and only when installed
        assert trained_calls == (len(batches) * layers * (2 if variant == "checkpointing" else 1) if compiled else 0)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return losses, grads, reference

    eager, compiled = run(False), run(True)
    assert math.isclose(eager[2], compiled[2], rel_tol=1e-6), (eager[2], compiled[2])  # the reference pass
    if variant == "dropout":  # other draws (the traced graph's own random stream): the same rate, not the same mask
        assert all(math.isfinite(loss) for loss in compiled[0])
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in compiled[1].values())
        return
    for a, b in zip(eager[0], compiled[0]):
        assert math.isclose(a, b, rel_tol=1e-5), (eager[0], compiled[0])
    assert eager[1].keys() == compiled[1].keys() and len(eager[1]) == 14 * 2
    for name in eager[1]:
        assert torch.allclose(eager[1][name], compiled[1][name], rtol=1e-4, atol=1e-6), name


def test_compiled_layers_refuse_other_architectures():
    from types import SimpleNamespace

    llama = dict(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0)
    assert compiled_layers.unsupported(SimpleNamespace(**llama)) is None
    assert "model_type 'mistral'" in compiled_layers.unsupported(SimpleNamespace(**dict(llama, model_type="mistral")))
    assert "biases" in compiled_layers.unsupported(SimpleNamespace(**dict(llama, attention_bias=True)))
    assert "gelu" in compiled_layers.unsupported(SimpleNamespace(**dict(llama, hidden_act="gelu")))


def test_cuda_graphs_read_every_layer_weight_in_place(tiny_demo):
    """Installed for CUDA graphs, every weight the compiled layer reads is marked static (a replay reads it where it
    is: LoRA A and B, the norms, the dequantized base copies), so the graphs neither copy nor re-record them."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.nn.llama import decoder_of
    from tinyllama_mcp.pipeline.speed.dequantized_base import dequantize_base
    from tinyllama_mcp.pipeline.specs import QuantSpec

    base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="nf4", compute_dtype="fp32"), torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=list(compiled_layers.PROJECTIONS)))
    dequantize_base(model)
    assert compiled_layers.install(model, compiled_layers.Settings(cuda_graphs=True)) == model.config.num_hidden_layers
    layer = decoder_of(model).layers[0]
    static = [t for t in layer.parameters() if getattr(t, "_dynamo_static_input_type", None)]
    assert len(static) == 2 + 2 * 7  # the norms, A and B of the seven projections (NF4 weights are not read)
    copies = [m.dequantized_weight for m in layer.modules() if hasattr(m, "dequantized_weight")]
    assert len(copies) == 7 and all(getattr(w, "_dynamo_static_input_type", None) for w in copies)
