"""One stage of bench.time_to_model's peer columns, in a fresh process, so its start-up and imports count.

    python -m bench.time_to_model_peer prepare  --work W [--smoke]           # the model, data and prompts
    python -m bench.time_to_model_peer STAGE --column a|b --work W --result R.json [--steps N]
        STAGE: sft, dpo, merge, generate

Column a is the seed's notebook: plain TRL as docs/ai/FINE_TUNING_TINYLLAMA.md writes it (train_bench's run a:
NF4 through transformers' BitsAndBytesConfig, LoRA r64 alpha 32 dropout 0.1, 2 x 4 sequences of 512, gradient
checkpointing, paged AdamW), the SFT adapter merged into the dequantized base and quantized again for DPO, the DPO
adapter merged with peft's merge_and_unload, and transformers' generate. Column b is Unsloth (bench.unsloth_bench's
model and choices: LoRA dropout 0, its offloaded checkpointing, padding-free SFT) with the same step shape and
schedules, its save_pretrained_merged for both merges and its for_inference generate. Each stage writes R.json: the
wall-clock marks it passed (imported, loaded, train_call, train_begin, train_end, saved, ...), its per-step clock
and the Trainer's total steps; --steps N stops training after N steps (the caller extrapolates).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Optional



class Marks(dict):
    def mark(self, name: str) -> None:
        self[name] = time.time()

    def callback(self):
        from transformers import TrainerCallback

        marks = self

        class MarkCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                marks.mark("train_begin")

        return MarkCallback()


# ---------------------------------------------------------------- prepare


def prepare(cfg) -> dict:
    """The base model (TinyLlama-1.1B-shaped random weights; smoke: a copy of tiny-demo), the SFT rows, the DPO pairs
    and the prompts; the card. Written to W/inputs.json."""
    import torch

    from bench.synthetic import build_tinyllama_shaped, chat_rows, orca_pairs, write_jsonl

    work = cfg.work
    work.mkdir(parents=True, exist_ok=True)
    if cfg.base:
        base = cfg.base
        n_sft, n_dpo, scale, dpo_steps = cfg.sft_rows, cfg.dpo_rows, 1.0, 200
    elif cfg.smoke:
        from tinyllama_mcp.pipeline.modeling import resolve_model

        base = work / "tiny-demo"
        if not base.exists():
            shutil.copytree(resolve_model("tiny-demo"), base)
        n_sft, n_dpo, scale, dpo_steps = 24, 24, 0.12, 3
    else:
        base = build_tinyllama_shaped(work / "tinyllama-shaped")
        n_sft, n_dpo, scale, dpo_steps = cfg.sft_rows, cfg.dpo_rows, 1.0, 200
    sft = chat_rows(n_sft, seed=1, scale=scale)
    inputs = {
        "base": str(base), "smoke": cfg.smoke, "dpo_steps": dpo_steps, "sft_rows": n_sft, "dpo_rows": n_dpo,
        "sft_path": str(write_jsonl(sft, work / "sft.jsonl")),
        "dpo_path": str(write_jsonl(orca_pairs(n_dpo, seed=2, scale=scale), work / "dpo.jsonl")),
        # smoke: 16-bit bases (bitsandbytes' CPU kernels are slow) and rows of 128 tokens, the rest as the recipe's
        "quantization": "none" if cfg.smoke else "nf4", "max_length": 128 if cfg.smoke else 512,
        "prompts": [" ".join(row["messages"][0]["content"].split()[:40]) for row in chat_rows(33, seed=3)],
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
    }
    (work / "inputs.json").write_text(json.dumps(inputs, indent=2))
    return inputs


# ---------------------------------------------------------------- shared


def dtype():
    from tinyllama_mcp.pipeline import modeling

    return modeling.compute_dtype("auto")


def train_and_save(trainer, meter, marks: Marks, adapter: Path, tokenizer) -> dict:
    marks.mark("train_call")
    trainer.train()
    marks.mark("train_end")
    trainer.save_model(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    marks.mark("saved")
    return {"curve": meter.result()["curve"], "total_steps": trainer.state.max_steps}


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int) -> int:
    """Greedy answers to `prompts` in one left-padded batch, in the chat template; returns the new tokens (to EOS)."""
    import torch

    from tinyllama_mcp.pipeline.chat import render

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    texts = [render([{"role": "user", "content": p}], add_generation_prompt=True, eos=tokenizer.eos_token)
             for p in prompts]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    tokens = 0
    for row in out[:, encoded["input_ids"].shape[1]:].tolist():
        tokens += next((i + 1 for i, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
    return tokens


def generate_stage(model, tokenizer, inputs: dict, cfg, marks: Marks) -> dict:
    marks.mark("loaded")
    first = generate_texts(model, tokenizer, inputs["prompts"][:1], cfg.gen_tokens)
    marks.mark("first")
    batch = generate_texts(model, tokenizer, inputs["prompts"][1:1 + cfg.batch], cfg.gen_tokens)
    marks.mark("batch")
    return {"first_tokens": first, "batch_tokens": batch, "batch_rows": cfg.batch}


def folders(cfg) -> dict[str, Path]:
    root = cfg.work / cfg.column
    return {name: root / name for name in ("sft_adapter", "sft_merged", "dpo_adapter", "merged", "trainer")}


def sft_rows(inputs: dict) -> list[dict]:
    from tinyllama_mcp.pipeline.data import load
    from tinyllama_mcp.pipeline.specs import DatasetSpec

    return load(DatasetSpec(source=inputs["sft_path"]), "sft").rows


def dpo_pairs(inputs: dict, tokenizer) -> list[dict]:
    from tinyllama_mcp.pipeline.data import load
    from tinyllama_mcp.pipeline.recipe.dpo import to_text_pairs
    from tinyllama_mcp.pipeline.specs import DatasetSpec

    return to_text_pairs(load(DatasetSpec(source=inputs["dpo_path"]), "dpo").rows, tokenizer, inputs["max_length"])


def dpo_config(common: dict, inputs: dict, length: int):
    """The recipe's DPO settings, the same for both columns."""
    from trl import DPOConfig

    return DPOConfig(**common, learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0.1,
                     max_steps=inputs["dpo_steps"], beta=0.1, max_length=length, truncation_mode="keep_start")


