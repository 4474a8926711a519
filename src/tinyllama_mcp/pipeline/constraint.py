"""Constrained decoding for one sequence: which tokens a grammar (pipeline.grammars) allows next.

The engine asks `allowed()` before sampling each token, masks the others out of the logits, and calls `advance()`
with the token it chose; `done` says the grammar is complete and admits nothing more (the request then stops with
finish "stop"). EOS is allowed exactly where the grammar may end. llguidance computes a mask in tens of
microseconds; its tokenizer view (~1 s to build for a 32k vocabulary) is cached per Hugging Face tokenizer.
"""

from __future__ import annotations

import threading

import torch

from tinyllama_mcp.errors import UserError

_LOCK = threading.Lock()
_ATTRIBUTE = "_tinyllama_llguidance_tokenizer"  # where a tokenizer keeps its llguidance view
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # byte value -> its 8 bits, LSB first


def ll_tokenizer(tokenizer):
    """llguidance's view of a Hugging Face fast tokenizer, built once per tokenizer object (kept on it)."""
    with _LOCK:
        cached = getattr(tokenizer, _ATTRIBUTE, None)
        if cached is None:
            import llguidance.hf

            try:
                cached = llguidance.hf.from_tokenizer(tokenizer)
            except ValueError as exc:
                raise UserError(f"constrained decoding needs a fast (Rust) tokenizer: {exc}") from None
            setattr(tokenizer, _ATTRIBUTE, cached)
        return cached


class GrammarConstraint:
    """The grammar state of one generated sequence, over a model vocabulary of `vocab_size` rows (tokens past the
    tokenizer's own vocabulary are never allowed)."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int):
        from llguidance import LLMatcher

        lltok = ll_tokenizer(tokenizer)
        self._matcher = LLMatcher(lltok, grammar, log_level=0)
        if self._matcher.is_error():
            raise UserError(f"the output grammar is invalid: {self._matcher.get_error().splitlines()[0]}")
        self.vocab_size = int(vocab_size)
        self._known = min(lltok.vocab_size, self.vocab_size)

    def allowed(self) -> torch.Tensor:
        """A CPU bool tensor [vocab_size]: True for the tokens the grammar allows next (EOS where it may end)."""
        self._check()
        packed = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        bits = _BYTE_BITS[packed.long()].flatten()  # token 8k+b is bit b of byte k
        out = torch.zeros(self.vocab_size, dtype=torch.bool)
        out[: self._known] = bits[: self._known]
        return out

    def advance(self, token_id: int) -> None:
        """Move past the chosen token; a token the grammar does not allow is a bug in the caller (ValueError)."""
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"token {int(token_id)} is not allowed by the grammar here: {self._error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (EOS included): stop without sampling."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (EOS is allowed)."""
        return self._matcher.is_accepting()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise ValueError(f"the grammar matcher failed: {self._error()}")

    def _error(self) -> str:
        return (self._matcher.get_error() or "no error message").splitlines()[0]
