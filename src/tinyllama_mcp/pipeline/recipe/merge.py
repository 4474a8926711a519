"""Merge stage: base + SFT adapter [+ DPO adapter] -> one standalone 16-bit safetensors checkpoint.

Adapters are merged into the dequantized 16-bit base (never into 4-bit weights), in the order
they were trained; the result loads with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.events import EventLog
from tinyllama_mcp.pipeline.lineage import write_lineage
from tinyllama_mcp.pipeline.specs import MergeSpec


def save_dtype(choice: str) -> torch.dtype:
    if choice == "auto":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return modeling.compute_dtype(choice)


def adapter_chain(spec: MergeSpec) -> dict:
    """The stack to merge: the DPO adapter's (which includes its SFT parent) or the SFT adapter's."""
    sft = modeling.read_stack(spec.sft_adapter)
    if spec.dpo_adapter is None:
        return sft
    dpo = modeling.read_stack(spec.dpo_adapter)
    sft_path = str(Path(spec.sft_adapter).resolve())
    if sft_path not in dpo["adapters"][:-1]:
        raise UserError(
            f"the DPO adapter {spec.dpo_adapter} was trained on top of {dpo['adapters'][:-1] or 'the bare base model'}, "
            f"not on the SFT adapter {sft_path}; pass the SFT job it was trained from"
        )
    return dpo


def run_merge(spec: MergeSpec, job_dir: Path, log: EventLog) -> dict:
    stack = adapter_chain(spec)
    base = modeling.resolve_model(stack["base_model"])
    target = save_dtype(spec.dtype)
    # Merge in fp32 on a CPU (bf16 matmuls there are slow and lossy), in the target dtype on a GPU.
    work = target if torch.cuda.is_available() else torch.float32
    log.emit("start", stage="merge", device=modeling.device_name(), dtype=modeling.dtype_name(target),
             resume_step=None, total_steps=None, rows=None)
    model = modeling.merge_adapters(modeling.stack_base(stack, work), stack["adapters"][-1:]).to(target)

    final, tmp = job_dir / "merged", job_dir / ".merged.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))  # safetensors
    modeling.load_tokenizer(stack["adapters"][-1]).save_pretrained(str(tmp))  # with the chat template
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.emit("artifact", kind="merged", path=str(final))

    effective = {"device": modeling.device_name(), "dtype": modeling.dtype_name(target), "adapters": stack["adapters"]}
    lineage = write_lineage(job_dir, spec, base, [], effective)
    log.emit("artifact", kind="lineage", path=str(lineage))
    return {"merged": str(final), "dtype": modeling.dtype_name(target), "adapters": len(stack["adapters"])}
