"""What the compiled layers' CUDA graphs cost to record and what a replayed step spends on the GPU (lever
cuda_graphs), on a CUDA card.

    python -m bench.graph_record_probe [--cprofile]

TinyLlama-shaped model (random weights), NF4 dequantized once, LoRA r64 (dropout 0.1), compiled layers with CUDA
graphs, packed widths padded to speed.plan.GRAPH_WIDTH_MULTIPLE. Times the forward and backward (no optimizer) of one
packed width through compile, warm-up, recording and replays, then a second and third width (the second makes the
graph dynamic: a recompile); prints torch.profiler's top GPU kernels over 3 replays with the GPU's busy time
against the wall time, and with --cprofile the Python profile of one recording.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path


def main() -> int:
    import torch

    from bench.compiled_layer_check import lora_model, packed_batches
    from bench.synthetic import build_tinyllama_shaped
    from tinyllama_mcp.pipeline.speed import compiled_layers, varlen_attention

    base = str(build_tinyllama_shaped(Path("/tmp/graph_probe_model")))
    model = lora_model(base, "nf4", dropout=0.1, master_fp32=True, compiled=True, graphs=True)
    rest = (1300, 400, 800, 600, 500, 300)  # 8 chat rows a step, three packed widths
    widths = packed_batches(model, [(700, 900, *rest), (1700, 900, *rest), (1700, 1900, *rest)], graphs=True)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(b) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        compiled_layers.step_begin()
        for p in trainable:
            p.grad = None
        model(**b).loss.backward()
        torch.cuda.synchronize()
        return round(time.perf_counter() - t0, 3)

    out = {"card": torch.cuda.get_device_name(), "widths": [b["input_ids"].shape[1] for b in widths]}
    python_profile = cProfile.Profile()
    with varlen_attention.use(model), torch.autocast("cuda", dtype=torch.bfloat16):
        out["width1: compile, warm-up, recording, replays"] = [step(widths[0]) for _ in range(6)]
        out["width2: recompile (dynamic) and warm-up"] = step(widths[1])
        if "--cprofile" in sys.argv:
            python_profile.enable()
        out["width2: recording"] = step(widths[1])
        python_profile.disable()
        out["width2: replays"] = [step(widths[1]) for _ in range(3)]
        out["width3: warm-up, recording, replays"] = [step(widths[2]) for _ in range(4)]
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(3):
                step(widths[0])
            wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    out["3 replays of width1: wall ms"] = round(wall * 1000, 1)
    out["3 replays of width1: GPU busy ms (sum of kernel times)"] = round(gpu_us / 1000, 1)
    print(out)
    print(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    if "--cprofile" in sys.argv:
        text = io.StringIO()
        stats = pstats.Stats(python_profile, stream=text)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(20)
        print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