# ---------------------------------------------------------------- column a: the seed's notebook (plain TRL)


def a_train(cfg, inputs: dict, marks: Marks) -> dict:
    """SFT, or DPO on the SFT model (merged in 16-bit into the dequantized NF4 base, then NF4 again)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOTrainer, SFTConfig, SFTTrainer

    from bench.train_bench import hf_common, lora, make_meter
    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    marks.mark("imported")
    paths, nf4, dt, length = folders(cfg), QuantSpec(quantization=inputs["quantization"]), dtype(), inputs["max_length"]
    common = hf_common(SimpleNamespace(dtype="auto"), paths["trainer"], batch=2, accumulation=4)
    meter = make_meter(float("inf"), cfg.steps or None)
    tokenizer = modeling.load_tokenizer(inputs["base"])
    if cfg.stage == "sft":
        data = Dataset.from_list(sft_rows(inputs))
        model = modeling.load_base(inputs["base"], nf4, dt)
        marks.mark("loaded")
        set_seed(42)
        args = SFTConfig(**common, learning_rate=2e-4, lr_scheduler_type="cosine", num_train_epochs=1,
                         max_length=length)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora(), callbacks=[marks.callback(), meter])
        return train_and_save(trainer, meter, marks, paths["sft_adapter"], tokenizer)
    sft = modeling.merge_adapters(modeling.load_dequantized(inputs["base"], nf4, dt), [str(paths["sft_adapter"])])
    sft.save_pretrained(str(paths["sft_merged"]))
    tokenizer.save_pretrained(str(paths["sft_merged"]))
    del sft
    marks.mark("sft_merged")
    model = modeling.load_base(str(paths["sft_merged"]), nf4, dt)
    marks.mark("loaded")
    set_seed(42)
    args = dpo_config(common, inputs, length)
    trainer = DPOTrainer(model=model, ref_model=None, args=args,
                         train_dataset=Dataset.from_list(dpo_pairs(inputs, tokenizer)), processing_class=tokenizer,
                         peft_config=lora(), callbacks=[marks.callback(), meter])
    return train_and_save(trainer, meter, marks, paths["dpo_adapter"], tokenizer)


def a_merge(cfg, inputs: dict, marks: Marks) -> dict:
    """The DPO adapter merged (peft's merge_and_unload) into the dequantized NF4 SFT model it was trained on."""
    from tinyllama_mcp.pipeline import modeling
    from tinyllama_mcp.pipeline.specs import QuantSpec

    marks.mark("imported")
    paths, quant = folders(cfg), QuantSpec(quantization=inputs["quantization"])
    model = modeling.load_dequantized(str(paths["sft_merged"]), quant, dtype())
    model = modeling.merge_adapters(model, [str(paths["dpo_adapter"])])
    marks.mark("merged")
    model.save_pretrained(str(paths["merged"]))
    modeling.load_tokenizer(str(paths["dpo_adapter"])).save_pretrained(str(paths["merged"]))
    marks.mark("saved")
    return {}


def a_generate(cfg, inputs: dict, marks: Marks) -> dict:
    from transformers import AutoModelForCausalLM

    from tinyllama_mcp.pipeline import modeling

    marks.mark("imported")
    merged = str(folders(cfg)["merged"])
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype(), device_map={"": modeling.device()})
    return generate_stage(model, modeling.load_tokenizer(merged), inputs, cfg, marks)


