"""Token log-probabilities in OpenAI's two shapes, with each token's text and bytes.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal"}`.
Completions (what lm-eval's local-completions reads): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
where an echoed prompt's first token has logprob null (nothing precedes it).

A token's bytes come from its vocabulary piece, which keeps the leading space and the raw bytes of a piece that
is only part of a UTF-8 character (a tokenizer's decode loses both): byte-level BPE pieces map back through
GPT-2's byte alphabet, SentencePiece pieces through '▁' and `<0xNN>`.
"""

from __future__ import annotations

import codecs
import math
import re
import threading
import weakref
from typing import Any, Optional, Sequence

from tinyllama_mcp.pipeline.generation_result import TokenLogprob

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_tables: "weakref.WeakKeyDictionary[Any, list[bytes]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
FLOOR = -9999.0  # JSON has no -inf; what vLLM reports for an impossible token


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies are written in it), reversed."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _decoder_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = repr(getattr(backend, "decoder", None))
    if "ByteLevel" in decoder:
        return "bytelevel"
    if "ByteFallback" in decoder or "Metaspace" in decoder or "▁" in decoder:
        return "sentencepiece"
    return "other"


def _build(tokenizer) -> list[bytes]:
    size = max(len(tokenizer), getattr(tokenizer, "vocab_size", 0) or 0)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kind = _decoder_kind(tokenizer)
    alphabet = _byte_alphabet() if kind == "bytelevel" else {}
    table = []
    for token_id, piece in enumerate(pieces):
        if piece is None:
            table.append(b"")
        elif token_id in special:
            table.append(piece.encode("utf-8"))
        elif kind == "bytelevel" and all(ch in alphabet for ch in piece):
            table.append(bytes(alphabet[ch] for ch in piece))
        elif kind == "sentencepiece" and (match := _BYTE_PIECE.match(piece)):
            table.append(bytes([int(match.group(1), 16)]))
        elif kind == "sentencepiece":
            table.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            table.append(tokenizer.convert_tokens_to_string([piece]).encode("utf-8"))
    return table


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes (built once per tokenizer)."""
    with _lock:
        table = _tables.get(tokenizer)
        if table is None:
            table = _tables[tokenizer] = _build(tokenizer)
        return table


def special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def _bytes_of(table: list[bytes], token_id: int) -> bytes:
    return table[token_id] if 0 <= token_id < len(table) else b""


def _text(raw: bytes) -> str:
    """A token's text; a piece of a UTF-8 character shows as \\xNN escapes, as OpenAI shows it."""
    return raw.decode("utf-8", errors="backslashreplace")


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _entry(table: list[bytes], token_id: int, logprob: float) -> dict[str, Any]:
    raw = _bytes_of(table, token_id)
    return {"token": _text(raw), "logprob": _value(logprob), "bytes": list(raw)}


def chat_logprobs(tokenizer, logprobs: Sequence[TokenLogprob], top: int) -> dict[str, Any]:
    table = token_bytes(tokenizer)
    content = []
    for item in logprobs:
        entry = _entry(table, item.token_id, item.logprob)
        entry["top_logprobs"] = [_entry(table, tid, lp) for tid, lp in item.top[:top]]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, token_ids: Sequence[int], logprobs: Sequence[Optional[TokenLogprob]],
                        top: int) -> dict[str, Any]:
    """The legacy shape over `token_ids` (an echoed prompt's, then the generated ones), `logprobs` aligned with them.

    `text_offset[i]` is where token i starts in the returned text (special tokens take no room there);
    each top_logprobs dict holds the `top` most likely tokens and the token itself, as vLLM reports.
    """
    table = token_bytes(tokenizer)
    special = special_ids(tokenizer)
    tokens, token_logprobs, tops, offsets = [], [], [], []
    decoder, written = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0
    for token_id, item in zip(token_ids, logprobs):
        raw = _bytes_of(table, token_id)
        tokens.append(_text(raw))
        offsets.append(written)
        if token_id not in special:
            written += len(decoder.decode(raw))
        if item is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(_value(item.logprob))
        alternatives = {_text(_bytes_of(table, tid)): _value(lp) for tid, lp in item.top[:top]}
        alternatives.setdefault(_text(raw), _value(item.logprob))
        tops.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
