"""An SFT/DPO LoRA adapter as a GGUF adapter file for llama.cpp (`--lora`) and Ollama (`ADAPTER`), written and verified.

general.type "adapter", adapter.type "lora", adapter.lora.alpha; per adapted weight two f32 tensors named after it,
"<tensor>.lora_a" (rank x in, as PEFT's lora_A) and "<tensor>.lora_b" (out x rank), llama.cpp's scale being alpha /
rank, PEFT's too. lora_b of Q and K gets the rows of the weight it changes permuted (llama_layout).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.export import checks, ggml_forward
from tinyllama_mcp.pipeline.export.gguf_read import fields_of, open_gguf, tensor_types, tensors_of
from tinyllama_mcp.pipeline.export.llama_layout import ARCH, LlamaShape, tensor_map, to_ggml_rows, to_hf_rows
from tinyllama_mcp.pipeline.export.source import Source, adapter_config


def plain_lora(config: dict, what: str) -> tuple[int, float]:
    """(rank, alpha) of a plain LoRA adapter config; UserError for what `what` cannot carry."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        problems.append("it is a DoRA adapter (use_dora)")
    if config.get("modules_to_save"):
        problems.append(f"it saves whole modules too (modules_to_save {config['modules_to_save']})")
    if config.get("bias", "none") != "none":
        problems.append(f"it trains biases (bias {config['bias']!r})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("its rank or alpha differs per module (rank_pattern/alpha_pattern)")
    if config.get("use_rslora"):
        problems.append("it scales by alpha / sqrt(rank) (use_rslora)")
    if problems:
        raise UserError(f"cannot export this adapter as {what}: {'; '.join(problems)}. Export 'gguf-f16' or "
                        "'safetensors' instead: they hold the model with the adapter merged in")
    return int(config["r"]), float(config["lora_alpha"])


def _lora_pairs(source: Source, shape: LlamaShape) -> dict[str, tuple[torch.Tensor, torch.Tensor, str, object]]:
    """GGUF weight name -> (lora_A, lora_B in HF row order, HF name, head count that permutes lora_B's rows)."""
    names = tensor_map(shape)
    pairs = {}
    for hf_name, layer in source.lora_layers().items():
        if hf_name not in names:
            raise UserError(f"the adapter changes {hf_name}, which has no llama.cpp tensor; "
                            "export 'safetensors' instead")
        gguf_name, heads = names[hf_name]
        a, b = layer.lora_A["default"].weight.detach().float(), layer.lora_B["default"].weight.detach().float()
        pairs[gguf_name] = (a, b, hf_name, heads)
    return pairs


def write_lora(path: Path, source: Source, name: str) -> None:
    rank, alpha = plain_lora(adapter_config(source.adapter_dir), "a GGUF LoRA")
    shape = LlamaShape.of_config(source.config)
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for gguf_name, (a, b, _, heads) in _lora_pairs(source, shape).items():
            b = to_ggml_rows(b, heads) if heads else b
            writer.add_tensor(f"{gguf_name}.lora_a", np.ascontiguousarray(a.numpy(), dtype=np.float32))
            writer.add_tensor(f"{gguf_name}.lora_b", np.ascontiguousarray(b.numpy(), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def verify_lora(path: Path, source: Source) -> dict:
    """Read back: keys, each lora_a/lora_b equal to the adapter's; then base + alpha/rank x B @ A from the file, in a
    llama.cpp-style forward on the base weights in GGUF layout, against the PEFT model's logits."""
    file = path.name
    reader = open_gguf(path)
    fields, types = fields_of(reader), tensor_types(reader)
    checks.require(fields.get(gguf.Keys.General.TYPE) == gguf.GGUFType.ADAPTER, file, "general.type is not 'adapter'")
    checks.require(fields.get(gguf.Keys.General.ARCHITECTURE) == ARCH, file, "general.architecture is not 'llama'")
    checks.require(fields.get(gguf.Keys.Adapter.TYPE) == "lora", file, "adapter.type is not 'lora'")
    alpha = fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    checks.require(isinstance(alpha, float), file, "adapter.lora.alpha is missing")
    rank, _ = plain_lora(adapter_config(source.adapter_dir), "a GGUF LoRA")
    shape = LlamaShape.of_config(source.config)
    pairs = _lora_pairs(source, shape)
    want = {f"{n}.lora_{s}" for n in pairs for s in "ab"}
    checks.require(set(types) == want, file, f"its tensors {sorted(set(types) ^ want)[:4]} differ from the adapter's")
    checks.require(set(types.values()) == {"F32"}, file, f"its tensors are stored as {sorted(set(types.values()))}")
    read = {name: torch.from_numpy(value) for name, value in tensors_of(reader).items()}
    deltas, worst = {}, 0.0
    for gguf_name, (a, b, _, heads) in pairs.items():
        got_a, got_b = read[f"{gguf_name}.lora_a"], read[f"{gguf_name}.lora_b"]
        worst = max(worst, checks.weights_match(file, f"{gguf_name}.lora_a", got_a, a, "f32"),
                    checks.weights_match(file, f"{gguf_name}.lora_b", to_hf_rows(got_b, heads) if heads else got_b,
                                         b, "f32"))
        deltas[gguf_name] = (alpha / got_a.shape[0]) * (got_b @ got_a)  # llama.cpp's scale: alpha / rank
    state = source.base_state()
    base = {gguf_name: to_ggml_rows(state[hf_name], heads) if heads else state[hf_name]
            for hf_name, (gguf_name, heads) in tensor_map(shape).items()}
    logits = [ggml_forward.logits(shape, base, ids, deltas) for ids in source.ids]
    figure = checks.max_abs_diff(logits, source.logits)
    bound = checks.same_bound(source.logit_scale)
    checks.within(file, f"the max abs logit difference of base + LoRA from the PEFT model over {len(source.ids)} "
                        "prompts", figure, bound)
    return {
        "method": "gguf.GGUFReader read-back; lora_a/lora_b compared with the adapter's (lora_b un-permuted); "
                  "base weights plus alpha/rank x lora_b @ lora_a in a llama.cpp-style forward vs the PEFT model",
        "max_abs_logit_diff": figure, "bound": bound, "passed": True, "max_abs_weight_diff": worst,
        "logit_scale": source.logit_scale, "prompts": len(source.ids), "lora_alpha": alpha,
        "rank": rank, "adapted_weights": len(pairs),
    }
