"""On a CUDA card: the LoRA dropout of the compiled layers, replayed as CUDA graphs, draws fresh masks at the rate.

    python -m bench.graph_dropout_check

The compiled layer's LoRA projection (speed.compiled_layers._lora) is compiled as inductor compiles it, with its
CUDA graphs, once with inductor's own random numbers and once with ATen's (`Settings.aten_random`). With a zero base
weight and identity A and B the projection returns the dropped input itself, so each replay shows its mask: the
check is that a replay zeroes a fraction p of the entries (within 0.5%), scales the rest by 1 / (1 - p), and
draws a new mask each replay (consecutive masks differ on ~2p(1 - p) of the entries, as independent ones do).
Prints one JSON line; exits 1 when a check fails.
"""

from __future__ import annotations

import json
import sys


def check(aten_random: bool, rate: float = 0.1, tokens: int = 8192, width: int = 64, replays: int = 6) -> dict:
    import torch

    from tinyllama_mcp.pipeline.speed import compiled_layers

    options = compiled_layers.inductor_options(cuda_graphs=True, aten_random=aten_random)
    fn = torch.compile(compiled_layers._lora, fullgraph=True, options=options)
    torch.manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16).abs_().add_(0.5)  # no zero entries
    weight = torch.zeros(width, width, device="cuda", dtype=torch.bfloat16)
    identity = torch.eye(width, device="cuda", dtype=torch.bfloat16)
    masks, scaled_ok = [], True
    for _ in range(replays):
        torch.compiler.cudagraph_mark_step_begin()
        y = fn(x, weight, identity, identity, 1.0, rate, torch.bfloat16).clone()
        kept = y != 0
        masks.append(kept)
        scaled_ok &= bool(torch.allclose(y[kept].float(), (x[kept].float() / (1 - rate)), rtol=2e-2))
    dropped = [1 - m.float().mean().item() for m in masks]
    changed = [(a != b).float().mean().item() for a, b in zip(masks, masks[1:])]
    expected_change = 2 * rate * (1 - rate)
    ok = (all(abs(d - rate) < 0.005 for d in dropped) and scaled_ok
          and all(abs(c - expected_change) < 0.01 for c in changed))
    return {"aten_random": aten_random, "rate": rate, "dropped": [round(d, 4) for d in dropped],
            "kept_scaled_by_1_over_1_minus_p": scaled_ok, "mask_changed": [round(c, 4) for c in changed],
            "independent_masks_change": round(expected_change, 4), "ok": ok}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the check replays CUDA graphs", file=sys.stderr)
        return 2
    results = [check(aten_random) for aten_random in (False, True)]
    print(json.dumps({"card": torch.cuda.get_device_name(0), "checks": results}))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
