"""The loss and preference metrics of one model, on the tokens its training stages score.

Chat rows are tokenized by the one chat template with its assistant mask (the `{% generation %}` marks, TRL's
assistant-only mask), cut at max_length as SFT cuts them. chat_loss is the mean negative log-likelihood over every
assistant token of the dataset (token-weighted, as a batch's loss is), chat_perplexity exp(chat_loss),
chat_token_accuracy the share of those tokens that are the model's argmax prediction.

Preference pairs are tokenized as DPO tokenizes them (recipe.dpo.to_text_pairs, then prompt and prompt + answer as
TRL does, cut at max_length keeping the start). An answer's log-prob is the sum of its tokens' log-probs given the
prompt; preference_accuracy is the share of pairs whose chosen answer has the higher one, and preference_margin the
mean of (chosen log-prob - rejected log-prob) in nats: the policy's own margin, not DPO's beta-scaled reward
margin against a reference model.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from tinyllama_mcp.errors import UserError


def token_scores(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (log-prob, is-argmax) of each token after the first, given the tokens before it (float64, bool).

    Batches are right-padded (exact under causal attention), longest first so each batch pads little."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    out: list[Any] = [None] * len(sequences)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(sequences[rows[0]])
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(rows):
                ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[r, : len(sequences[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:]
            picked = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
            greedy = logits.argmax(-1) == target
            for r, i in enumerate(rows):
                n = len(sequences[i]) - 1
                out[i] = (picked[r, :n].double().cpu(), greedy[r, :n].cpu())
    return out


def chat_example(tokenizer, row: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of one chat row, as SFT tokenizes it, cut at max_length."""
    tools = json.loads(row["tools"]) if row.get("tools") else None
    encoded = tokenizer.apply_chat_template(row["messages"], tools=tools, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    return list(encoded["input_ids"])[:max_length], list(encoded["assistant_masks"])[:max_length]


def chat_metrics(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> tuple[dict[str, float], int]:
    """(chat_loss, chat_perplexity, chat_token_accuracy; the assistant tokens scored)."""
    examples = [chat_example(tokenizer, row, max_length) for row in rows]
    scores = token_scores(model, [ids for ids, _ in examples], batch_size, tokenizer.pad_token_id)
    nll, correct, count = 0.0, 0, 0
    for (_, mask), (logps, greedy) in zip(examples, scores):
        scored = torch.tensor(mask[1:], dtype=torch.bool)  # token t is scored from the tokens before it
        nll -= float(logps[scored].sum())
        correct += int(greedy[scored].sum())
        count += int(scored.sum())
    if count == 0:
        raise UserError(f"no assistant tokens within max_length {max_length} in the chat dataset; raise max_length "
                        "or give rows whose assistant turns fit")
    loss = nll / count
    return {"chat_loss": loss, "chat_perplexity": math.exp(min(loss, 700.0)), "chat_token_accuracy": correct / count}, count


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def pair_sequences(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], list[int], int]]:
    """(prompt + chosen ids, prompt + rejected ids, where the answers start) per pair, as DPO tokenizes them."""
    from tinyllama_mcp.pipeline.recipe.dpo import to_text_pairs

    out = []
    for pair in to_text_pairs(rows, tokenizer, max_length):
        prompt = tokenizer(text=pair["prompt"])["input_ids"]
        chosen = tokenizer(text=pair["prompt"] + pair["chosen"])["input_ids"]
        rejected = tokenizer(text=pair["prompt"] + pair["rejected"])["input_ids"]
        start = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        out.append((chosen[:max_length], rejected[:max_length], max(start, 1)))
    return out


def preference_metrics(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> tuple[dict[str, float], int]:
    """(preference_accuracy, preference_margin; the pairs scored). Pairs whose answers max_length cuts away are
    left out, as DPO drops them."""
    pairs = [p for p in pair_sequences(tokenizer, rows, max_length) if min(len(p[0]), len(p[1])) > p[2]]
    if not pairs:
        raise UserError(f"no preference pair keeps its answers within max_length {max_length}; raise max_length")
    sequences = [seq for chosen, rejected, _ in pairs for seq in (chosen, rejected)]
    scores = token_scores(model, sequences, batch_size, tokenizer.pad_token_id)
    margins = []
    for k, (_, _, start) in enumerate(pairs):
        # row j of a sequence's scores predicts token j + 1: the answer's tokens start..end are rows start-1..
        chosen, rejected = (float(scores[2 * k + side][0][start - 1 :].sum()) for side in (0, 1))
        margins.append(chosen - rejected)
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "preference_margin": sum(margins) / len(margins)}, len(margins)
