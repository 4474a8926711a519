"""The tokenizer as GGUF key/values, so llama.cpp and Ollama need no tokenizer files of their own.

Two kinds are written, each only when llama.cpp's tokenizer of that kind gives the same ids:
- "gpt2": byte-level BPE (tiny-demo's): tokens, merges, pre-tokenizer "gpt-2" (GPT-2's split regex, which is
  what tokenizers' ByteLevel(use_regex=True) uses);
- "llama": SentencePiece (TinyLlama's, Llama 2's): tokens with the scores and piece types of its tokenizer.model.
Anything else (other normalizers or pre-tokenizers, a SentencePiece tokenizer without tokenizer.model) is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf

from tinyllama_mcp.errors import UserError

K = gguf.Keys.Tokenizer
TT = gguf.TokenType
GPT2_PRE = "gpt-2"
# HF's {% generation %} markers only tell TRL which tokens to train on; llama.cpp's Jinja knows no such tag.
_GENERATION_TAGS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    bos: Optional[int]
    eos: Optional[int]
    unk: Optional[int]
    pad: Optional[int]
    add_bos: bool
    add_eos: bool
    chat_template: str
    merges: Optional[list[str]] = None  # gpt2
    pre: Optional[str] = None  # gpt2
    scores: Optional[list[float]] = None  # llama
    add_space_prefix: Optional[bool] = None  # llama

    @property
    def special(self) -> dict[str, int]:
        """Tokens llama.cpp matches whole in text (with special parsing on): control, user-defined, unknown."""
        kinds = {TT.CONTROL, TT.USER_DEFINED, TT.UNKNOWN}
        return {t: i for i, (t, k) in enumerate(zip(self.tokens, self.types)) if k in kinds}


def gguf_chat_template(template: str) -> str:
    return _GENERATION_TAGS.sub("", template)


def _refuse(why: str) -> UserError:
    return UserError(f"cannot export this tokenizer to GGUF faithfully: {why}; export 'safetensors' (and 'peft' for an "
                     "adapter), which keep the tokenizer as transformers loads it")


def vocab_of(tokenizer, folder: Path, n_vocab: int) -> Vocab:
    """The GGUF vocabulary of an HF tokenizer (folder: where it was loaded from) for a model with n_vocab rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _refuse("it is not backed by a tokenizers tokenizer.json")
    spec = json.loads(backend.to_str())
    vocab = backend.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise _refuse("its token ids are not 0..N-1 without gaps")
    if len(vocab) > n_vocab:
        raise _refuse(f"it has {len(vocab)} tokens but the model's embedding only {n_vocab} rows")
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    ids = tokenizer("a")["input_ids"]  # what the tokenizer adds around plain text
    common = dict(
        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, unk=tokenizer.unk_token_id, pad=tokenizer.pad_token_id,
        add_bos=bool(ids) and ids[0] == tokenizer.bos_token_id,
        add_eos=len(ids) > 1 and ids[-1] == tokenizer.eos_token_id,
        chat_template=gguf_chat_template(tokenizer.chat_template or ""),
    )
    model = spec.get("model") or {}
    if (folder / "tokenizer.model").is_file():
        vocab_ = _sentencepiece(folder / "tokenizer.model", tokens, added, common)
    elif model.get("type") == "BPE" and not model.get("byte_fallback"):
        vocab_ = _byte_level_bpe(spec, tokens, added, common)
    else:
        raise _refuse(f"a {model.get('type')} model with byte fallback and no tokenizer.model in {folder} (llama.cpp's "
                      "SentencePiece tokenizer needs the piece scores that file holds)")
    for i in range(len(tokens), n_vocab):  # embedding rows no token uses, as llama.cpp's own converter pads them
        vocab_.tokens.append(f"[PAD{i}]")
        vocab_.types.append(TT.UNUSED)
        if vocab_.scores is not None:
            vocab_.scores.append(-1000.0)
    return vocab_


def _added_type(entry: Optional[dict], default: int) -> int:
    if entry is None:
        return default
    return TT.CONTROL if entry.get("special") else TT.USER_DEFINED


def _byte_level_bpe(spec: dict, tokens: list[str], added: dict, common: dict) -> Vocab:
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if spec.get("normalizer") is not None:
        raise _refuse(f"its normalizer {spec['normalizer'].get('type')} has no llama.cpp equivalent")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise _refuse(f"its pre-tokenizer {json.dumps(pre)} is not GPT-2's byte-level split ({GPT2_PRE!r})")
    merges = []
    for merge in spec["model"].get("merges", []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if " " in left or " " in right:
            raise _refuse(f"merge {merge!r} holds a space, which GGUF's 'a b' merges cannot write")
        merges.append(f"{left} {right}")
    types = [_added_type(added.get(i), TT.NORMAL) for i in range(len(tokens))]
    return Vocab(model="gpt2", tokens=list(tokens), types=types, merges=merges, pre=GPT2_PRE, **common)


def _sentencepiece(path: Path, tokens: list[str], added: dict, common: dict) -> Vocab:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    if pieces != tokens[:n] or any(i not in added for i in range(n, len(tokens))):
        raise _refuse(f"{path} and tokenizer.json disagree on the tokens")
    types, scores = [], []
    for i, token in enumerate(tokens):
        if i >= n:
            types.append(_added_type(added[i], TT.USER_DEFINED))
            scores.append(0.0)
            continue
        kind = (TT.CONTROL if sp.is_control(i) else TT.UNKNOWN if sp.is_unknown(i) else TT.UNUSED if sp.is_unused(i)
                else TT.BYTE if sp.is_byte(i) else _added_type(added.get(i), TT.NORMAL))
        types.append(kind)
        scores.append(float(sp.get_score(i)))
    prefix = sp.encode("a", out_type=str)
    return Vocab(model="llama", tokens=list(tokens), types=types, scores=scores,
                 add_space_prefix=bool(prefix) and prefix[0].startswith("\u2581"), **common)


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for value, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.unk, writer.add_unk_token_id), (vocab.pad, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def read_vocab(fields: dict) -> Vocab:
    """The vocabulary from a GGUF file's key/values (gguf_read.fields_of); KeyError names a missing key."""
    return Vocab(
        model=fields[K.MODEL], tokens=list(fields[K.LIST]), types=[int(t) for t in fields[K.TOKEN_TYPE]],
        bos=fields.get(K.BOS_ID), eos=fields.get(K.EOS_ID), unk=fields.get(K.UNK_ID), pad=fields.get(K.PAD_ID),
        add_bos=bool(fields.get(K.ADD_BOS, False)), add_eos=bool(fields.get(K.ADD_EOS, False)),
        chat_template=fields.get(K.CHAT_TEMPLATE, ""), merges=fields.get(K.MERGES), pre=fields.get(K.PRE),
        scores=fields.get(K.SCORES), add_space_prefix=fields.get(K.ADD_PREFIX),
    )