# ---------------------------------------------------------------- column b: Unsloth


def b_stage(cfg, inputs: dict, marks: Marks) -> dict:
    import bench.unsloth_bench as ub  # imports unsloth before transformers, trl and peft

    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOTrainer, SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from bench.train_bench import make_meter

    marks.mark("imported")
    paths, cuda, length = folders(cfg), torch.cuda.is_available(), inputs["max_length"]
    common = dict(ub.common_args(paths["trainer"]), per_device_train_batch_size=2, gradient_accumulation_steps=4)
    meter = make_meter(float("inf"), cfg.steps or None)

    def unsloth_load(name: Path | str, **kwargs):
        return FastLanguageModel.from_pretrained(
            model_name=str(name), max_seq_length=kwargs.pop("max_seq_length", length), local_files_only=True,
            load_in_4bit=kwargs.pop("load_in_4bit", cuda), dtype=torch.bfloat16 if cuda else torch.float32, **kwargs)

    if cfg.stage == "sft":
        rows = sft_rows(inputs)
        model, tokenizer = ub.load(SimpleNamespace(base=inputs["base"]), length)
        marks.mark("loaded")
        set_seed(42)
        args = SFTConfig(**common, learning_rate=2e-4, lr_scheduler_type="cosine", num_train_epochs=1,
                         max_length=length, padding_free=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[marks.callback(), meter])
        return train_and_save(trainer, meter, marks, paths["sft_adapter"], tokenizer)
    if cfg.stage == "dpo":
        model, tokenizer = unsloth_load(paths["sft_adapter"])  # the base in NF4 with the SFT adapter
        model.save_pretrained_merged(str(paths["sft_merged"]), tokenizer, save_method="merged_16bit")
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        marks.mark("sft_merged")
        model, tokenizer = ub.load(SimpleNamespace(base=str(paths["sft_merged"])), length)
        marks.mark("loaded")
        set_seed(42)
        args = dpo_config(common, inputs, length)
        trainer = DPOTrainer(model=model, ref_model=None, args=args,
                             train_dataset=Dataset.from_list(dpo_pairs(inputs, tokenizer)), processing_class=tokenizer,
                             callbacks=[marks.callback(), meter])
        return train_and_save(trainer, meter, marks, paths["dpo_adapter"], tokenizer)
    if cfg.stage == "merge":
        model, tokenizer = unsloth_load(paths["dpo_adapter"])  # the SFT model in NF4 with the DPO adapter
        marks.mark("loaded")
        model.save_pretrained_merged(str(paths["merged"]), tokenizer, save_method="merged_16bit")
        marks.mark("saved")
        return {}
    model, tokenizer = unsloth_load(paths["merged"], load_in_4bit=False, max_seq_length=2048)
    FastLanguageModel.for_inference(model)
    return generate_stage(model, tokenizer, inputs, cfg, marks)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["prepare", "sft", "dpo", "merge", "generate"])
    ap.add_argument("--column", choices=["a", "b"], default="a")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--result", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=0, help="stop training after this many steps (0: the whole run)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--base", type=Path, default=None, help="prepare: this base instead of bench.synthetic's")
    ap.add_argument("--sft-rows", type=int, default=3000)
    ap.add_argument("--dpo-rows", type=int, default=12859)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    cfg = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.stage == "prepare":
        print(json.dumps(prepare(cfg)))
        return 0
    marks = Marks()
    inputs = json.loads((cfg.work / "inputs.json").read_text())
    result: dict = {"stage": cfg.stage, "column": cfg.column}
    try:
        if cfg.column == "b":
            result.update(b_stage(cfg, inputs, marks))
        else:
            result.update({"sft": a_train, "dpo": a_train, "merge": a_merge, "generate": a_generate}[cfg.stage](
                cfg, inputs, marks))
    except Exception as exc:
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    result["marks"] = dict(marks)
    cfg.result.write_text(json.dumps(result, indent=2))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
