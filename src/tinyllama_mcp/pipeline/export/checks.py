"""The comparisons every export check is made of: logits, weights, token ids, chat template; failures raise.

Logit bounds: a weight rounded to a format moves by at most half its step, relative to itself (f16: 2^-11, bf16:
2^-8) or to its block's largest value (q8_0: 1/254). The logits then move by about that fraction of their size,
growing with the square root of the layers a token passes: bound = 16 x step x sqrt(2 x layers + 1) x max(1, max
|logit|). A wrong tensor, permutation or key moves logits by their own size, far beyond it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from tinyllama_mcp.errors import SelfCheckError

HALF_STEP = {"f32": 2.0 ** -24, "f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": 1.0 / 254}
SAFETY = 16
SAME = 1e-5  # relative bound where the weights are identical and only the order of float operations differs


def logit_bound(kind: str, scale: float, layers: int) -> float:
    """How far logits may move when every weight is rounded to `kind` (the module docstring derives it)."""
    return SAFETY * HALF_STEP[kind] * math.sqrt(2 * layers + 1) * max(1.0, scale)


def same_bound(scale: float) -> float:
    return SAME * max(1.0, scale)


def max_abs_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest |got - want| over all prompts; inf when a shape differs or a value is not finite."""
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return math.inf
        diff = (a.float() - b.float()).abs()
        if not torch.isfinite(diff).all():
            return math.inf
        worst = max(worst, float(diff.max()))
    return worst


def require(ok: bool, file: str, message: str) -> None:
    if not ok:
        raise SelfCheckError(f"export check failed for {file}: {message}; the file is wrong or damaged: export again")


def within(file: str, what: str, figure: float, bound: float) -> float:
    """figure when it is within bound (both reported), else SelfCheckError naming the file, the figure and the bound."""
    require(figure <= bound, file, f"{what} is {figure:.6g}, over the bound {bound:.6g}")
    return figure


def rounded(t: torch.Tensor, kind: str) -> torch.Tensor:
    """What a file of `kind` should hold for weight t, in fp32 (f16/bf16 round to nearest even, as numpy and ggml)."""
    if kind == "f16":
        return t.half().float()
    if kind == "bf16":
        return t.bfloat16().float()
    return t


def q8_0_tolerance(t: torch.Tensor) -> torch.Tensor:
    """Per weight, how far q8_0 may move it: half a step d/2 of its block of 32 (d = block max / 127), plus what
    storing d as f16 adds (127 x |d16 - d|)."""
    blocks = t.float().reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    tol = d / 2 + 127 * (d.half().float() - d).abs() + 1e-6 * d
    return tol.expand_as(blocks).reshape(t.shape)


def weights_match(file: str, name: str, read: torch.Tensor, source: torch.Tensor, kind: str) -> float:
    """The largest |read - what `kind` makes of source| for one tensor; f16/bf16/f32 must match bit for bit."""
    read, source = read.detach(), source.detach()
    require(tuple(read.shape) == tuple(source.shape), file,
            f"tensor {name} has shape {tuple(read.shape)}, the source {tuple(source.shape)}")
    if kind == "q8_0":
        diff, tol = (read - source.float()).abs().flatten(), q8_0_tolerance(source).flatten()
        excess = (diff - tol).nan_to_num(math.inf)
        at = int(excess.argmax())
        require(float(excess[at]) <= 0, file, f"tensor {name} differs from the source by {float(diff[at]):.6g} at "
                                              f"element {at}, over the bound {float(tol[at]):.6g} (half a q8_0 step)")
        return float(diff.max())
    diff = (read - rounded(source, kind)).abs()
    worst = float(diff.max()) if torch.isfinite(diff).all() else math.inf
    require(worst == 0.0, file, f"tensor {name} differs from the source rounded to {kind} by {worst:.6g}, over the "
                                "bound 0 (the same bits)")
    return worst


def token_ids_match(file: str, encode: Callable[[str], list[int]], texts: list[str], want: list[list[int]]) -> int:
    """Each fixed prompt encodes to the source tokenizer's ids; returns how many were compared."""
    for text, ids in zip(texts, want, strict=True):
        got = encode(text)
        if got != ids:
            at = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), min(len(got), len(ids)))
            require(False, file, f"its tokenizer encodes {text[:40]!r}... differently from the source from token {at} "
                                 f"on ({got[at:at + 4]} vs {ids[at:at + 4]})")
    return len(texts)


def chat_template_matches(file: str, tokenizer, template: str, chats: list[list[dict]]) -> int:
    """The embedded template renders each chat (with and without the generation prompt) as the source does."""
    for chat in chats:
        for prompt in (True, False):
            want = tokenizer.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
            try:
                got = tokenizer.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False,
                                                    chat_template=template)
            except Exception as exc:  # a template that no longer parses: jinja's errors have many types
                require(False, file, f"its chat template does not render ({type(exc).__name__}: {exc})")
            require(got == want, file, f"its chat template renders {got[:60]!r} where the source renders {want[:60]!r}")
    return 2 * len(chats)
