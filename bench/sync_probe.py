"""Where the project's training step waits for the GPU: every host sync of a few steps, counted by call site.

    python -m bench.sync_probe [--steps 3] [--stage sft|dpo] [--graphs]   # CUDA; the bench's model and data

A CPU-bound step only overlaps with the GPU between syncs, so each sync (a .item(), a tensor read back to
the host, a data-dependent shape) costs up to the GPU work queued before it. After two warm-up steps this
turns on torch's sync debug mode and prints, for each synchronizing call site, how often it ran and the
innermost frames of its Python stack.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="steps probed after two warm-up steps")
    ap.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    ap.add_argument("--graphs", action="store_true", help="the stage with cuda_graphs (a recording's syncs show as "
                    "cudagraph_trees frames)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sync_probe"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    from transformers import TrainerCallback

    from bench import train_bench
    from bench.synthetic import build_tinyllama_shaped, dpo_rows, sft_rows, write_jsonl

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    base = str(build_tinyllama_shaped(args.work / "tinyllama-shaped"))
    if args.stage == "sft":
        data = write_jsonl(sft_rows(400, seed=1, lo=60, hi=1400), args.work / "sft.jsonl")
    else:
        data = write_jsonl(dpo_rows(400, seed=2, lo=30, hi=300), args.work / "dpo.jsonl")
    training = train_bench.stage_training(args.stage, 2048 if args.stage == "sft" else 1024)
    if args.graphs:
        training["cuda_graphs"] = True
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename][-6:]
            sites["\n".join(f"    {f.filename}:{f.lineno} {f.name}" for f in frames)] += 1

    class Probe(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == 2:
                torch.cuda.set_sync_debug_mode("warn")
            if state.global_step == 2 + args.steps:
                torch.cuda.set_sync_debug_mode(0)
                control.should_training_stop = True

    warnings.simplefilter("always")
    warnings.showwarning = record
    cfg = SimpleNamespace(base=base, dtype="auto", seconds=600.0)
    train_bench.run_stage(cfg, args.stage, data, args.work / "run", training, callbacks=(Probe(),))
    print(f"host syncs in {args.steps} steps of the {args.stage.upper()} stage, by call site:")
    for site, count in sites.most_common():
        print(f"{count:5d}x\n{site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
