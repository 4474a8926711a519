"""Loading models and tokenizers: name resolution, dtypes, NF4, adapters.

One place decides how a base model is loaded for training (NF4 or plain), dequantized for
merging, and stacked with adapters for serving, so that training, merge and generate agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from tinyllama_mcp.files import write_atomic
from tinyllama_mcp.pipeline.nn import nf4
from tinyllama_mcp.pipeline.chat import CHAT_TEMPLATE
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.specs import TINY_DEMO, QuantSpec
from tinyllama_mcp.sources import hub_reachable, looks_local

STACK_FILE = "stack.json"  # in an adapter folder: base model, quantization, adapters to apply in order


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def compute_dtype(choice: str = "auto") -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on CUDA; fp32 on CPU (bf16 matmuls are slow there)."""
    explicit = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if choice in explicit:
        if explicit[choice] is torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU does not support bf16; use compute_dtype 'fp16' or 'auto'")
        return explicit[choice]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def resolve_model(name: str) -> str:
    """A loadable path or hub id for a model reference; `tiny-demo` is created on first use."""
    if name == TINY_DEMO:
        from tinyllama_mcp.pipeline.tiny_demo import ensure_tiny_demo

        return str(ensure_tiny_demo())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; pass a Hugging Face checkpoint folder")
        _refuse_custom_code(path)
        return str(path.resolve())
    if looks_local(name):
        raise UserError(f"model folder {name} does not exist; check the path")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str) and not hub_reachable():
        raise UserError(
            f"model '{name}' is not cached and the Hugging Face Hub cannot be reached (offline); "
            "pass a local checkpoint folder or 'tiny-demo'"
        )
    return name


def _refuse_custom_code(path: Path) -> None:
    """A checkpoint whose config maps to its own Python code needs remote code enabled, which this tool never does."""
    try:
        config = json.loads((path / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path}/config.json is not readable JSON; pass a Hugging Face checkpoint folder") from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise UserError(
            f"model {path} needs its own Python code (auto_map in config.json); this tool never runs model code "
            "from checkpoints: use a checkpoint of a built-in transformers architecture such as Llama"
        )


def load_tokenizer(path: str):
    """The tokenizer with TinyLlama's chat template and a pad token that is not EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)  # never trust_remote_code
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A model padded with EOS is trained to ignore EOS and never learns to stop. Llama's
        # vocabulary has <unk>, which never appears in real text: pad with it.
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise UserError(f"tokenizer of {path} has no pad or unk token distinct from EOS; add a '<pad>' token")
    tokenizer.padding_side = "right"
    return tokenizer


def bnb_config(quant: QuantSpec, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_base(path: str, quant: QuantSpec, dtype: torch.dtype):
    """The frozen base for training: NF4 4-bit (QLoRA) or plain weights in the compute dtype."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, device_map={"": device()})
    if quant.quantization == "nf4":
        kwargs["quantization_config"] = bnb_config(quant, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"could not load model '{path}': {exc}") from None
    if quant.quantization == "nf4":
        nf4.keep_plain_layout(model)  # the same weights in every pass, on every CPU
    model.config.use_cache = False  # training: no KV cache
    return model


def load_dequantized(path: str, quant: QuantSpec, dtype: torch.dtype):
    """The 16-bit base that adapters are merged into: the NF4 weights training saw, dequantized.

    Merging into these (not into the original full-precision weights) reproduces the trained model,
    and merging never touches 4-bit storage.
    """
    from transformers import AutoModelForCausalLM

    if quant.quantization == "none":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device()})
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map={"": device()}, quantization_config=bnb_config(quant, dtype)
    )
    nf4.keep_plain_layout(model)
    return model.dequantize(dtype=dtype)


# ---------------------------------------------------------------- adapter stacks


def read_stack(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / STACK_FILE
    if not path.is_file():
        raise UserError(f"{adapter_dir} is not an adapter folder made by this tool (no {STACK_FILE})")
    return json.loads(path.read_text())


def write_stack(
    adapter_dir: Path, base_model: str, quant: QuantSpec, parents: list[str], policy_quant: Optional[QuantSpec] = None
) -> None:
    """Record what an adapter sits on: generation and merge rebuild exactly this stack.

    `policy_quant`: for an adapter trained on top of parents (DPO on SFT), how the merged parent
    model was loaded for its training (NF4 again, or plain).
    """
    stack = {"base_model": base_model, "quant": quant.model_dump(), "adapters": [*parents, str(adapter_dir.resolve())]}
    if parents and policy_quant is not None:
        stack["policy_quant"] = policy_quant.model_dump()
    write_atomic(adapter_dir / STACK_FILE, json.dumps(stack, indent=2))


def merge_adapters(model, adapters: list[str]):
    """Merge LoRA adapters into a 16-bit model, one after another, and unload them."""
    from peft import PeftModel

    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def stack_base(stack: dict, dtype: torch.dtype):
    """The 16-bit model the stack's last adapter was trained on: the base (dequantized as in
    training) with every earlier adapter merged in.

    DPO on an NF4 SFT model trained on that merged model quantized to NF4 again (`policy_quant`):
    the same round trip is made here, else the served and merged DPO model differ from the trained one.
    """
    adapters = stack["adapters"]
    missing = [a for a in adapters if not is_adapter_dir(a)]
    if missing:
        raise UserError(f"adapter folder(s) {missing} are missing; the parent job's files were removed")
    model = load_dequantized(resolve_model(stack["base_model"]), QuantSpec(**stack["quant"]), dtype)
    if not adapters[:-1]:
        return model
    model = merge_adapters(model, adapters[:-1])
    policy_quant = stack.get("policy_quant")
    if policy_quant and policy_quant["quantization"] == "nf4":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="tinyllama-mcp-policy-") as tmp:
            model.save_pretrained(tmp)  # as recipe.dpo.sft_merged_base does before training
            model = load_dequantized(tmp, QuantSpec(**policy_quant), dtype)
    return model


def is_adapter_dir(path: str | Path) -> bool:
    return Path(path, "adapter_config.json").is_file()


def cast_trainable(model, dtype: torch.dtype, master_fp32: bool = False) -> None:
    """Trainable (LoRA) weights in bf16 when computing in bf16, else fp32.

    fp16 training needs fp32 master weights: the gradient scaler refuses to unscale fp16 (or
    bf16) gradients, and TRL casts QLoRA adapters to bf16 by default. `master_fp32`: fp32 in every
    dtype (the fused torch AdamW keeps its states in the weights' dtype; compute stays 16-bit under autocast).
    """
    target = torch.bfloat16 if dtype is torch.bfloat16 and not master_fp32 else torch.float32
    for param in model.parameters():
        if param.requires_grad and param.dtype != target:
            param.data = param.data.to(target)


def peak_memory_gib() -> Optional[float]:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None
