"""Speed levers (issue 4): each lever, where it runs on a CPU, learns the same as with it off.

Runs on the embedded tiny-demo model in fp32 with LoRA dropout 0 (dropout draws would differ with the
batch layout). The end-to-end checks run each stage in-process for two optimizer steps.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from tinyllama_mcp.pipeline import fast
from tinyllama_mcp.pipeline.specs import DPOSpec, SFTSpec, TrainingSpec

from bnb_cpu import described

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# ---------------------------------------------------------------- units


def test_pack_rows_first_fit_decreasing():
    rows = fast.pack_rows([5, 3, 8, 2, 6], capacity=10)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 6][i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 24 tokens need at least 3 rows of 10
    assert fast.pack_rows([12, 1], capacity=10) == [[0], [1]]  # an over-long sequence gets a row of its own


def test_packed_collator_positions_and_labels():
    collate = fast.PackedRowsCollator(pad_token_id=3, capacity=8)
    batch = collate([{"input_ids": [10, 11, 12], "labels": [10, 11, 12]},
                     {"input_ids": [20, 21, 22, 23], "labels": [-100, 21, 22, 23]},
                     {"input_ids": [30, 31, 32, 33, 34, 35]}])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask
    ids, labels, pos = batch["input_ids"].tolist(), batch["labels"].tolist(), batch["position_ids"].tolist()
    assert len(ids) == 2 and len(ids[0]) == 7
    flat = {tuple(row[:]) for row in ids}
    assert (30, 31, 32, 33, 34, 35, 3) in flat
    for row_ids, row_labels, row_pos in zip(ids, labels, pos):
        for j, token in enumerate(row_ids):
            if token == 3:  # pad: no loss
                assert row_labels[j] == -100
            elif row_pos[j] == 0:  # a sequence's first token is never predicted from the one before
                assert row_labels[j] == -100
    row = ids.index([10, 11, 12, 20, 21, 22, 23])
    assert pos[row] == [0, 1, 2, 0, 1, 2, 3]
    assert labels[row] == [-100, 11, 12, -100, 21, 22, 23]


def test_packed_collator_sequence_boundaries_for_varlen():
    collate = fast.PackedRowsCollator(pad_token_id=3, capacity=8, cu_seq_lens=True)
    batch = collate([{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21, 22, 23]}, {"input_ids": [30, 31, 32, 33, 34]}])
    ids = batch["input_ids"].tolist()
    assert ids == [[10, 11, 12, 30, 31, 32, 33, 34], [20, 21, 22, 23, 3, 3, 3, 3]]  # first-fit-decreasing
    # Every sequence is one segment of the flattened rows; a row's padding is a segment of its own.
    flat = batch["input_ids"].view(-1).tolist()
    cu = batch["cu_seq_lens_q"].tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == len(flat)
    segments = [flat[a:b] for a, b in zip(cu[:-1], cu[1:])]
    assert sorted(segments) == sorted([[10, 11, 12], [20, 21, 22, 23], [30, 31, 32, 33, 34], [3, 3, 3, 3]])
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    one_row = fast.PackedRowsCollator(pad_token_id=3, capacity=100, cu_seq_lens=True)(
        [{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21]}])
    assert one_row["input_ids"].shape == (1, 5) and one_row["cu_seq_lens_q"].tolist() == [0, 3, 5]
    # cuda_graphs: the width rounded up to the multiple, the padding its own segment, max_length the width
    padded = fast.PackedRowsCollator(pad_token_id=3, capacity=100, cu_seq_lens=True, width_multiple=4)(
        [{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21]}])
    assert padded["input_ids"].tolist() == [[10, 11, 12, 20, 21, 3, 3, 3]]
    assert padded["labels"].tolist() == [[-100, 11, 12, -100, 21, -100, -100, -100]]
    assert padded["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and padded["max_length_q"] == 8
    # ... unless the stage's max_length is known: then max_length is a bound on every segment fixed before the run,
    # the longer of it and the multiple (which bounds the padding), where no segment exceeds it
    def bounded(lengths, max_sequence):
        return fast.PackedRowsCollator(pad_token_id=3, capacity=100, cu_seq_lens=True, width_multiple=4,
                                       max_sequence=max_sequence)([{"input_ids": [9] * n} for n in lengths])
    assert bounded([3, 2], max_sequence=3)["max_length_q"] == bounded([3, 2], max_sequence=3)["max_length_k"] == 4
    assert bounded([3, 2], max_sequence=6)["max_length_q"] == 6
    assert bounded([5, 2], max_sequence=2)["max_length_q"] == 8  # a sequence longer than max_length: the width
    assert bounded([1, 1], max_sequence=6)["max_length_q"] == 4  # never more than the width


def test_resolve_fuses_accumulation_within_the_token_budget(tiny_demo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_demo)
    recipe = TrainingSpec()  # 2 x 4 x 512 = 4096 tokens <= 16384
    lv = fast.resolve(recipe, "sft", config, torch.float32, rows=100)
    assert (lv.batch_size, lv.accumulation) == (8, 1)
    lv = fast.resolve(recipe, "dpo", config, torch.float32, rows=100)  # chosen + rejected: 8192 tokens
    assert (lv.batch_size, lv.accumulation) == (8, 1)
    off = fast.resolve(recipe.model_copy(update={"max_tokens_per_batch": 0}), "sft", config, torch.float32, rows=100)
    assert (off.batch_size, off.accumulation) == (2, 4)
    big = fast.resolve(recipe.model_copy(update={"max_length": 4096}), "sft", config, torch.float32, rows=100)
    assert (big.batch_size, big.accumulation) == (4, 2)  # 4 x 4096 fits 16384: partly fused
    huge = fast.resolve(recipe.model_copy(update={"max_length": 16384}), "sft", config, torch.float32, rows=100)
    assert (huge.batch_size, huge.accumulation) == (2, 4)  # nothing larger than the recipe's micro-batch fits


def test_resolve_cpu_skips_gpu_only_levers_with_a_note(tiny_demo):
    from transformers import AutoConfig

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    config = AutoConfig.from_pretrained(tiny_demo)
    lv = fast.resolve(TrainingSpec(activation_offloading=True), "sft", config, torch.float32, rows=10)
    assert lv.use_liger_kernel is False and lv.activation_offloading is False
    assert lv.gradient_checkpointing is False  # "auto": the tiny model's activations fit
    notes = " ".join(lv.notes)
    assert "use_liger_kernel skipped" in notes and "activation_offloading skipped" in notes
    assert "gradient_checkpointing auto -> False" in notes
    forced = fast.resolve(TrainingSpec(gradient_checkpointing=True, use_liger_kernel=False), "sft", config,
                          torch.float32, rows=10)
    assert forced.gradient_checkpointing is True
    assert [n for n in forced.notes[1:] if not n.startswith(("fused_optimizer skipped", "torch_compile skipped"))] == []
    assert forced.optim == "adamw_torch" and not forced.master_fp32  # CPU: torch's AdamW, weights as before
    assert forced.tokens_per_step == 0 and forced.step_scale == 1  # 'auto' token budget is off on a CPU


def test_activation_estimate_for_tinyllama_shape():
    from types import SimpleNamespace

    tinyllama = SimpleNamespace(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22)
    gib = fast.activation_bytes(tinyllama, 8 * 2048, torch.bfloat16) / 2**30
    assert 40 < gib < 60  # stock HF + Liger without checkpointing measured 44 GiB at 8 x 2048


def test_precompute_auto_only_when_every_row_is_trained(tiny_demo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_demo)
    short = TrainingSpec(max_steps=10, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    assert not fast.resolve(short, "dpo", config, torch.float32, rows=100).precompute_ref_log_probs
    every_row = TrainingSpec(max_steps=50, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    assert fast.resolve(every_row, "dpo", config, torch.float32, rows=100).precompute_ref_log_probs
    assert fast.resolve(TrainingSpec(num_train_epochs=1), "dpo", config, torch.float32, rows=100).precompute_ref_log_probs
    epochs = TrainingSpec(num_train_epochs=3)
    assert fast.resolve(epochs, "dpo", config, torch.float32, rows=100).precompute_ref_log_probs
    assert not fast.resolve(TrainingSpec(precompute_ref_log_probs=False, num_train_epochs=3), "dpo", config,
                            torch.float32, rows=100).precompute_ref_log_probs


def test_fused_optimizer_lever_resolves_per_device(tiny_demo, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_demo)
    monkeypatch.setattr(fast, "fused_optimizer_ok", lambda: True)  # as on CUDA
    on = fast.resolve(TrainingSpec(fused_optimizer=True), "sft", config, torch.bfloat16, rows=10)
    assert on.optim == "adamw_torch_fused" and on.master_fp32 and on.effective()["optim"] == "adamw_torch_fused"
    off = fast.resolve(TrainingSpec(fused_optimizer=False), "sft", config, torch.bfloat16, rows=10)
    assert off.optim == "paged_adamw_32bit" and not off.master_fp32
    eight_bit = fast.resolve(TrainingSpec(optim="paged_adamw_8bit"), "sft", config, torch.bfloat16, rows=10)
    assert eight_bit.optim == "paged_adamw_8bit"  # quantized states: not the same math, left alone
    lowmem = fast.resolve(TrainingSpec(fused_optimizer=True, activation_offloading=True), "sft", config,
                          torch.bfloat16, rows=10)
    assert lowmem.optim == "paged_adamw_32bit" and "memory-saving" in " ".join(lowmem.notes)


def test_cast_trainable_master_fp32_keeps_fp32_under_bf16(tiny_demo):
    from peft import get_peft_model

    from tinyllama_mcp.pipeline.modeling import cast_trainable, load_base
    from tinyllama_mcp.pipeline.specs import LoraSpec, QuantSpec
    from tinyllama_mcp.pipeline.training import lora_config

    model = get_peft_model(load_base(tiny_demo, QuantSpec(quantization="none"), torch.float32),
                           lora_config(LoraSpec(r=4)))
    cast_trainable(model, torch.bfloat16, master_fp32=True)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    cast_trainable(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_torch_fused_adamw_is_the_same_math():
    """adamw_torch_fused vs adamw_torch (what the lever swaps on CUDA; fused AdamW also runs on a CPU)."""
    torch.manual_seed(0)
    params = [torch.randn(64, 8), torch.randn(8, 64), torch.randn(3)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]
    out = []
    for fused in (False, True):
        ps = [p.clone().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, fused=fused, foreach=None if fused else False)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        out.append([p.detach() for p in ps])
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tokens_per_step_scales_the_step_and_the_step_counts(tiny_demo):
    from transformers import AutoConfig

    from tinyllama_mcp.pipeline.training import total_steps

    config = AutoConfig.from_pretrained(tiny_demo)
    # 2 x 4 sequences of ~700 tokens: ~5.6k a step -> k = 4
    recipe = TrainingSpec(tokens_per_step=24576, max_length=2048)
    lv = fast.resolve(recipe, "sft", config, torch.float32, rows=3000, mean_tokens=700)
    assert lv.step_scale == 4 and lv.batch_size * lv.accumulation == 32
    assert (lv.batch_size, lv.accumulation) == (8, 4)  # 8 x 2048 = 16384 fits max_tokens_per_batch
    short = fast.resolve(recipe.model_copy(update={"max_length": 512}), "sft", config, torch.float32, rows=3000,
                         mean_tokens=700)  # rows clipped to 512: k = round(24576 / 4096)
    assert short.step_scale == 6 and (short.batch_size, short.accumulation) == (24, 2)
    assert lv.max_steps == -1 and lv.save_steps == 13
    # Epochs: the same rows in a quarter of the steps.
    assert total_steps(3000, recipe) == 375 and total_steps(3000, recipe, lv) == 94
    # max_steps counts recipe-sized steps: the same sequences in ceil(200 / k) steps.
    dpo = TrainingSpec(learning_rate=1e-5, max_steps=200, warmup_ratio=0.1, tokens_per_step=24576)
    lv = fast.resolve(dpo, "dpo", config, torch.float32, rows=12000, mean_tokens=400)  # 800 tokens a pair
    assert lv.step_scale == 4 and lv.max_steps == 50 and total_steps(12000, dpo, lv) == 50
    assert lv.batch_size * lv.accumulation == 32 and lv.batch_size * 1024 <= 16384
    # Off, unknown lengths, or tiny data: the recipe's step.
    assert fast.resolve(recipe.model_copy(update={"tokens_per_step": 0}), "sft", config, torch.float32, rows=3000,
                        mean_tokens=700).step_scale == 1
    assert fast.resolve(recipe, "sft", config, torch.float32, rows=3000).step_scale == 1
    assert fast.resolve(recipe, "sft", config, torch.float32, rows=12, mean_tokens=700).step_scale == 1


def test_spec_accepts_auto_and_bools():
    assert TrainingSpec().gradient_checkpointing == "auto"
    assert TrainingSpec(gradient_checkpointing=False).gradient_checkpointing is False
    with pytest.raises(Exception):
        TrainingSpec(gradient_checkpointing="sometimes")


# ---------------------------------------------------------------- same numbers with the lever on and off


@pytest.fixture(scope="module")
def demo_model(tiny_demo):
    from tinyllama_mcp.pipeline.modeling import load_base
    from tinyllama_mcp.pipeline.specs import QuantSpec

    torch.manual_seed(0)
    return load_base(tiny_demo, QuantSpec(quantization="none"), torch.float32).eval()


def _sft_examples(tokenizer, n: int) -> list[dict]:
    from tinyllama_mcp.pipeline.chat import render
    from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

    rows = [json.loads(line) for line in SFT_SAMPLE.read_text().splitlines()[:n]]
    texts = [render(r["messages"], add_generation_prompt=False, eos=tokenizer.eos_token) for r in rows]
    return [{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"][:200]} for t in texts]


def test_packed_loss_equals_padded_loss(demo_model, tokenizer):
    examples = _sft_examples(tokenizer, 6)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1
    width = max(lengths)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        padded = demo_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        packed_batch = fast.PackedRowsCollator(pad_token_id=pad, capacity=width + 150)(examples)
        assert packed_batch["input_ids"].shape[0] < len(examples)  # sequences really share rows
        packed = demo_model(**packed_batch).loss
        # Without the restarting positions (one long causal sequence) the loss would differ: the mask matters.
        leaky = dict(packed_batch)
        leaky.pop("position_ids")
        leaked = demo_model(**leaky).loss
    assert torch.allclose(packed, padded, rtol=1e-5, atol=1e-5), (packed, padded)
    assert not torch.allclose(leaked, padded, rtol=1e-4, atol=1e-4)


def test_dropping_a_right_padding_mask_keeps_real_token_outputs(demo_model):
    ids = torch.randint(10, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        ref = demo_model(input_ids=ids, attention_mask=mask).logits
        handle = fast.drop_right_padding_mask(demo_model)
        try:
            seen = []
            probe = demo_model.model.register_forward_pre_hook(
                lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
            out = demo_model(input_ids=ids, attention_mask=mask).logits
            probe.remove()
        finally:
            handle.remove()
    assert seen == [None]  # the mask really was dropped (hooks run in registration order)
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5)


def test_left_padding_mask_is_kept(demo_model):
    ids = torch.randint(10, 1000, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    handle = fast.drop_right_padding_mask(demo_model)
    try:
        seen = []
        probe = demo_model.model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
        with torch.no_grad():
            demo_model(input_ids=ids, attention_mask=mask)
        probe.remove()
    finally:
        handle.remove()
    assert seen[0] is not None


# ---------------------------------------------------------------- end to end through the stages

OFF = dict(padding_free=False, max_tokens_per_batch=0, gradient_checkpointing=True, use_liger_kernel=False,
           precompute_ref_log_probs=False, fused_optimizer=False, tokens_per_step=0, dequantized_base=False,
           fused_lora=False, varlen_attention=False)
ON = dict(padding_free=True, max_tokens_per_batch=16384, gradient_checkpointing="auto", use_liger_kernel=True,
          precompute_ref_log_probs="auto", fused_optimizer=True, tokens_per_step="auto", dequantized_base="auto",
          fused_lora=True, varlen_attention=True)


def _steps(job_dir: Path) -> list[dict]:
    from tinyllama_mcp.pipeline.events import read_events

    return [e for e in read_events(job_dir / "events.jsonl") if e["event"] == "step"]


def _run(stage_fn, spec, job_dir: Path):
    from tinyllama_mcp.pipeline.events import EventLog

    job_dir.mkdir(parents=True)
    log = EventLog(job_dir / "events.jsonl")
    try:
        summary = stage_fn(spec, job_dir, log)
    finally:
        log.close()
    return summary, _steps(job_dir)


def _sft_spec(levers: dict) -> SFTSpec:
    from tinyllama_mcp.pipeline.samples import SFT_SAMPLE

    return SFTSpec(
        base_model="tiny-demo", dataset={"source": str(SFT_SAMPLE), "max_samples": 16},
        lora={"r": 8, "alpha": 16, "dropout": 0.0}, quant={"quantization": "none", "compute_dtype": "fp32"},
        training=dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2, max_length=128,
                      learning_rate=1e-2, save_steps=100, **levers),
        eval_prompts={"prompts": [], "max_new_tokens": 1},
    )


def _dpo_spec(levers: dict) -> DPOSpec:
    from tinyllama_mcp.pipeline.samples import DPO_SAMPLE

    return DPOSpec(
        base_model="tiny-demo", dataset={"source": str(DPO_SAMPLE), "max_samples": 16},
        lora={"r": 8, "alpha": 16, "dropout": 0.0}, quant={"quantization": "none", "compute_dtype": "fp32"},
        training=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, max_length=128,
                      learning_rate=5e-3, warmup_ratio=0.0, save_steps=100, **levers),
        eval_prompts={"prompts": [], "max_new_tokens": 1},
    )


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_dataloader_workers_learn_the_same(tmp_path, tiny_demo, stage):
    """dataloader_workers: batches collated in worker processes train exactly what the training process collates
    (DPO: its precomputed reference pass collated in workers too)."""
    from tinyllama_mcp.pipeline.dpo import run_dpo
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.sft import run_sft

    run, spec = (run_sft, _sft_spec) if stage == "sft" else (run_dpo, _dpo_spec)
    levers = dict(ON, **({"precompute_ref_log_probs": True} if stage == "dpo" else {}))
    _, inline = _run(run, spec(dict(levers, dataloader_workers=0)), tmp_path / "inline")
    _, workers = _run(run, spec(dict(levers, dataloader_workers=2)), tmp_path / "workers")
    start = next(e for e in read_events(tmp_path / "workers" / "events.jsonl") if e["event"] == "start")
    assert start["levers"]["dataloader_workers"] == 2
    assert stage == "sft" or start["reference_logps"]["rows"] == 16
    assert [(s["loss"], s["grad_norm"]) for s in workers] == [(s["loss"], s["grad_norm"]) for s in inline]
    from transformers import AutoConfig

    assert TrainingSpec().dataloader_workers == "auto" and fast.resolve(
        TrainingSpec(), stage, AutoConfig.from_pretrained(tiny_demo), torch.float32, rows=10).dataloader_workers == 0
    with pytest.raises(ValueError, match="dataloader_workers"):
        TrainingSpec(dataloader_workers=17)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_eval_loss_runs_on_the_packed_batches(tmp_path, stage):
    """eval_fraction: the held-out loss is computed where training runs, on the collator's packed batches (DPO: the
    packing hooks, shared prompts and precomputed reference log-probs of the held-out pairs), and is finite."""
    from tinyllama_mcp.pipeline.dpo import run_dpo
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.sft import run_sft

    run, spec = (run_sft, _sft_spec) if stage == "sft" else (run_dpo, _dpo_spec)
    levers = dict(ON, eval_fraction=0.25, **({"precompute_ref_log_probs": True} if stage == "dpo" else {}))
    _run(run, spec(levers), tmp_path / "job")
    events = read_events(tmp_path / "job" / "events.jsonl")
    start = next(e for e in events if e["event"] == "start")
    assert start["levers"]["varlen_attention"] and start["rows"] == 12
    evals = [e for e in events if e["event"] == "eval" and "eval_loss" in e]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_loss"]) and evals[0]["eval_loss"] > 0
    if stage == "dpo":
        assert start["levers"]["share_prompt"] and start["reference_logps"]["rows"] == 16  # train and held-out
    kinds = [e["event"] for e in events]
    assert kinds.index("eval") < kinds.index("artifact")  # before the adapter is saved, as before


def test_dataloader_workers_and_shared_prompts_resolve(tiny_demo, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_demo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve's arithmetic as on a GPU
    monkeypatch.setattr(fast, "free_memory_bytes", lambda: 80 * 2**30)
    spec = TrainingSpec(max_length=1024)
    dpo = fast.resolve(spec, "dpo", config, torch.bfloat16, rows=1_000, mean_tokens=300)
    sft = fast.resolve(spec, "sft", config, torch.bfloat16, rows=1_000, mean_tokens=300)
    assert dpo.dataloader_workers == fast.AUTO_DATALOADER_WORKERS and sft.dataloader_workers == 0
    assert fast.resolve(spec.model_copy(update={"dataloader_workers": 3}), "sft", config, torch.bfloat16,
                        rows=1_000).dataloader_workers == 3
    assert dpo.share_prompt and dpo.effective()["share_prompt"] and not sft.share_prompt
    padded = fast.resolve(spec.model_copy(update={"varlen_attention": False}), "dpo", config, torch.bfloat16, rows=1_000)
    assert not padded.share_prompt and any(n.startswith("share_prompt skipped") for n in padded.notes)
    off = fast.resolve(spec.model_copy(update={"share_prompt": False}), "dpo", config, torch.bfloat16, rows=1_000)
    assert not off.share_prompt and not any("share_prompt" in n for n in off.notes)


def test_sft_levers_learn_the_same(tmp_path):
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.sft import run_sft

    off_summary, off = _run(run_sft, _sft_spec(OFF), tmp_path / "off")
    on_summary, on = _run(run_sft, _sft_spec(ON), tmp_path / "on")
    start = next(e for e in read_events(tmp_path / "on" / "events.jsonl") if e["event"] == "start")
    assert start["levers"]["padding_free"] and start["levers"]["micro_batch_size"] == 8
    assert start["levers"]["varlen_attention"] and start["levers"]["fused_lora"]
    assert [s["step"] for s in on] == [1, 2] == [s["step"] for s in off]
    for a, b in zip(off, on):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)
    assert on_summary["tokens_seen"] == off_summary["tokens_seen"]  # real tokens, pads not counted


def test_dpo_levers_learn_the_same(tmp_path, monkeypatch):
    import functools

    from tinyllama_mcp.pipeline import compiled_layers
    from tinyllama_mcp.pipeline.dpo import run_dpo
    from tinyllama_mcp.pipeline.events import read_events

    spec = _dpo_spec
    _, off = _run(run_dpo, spec(OFF), tmp_path / "off")
    _, on = _run(run_dpo, spec(ON), tmp_path / "on")
    pre = dict(ON, precompute_ref_log_probs=True)
    _, precomputed = _run(run_dpo, spec(pre), tmp_path / "pre")
    # The compiled layers for the policy and for the reference pass (the adapter off), traced with aot_eager here
    # (the same graphs inductor compiles; test_sft_torch_compile_learns_the_same runs inductor's kernels).
    calls = []
    compiled_fn = compiled_layers._compiled
    monkeypatch.setattr(compiled_layers, "_compiled",
                        lambda *key: lambda *args: calls.append(torch.is_grad_enabled()) or compiled_fn(*key)(*args))
    monkeypatch.setattr(compiled_layers, "install", functools.partial(compiled_layers.install, backend="aot_eager"))
    _, compiled = _run(run_dpo, spec(dict(ON, torch_compile=True)), tmp_path / "compiled")
    assert calls.count(True) == calls.count(False) == 2 * 2  # steps x layers (one fused micro-batch), each pass
    # Precomputed through the compiled reference pass: no reference forward in the steps, one per batch before.
    calls.clear()
    _, compiled_pre = _run(run_dpo, spec(dict(pre, torch_compile=True)), tmp_path / "compiled_pre")
    start = next(e for e in read_events(tmp_path / "compiled_pre" / "events.jsonl") if e["event"] == "start")
    batches = -(-start["rows"] // (4 * start["levers"]["micro_batch_size"]))
    assert start["reference_logps"]["rows"] >= start["rows"] and start["reference_logps"]["seconds"] > 0
    assert calls.count(True) == 2 * 2 and calls.count(False) >= batches * 2
    assert calls[: calls.count(False)] == [False] * calls.count(False)  # all before the first step
    start = next(e for e in read_events(tmp_path / "on" / "events.jsonl") if e["event"] == "start")
    assert start["levers"]["varlen_attention"] and start["levers"]["fused_lora"]  # packed pairs, fused LoRA
    assert "reference_logps" not in start
    for a, b, c, d, e in zip(off, on, precomputed, compiled, compiled_pre):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["loss"], c["loss"], rel_tol=1e-4), (a, c)
        assert math.isclose(a["loss"], d["loss"], rel_tol=1e-4), (a, d)
        assert math.isclose(a["loss"], e["loss"], rel_tol=1e-4), (a, e)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)
        assert math.isclose(a["grad_norm"], d["grad_norm"], rel_tol=1e-3), (a, d)
        assert math.isclose(a["grad_norm"], e["grad_norm"], rel_tol=1e-3), (a, e)
    assert len(on) == len(off) == len(compiled) == len(compiled_pre) == 2


def test_sft_fused_optimizer_learns_the_same(tmp_path, monkeypatch):
    """The Trainer path with adamw_torch_fused (forced here; on CUDA the lever picks it) vs adamw_torch."""
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.sft import run_sft

    _, off = _run(run_sft, _sft_spec(dict(OFF, padding_free=True)), tmp_path / "off")
    monkeypatch.setattr(fast, "fused_optimizer_ok", lambda: True)
    _, on = _run(run_sft, _sft_spec(dict(OFF, padding_free=True, fused_optimizer=True)), tmp_path / "on")
    start = next(e for e in read_events(tmp_path / "on" / "events.jsonl") if e["event"] == "start")
    assert start["levers"]["optim"] == "adamw_torch_fused" and start["levers"]["master_weights_fp32"]
    assert len(on) == len(off) == 2
    for a, b in zip(off, on):  # step 2's loss is after one optimizer update
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)


def test_dequantized_base_is_the_same_model(tiny_demo, cpu_path):
    """NF4 weights dequantized once: the same outputs and LoRA gradients as bitsandbytes' per-call path, on either
    of its CPU paths (the model is in eval mode here, where bitsandbytes' AVX512-BF16 path would repack)."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    def model_and_grads(dequantized: bool):
        torch.manual_seed(0)
        with described(cpu_path):
            base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="nf4", compute_dtype="fp32"),
                                      torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                                init_lora_weights=False))
        if dequantized:
            assert fast.dequantize_base(model) > 0
            assert not any("dequantized" in name for name in model.state_dict())  # never saved
        ids = torch.arange(3, 40).view(1, -1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads

    loss_off, grads_off = model_and_grads(False)
    loss_on, grads_on = model_and_grads(True)
    assert math.isclose(loss_off, loss_on, rel_tol=1e-6), (loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and grads_off
    for name in grads_off:
        assert torch.allclose(grads_off[name], grads_on[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_fused_lora_is_the_same_math(tiny_demo, quantization, dropout):
    """One autograd function per projection: peft's outputs and LoRA gradients, with the same dropout draws."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import fused_lora, modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    def model_and_grads(fused: bool):
        torch.manual_seed(0)
        base = modeling.load_base(str(tiny_demo), QuantSpec(quantization=quantization, compute_dtype="fp32"),
                                  torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]))
        if quantization == "none":
            model.enable_input_require_grads()  # dx through every projection, as under checkpointing
        if fused:
            assert fused_lora.fuse_lora(model) == 7 * model.config.num_hidden_layers
            attention = model.base_model.model.model.layers[0].self_attn
            assert attention.q_proj._group_followers == (attention.k_proj, attention.v_proj)  # Q, K, V: one function
        model.train()
        torch.manual_seed(1)  # the dropout draws
        ids = torch.arange(3, 40).view(1, -1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with model.disable_adapter(), torch.no_grad():  # adapter off (DPO's reference pass): the base alone
            reference = model(input_ids=ids, labels=ids).loss.item()
        with torch.no_grad():  # a sibling called on another input than its group's first projection: on its own
            attention = model.base_model.model.model.layers[0].self_attn
            attention.q_proj(torch.ones(2, 3, model.config.hidden_size))
            k_alone = attention.k_proj(torch.full((2, 3, model.config.hidden_size), 0.5))
        return loss.item(), grads, reference, k_alone

    loss_off, grads_off, ref_off, k_off = model_and_grads(False)
    loss_on, grads_on, ref_on, k_on = model_and_grads(True)
    assert math.isclose(loss_off, loss_on, rel_tol=1e-6), (loss_off, loss_on)
    if dropout == 0.0:
        assert torch.allclose(k_off, k_on, rtol=1e-5, atol=1e-6)
    assert ref_off == ref_on and not math.isclose(ref_on, loss_on, rel_tol=1e-4)
    assert grads_off.keys() == grads_on.keys() and len(grads_off) == 14 * 2
    for name in grads_off:
        assert torch.allclose(grads_off[name], grads_on[name], rtol=1e-4, atol=1e-6), name


def test_fused_lora_under_gradient_checkpointing(tiny_demo):
    """The recompute of a checkpointed layer runs the grouped functions again: the same gradients as without."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import fused_lora, modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="none"), torch.float32)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        fused_lora.fuse_lora(model)
        model.train()
        ids = torch.arange(3, 40).view(1, -1)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6), name


def test_varlen_attention_is_the_masked_packed_attention(demo_model, tokenizer):
    """Packed sequences through varlen attention (one row, sequence boundaries): the block-diagonal mask's loss
    and gradients."""
    from tinyllama_mcp.pipeline import varlen_attention

    examples = _sft_examples(tokenizer, 6)
    pad = tokenizer.pad_token_id
    longest = max(len(e["input_ids"]) for e in examples)
    masked_batch = fast.PackedRowsCollator(pad_token_id=pad, capacity=longest + 20)(examples)
    varlen_batch = fast.PackedRowsCollator(pad_token_id=pad, capacity=10_000, cu_seq_lens=True)(examples)
    assert masked_batch["input_ids"].shape[0] > 1 and varlen_batch["input_ids"].shape[0] == 1

    def loss_and_grad(batch):
        demo_model.zero_grad()
        loss = demo_model(**batch).loss
        loss.backward()
        return loss.item(), demo_model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    padded_batch = fast.PackedRowsCollator(pad_token_id=pad, capacity=10_000, cu_seq_lens=True,
                                          width_multiple=256)(examples)  # lever cuda_graphs' padded width
    assert padded_batch["input_ids"].shape[1] % 256 == 0 and padded_batch["input_ids"].shape[1] > varlen_batch[
        "input_ids"].shape[1]

    masked_loss, masked_grad = loss_and_grad(masked_batch)
    with varlen_attention.use(demo_model):
        assert demo_model.config._attn_implementation == varlen_attention.NAME
        varlen_loss, varlen_grad = loss_and_grad(varlen_batch)
        padded_loss, padded_grad = loss_and_grad(padded_batch)
        with pytest.raises(RuntimeError, match="cu_seq_lens_q"):
            demo_model(**masked_batch)  # no boundaries: refused, never attended across sequences
    assert demo_model.config._attn_implementation == "sdpa"  # generation afterwards keeps sdpa
    assert math.isclose(masked_loss, varlen_loss, rel_tol=1e-5), (masked_loss, varlen_loss)
    assert torch.allclose(masked_grad, varlen_grad, rtol=1e-4, atol=1e-6)
    assert math.isclose(padded_loss, varlen_loss, rel_tol=1e-5), (padded_loss, varlen_loss)
    assert torch.allclose(padded_grad, varlen_grad, rtol=1e-4, atol=1e-6)


def test_packed_preference_batches_give_the_padded_hidden_states(demo_model):
    """DPO packing: the decoder runs only the real tokens as one varlen row; real tokens' hidden states equal the
    padded batch's (under its mask), pads come back as zeros, in the padded layout TRL scores."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tinyllama_mcp.pipeline import dpo_packing

    examples = [{"prompt_ids": list(range(10, 10 + p)), "chosen_ids": list(range(200, 200 + c)),
                 "rejected_ids": list(range(400, 400 + r))} for p, c, r in [(7, 3, 12), (2, 9, 1), (15, 4, 4)]]
    collate = dpo_packing.PackedPairsCollator(DataCollatorForPreference(pad_token_id=0))
    batch = collate(examples)
    mask = batch["attention_mask"]
    assert batch["cu_seq_lens_q"].tolist()[-1] == int(mask.sum()) == batch["packed_index"].numel()
    padded = demo_model.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    with dpo_packing.packing(demo_model):
        packed = demo_model.model(**{k: v for k, v in batch.items() if k != "completion_mask"}).last_hidden_state
    assert packed.shape == padded.shape
    real = mask.bool()
    assert torch.allclose(packed[real], padded[real], rtol=1e-4, atol=1e-5)
    assert not packed[~real].any()
    assert demo_model.config._attn_implementation == "sdpa" and not demo_model.model._forward_pre_hooks
    # cuda_graphs' padded width: pad tokens run as a segment of their own, their outputs are dropped
    padded_batch = dpo_packing.PackedPairsCollator(DataCollatorForPreference(pad_token_id=0), width_multiple=64)(
        examples)
    total = int(mask.sum())  # 81 real tokens: 128 with the padding
    assert padded_batch["packed_padding"] == 128 - total and padded_batch["max_length_q"] == 128
    assert padded_batch["cu_seq_lens_q"].tolist()[-2:] == [total, 128]
    with dpo_packing.packing(demo_model):
        padded_out = demo_model.model(**{k: v for k, v in padded_batch.items() if k != "completion_mask"})
    assert torch.allclose(padded_out.last_hidden_state, packed, rtol=1e-4, atol=1e-5)
    left = dict(batch, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        collate.inner = lambda _examples: left
        collate(examples)


def test_shared_prompts_give_the_padded_hidden_states_and_gradients(demo_model):
    """share_prompt: a pair's common prefix runs once and both answers attend to it (keys gathered, causal to the
    key segment's end); real tokens' hidden states and the gradients equal the padded batch's, with and without
    cuda_graphs' padded widths."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tinyllama_mcp.pipeline import dpo_packing

    # pair 1's answers begin alike (the shared prefix runs past the prompt); pair 2's rejected answer is one token
    examples = [{"prompt_ids": list(range(10, 10 + p)), "chosen_ids": [300, 301] + list(range(200, 200 + c)),
                 "rejected_ids": [300, 301] + list(range(400, 400 + r))} for p, c, r in [(7, 3, 12), (15, 4, 4)]]
    examples.append({"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12]})
    batch = dpo_packing.PackedPairsCollator(DataCollatorForPreference(pad_token_id=0), share_prompt=True)(examples)
    mask = batch["attention_mask"]
    shared = [7 + 2, 15 + 2, 3]
    assert batch["packed_index"].numel() == int(mask.sum()) - sum(shared)  # each prefix packed once
    assert batch["cu_seq_lens_k"].tolist()[-1] == batch["packed_key_index"].numel() == int(mask.sum()) + sum(shared)
    assert dpo_packing.shared_prefix(torch.tensor([1, 2]), torch.tensor([1, 2, 3])) == 1  # one token left each

    def outputs_and_grad(batch_kwargs, pack: bool):
        demo_model.zero_grad()
        with dpo_packing.packing(demo_model) if pack else contextlib.nullcontext():
            hidden = demo_model.model(**batch_kwargs).last_hidden_state
        (hidden[mask.bool()].float() ** 2).mean().backward()
        return hidden.detach(), demo_model.model.layers[0].self_attn.k_proj.weight.grad.clone()

    padded, padded_grad = outputs_and_grad(dict(input_ids=batch["input_ids"], attention_mask=mask), pack=False)
    real = mask.bool()
    for width_multiple, max_sequence in ((0, 0), (32, 0), (32, 24)):
        shared_batch = dpo_packing.PackedPairsCollator(DataCollatorForPreference(pad_token_id=0), width_multiple,
                                                       share_prompt=True, max_sequence=max_sequence)(examples)
        packed, packed_grad = outputs_and_grad({k: v for k, v in shared_batch.items() if k != "completion_mask"},
                                               pack=True)
        assert torch.allclose(packed[real], padded[real], rtol=1e-4, atol=1e-5), width_multiple
        assert not packed[~real].any()
        assert torch.allclose(packed_grad, padded_grad, rtol=1e-3, atol=1e-6), width_multiple
        if width_multiple:
            assert shared_batch["packed_padding"] >= 1
            segments = {side: shared_batch[f"cu_seq_lens_{side}"].diff() for side in "qk"}
            if max_sequence:  # (the rows are 21 tokens at most) bounds fixed before the run: max(24, 32), max(24, 64)
                assert (shared_batch["max_length_q"], shared_batch["max_length_k"]) == (32, 64)
                assert all(int(segments[side].max()) <= shared_batch[f"max_length_{side}"] for side in "qk")
            else:  # the widths
                assert shared_batch["max_length_q"] == int(shared_batch["cu_seq_lens_q"][-1]) == 64
                assert shared_batch["max_length_k"] == int(shared_batch["cu_seq_lens_k"][-1])


def test_quick_adapter_switch_is_peft_switch(tiny_demo):
    """DPO's reference pass switches the adapter off through model.disable_adapter(): the quick switch gives the
    base model's outputs inside, the adapted outputs and trainable weights back after, and leaves adapters that
    are already off to peft's own context."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import compiled_layers, modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    torch.manual_seed(0)
    base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="none", compute_dtype="fp32"), torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, init_lora_weights=False, target_modules=list(compiled_layers.PROJECTIONS)))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            peft_base = model(input_ids=ids).logits
        assert fast.quick_adapter_switch(model)
        with model.disable_adapter():
            quick_base = model(input_ids=ids).logits
            assert not model.has_active_enabled_adapter
        after = model(input_ids=ids).logits
    assert not torch.equal(adapted, peft_base)
    assert torch.equal(quick_base, peft_base) and torch.equal(after, adapted)
    assert model.has_active_enabled_adapter
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    model.base_model.disable_adapter_layers()  # already off: peft's context runs, and leaves them off
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))


def test_trimmed_trainer_overhead_gives_the_same_answers(tiny_demo, tmp_path):
    """Counting FLOPs once, skipping no-op mode walks and visiting only trainable parameters: same results."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    torch.manual_seed(0)
    base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="none"), torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                          max_grad_norm=0.01, use_cpu=True))
    ids = torch.arange(3, 40).view(1, -1)
    inputs = {"input_ids": ids, "labels": ids}
    model(**inputs).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    flops = Trainer.floating_point_ops(trainer, inputs)
    norm = Trainer._clip_grad_norm(trainer, model)
    clipped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():  # back to the unclipped gradients
        if n in grads:
            p.grad = grads[n].clone()

    fast.trim_trainer_overhead(trainer)
    assert trainer.floating_point_ops(inputs) == flops > 0
    assert torch.equal(trainer._clip_grad_norm(model), norm)
    for n, p in model.named_parameters():
        if n in clipped:
            assert torch.equal(p.grad, clipped[n]), n
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    layer = model.base_model.model.model.layers[0]
    layer.eval()  # one submodule out of training mode: train() must still walk and restore it
    assert model.train() is model and layer.training and layer.mlp.down_proj.lora_dropout["default"].training
    model.eval()
    assert not any(m.training for m in model.modules())


def test_liger_auto_is_rope_alone_unless_gradient_checkpointing(tiny_demo, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_demo)
    monkeypatch.setattr(fast, "liger_available", lambda: None)  # as on CUDA with liger-kernel installed

    def kernels(**fields):
        lv = fast.resolve(TrainingSpec(**fields), "sft", config, torch.float32, rows=10)
        return lv.liger_kernels(), lv.config_kwargs().get("liger_kernel_config")

    every = ["rope", "swiglu", "rms_norm"]
    assert TrainingSpec().use_liger_kernel == "auto"
    assert kernels(gradient_checkpointing=False) == (["rope"], {"rope": True, "swiglu": False, "rms_norm": False})
    assert kernels(gradient_checkpointing=True) == (every, {"rope": True, "swiglu": True, "rms_norm": True})
    assert kernels(use_liger_kernel=True, gradient_checkpointing=False)[0] == every
    assert kernels(use_liger_kernel=False) == ([], None)


def test_dequantized_base_auto_needs_cuda_memory_and_not_the_saving_mode(tiny_demo, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_demo)
    auto = TrainingSpec(dequantized_base="auto")
    assert TrainingSpec().dequantized_base == "auto"
    assert fast.resolve(auto, "sft", config, torch.float32, rows=10).dequantized_base is False  # CPU
    monkeypatch.setattr(fast, "free_memory_bytes", lambda: 80 * 2**30)  # as on a GPU with room
    assert fast.resolve(auto, "sft", config, torch.bfloat16, rows=10).dequantized_base is True
    saving = auto.model_copy(update={"activation_offloading": True, "gradient_checkpointing": True})
    assert fast.resolve(saving, "sft", config, torch.bfloat16, rows=10).dequantized_base is False
    monkeypatch.setattr(fast, "free_memory_bytes", lambda: 1024)  # no room
    assert fast.resolve(auto, "sft", config, torch.bfloat16, rows=10).dequantized_base is False


def test_sft_token_budget_step_equals_the_bigger_recipe_step(tmp_path):
    """tokens_per_step = k x the recipe's sequences a step and max_steps / k: the same as asking for that step."""
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.samples import SFT_SAMPLE
    from tinyllama_mcp.pipeline.sft import run_sft

    def spec(training: dict) -> SFTSpec:
        base = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_length=128,
                    learning_rate=1e-2, warmup_ratio=0.25, save_steps=100, **OFF)
        return SFTSpec(
            base_model="tiny-demo", dataset={"source": str(SFT_SAMPLE), "max_samples": 32},
            lora={"r": 8, "alpha": 16, "dropout": 0.0}, quant={"quantization": "none", "compute_dtype": "fp32"},
            training={**base, **training}, eval_prompts={"prompts": [], "max_new_tokens": 1},
        )

    # 32 rows cap k at 4: 32 sequences a step; max_steps 8 recipe steps -> 2 optimizer steps.
    _, budget = _run(run_sft, spec(dict(tokens_per_step=1_000_000, max_tokens_per_batch=16384, max_steps=8)),
                     tmp_path / "budget")
    _, manual = _run(run_sft, spec(dict(gradient_accumulation_steps=16, max_steps=2)), tmp_path / "manual")
    start = next(e for e in read_events(tmp_path / "budget" / "events.jsonl") if e["event"] == "start")
    lv = start["levers"]
    assert (lv["step_scale"], lv["sequences_per_step"], lv["max_steps"]) == (4, 32, 2)
    assert start["total_steps"] == 2 and [s["total"] for s in budget] == [2, 2]
    assert [s["step"] for s in budget] == [1, 2] == [s["step"] for s in manual]
    for a, b in zip(manual, budget):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)
        assert math.isclose(a["learning_rate"], b["learning_rate"], rel_tol=1e-6), (a, b)


