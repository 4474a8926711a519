"""What the host must see token by token: grammar masks, token log-probabilities and prompt scoring.

A request with a grammar or with logprobs cannot run ahead in chunks: its next token depends on the host
(the grammar's mask follows every token), and its log-probabilities come from the logits, which the fast
decode graphs never leave on the device. Such rows decode one eager step at a time; the token is still picked
by the same seeded sampler (`pick_tokens`), so a seeded request gives the same text on either path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import logging
import time

import torch

from tinyllama_mcp.pipeline.engine.requests import Request
from tinyllama_mcp.pipeline.engine.sampling import pick_tokens
from tinyllama_mcp.pipeline.generation_result import TokenLogprob

log = logging.getLogger(__name__)

SCORE_CHUNK = 512  # prompt positions whose logits are made at once (a [chunk, vocab] fp32 block)


def token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The record of `token` from one position's log-softmax [V] (on the host), with its top k."""
    top: tuple = ()
    if k:
        values, ids = logprobs.topk(k)
        top = tuple(zip(ids.tolist(), [round(v, 6) for v in values.tolist()]))
    return TokenLogprob(int(token), round(float(logprobs[token]), 6), top)


def choose(logits: torch.Tensor, params: Sequence[Optional[object]], temp, top_p, seed, pos,
           sampling: bool) -> tuple[torch.Tensor, list[Optional[TokenLogprob]]]:
    """Next tokens for rows of fp32 `logits` [n, V], each row's grammar mask applied first.

    params[i]: row i's SamplingParams, or None for a row with neither grammar nor logprobs. pos: the positions
    the sampler keys on. Returns the tokens (on the device) and each row's TokenLogprob (None where not asked),
    computed from the unmasked logits as OpenAI reports them."""
    wanted = [i for i, p in enumerate(params) if p is not None and p.logprobs is not None]
    raw = torch.log_softmax(logits[wanted], dim=-1).cpu() if wanted else None
    constrained = [i for i, p in enumerate(params) if p is not None and p.constraint is not None]
    if constrained:
        allowed = torch.stack([params[i].constraint.allowed() for i in constrained]).to(logits.device)
        logits[constrained] = logits[constrained].masked_fill(~allowed[:, : logits.shape[1]], float("-inf"))
    tokens = pick_tokens(logits, temp, top_p, seed, pos, sampling)
    records: list[Optional[TokenLogprob]] = [None] * len(params)
    if wanted:
        chosen = tokens[wanted].tolist()
        for j, i in enumerate(wanted):
            records[i] = token_logprob(raw[j], chosen[j], params[i].logprobs)
    return tokens, records


def score_prompt(runner, hidden: torch.Tensor, prompt: list[int], k: int) -> list[Optional[TokenLogprob]]:
    """Each prompt token's log-probability given the tokens before it (None for the first), from the final-normed
    hidden states of its prefill [T, hidden]."""
    out: list[Optional[TokenLogprob]] = [None]
    for start in range(0, len(prompt) - 1, SCORE_CHUNK):
        stop = min(start + SCORE_CHUNK, len(prompt) - 1)
        logprobs = torch.log_softmax(runner.logits_of(hidden[start:stop]), dim=-1).cpu()
        for j, position in enumerate(range(start, stop)):
            out.append(token_logprob(logprobs[j], prompt[position + 1], k))
    return out


