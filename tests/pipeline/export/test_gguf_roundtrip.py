"""GGUF export on CPU: each model type (f16, bf16, q8_0) and the LoRA adapter written, read back with gguf.GGUFReader
and checked against the source's logits and token ids; for tiny-demo, a trained tiny-demo adapter (also as a PEFT
folder for vLLM), and a tiny Llama with a SentencePiece tokenizer laid out as TinyLlama's. The Q/K permutation is
shown to be what the forward needs."""

from __future__ import annotations

import gguf
import pytest
import torch

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.export import checks, ggml_forward
from tinyllama_mcp.pipeline.export.gguf_lora import plain_lora, verify_lora, write_lora
from tinyllama_mcp.pipeline.export.gguf_model import verify_model, write_model
from tinyllama_mcp.pipeline.export.gguf_read import fields_of
from tinyllama_mcp.pipeline.export.llama_layout import LlamaShape, tensor_map, to_ggml_rows, to_hf_rows
from tinyllama_mcp.pipeline.export.peft_format import verify_peft, vllm_view, write_peft
from tinyllama_mcp.pipeline.export.source import load_source
from tinyllama_mcp.pipeline.specs import export_formats

from spm_model import build_spm_llama


@pytest.fixture(scope="module")
def demo(tiny_demo):
    return load_source("tiny-demo")


