"""The embedded default model `tiny-demo`: no download, deterministic, created on first use.

A 0.5M-parameter Llama with TinyLlama's module names (q/k/v/o_proj, gate/up/down_proj, grouped
KV heads), so the recipe's LoRA targets apply unchanged, and a byte-level BPE tokenizer trained
here on the bundled samples, with TinyLlama's chat template. Weights are random: the point is
that every code path (NF4, LoRA, DPO, merge, generate) runs for real on a CPU in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tinyllama_mcp.pipeline.chat import CHAT_TEMPLATE, ROLE_TAGS
from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE

VERSION = "v1"  # bump when the recipe below changes, so old caches are not reused
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", *ROLE_TAGS]  # ids 0..6; pad is not EOS
SEED = 1234

# Shape: TinyLlama's layout at toy scale. Dimensions are multiples of 64 so NF4 blocks divide them.
CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    # ~1/sqrt(hidden): with transformers' default 0.02 the frozen random lm_head caps logits near +-2.5,
    # and no adapter can make the model confident about anything.
    initializer_range=0.09,
)


def cache_dir() -> Path:
    """TINYLLAMA_MCP_CACHE, else $XDG_CACHE_HOME/tinyllama-mcp, else ~/.cache/tinyllama-mcp."""
    explicit = os.environ.get("TINYLLAMA_MCP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinyllama-mcp"


def model_dir() -> Path:
    return cache_dir() / f"tiny-demo-{VERSION}"


def _corpus() -> list[str]:
    """Training text for the tokenizer: the bundled samples rendered as chat, one string each."""
    texts = []
    for line in SFT_SAMPLE.read_text("utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            texts.append(m["content"])
    for line in DPO_SAMPLE.read_text("utf-8").splitlines():
        row = json.loads(line)
        texts += [row["system"], row["input"], row["chosen"], row["rejected"]]
    return [t for t in texts if t]


def build_tokenizer():
    """Train the byte-level BPE tokenizer (deterministic: fixed corpus order, single pass)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def _write_atomically(target: Path, build) -> Path:
    """Build into a temporary sibling, then rename: concurrent first uses never see a half-written model."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # a real failure, not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tokenizer_file() -> Path:
    """tokenizer.json of tiny-demo, made without torch (the server's preflight counts tokens with it)."""
    folder = _write_atomically(
        cache_dir() / f"tiny-demo-{VERSION}-tokenizer",
        lambda tmp: build_tokenizer().save(str(tmp / "tokenizer.json")),
    )
    return folder / "tokenizer.json"


def _build_model(tmp: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(ensure_tokenizer_file()),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        **CONFIG,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def ensure_tiny_demo() -> Path:
    """The folder of the tiny-demo checkpoint, created on first use."""
    return _write_atomically(model_dir(), _build_model)
