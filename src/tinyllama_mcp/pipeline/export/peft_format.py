"""The SFT/DPO adapter as a PEFT folder that vLLM's LoRA loader takes (`--enable-lora --lora-modules name=path`).

vLLM loads adapter_config.json and adapter_model.safetensors and refuses modules_to_save, DoRA, trained biases and
target modules its Llama has no LoRA layer for; it needs --max-lora-rank at least the rank (its default is 16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.export import checks
from tinyllama_mcp.pipeline.export.gguf_lora import plain_lora
from tinyllama_mcp.pipeline.export.source import Source, adapter_config

FILES = ("adapter_config.json", "adapter_model.safetensors")
# Modules vLLM's Llama serves LoRA on (q/k/v packed as qkv_proj, gate/up as gate_up_proj, as vLLM loads them).
VLLM_LLAMA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
VLLM_DEFAULT_MAX_RANK = 16
WEIGHT_PREFIX = "base_model.model."


def vllm_view(config: dict, weight_names: list[str]) -> dict:
    """What vLLM will make of the adapter: its rank and modules, and the flag it needs; UserError where it refuses."""
    rank, alpha = plain_lora({**config, "use_rslora": False}, "a vLLM LoRA")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - VLLM_LLAMA_MODULES)
    if unknown:
        raise UserError(f"vLLM serves LoRA on Llama's {sorted(VLLM_LLAMA_MODULES)} only, not {unknown}; export "
                        "'safetensors' (the adapter merged in) instead")
    bad = [n for n in weight_names if not n.startswith(WEIGHT_PREFIX)
           or not n.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise UserError(f"the adapter's weights {bad[:3]} are not named as vLLM expects "
                        f"({WEIGHT_PREFIX}...lora_A.weight / lora_B.weight); retrain it with this tool")
    max_rank = next((r for r in VLLM_RANKS if r >= rank), None)
    if max_rank is None:
        raise UserError(f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}; retrain with a "
                        "lower lora_r")
    flags = "--enable-lora" + (f" --max-lora-rank {max_rank}" if rank > VLLM_DEFAULT_MAX_RANK else "")
    return {"rank": rank, "lora_alpha": alpha, "target_modules": sorted(targets),
            "use_rslora": bool(config.get("use_rslora")), "vllm_flags": flags}


def write_peft(folder: Path, source: Source) -> dict:
    """Copy the adapter's two files into `folder` once vLLM's rules hold; returns vllm_view."""
    from safetensors import safe_open

    adapter = source.adapter_dir
    missing = [name for name in FILES if not (adapter / name).is_file()]
    if missing:
        raise UserError(f"the adapter folder {adapter} has no {missing}; vLLM needs both {list(FILES)}")
    with safe_open(str(adapter / FILES[1]), "pt") as f:
        view = vllm_view(adapter_config(adapter), list(f.keys()))
    folder.mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(adapter / name, folder / name)
    return view


def verify_peft(folder: Path, source: Source) -> dict:
    """Load the exported folder with peft onto the source's base (as a second adapter) and compare logits."""
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    file = f"{folder.name}/"
    try:
        config = json.loads((folder / FILES[0]).read_text("utf-8"))
        weights = load_peft_weights(str(folder), device="cpu")
    except (OSError, ValueError, SafetensorError) as exc:
        checks.require(False, file, f"it cannot be read ({type(exc).__name__}: {exc})")
    view = vllm_view(config, [f"{WEIGHT_PREFIX}{n}" if not n.startswith(WEIGHT_PREFIX) else n for n in weights])
    model = source.model
    try:
        model.load_adapter(str(folder), adapter_name="exported")
    except Exception as exc:  # peft raises several types for a damaged adapter
        checks.require(False, file, f"peft cannot load it ({type(exc).__name__}: {exc})")
    try:
        model.set_adapter("exported")
        logits = source.forward()
    finally:
        model.set_adapter("default")
        model.delete_adapter("exported")
    figure = checks.max_abs_diff(logits, source.logits)
    bound = checks.same_bound(source.logit_scale)
    checks.within(file, f"the max abs logit difference from the source adapter over {len(source.ids)} prompts",
                  figure, bound)
    finite = all(torch.isfinite(w).all() for w in weights.values())
    checks.require(finite, file, "its weights hold NaN or infinite values")
    return {"method": "peft load_adapter of the exported folder on the source's base, logits vs the source adapter; "
                      "adapter_config checked against vLLM's LoRA rules",
            "max_abs_logit_diff": figure, "bound": bound, "passed": True, "logit_scale": source.logit_scale,
            "prompts": len(source.ids), **view}
