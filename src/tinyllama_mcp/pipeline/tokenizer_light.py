"""Token counting without torch or transformers, for preflight inside the server process."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from tinyllama_mcp.pipeline.specs import TINY_DEMO


def _tokenizer_file(base_model: str) -> Optional[Path]:
    if base_model == TINY_DEMO:
        from tinyllama_mcp.pipeline.tiny_demo import ensure_tokenizer_file

        return ensure_tokenizer_file()
    local = Path(base_model).expanduser()
    if local.is_dir():
        candidate = local / "tokenizer.json"
        return candidate if candidate.is_file() else None
    try:  # a hub id: use the cached copy if there is one; never download here
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base_model, "tokenizer.json")
        return Path(found) if isinstance(found, str) else None
    except Exception:
        return None


def light_token_counter(base_model: str) -> Optional[Callable[[list[str]], list[int]]]:
    """A function mapping texts to token counts, or None when no tokenizer file is at hand."""
    path = _tokenizer_file(base_model)
    if path is None:
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))

    def count(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return count
