"""The model being exported, as generate would serve it, in fp32 on the CPU: the reference every export is checked on.

A model reference resolves as pipeline.generate resolves it (a merged or checkpoint folder, 'tiny-demo', a hub id,
or an adapter folder, served on the base its stack rebuilds). The fixed prompts and their logits are computed once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline import modeling
from tinyllama_mcp.pipeline.generate import PROBE, resolve_ref

# Chats and raw texts the checks run on: turns, a system prompt, non-ASCII text, runs of spaces, tabs, digits.
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a Python function that reverses a string."},
     {"role": "assistant", "content": "def reverse(s):\n    return s[::-1]"},
     {"role": "user", "content": "Now explain it  in one line, café style \U0001F642."}],
]
RAW_TEXTS = [PROBE, "  Leading spaces,\ttabs and\nnewlines; 1234567 números, naïve façade."]


@dataclass
class Source:
    """The model as generate serves it (a PeftModel for an adapter), its tokenizer, and the reference logits."""

    ref: str
    kind: str  # "model" or "adapter"
    path: str
    model: torch.nn.Module
    tokenizer: object
    tokenizer_dir: Path
    adapter_dir: Optional[Path] = None
    stack: Optional[dict] = None
    stored_dtype: str = "float32"  # the dtype config.json says the weights were saved in (an adapter's: its base's)
    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def config(self):
        return self.model.config

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"

    @property
    def logit_scale(self) -> float:
        return max(float(x.abs().max()) for x in self.logits)

    def forward(self, model=None) -> list[torch.Tensor]:
        """fp32 logits of every fixed prompt, from `model` (default: the source itself)."""
        model = model if model is not None else self.model
        with torch.inference_mode():
            return [model(torch.tensor([ids])).logits[0].float() for ids in self.ids]

    def lora_layers(self) -> dict[str, object]:
        """HF weight name (model.layers.N....weight) -> its peft LoRA layer, for an adapter source."""
        from peft.tuners.lora import LoraLayer

        prefix = "base_model.model."
        return {name.removeprefix(prefix) + ".weight": module for name, module in self.model.named_modules()
                if isinstance(module, LoraLayer) and "default" in module.lora_A}

    def base_state(self) -> dict[str, torch.Tensor]:
        """The weights under the adapter (or the model's own) by HF name, fp32."""
        from tinyllama_mcp.pipeline.nn.llama import causal_lm_of

        state = {}
        for name, param in causal_lm_of(self.model).named_parameters():
            if "lora_" not in name:
                state[name.replace(".base_layer.", ".")] = param.detach().float()
        if getattr(self.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The weights of the model generate serves, adapter merged in (base + scale * B @ A), by HF name, fp32."""
        state = self.base_state()
        if self.is_adapter:
            with torch.no_grad():
                for name, layer in self.lora_layers().items():
                    state[name] = state[name] + layer.get_delta_weight("default").float()
        return state


def _local_folder(path: str) -> Path:
    """A hub id's cached snapshot folder, or the path itself."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    return Path(cached).parent if isinstance(cached, str) else Path(path)


def _stored_dtype(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return "float32"
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def load_source(model_ref: str) -> Source:
    """The model `model_ref` names, loaded as generate loads it but fp32 on the CPU, with its reference logits."""
    from transformers import AutoModelForCausalLM

    kind, path = resolve_ref(model_ref)
    if kind == "adapter":
        from peft import PeftModel

        stack = modeling.read_stack(path)
        weights_dir = _local_folder(modeling.resolve_model(stack["base_model"]))
        base = modeling.stack_base(stack, torch.float32).to("cpu")
        model = PeftModel.from_pretrained(base, path).eval()
        tokenizer_dir, adapter_dir = Path(path), Path(path)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"}).eval()
        except OSError as exc:
            raise UserError(f"could not load model '{model_ref}': {exc}") from None
        stack, tokenizer_dir, adapter_dir = None, _local_folder(path), None
        weights_dir = tokenizer_dir
    tokenizer = modeling.load_tokenizer(str(tokenizer_dir))
    source = Source(ref=model_ref, kind=kind, path=path, model=model, tokenizer=tokenizer,
                    tokenizer_dir=tokenizer_dir, adapter_dir=adapter_dir, stack=stack,
                    stored_dtype=_stored_dtype(weights_dir))
    chats = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in CHATS]
    source.texts = chats + RAW_TEXTS
    source.ids = [tokenizer(text)["input_ids"] for text in source.texts]
    source.logits = source.forward()
    return source


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text("utf-8"))
