"""The model as one standalone transformers checkpoint (safetensors weights, config, tokenizer, chat template).

Weights keep the dtype the source checkpoint was stored in (an adapter's: its base's); an adapter is merged in.
Verified by loading the folder with plain transformers (AutoModelForCausalLM, AutoTokenizer) and comparing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from tinyllama_mcp.pipeline.export import checks
from tinyllama_mcp.pipeline.export.source import CHATS, Source
from tinyllama_mcp.pipeline.nn.llama import causal_lm_of

DTYPES = {"float32": (torch.float32, "f32"), "float16": (torch.float16, "f16"), "bfloat16": (torch.bfloat16, "bf16")}


def stored_dtype(source: Source) -> str:
    """The dtype name the source's weights were saved in, float32 for one this export does not write."""
    return source.stored_dtype if source.stored_dtype in DTYPES else "float32"


def write_safetensors(folder: Path, source: Source) -> str:
    """Save the merged model in its stored dtype with the tokenizer; returns the dtype name."""
    from transformers import AutoModelForCausalLM

    dtype = stored_dtype(source)
    config = copy.deepcopy(causal_lm_of(source.model).config)  # the source's own stays as it is
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = {name: t.to(DTYPES[dtype][0]) for name, t in source.merged_state().items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.dtype = DTYPES[dtype][0]
    model.generation_config = causal_lm_of(source.model).generation_config
    model.save_pretrained(str(folder))
    source.tokenizer.save_pretrained(str(folder))
    return dtype


def verify_safetensors(folder: Path, source: Source) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = f"{folder.name}/"
    try:
        dtype = json.loads((folder / "config.json").read_text("utf-8")).get("dtype", "float32")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map={"": "cpu"}).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers and safetensors raise many types for a damaged checkpoint
        checks.require(False, file, f"transformers cannot load it ({type(exc).__name__}: {str(exc)[:200]})")
    checks.require(dtype == stored_dtype(source), file, f"its dtype {dtype} is not the source's {stored_dtype(source)}")
    kind = DTYPES[dtype][1]
    state, worst = source.merged_state(), 0.0
    loaded = dict(model.named_parameters())
    for name, want in state.items():
        checks.require(name in loaded, file, f"tensor {name} is missing")
        worst = max(worst, checks.weights_match(file, name, loaded[name].detach(), want, kind))
    prompts = checks.token_ids_match(file, lambda text: tokenizer(text)["input_ids"], source.texts, source.ids)
    renders = checks.chat_template_matches(file, source.tokenizer, tokenizer.chat_template or "", CHATS)
    figure = checks.max_abs_diff(source.forward(model), source.logits)
    layers = source.config.num_hidden_layers
    bound = checks.same_bound(source.logit_scale) if kind == "f32" else \
        checks.logit_bound(kind, source.logit_scale, layers)
    checks.within(file, f"the max abs logit difference from the source over {len(source.ids)} prompts", figure, bound)
    return {"method": "transformers AutoModelForCausalLM/AutoTokenizer load of the folder; weights vs the source "
                      f"rounded to {dtype}; logits, token ids and chat template vs the source",
            "max_abs_logit_diff": figure, "bound": bound, "passed": True, "max_abs_weight_diff": worst,
            "logit_scale": source.logit_scale, "prompts": len(source.ids), "dtype": dtype,
            "tokenizer_ids_equal": True, "token_prompts": prompts, "chat_template_renders_equal": renders}
