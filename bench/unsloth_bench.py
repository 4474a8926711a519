"""Unsloth's SFT and DPO on bench.train_bench's model, data and step shape: the bench's fourth column (issue 4).

    python -m bench.unsloth_bench --out OUT_DIR [--work /tmp/train_bench] [--seconds 15] [--only sft|dpo]
                                  [--padded] [--full-rows]
    python -m bench.unsloth_bench --out OUT_DIR --smoke     # CPU, tiny-demo: checks the script works

Unsloth pins transformers <= 5.17, trl <= 1.15 and datasets < 5, where the project runs newer ones, so it runs in a
process of its own with its packages first on the path: `python -m bench.train_bench --unsloth-site DIR` starts
this script for its `unsloth` runs, beside the other runs of the same call. `bench/unsloth_site.sh` builds DIR's
packages for a GPU machine.

Same as run b and c: the TinyLlama-1.1B-shaped random model in NF4 (Unsloth's load_in_4bit), LoRA r64, alpha 32 on
the 7 projections, 8 sequences a step without accumulation (SFT rows up to 2,048 tokens, DPO pairs up to 1,024 tokens
each), the recipe's learning rates, schedules and paged AdamW, the same rows in the same order (the same data files,
seed 42), and the same meter (real tokens/s after the first two steps, peak allocator memory, the logged losses).
Unsloth's own choices: LoRA dropout 0 (its fused LoRA kernels apply to dropout 0 only; the recipe's 0.1 would leave
them off), its offloaded gradient checkpointing (`use_gradient_checkpointing="unsloth"`) and padding-free SFT batches:
its fastest setting, the one PERF_NOTES' 44.7k / 32.2k tok/s were measured with. Writes OUT_DIR/unsloth_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

# Unsloth patches transformers, peft and trl when it is imported, so it comes before any of them.
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network on the GPU machine
# Unsloth writes the trainer and model code it generates into this folder (by default ./unsloth_compiled_cache).
os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache"))
import unsloth  # noqa: E402,F401
from unsloth import FastLanguageModel  # noqa: E402

from bench.train_bench import make_meter, peak_gib, prepare_inputs, reset_memory  # noqa: E402

LORA = dict(r=64, lora_alpha=32, lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth", random_state=42)


def load(cfg, max_length: int):
    """Unsloth's NF4 model with its LoRA adapters, and the tokenizer."""
    import torch

    from tinyllama_mcp.pipeline.specs import LLAMA_PROJECTIONS

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=cfg.base, max_seq_length=max_length, load_in_4bit=torch.cuda.is_available(),
        dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, target_modules=list(LLAMA_PROJECTIONS), **LORA)
    return model, tokenizer


def common_args(out: Path) -> dict:
    """The Trainer fields of both stages: run b's step shape and optimizer, a log every step for the meter."""
    import torch

    cuda = torch.cuda.is_available()  # (a CPU has neither bf16 kernels here nor bitsandbytes' paged optimizer)
    return dict(output_dir=str(out), per_device_train_batch_size=8, gradient_accumulation_steps=1,
                optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=cuda,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=42,
                include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)


def described(trainer, meter) -> dict:
    """The meter's figures and what Unsloth chose for the run."""
    from unsloth.models import _utils

    return dict(meter.result(), padding_free=getattr(trainer.args, "padding_free", None),
                xformers=getattr(_utils, "xformers_version", None), trainer=type(trainer).__name__)


def run_sft(cfg, rows: list[dict], max_length: int) -> dict:
    """Padding-free batches (8 rows concatenated, no pads), or with --padded Unsloth's padded rows."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load(cfg, max_length)
    meter = make_meter(cfg.seconds)
    args = SFTConfig(**common_args(cfg.work / "unsloth_sft"), learning_rate=2e-4, lr_scheduler_type="cosine",
                     num_train_epochs=1, max_length=max_length, padding_free=not cfg.padded)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[meter])
    trainer.train()
    return described(trainer, meter)


def run_dpo(cfg, rows: list[dict], max_length: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tinyllama_mcp.pipeline.recipe.dpo import to_text_pairs

    model, tokenizer = load(cfg, max_length)
    meter = make_meter(cfg.seconds)
    args = DPOConfig(**common_args(cfg.work / "unsloth_dpo"), learning_rate=1e-5, lr_scheduler_type="cosine",
                     warmup_steps=0.1, max_steps=200, beta=0.1, max_length=max_length, truncation_mode="keep_start")
    trainer = DPOTrainer(model=model, ref_model=None, args=args,
                         train_dataset=Dataset.from_list(to_text_pairs(rows, tokenizer, max_length)),
                         processing_class=tokenizer, callbacks=[meter])
    trainer.train()
    return described(trainer, meter)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("unsloth", "unsloth_zoo", "torch", "transformers", "trl", "peft", "bitsandbytes", "xformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/train_bench"), help="train_bench's --work: model and data")
    ap.add_argument("--seconds", type=float, default=None, help="training seconds per run (default 15; smoke 4)")
    ap.add_argument("--only", choices=["sft", "dpo"], default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-demo, small shapes (Unsloth's CPU mode: SFT only)")
    ap.add_argument("--padded", action="store_true", help="SFT with padded rows instead of padding-free batches")
    ap.add_argument("--full-rows", action="store_true", help="train_bench's --full-rows: rows all max_length long")
    cfg = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from tinyllama_mcp.pipeline.data import load as load_data
    from tinyllama_mcp.pipeline.specs import DatasetSpec

    if not cfg.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    inputs = prepare_inputs(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "versions": versions(), "seconds_per_run": cfg.seconds, "smoke": cfg.smoke, "lora": LORA}
    stages = [cfg.only] if cfg.only else ["sft"] if cfg.smoke else ["sft", "dpo"]
    for stage in stages:
        rows = load_data(DatasetSpec(source=str(inputs[f"{stage}_path"])), stage).rows
        reset_memory()
        t0 = time.time()
        try:
            result = (run_sft if stage == "sft" else run_dpo)(cfg, rows, inputs[f"{stage}_len"])
        except Exception as exc:
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
        result.update(peak_gib=peak_gib(), wall_s=round(time.time() - t0, 1))
        results[stage] = result
        print(f"[unsloth] {stage}: {json.dumps({k: v for k, v in result.items() if k != 'curve'})}", flush=True)
        (cfg.out / "unsloth_bench.json").write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in results[s] for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