@pytest.fixture(scope="module")
def adapter(tiny_demo, tmp_path_factory):
    """A tiny-demo SFT adapter trained in-process for a few steps (plain LoRA on the fp32 base), loaded as a source."""
    from pipeline_testlib import sft_demo_spec
    from tinyllama_mcp.pipeline.events import EventLog
    from tinyllama_mcp.pipeline.recipe.sft import run_sft
    from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

    job = tmp_path_factory.mktemp("sft")
    spec = sft_demo_spec(SFT_SAMPLE, max_samples=8, training={"max_steps": 4, "save_steps": 100},
                         quant={"quantization": "none"}, eval_prompts={"prompts": ["hi"], "max_new_tokens": 2})
    log = EventLog(job / "events.jsonl")
    run_sft(spec, job, log)
    log.close()
    return load_source(str(job / "adapter"))


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_model_gguf_round_trip(demo, tmp_path, kind):
    path = tmp_path / f"model-{kind}.gguf"
    write_model(path, demo, kind, "tiny-demo")
    report = verify_model(path, demo, kind)
    assert report["passed"] and 0 < report["max_abs_logit_diff"] <= report["bound"]
    assert report["tokenizer"] == "gpt2" and report["tokenizer_ids_equal"] and report["token_prompts"] == len(demo.ids)
    assert report["bound"] == checks.logit_bound(kind, demo.logit_scale, 2)

    # What llama.cpp reads, through the gguf package's own reader
    reader = gguf.GGUFReader(path)
    fields = fields_of(reader)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert (fields["llama.context_length"], fields["llama.embedding_length"], fields["llama.block_count"],
            fields["llama.feed_forward_length"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"]) == (2048, 128, 2, 256, 4, 2)
    assert fields["llama.rope.freq_base"] == 10000.0
    assert abs(fields["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 1024 and fields["tokenizer.ggml.tokens"][5] == "<|user|>"
    assert fields["tokenizer.ggml.token_type"][:7] == [3] * 7 and fields["tokenizer.ggml.token_type"][7] == 1
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (1, 2, 3, False)
    template = fields["tokenizer.chat_template"]
    assert "<|assistant|>" in template and "{% generation %}" not in template and "endgeneration" not in template
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types) == {name for name, _ in tensor_map(LlamaShape.of_config(demo.config)).values()}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_output.weight",
            "blk.1.ffn_gate.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"} <= set(types)
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == kind.upper()


def test_qk_permutation_is_what_llama_cpp_rope_needs(demo):
    w = torch.arange(8.0)[:, None].expand(8, 3)  # two heads of dim 4: HF rows (0, 1 | 2, 3) pair as (0, 2), (1, 3)
    assert to_ggml_rows(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(to_hf_rows(to_ggml_rows(w, 2), 2), w)

    shape = LlamaShape.of_config(demo.config)
    state = demo.merged_state()
    as_gguf = {g: to_ggml_rows(state[h], heads) if heads else state[h] for h, (g, heads) in tensor_map(shape).items()}
    unpermuted = {g: state[h] for h, (g, _) in tensor_map(shape).items()}
    right = checks.max_abs_diff([ggml_forward.logits(shape, as_gguf, ids) for ids in demo.ids], demo.logits)
    wrong = checks.max_abs_diff([ggml_forward.logits(shape, unpermuted, ids) for ids in demo.ids], demo.logits)
    assert right <= checks.same_bound(demo.logit_scale)  # adjacent-pair RoPE on permuted rows = HF's rotate_half
    assert wrong > demo.logit_scale / 2 and wrong > 4 * checks.logit_bound("q8_0", demo.logit_scale, shape.layers)


def test_adapter_gguf_model_and_lora(adapter, demo, tmp_path):
    assert checks.max_abs_diff(adapter.logits, demo.logits) > 0.05  # the adapter changes the model
    merged = tmp_path / "merged-f16.gguf"
    write_model(merged, adapter, "f16", "sft")
    assert verify_model(merged, adapter, "f16")["passed"]

    lora = tmp_path / "lora.gguf"
    write_lora(lora, adapter, "sft")
    report = verify_lora(lora, adapter)
    assert report["passed"] and report["max_abs_logit_diff"] <= report["bound"] and report["rank"] == 16
    reader = gguf.GGUFReader(lora)
    fields = fields_of(reader)
    assert (fields["general.type"], fields["adapter.type"], fields["adapter.lora.alpha"]) == ("adapter", "lora", 32.0)
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert len(shapes) == 2 * 7 * 2  # lora_a and lora_b of the seven projections of both layers
    assert shapes["blk.0.attn_q.weight.lora_a"] == [128, 16] and shapes["blk.0.attn_q.weight.lora_b"] == [16, 128]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == [256, 16] and shapes["blk.1.attn_k.weight.lora_b"] == [16, 64]


def test_adapter_peft_folder_for_vllm(adapter, tmp_path):
    view = write_peft(tmp_path / "peft", adapter)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert view["rank"] == 16 and view["vllm_flags"] == "--enable-lora" and len(view["target_modules"]) == 7
    report = verify_peft(tmp_path / "peft", adapter)
    assert report["passed"] and report["max_abs_logit_diff"] <= report["bound"]
    assert vllm_view({"r": 64, "lora_alpha": 16, "target_modules": ["q_proj"]}, [])["vllm_flags"] == \
        "--enable-lora --max-lora-rank 64"
    with pytest.raises(UserError, match=r"not \['embed_tokens'\]"):
        vllm_view({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "embed_tokens"]}, [])


def test_sentencepiece_tokenizer_as_tinyllama(tmp_path):
    source = load_source(str(build_spm_llama(tmp_path / "spm-llama")))
    path = tmp_path / "spm-f16.gguf"
    write_model(path, source, "f16", "spm")
    report = verify_model(path, source, "f16")
    assert report["tokenizer"] == "llama" and report["tokenizer_ids_equal"] and report["passed"]
    fields = fields_of(gguf.GGUFReader(path))
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is True
    assert len(fields["tokenizer.ggml.scores"]) == len(fields["tokenizer.ggml.tokens"]) == 640
    assert fields["tokenizer.ggml.tokens"][3:5] == ["<0x00>", "<0x01>"] and fields["tokenizer.ggml.token_type"][3] == 6


def test_what_cannot_be_exported_faithfully_is_refused(demo):
    config = demo.config.__class__(**{**demo.config.to_dict(), "rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})
    with pytest.raises(UserError, match="RoPE scaling 'linear'"):
        LlamaShape.of_config(config)
    with pytest.raises(UserError, match="DoRA"):
        plain_lora({"r": 8, "lora_alpha": 16, "use_dora": True}, "a GGUF LoRA")
    with pytest.raises(UserError, match="modules_to_save"):
        plain_lora({"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head"]}, "a GGUF LoRA")
    with pytest.raises(UserError, match=r"\['gguf-lora', 'peft'\] export a LoRA adapter"):
        export_formats(["gguf-f16", "peft", "gguf-lora"], is_adapter=False, label="merge-0123456789ab")
