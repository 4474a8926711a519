"""speed.plan's levers: torch_compile, cuda_graphs, sync_free_step, dataloader_workers, precompute, share_prompt."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch

from tinyllama_mcp.pipeline.speed import compiled_layers, estimates, plan
from tinyllama_mcp.pipeline.speed.machine import Machine
from tinyllama_mcp.pipeline.speed.plan import Plan, decide
from tinyllama_mcp.pipeline.specs import TrainingSpec

from speed_testlib import with_speed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CPU = Machine()
GPU = Machine.gpu(free_gib=80)  # CUDA with room, Triton, Liger and the varlen kernel


def test_precompute_auto_only_when_every_row_is_trained(demo_config):
    config = demo_config
    short = TrainingSpec(max_steps=10, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    assert not decide(short, "dpo", CPU, config, torch.float32, rows=100).precompute_ref_log_probs
    every_row = TrainingSpec(max_steps=50, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    assert decide(every_row, "dpo", CPU, config, torch.float32, rows=100).precompute_ref_log_probs
    one_epoch = TrainingSpec(num_train_epochs=1)
    assert decide(one_epoch, "dpo", CPU, config, torch.float32, rows=100).precompute_ref_log_probs
    epochs = TrainingSpec(num_train_epochs=3)
    assert decide(epochs, "dpo", CPU, config, torch.float32, rows=100).precompute_ref_log_probs
    assert not decide(TrainingSpec(precompute_ref_log_probs=False, num_train_epochs=3), "dpo", CPU, config,
                      torch.float32, rows=100).precompute_ref_log_probs


def test_dataloader_workers_and_shared_prompts_resolve(demo_config):
    config = demo_config
    spec = TrainingSpec(max_length=1024)
    dpo = decide(spec, "dpo", GPU, config, torch.bfloat16, rows=1_000, mean_tokens=300)
    sft = decide(spec, "sft", GPU, config, torch.bfloat16, rows=1_000, mean_tokens=300)
    assert dpo.dataloader_workers == plan.AUTO_DATALOADER_WORKERS and sft.dataloader_workers == 0
    assert decide(with_speed(spec, dataloader_workers=3), "sft", GPU, config, torch.bfloat16,
                  rows=1_000).dataloader_workers == 3
    assert dpo.share_prompt and dpo.effective()["share_prompt"] and not sft.share_prompt
    padded = decide(with_speed(spec, varlen_attention=False), "dpo", GPU, config, torch.bfloat16, rows=1_000)
    assert not padded.share_prompt and any(n.startswith("share_prompt skipped") for n in padded.notes)
    off = decide(with_speed(spec, share_prompt=False), "dpo", GPU, config, torch.bfloat16, rows=1_000)
    assert not off.share_prompt and not any("share_prompt" in n for n in off.notes)


def test_torch_compile_resolves_per_device_and_batch_layout(demo_config):
    config = demo_config
    machine = CPU
    packed = dict(padding_free=True, varlen_attention=True, use_liger_kernel="auto")
    auto = decide(TrainingSpec(**packed), "sft", machine, config, torch.float32, rows=10)
    assert auto.torch_compile is machine.cuda
    if not machine.cuda:
        assert "torch_compile skipped: 'auto' compiles on CUDA only" in auto.notes
    forced = decide(TrainingSpec(**packed, torch_compile=True), "dpo", machine, config, torch.float32, rows=10)
    assert forced.torch_compile is True and forced.effective()["torch_compile"] is True
    unpacked = decide(TrainingSpec(padding_free=True, varlen_attention=False, torch_compile=True), "sft", machine,
                      config, torch.float32, rows=10)
    assert unpacked.torch_compile is False
    assert any(n.startswith("torch_compile skipped: it runs on packed batches") for n in unpacked.notes)
    off = decide(TrainingSpec(**packed, torch_compile=False), "sft", machine, config, torch.float32, rows=10)
    assert off.torch_compile is False and not any(n.startswith("torch_compile") for n in off.notes)
    assert "torch_compile" not in off.trainer_args()  # the Trainer's whole-model compile is never asked for


def test_torch_compile_auto_only_where_the_compile_pays(demo_config, monkeypatch):
    config = demo_config
    spec = TrainingSpec(max_length=2048)  # the defaults: packed rows, varlen attention, torch_compile 'auto'
    assert spec.speed.torch_compile == "auto"
    assert decide(spec, "sft", GPU, config, torch.bfloat16, rows=10_000, mean_tokens=650).torch_compile  # 6.5M
    short = decide(spec, "sft", GPU, config, torch.bfloat16, rows=2_400, mean_tokens=650)  # 1.56M tokens
    assert short.torch_compile is False
    assert any("this one trains ~1,560,000" in n for n in short.notes), short.notes
    steps = spec.model_copy(update={"max_steps": 1_000})  # 1,000 x 8 pairs x 2 x 300 tokens = 4.8M
    assert decide(steps, "dpo", GPU, config, torch.bfloat16, rows=500, mean_tokens=300).torch_compile
    checkpointed = with_speed(spec, gradient_checkpointing=True)
    assert not decide(checkpointed, "sft", GPU, config, torch.bfloat16, rows=10_000, mean_tokens=650).torch_compile
    forced = with_speed(spec, torch_compile=True)
    assert decide(forced, "sft", GPU, config, torch.bfloat16, rows=2_400, mean_tokens=650).torch_compile
    # A CUDA machine without Triton, described by what Machine.read() would find there: no GPU kernels to compile.
    monkeypatch.setitem(sys.modules, "triton", None)
    no_triton_gpu = dataclasses.replace(GPU, triton_missing=compiled_layers.gpu_kernels_unavailable())
    no_triton = decide(forced, "sft", no_triton_gpu, config, torch.bfloat16, rows=10_000, mean_tokens=650)
    assert no_triton.torch_compile is False
    assert any("need Triton, which cannot be imported" in n for n in no_triton.notes), no_triton.notes


def test_cuda_graphs_resolve_with_the_compiled_layers_on_cuda(demo_config):
    config = demo_config
    compiled = TrainingSpec(max_length=2048, torch_compile=True)
    assert compiled.speed.cuda_graphs == "auto"
    cpu = decide(compiled, "sft", CPU, config, torch.bfloat16, rows=20_000, mean_tokens=650)
    assert cpu.torch_compile and not cpu.cuda_graphs and cpu.width_multiple == 0  # (inductor's CPU kernels)
    assert "cuda_graphs skipped: no CUDA device" in cpu.notes
    long_sft = decide(compiled, "sft", GPU, config, torch.bfloat16, rows=40_000, mean_tokens=650)  # 26M tokens
    assert long_sft.cuda_graphs and long_sft.width_multiple == plan.GRAPH_WIDTH_MULTIPLE
    assert long_sft.effective()["cuda_graphs"] is True and long_sft.effective()["packed_width_multiple"] == 1024
    short_sft = decide(compiled, "sft", GPU, config, torch.bfloat16, rows=2_400, mean_tokens=650)  # 1.56M
    assert not short_sft.cuda_graphs and short_sft.width_multiple == 0
    assert any("SFT runs of at least 20,000,000 real tokens" in n and "trains ~1,560,000" in n for n in short_sft.notes)
    long_dpo = decide(compiled, "dpo", GPU, config, torch.bfloat16, rows=20_000, mean_tokens=650)  # x 2 rows: 26M
    assert long_dpo.cuda_graphs
    dpo = decide(compiled, "dpo", GPU, config, torch.bfloat16, rows=10_000, mean_tokens=650)  # 13M
    assert not dpo.cuda_graphs and any("DPO runs of at least 24,000,000" in n for n in dpo.notes)
    forced = with_speed(compiled, cuda_graphs=True)
    assert decide(forced, "dpo", GPU, config, torch.bfloat16, rows=100, mean_tokens=650).cuda_graphs
    off = decide(with_speed(compiled, cuda_graphs=False), "sft", GPU, config, torch.bfloat16,
                 rows=20_000, mean_tokens=650)
    assert not off.cuda_graphs and off.width_multiple == 0 and not any("cuda_graphs" in n for n in off.notes)
    checkpointed = decide(with_speed(forced, gradient_checkpointing=True), "sft", GPU, config,
                          torch.bfloat16, rows=100)
    assert checkpointed.torch_compile and not checkpointed.cuda_graphs
    assert any(n.startswith("cuda_graphs skipped: not under gradient checkpointing") for n in checkpointed.notes)
    eager = decide(with_speed(forced, torch_compile=False), "sft", GPU, config, torch.bfloat16, rows=100)
    assert not eager.cuda_graphs and not any("cuda_graphs" in n for n in eager.notes)


def test_cuda_graphs_auto_counts_the_widths_sft_rows_pack_to(demo_config):
    """SFT's 'auto' asks GRAPHS_TOKENS_PER_WIDTH real tokens for every packed width the run meets (one recording
    each): rows that all fill max_length pack to one width, chat rows of spread lengths to several."""
    import random

    multiple = plan.GRAPH_WIDTH_MULTIPLE
    full = [3000] * 400  # cut to max_length: 8 x 2048 tokens, one width
    rng = random.Random(0)
    spread = [int(math.exp(rng.uniform(math.log(100), math.log(2300)))) for _ in range(400)]
    assert estimates.sft_packed_widths(full, 2048, 8, 10_000, multiple) == 1
    widths = estimates.sft_packed_widths(spread, 2048, 8, 10_000, multiple)
    assert 5 <= widths <= 14  # 8-row sums from ~2k to ~13k tokens, in multiples of 1,024
    assert estimates.sft_packed_widths(spread, 2048, 8, 1, multiple) == 1  # a one-step run meets one width
    assert estimates.sft_packed_widths([], 2048, 8, 100, multiple) == 0

    config = demo_config
    compiled = TrainingSpec(max_length=2048, torch_compile=True)

    def resolved(lengths: list[int], rows: int) -> Plan:
        mean = sum(min(n, 2048) for n in lengths) / len(lengths)
        return decide(compiled, "sft", GPU, config, torch.bfloat16, rows=rows, mean_tokens=mean, row_lengths=lengths)

    assert resolved(full, 2_000).cuda_graphs  # 4.1M tokens, one width: past 2.5M
    small = resolved(full, 1_000)  # 2.0M
    assert not small.cuda_graphs
    assert any("at least 2,500,000 real tokens" in n and "pack to ~1" in n for n in small.notes), small.notes
    least = widths * plan.GRAPHS_TOKENS_PER_WIDTH
    mean = sum(min(n, 2048) for n in spread) / len(spread)
    below, above = int(0.9 * least / mean), int(1.1 * least / mean)
    assert not resolved(spread, below).cuda_graphs and resolved(spread, above).cuda_graphs
    assert any(f"at least {least:,} real tokens" in n and f"pack to ~{widths}" in n
               for n in resolved(spread, below).notes)


def test_sync_free_step_resolves_with_cuda_graphs(demo_config):
    config = demo_config
    spec = TrainingSpec(max_length=1024, torch_compile=True)
    assert TrainingSpec().speed.sync_free_step == "auto"
    graphs = decide(with_speed(spec, cuda_graphs=True), "sft", GPU, config, torch.bfloat16, rows=1_000)
    assert graphs.cuda_graphs and graphs.sync_free_step
    assert graphs.trainer_args()["accelerator_config"] == {"non_blocking": True}
    plain = decide(with_speed(spec, cuda_graphs=False), "sft", GPU, config, torch.bfloat16, rows=1_000)
    assert not plain.sync_free_step and "accelerator_config" not in plain.trainer_args()
    # the GPU sets the pace with graphs: the batches are collated in workers too
    assert graphs.dataloader_workers == plan.AUTO_DATALOADER_WORKERS and plain.dataloader_workers == 0
    forced = decide(with_speed(spec, sync_free_step=True), "sft", GPU, config, torch.bfloat16, rows=1_000)
    assert forced.sync_free_step
    dpo = decide(with_speed(spec, sync_free_step=True), "dpo", GPU, config, torch.bfloat16, rows=1_000)
    assert not dpo.sync_free_step and any(n.startswith("sync_free_step skipped") for n in dpo.notes)