class ExactDecoding:
    """The Engine's step-by-step paths (a mixin: it uses the engine's runner, slots, lock and finishing)."""

    def _prefill_exact(self, reqs: list[Request]) -> None:
        """Prefill with the host in the loop: the prompts scored where asked, the first tokens chosen under their
        grammars and read back at once, so the next step's masks follow them."""
        runner = self.runner
        lengths, rows, temp, top_p, seed, slots = runner.prefill_inputs(
            [r.prompt for r in reqs], [r.slot for r in reqs], [r.params.temperature for r in reqs],
            [r.params.top_p for r in reqs], [r.seed for r in reqs], [r.adapter_slot for r in reqs])
        score = any(r.params.prompt_logprobs is not None for r in reqs)
        out = runner.prefill_forward(runner.padded([r.prompt for r in reqs]), lengths, rows, keep_hidden=score,
                                     slots=slots)
        logits, hidden = out if score else (out, None)
        for i, r in enumerate(reqs):
            if r.params.prompt_logprobs is not None:
                r.prompt_logprobs = score_prompt(runner, hidden[i, : len(r.prompt)], r.prompt, r.params.prompt_logprobs)
        tokens, records = choose(logits, [r.params if r.params.exact else None for r in reqs], temp, top_p, seed,
                                 lengths, sampling=any(r.params.temperature > 0 for r in reqs))
        runner.set_state(rows, tokens, lengths, temp, top_p, seed, slots)
        first = tokens.tolist()
        now = time.perf_counter()
        for r, token, record in zip(reqs, first, records):
            r.pos, r.planned = len(r.prompt), 1
            if r.params.max_new_tokens == 0:
                with self._cv:
                    self._finish(r, "length")
                continue
            r.first_token_t = now
            self._take(r, token, record)

    def _take(self, r: Request, token: int, record) -> None:
        """One token read back for a request decoded step by step: record it, follow its grammar, finish or stream."""
        if r.cancelled:
            with self._cv:
                self._finish(r, "cancelled")
            return
        r.tokens.append(token)
        if record is not None:
            r.logprobs.append(record)
        reason = None
        if token in self.eos and not r.params.ignore_eos:
            reason = "stop"
        elif r.params.constraint is not None:
            try:
                r.params.constraint.advance(token)
                reason = "stop" if r.params.constraint.done else None
            except ValueError:  # nothing was left to allow (a grammar that admits no token): end it here
                log.warning("engine: the grammar admitted no token after %d tokens; stopping", len(r.tokens) - 1)
                r.tokens.pop()
                if record is not None:
                    r.logprobs.pop()
                reason = "stop"
        if reason is None and len(r.tokens) >= r.params.max_new_tokens:
            reason = "length"
        if reason is None and r.params.stop and self._stop_hit(r):
            reason = "stop"
        if reason is not None:
            with self._cv:
                self._finish(r, reason)
        elif r.on_text is not None and time.perf_counter() - r.last_emit >= self.config.stream_interval_s:
            r.last_emit = time.perf_counter()
            self._emit(r)

    def _exact_step(self) -> None:
        """One eager decode step for every busy row, read back at once (some row needs the host per token)."""
        busy = [(i, r) for i, r in enumerate(self._slots) if r is not None]
        graphs = self.runner.graphs
        b = graphs.pad_batch(busy[-1][0] + 1)
        lb = graphs.bucket(max(r.pos for _, r in busy) + 2)
        runner = self.runner
        logits = runner.step_logits(b, lb, lora=any(r.adapter_slot for _, r in busy))
        params: list = [None] * b
        for i, r in busy:
            params[i] = r.params if r.params.exact else None
        inputs = runner.tok_buf[:b].clone()
        tokens, records = choose(logits, params, runner.temp_buf[:b], runner.top_p_buf[:b], runner.seed_buf[:b],
                                 runner.pos_buf[:b] + 1, sampling=any(r.params.temperature > 0 for _, r in busy))
        runner.advance(b, tokens)
        host = torch.stack([inputs, tokens]).cpu()
        fresh = {i for i, r in busy if r.fresh}
        for _, r in busy:
            r.fresh = False
            r.pos += 1
            r.planned += 1
        self.stats["steps"] += 1
        plain = [(i, r) for i, r in busy if not r.params.exact]
        if plain:
            self._process(plain, fresh, host, None)
        for i, r in busy:
            if r.params.exact and not r.done:
                self._take(r, int(host[1, i]), records[i])
