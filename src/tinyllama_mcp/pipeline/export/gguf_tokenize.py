"""Encoding text from a GGUF file's vocabulary alone, by llama.cpp's rules, to check the embedded tokenizer.

As llama.cpp tokenizes with special parsing on (its chat path): text is first split at control, user-defined and
unknown tokens; "gpt2" pieces are byte-level BPE over GPT-2's split regex; "llama" pieces follow llama.cpp's
SentencePiece tokenizer: spaces escaped as U+2581, a space prefix at the start and after each special token when
add_space_prefix is set, adjacent symbols merged best score first, unknown symbols as <0xXX> byte tokens.
"""

from __future__ import annotations

import heapq
import re
from typing import Callable

from tinyllama_mcp.errors import SelfCheckError
from tinyllama_mcp.pipeline.export.gguf_vocab import GPT2_PRE, Vocab


def encoder_of(vocab: Vocab) -> Callable[[str], list[int]]:
    """text -> ids as llama.cpp encodes it with add_special (BOS/EOS as the file says) and special parsing."""
    if vocab.model == "gpt2":
        piece = _byte_level_bpe(vocab)
    elif vocab.model == "llama":
        piece = _sentencepiece(vocab)
    else:
        raise SelfCheckError(f"tokenizer.ggml.model {vocab.model!r} is not one this export writes")
    special = vocab.special
    splitter = re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")") \
        if special else None

    def encode(text: str) -> list[int]:
        ids = [vocab.bos] if vocab.add_bos and vocab.bos is not None else []
        after_special = True
        for part in splitter.split(text) if splitter else [text]:
            if part in special:
                ids.append(special[part])
                after_special = True
            elif part:
                ids += piece(part, after_special)
                after_special = False
        if vocab.add_eos and vocab.eos is not None:
            ids.append(vocab.eos)
        return ids

    return encode


def _byte_level_bpe(vocab: Vocab) -> Callable[[str, bool], list[int]]:
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab.pre != GPT2_PRE or vocab.merges is None:
        raise SelfCheckError(f"a gpt2 tokenizer with pre-tokenizer {vocab.pre!r} and "
                             f"{'no' if vocab.merges is None else len(vocab.merges)} merges is not what was written")
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return lambda text, _after_special: tokenizer.encode(text, add_special_tokens=False).ids


def _sentencepiece(vocab: Vocab) -> Callable[[str, bool], list[int]]:
    if vocab.scores is None or len(vocab.scores) != len(vocab.tokens):
        raise SelfCheckError("a llama (SentencePiece) tokenizer without one score per token is not what was written")
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    scores = vocab.scores

    def encode(text: str, after_special: bool) -> list[int]:
        if vocab.add_space_prefix and after_special:
            text = " " + text
        symbols = list(text.replace(" ", "\u2581"))
        alive = [True] * len(symbols)
        nxt = list(range(1, len(symbols) + 1))
        prv = list(range(-1, len(symbols) - 1))
        heap: list = []

        def push(left: int) -> None:
            right = nxt[left]
            if right < len(symbols) and (token := ids.get(symbols[left] + symbols[right])) is not None:
                heapq.heappush(heap, (-scores[token], left, symbols[left] + symbols[right]))

        for i in range(len(symbols) - 1):
            push(i)
        while heap:
            _, left, joined = heapq.heappop(heap)
            right = nxt[left] if alive[left] else len(symbols)
            if right >= len(symbols) or symbols[left] + symbols[right] != joined:
                continue  # stale: one side was merged since
            symbols[left], alive[right] = joined, False
            nxt[left] = nxt[right]
            if nxt[left] < len(symbols):
                prv[nxt[left]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)
        out: list[int] = []
        for symbol, live in zip(symbols, alive):
            if not live:
                continue
            if symbol in ids:
                out.append(ids[symbol])
            else:
                out += [ids.get(f"<0x{b:02X}>", vocab.unk) for b in symbol.encode("utf-8")]
        return out

    return encode