def test_torch_compile_resolves_per_device_and_batch_layout(tiny_demo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_demo)
    packed = dict(padding_free=True, varlen_attention=True, use_liger_kernel="auto")
    auto = fast.resolve(TrainingSpec(**packed), "sft", config, torch.float32, rows=10)
    assert auto.torch_compile is torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert "torch_compile skipped: 'auto' compiles on CUDA only" in auto.notes
    forced = fast.resolve(TrainingSpec(**packed, torch_compile=True), "dpo", config, torch.float32, rows=10)
    assert forced.torch_compile is True and forced.effective()["torch_compile"] is True
    unpacked = fast.resolve(TrainingSpec(padding_free=True, varlen_attention=False, torch_compile=True), "sft",
                            config, torch.float32, rows=10)
    assert unpacked.torch_compile is False
    assert any(n.startswith("torch_compile skipped: it runs on packed batches") for n in unpacked.notes)
    off = fast.resolve(TrainingSpec(**packed, torch_compile=False), "sft", config, torch.float32, rows=10)
    assert off.torch_compile is False and not any(n.startswith("torch_compile") for n in off.notes)
    assert "torch_compile" not in off.config_kwargs()  # the Trainer's whole-model compile is never asked for


def test_torch_compile_auto_only_where_the_compile_pays(tiny_demo, monkeypatch):
    from transformers import AutoConfig

    from tinyllama_mcp.pipeline import compiled_layers

    config = AutoConfig.from_pretrained(tiny_demo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve's arithmetic as on a GPU
    monkeypatch.setattr(fast, "free_memory_bytes", lambda: 80 * 2**30)
    triton_check = compiled_layers.gpu_kernels_unavailable
    monkeypatch.setattr(compiled_layers, "gpu_kernels_unavailable", lambda: None)  # as with Triton installed
    spec = TrainingSpec(max_length=2048)  # the defaults: packed rows, varlen attention, torch_compile 'auto'
    assert spec.torch_compile == "auto"
    assert fast.resolve(spec, "sft", config, torch.bfloat16, rows=10_000, mean_tokens=650).torch_compile  # 6.5M
    short = fast.resolve(spec, "sft", config, torch.bfloat16, rows=2_400, mean_tokens=650)  # 1.56M tokens
    assert short.torch_compile is False
    assert any("this one trains ~1,560,000" in n for n in short.notes), short.notes
    steps = spec.model_copy(update={"max_steps": 1_000})  # 1,000 x 8 pairs x 2 x 300 tokens = 4.8M
    assert fast.resolve(steps, "dpo", config, torch.bfloat16, rows=500, mean_tokens=300).torch_compile
    checkpointed = spec.model_copy(update={"gradient_checkpointing": True})
    assert not fast.resolve(checkpointed, "sft", config, torch.bfloat16, rows=10_000, mean_tokens=650).torch_compile
    forced = spec.model_copy(update={"torch_compile": True})
    assert fast.resolve(forced, "sft", config, torch.bfloat16, rows=2_400, mean_tokens=650).torch_compile
    monkeypatch.setattr(compiled_layers, "gpu_kernels_unavailable", triton_check)
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # no Triton: no GPU kernels to compile
    no_triton = fast.resolve(forced, "sft", config, torch.bfloat16, rows=10_000, mean_tokens=650)
    assert no_triton.torch_compile is False
    assert any("need Triton, which cannot be imported" in n for n in no_triton.notes), no_triton.notes


def test_cuda_graphs_resolve_with_the_compiled_layers_on_cuda(tiny_demo, monkeypatch):
    from transformers import AutoConfig

    from tinyllama_mcp.pipeline import compiled_layers

    config = AutoConfig.from_pretrained(tiny_demo)
    compiled = TrainingSpec(max_length=2048, torch_compile=True)
    assert compiled.cuda_graphs == "auto"
    cpu = fast.resolve(compiled, "sft", config, torch.bfloat16, rows=20_000, mean_tokens=650)
    assert cpu.torch_compile and not cpu.cuda_graphs and cpu.width_multiple == 0  # (inductor's CPU kernels)
    assert "cuda_graphs skipped: no CUDA device" in cpu.notes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve's arithmetic as on a GPU
    monkeypatch.setattr(fast, "free_memory_bytes", lambda: 80 * 2**30)
    monkeypatch.setattr(compiled_layers, "gpu_kernels_unavailable", lambda: None)  # as with Triton installed
    long_sft = fast.resolve(compiled, "sft", config, torch.bfloat16, rows=40_000, mean_tokens=650)  # 26M tokens
    assert long_sft.cuda_graphs and long_sft.width_multiple == fast.GRAPH_WIDTH_MULTIPLE
    assert long_sft.effective()["cuda_graphs"] is True and long_sft.effective()["packed_width_multiple"] == 1024
    short_sft = fast.resolve(compiled, "sft", config, torch.bfloat16, rows=2_400, mean_tokens=650)  # 1.56M
    assert not short_sft.cuda_graphs and short_sft.width_multiple == 0
    assert any("SFT runs of at least 20,000,000 real tokens" in n and "trains ~1,560,000" in n for n in short_sft.notes)
    long_dpo = fast.resolve(compiled, "dpo", config, torch.bfloat16, rows=20_000, mean_tokens=650)  # x 2 rows: 26M
    assert long_dpo.cuda_graphs
    dpo = fast.resolve(compiled, "dpo", config, torch.bfloat16, rows=10_000, mean_tokens=650)  # 13M
    assert not dpo.cuda_graphs and any("DPO runs of at least 24,000,000" in n for n in dpo.notes)
    forced = compiled.model_copy(update={"cuda_graphs": True})
    assert fast.resolve(forced, "dpo", config, torch.bfloat16, rows=100, mean_tokens=650).cuda_graphs
    off = fast.resolve(compiled.model_copy(update={"cuda_graphs": False}), "sft", config, torch.bfloat16,
                       rows=20_000, mean_tokens=650)
    assert not off.cuda_graphs and off.width_multiple == 0 and not any("cuda_graphs" in n for n in off.notes)
    checkpointed = fast.resolve(forced.model_copy(update={"gradient_checkpointing": True}), "sft", config,
                                torch.bfloat16, rows=100)
    assert checkpointed.torch_compile and not checkpointed.cuda_graphs
    assert any(n.startswith("cuda_graphs skipped: not under gradient checkpointing") for n in checkpointed.notes)
    eager = fast.resolve(forced.model_copy(update={"torch_compile": False}), "sft", config, torch.bfloat16, rows=100)
    assert not eager.cuda_graphs and not any("cuda_graphs" in n for n in eager.notes)


def test_cuda_graphs_auto_counts_the_widths_sft_rows_pack_to(tiny_demo, monkeypatch):
    """SFT's 'auto' asks GRAPHS_TOKENS_PER_WIDTH real tokens for every packed width the run meets (one recording
    each): rows that all fill max_length pack to one width, chat rows of spread lengths to several."""
    import random

    from transformers import AutoConfig

    from tinyllama_mcp.pipeline import compiled_layers

    full = [3000] * 400  # cut to max_length: 8 x 2048 tokens, one width
    rng = random.Random(0)
    spread = [int(math.exp(rng.uniform(math.log(100), math.log(2300)))) for _ in range(400)]
    assert fast.sft_packed_widths(full, 2048, 8, 10_000) == 1
    widths = fast.sft_packed_widths(spread, 2048, 8, 10_000)
    assert 5 <= widths <= 14  # 8-row sums from ~2k to ~13k tokens, in multiples of 1,024
    assert fast.sft_packed_widths(spread, 2048, 8, 1) == 1  # a one-step run meets one width
    assert fast.sft_packed_widths([], 2048, 8, 100) == 0

    config = AutoConfig.from_pretrained(tiny_demo)
    compiled = TrainingSpec(max_length=2048, torch_compile=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve's arithmetic as on a GPU
    monkeypatch.setattr(fast, "free_memory_bytes", lambda: 80 * 2**30)
    monkeypatch.setattr(compiled_layers, "gpu_kernels_unavailable", lambda: None)

    def resolved(lengths: list[int], rows: int) -> fast.Levers:
        mean = sum(min(n, 2048) for n in lengths) / len(lengths)
        return fast.resolve(compiled, "sft", config, torch.bfloat16, rows=rows, mean_tokens=mean, row_lengths=lengths)

    assert resolved(full, 2_000).cuda_graphs  # 4.1M tokens, one width: past 2.5M
    small = resolved(full, 1_000)  # 2.0M
    assert not small.cuda_graphs
    assert any("at least 2,500,000 real tokens" in n and "pack to ~1" in n for n in small.notes), small.notes
    least = widths * fast.GRAPHS_TOKENS_PER_WIDTH
    mean = sum(min(n, 2048) for n in spread) / len(spread)
    below, above = int(0.9 * least / mean), int(1.1 * least / mean)
    assert not resolved(spread, below).cuda_graphs and resolved(spread, above).cuda_graphs
    assert any(f"at least {least:,} real tokens" in n and f"pack to ~{widths}" in n
               for n in resolved(spread, below).notes)


def test_cuda_graphs_read_every_layer_weight_in_place(tiny_demo):
    """Installed for CUDA graphs, every weight the compiled layer reads is marked static (a replay reads it where it
    is: LoRA A and B, the norms, the dequantized base copies), so the graphs neither copy nor re-record them."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import compiled_layers, modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    base = modeling.load_base(str(tiny_demo), QuantSpec(quantization="nf4", compute_dtype="fp32"), torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=list(compiled_layers.PROJECTIONS)))
    fast.dequantize_base(model)
    assert compiled_layers.install(model, cuda_graphs=True) == model.config.num_hidden_layers
    layer = fast.decoder_of(model).layers[0]
    static = [t for t in layer.parameters() if getattr(t, "_dynamo_static_input_type", None)]
    assert len(static) == 2 + 2 * 7  # the norms, A and B of the seven projections (NF4 weights are not read)
    copies = [m.dequantized_weight for m in layer.modules() if hasattr(m, "dequantized_weight")]
    assert len(copies) == 7 and all(getattr(w, "_dynamo_static_input_type", None) for w in copies)


@pytest.mark.parametrize("variant", ["fp32", "nf4", "checkpointing", "dropout"])
def test_compiled_layer_is_the_eager_layer(tiny_demo, variant, monkeypatch):
    """The compiled decoder layer (traced by dynamo, forward and backward split by AOTAutograd): HF's eager
    layers' loss and LoRA gradients on packed sequences, and DPO's reference pass (adapter off, no gradients) its
    loss; evaluation with the adapter on keeps HF's forward."""
    from peft import LoraConfig, get_peft_model

    from tinyllama_mcp.pipeline import compiled_layers, fused_lora, modeling, varlen_attention
    from tinyllama_mcp.pipeline.specs import QuantSpec

    calls = []  # layer forwards that took the compiled function
    compiled_fn = compiled_layers._compiled
    monkeypatch.setattr(compiled_layers, "_compiled",
                        lambda *key: lambda *args: calls.append(key) or compiled_fn(*key)(*args))

    batches = [fast.PackedRowsCollator(pad_token_id=0, capacity=10_000, cu_seq_lens=True)(
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
            assert compiled_layers.install(model, backend="aot_eager") == model.config.num_hidden_layers
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

    from tinyllama_mcp.pipeline import compiled_layers

    llama = dict(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=0.0)
    assert compiled_layers.unsupported(SimpleNamespace(**llama)) is None
    assert "model_type 'mistral'" in compiled_layers.unsupported(SimpleNamespace(**dict(llama, model_type="mistral")))
    assert "biases" in compiled_layers.unsupported(SimpleNamespace(**dict(llama, attention_bias=True)))
    assert "gelu" in compiled_layers.unsupported(SimpleNamespace(**dict(llama, hidden_act="gelu")))


@pytest.mark.slow
def test_sft_torch_compile_learns_the_same(tmp_path):
    """The stage with torch_compile on (inductor's kernels, here its CPU ones): the eager stage's losses."""
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.sft import run_sft

    packed = dict(OFF, padding_free=True, varlen_attention=True, fused_lora=True)
    _, off = _run(run_sft, _sft_spec(packed), tmp_path / "off")
    _, on = _run(run_sft, _sft_spec(dict(packed, torch_compile=True)), tmp_path / "on")
    start = next(e for e in read_events(tmp_path / "on" / "events.jsonl") if e["event"] == "start")
    assert start["levers"]["torch_compile"] is True
    assert len(on) == len(off) == 2
    for a, b in zip(off, on):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-3), (a, b)


# ---------------------------------------------------------------- sync_free_step (SFT)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_cross_entropy_is_the_cross_entropy_and_trl_metrics(monkeypatch, compiled):
    """The chunked LM-head loss: the summed cross-entropy, its gradient, and TRL's entropy and top-1 counts, over
    several chunks (a chunk of 4 tokens here, the last of 3), eager and compiled by inductor (here its CPU kernels;
    the chunks' two row counts run through one dynamic graph)."""
    from tinyllama_mcp.pipeline import sft_loss

    monkeypatch.setattr(sft_loss, "CHUNK_LOGIT_BYTES", 4 * 4 * 50)  # 4 tokens a chunk at 50 logits
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (11,))
    scores = sft_loss.compiled_chunk_scores() if compiled else sft_loss.chunk_scores
    total, entropy, correct = sft_loss.LinearCrossEntropy.apply(hidden, weight, targets, scores)
    (total * 0.5).backward()

    ref_hidden = hidden.detach().clone().requires_grad_()
    logits = ref_hidden @ weight.T
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (ref * 0.5).backward()
    probs = logits.detach().softmax(-1)
    assert torch.allclose(total, ref.detach(), rtol=1e-5)
    assert torch.allclose(hidden.grad, ref_hidden.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(entropy, -(probs * probs.log()).sum(), rtol=1e-5)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())


def test_loss_positions_are_the_shifted_labels():
    from tinyllama_mcp.pipeline import sft_loss

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    positions = sft_loss.loss_positions(labels)
    assert positions["loss_index"].tolist() == [0, 1, 5, 6]  # the position before each label, flat over rows
    assert positions["loss_targets"].tolist() == [5, 6, 7, 8]


def test_sync_free_step_learns_the_same(tmp_path):
    """sync_free_step: the chunked loss over positions listed on the CPU trains what TRL's loss trains: the same
    losses, gradients and real-token counts (packed batches, padded widths included)."""
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.sft import run_sft

    trl_summary, trl = _run(run_sft, _sft_spec(dict(ON, sync_free_step=False)), tmp_path / "trl")
    own_summary, own = _run(run_sft, _sft_spec(dict(ON, sync_free_step=True)), tmp_path / "own")
    start = next(e for e in read_events(tmp_path / "own" / "events.jsonl") if e["event"] == "start")
    assert start["levers"]["sync_free_step"] and start["levers"]["padding_free"]
    assert [s["step"] for s in own] == [1, 2]
    for a, b in zip(trl, own):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a, b)
    assert own_summary["tokens_seen"] == trl_summary["tokens_seen"]


@pytest.mark.parametrize("accumulation, logging_steps, logged, staged_sizes", [
    (1, 1, [1, 2, 3, 4, 5], [4, 4, 4]),  # 3 (a checkpoint's) and 5 (the last) log at once
    (2, 2, [1, 2, 4], [4, 4, 6]),  # 4's log is written by the last step, which logs nothing of its own
])
def test_step_logs_written_one_step_late_are_the_trainers(tmp_path, monkeypatch, accumulation, logging_steps, logged,
                                                          staged_sizes):
    """pipeline.late_log: with the log staged on the GPU and written at the next step's end, the step events, the
    checkpoint's log history and the metrics are those of logs written at once; a checkpoint's step and the last
    step log at once, the others are staged. A staged log holds the loss sum, the gradient norm, and the entropy
    and correct count of each batch since the last log (the levers run the accumulation as one packed batch)."""
    import json

    from tinyllama_mcp.pipeline import late_log, sft_loss
    from tinyllama_mcp.pipeline.sft import run_sft

    staged = []
    to_host = late_log._to_host
    monkeypatch.setattr(late_log, "_to_host", lambda values: staged.append(len(values)) or to_host(values))
    runs = {}
    for late in (False, True):
        monkeypatch.setattr(sft_loss, "LOG_ONE_STEP_LATE", late)
        spec = _sft_spec(dict(ON, sync_free_step=True))
        spec.training.max_steps, spec.training.save_steps = 5, 3
        spec.training.gradient_accumulation_steps, spec.training.logging_steps = accumulation, logging_steps
        summary, steps = _run(run_sft, spec, tmp_path / str(late))
        state = json.loads(next((tmp_path / str(late)).rglob("checkpoint-3/trainer_state.json")).read_text())
        runs[late] = summary, steps, state["log_history"]
    assert staged == staged_sizes
    (at_once, at_once_steps, at_once_history), (late_summary, late_steps, late_history) = runs[False], runs[True]
    timing = {"time", "tokens_per_s", "eta_s", "train_runtime", "train_tokens_per_second"}
    assert [s["step"] for s in late_steps] == [s["step"] for s in at_once_steps] == logged
    for a, b in zip(at_once_steps, late_steps):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert [h["step"] for h in late_history] == [h["step"] for h in at_once_history] == [k for k in logged if k <= 3]
    for a, b in zip(at_once_history, late_history):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
        assert {"entropy", "mean_token_accuracy", "num_tokens", "grad_norm"} <= b.keys()
    assert late_summary["first_loss"] == at_once["first_loss"] and late_summary["last_loss"] == at_once["last_loss"]


def test_sync_free_step_resolves_with_cuda_graphs(tiny_demo, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_demo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve's arithmetic as on a GPU
    monkeypatch.setattr(fast, "free_memory_bytes", lambda: 80 * 2**30)
    monkeypatch.setattr("tinyllama_mcp.pipeline.compiled_layers.gpu_kernels_unavailable", lambda: None)
    spec = TrainingSpec(max_length=1024, torch_compile=True)
    assert TrainingSpec().sync_free_step == "auto"
    graphs = fast.resolve(spec.model_copy(update={"cuda_graphs": True}), "sft", config, torch.bfloat16, rows=1_000)
    assert graphs.cuda_graphs and graphs.sync_free_step
    assert graphs.config_kwargs()["accelerator_config"] == {"non_blocking": True}
    plain = fast.resolve(spec.model_copy(update={"cuda_graphs": False}), "sft", config, torch.bfloat16, rows=1_000)
    assert not plain.sync_free_step and "accelerator_config" not in plain.config_kwargs()
    # the GPU sets the pace with graphs: the batches are collated in workers too
    assert graphs.dataloader_workers == fast.AUTO_DATALOADER_WORKERS and plain.dataloader_workers == 0
    forced = fast.resolve(spec.model_copy(update={"sync_free_step": True}), "sft", config, torch.bfloat16, rows=1_000)
    assert forced.sync_free_step
    dpo = fast.resolve(spec.model_copy(update={"sync_free_step": True}), "dpo", config, torch.bfloat16, rows=1_000)
    assert not dpo.sync_free_step and any(n.startswith("sync_free_step skipped") for n in dpo.notes)


def test_sync_free_step_falls_back_to_trl_where_the_head_is_not_plain(tmp_path, monkeypatch):
    """A model whose LM head the chunked loss cannot score keeps TRL's loss and the Trainer's NaN check, with a
    note saying why."""
    from tinyllama_mcp.pipeline import sft_loss
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.pipeline.sft import run_sft

    monkeypatch.setattr(sft_loss, "unsupported", lambda model: "the model scales its logits (logit_scale)")
    _, fallback = _run(run_sft, _sft_spec(dict(ON, sync_free_step=True)), tmp_path / "fallback")
    _, trl = _run(run_sft, _sft_spec(dict(ON, sync_free_step=False)), tmp_path / "trl")
    start = next(e for e in read_events(tmp_path / "fallback" / "events.jsonl") if e["event"] == "start")
    assert not start["levers"]["sync_free_step"]
    assert "sync_free_step skipped: the model scales its logits (logit_scale)" in start["levers"]["lever_notes"]
    assert [(s["loss"], s["grad_norm"]) for s in fallback] == [(s["loss"], s["grad_norm"]) for s in trl]


def test_linear_cross_entropy_refuses_a_trained_head():
    from tinyllama_mcp.pipeline import sft_loss

    with pytest.raises(ValueError, match="frozen LM head"):
        sft_loss.LinearCrossEntropy.apply(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2]))
