"""SFT -> DPO -> merge -> generate on a TinyLlama-1.1B-shaped model on a GPU, in bf16 and in forced fp16.

    python bench/gpu_pipeline_check.py --out OUT_DIR [--sft-steps 30] [--dpo-steps 20]

Each stage runs through the real CLI (`python -m tinyllama_mcp.pipeline run JOB_DIR`) with the reference
recipe (NF4, LoRA r64 on 7 projections, batch 2 x accumulation 4, length 512). Prints a table
of first/last loss, tokens/s and peak memory per stage, and writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.synthetic import build_tinyllama_shaped, dpo_rows, sft_rows, write_jsonl
from tinyllama_mcp.pipeline.events import read_events
from tinyllama_mcp.pipeline.specs import DatasetSpec, DPOSpec, GenerationSpec, MergeSpec, QuantSpec, SFTSpec, TrainingSpec


def run_stage(job_dir: Path, spec) -> dict:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "spec.json").write_text(spec.model_dump_json())
    t0 = time.time()
    with open(job_dir / "log.txt", "w") as log:
        code = subprocess.call([sys.executable, "-m", "tinyllama_mcp.pipeline", "run", str(job_dir)], stdout=log, stderr=log)
    events = read_events(job_dir / "events.jsonl")
    end = next((e for e in events if e["event"] in ("end", "error")), {})
    steps = [e for e in events if e["event"] == "step"]
    return {"exit": code, "wall_s": round(time.time() - t0, 1), "end": end,
            "mean_tokens_per_s": round(sum(s["tokens_per_s"] for s in steps[2:]) / max(len(steps[2:]), 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--dpo-steps", type=int, default=20)
    ap.add_argument("--base", default=None, help="model to use instead of the TinyLlama-shaped one (e.g. tiny-demo)")
    args = ap.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/gpu_check")
    work.mkdir(exist_ok=True)
    base = args.base or str(build_tinyllama_shaped(work / "tinyllama-shaped"))
    sft_data = write_jsonl(sft_rows(400, seed=1, lo=60, hi=700), work / "sft.jsonl")
    dpo_data = write_jsonl(dpo_rows(400, seed=2, lo=30, hi=250), work / "dpo.jsonl")
    from tinyllama_mcp.pipeline.modeling import device_name

    results = {"card": device_name(), "runs": {}}
    for dtype in ("auto", "fp16") if torch.cuda.is_available() else ("auto",):
        root = work / dtype
        quant = QuantSpec(compute_dtype=dtype)
        sft = SFTSpec(base_model=base, dataset=DatasetSpec(source=str(sft_data)), quant=quant,
                      training=TrainingSpec(max_steps=args.sft_steps, save_steps=10))
        r = {"sft": run_stage(root / "sft", sft)}
        dpo = DPOSpec(base_model=base, sft_adapter=str(root / "sft" / "adapter"), dataset=DatasetSpec(source=str(dpo_data)),
                      quant=quant, training=TrainingSpec(learning_rate=1e-5, max_steps=args.dpo_steps, warmup_ratio=0.1, save_steps=10))
        r["dpo"] = run_stage(root / "dpo", dpo)
        merge = MergeSpec(base_model=base, sft_adapter=str(root / "sft" / "adapter"), dpo_adapter=str(root / "dpo" / "adapter"),
                          dtype="fp16" if dtype == "fp16" else "auto")
        r["merge"] = run_stage(root / "merge", merge)
        from tinyllama_mcp.pipeline.generate import load_generator

        t0 = time.time()
        gen = load_generator(str(root / "merge" / "merged"), dtype="fp16" if dtype == "fp16" else "auto")
        out = gen.generate(messages=[{"role": "user", "content": "How do I name a feature branch?"}],
                           spec=GenerationSpec(max_new_tokens=32, temperature=0))
        r["generate"] = {"load_s": round(time.time() - t0, 1), "completion_tokens": out.completion_tokens,
                         "latency_ms": out.latency_ms, "text": out.text[:80]}
        del gen
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results["runs"][dtype] = r
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"card: {results['card']}")
    print(f"{'dtype':6} {'stage':6} {'exit':4} {'first_loss':>10} {'last_loss':>10} {'tok/s':>8} {'peak GiB':>8} {'wall s':>7}")
    for dtype, r in results["runs"].items():
        for stage in ("sft", "dpo", "merge"):
            s = r[stage]
            summ = s["end"].get("summary", {}) or {}
            print(f"{dtype:6} {stage:6} {s['exit']:4} {summ.get('first_loss', float('nan')):10.4f} "
                  f"{summ.get('last_loss', float('nan')):10.4f} {s['mean_tokens_per_s']:8.0f} "
                  f"{summ.get('peak_memory_gib') or 0:8.2f} {s['wall_s']:7.1f}  {s['end'].get('message', '')}")
        print(f"{dtype:6} generate: {r['generate']}")


if __name__ == "__main__":
    main()
