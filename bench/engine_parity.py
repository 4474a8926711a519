"""Greedy parity of pipeline.engine with transformers on a GPU, in fp32, through every fast path.

    python bench/engine_parity.py --out results/engine_parity.json

In bf16, greedy tokens of a random-weight model drift apart after a few dozen tokens through rounding
alone (gen_bench reports where); in fp32 the engine's compiled layers, CUDA graphs (decode and batch-1
prefill), batch-1 attention and continuous batching must give HF's tokens. Reports, for batch 1 and for
8 concurrent requests, the first position where the engine's greedy tokens differ from HF's (None: none).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch  # noqa: E402

from bench.gen_bench import first_divergence  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.synthetic import TINYLLAMA_SHAPE
    from tinyllama_mcp.pipeline.engine import Engine, EngineConfig, SamplingParams

    config = LlamaConfig(bos_token_id=1, eos_token_id=None, pad_token_id=0, **TINYLLAMA_SHAPE)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).float().eval()
    model.generation_config.eos_token_id = None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(10, 1024, (n,), generator=g).tolist() for n in (64, 40, 64, 17, 64, 33, 64, 50)]
    reference = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0)
            reference.append(out[0, len(p):].tolist())
    eng = Engine(model, None, EngineConfig(max_batch=8, max_len=256, eos_token_ids=[], idle_exit_s=600))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    try:
        eng.generate(prompts[0], SamplingParams(max_new_tokens=16), timeout=600)  # compile and capture
        single = eng.generate(prompts[0], params, timeout=600).token_ids
        handles = [eng.submit(p, params) for p in prompts]
        batched = [h.result(600).token_ids for h in handles]
        result = {
            "card": torch.cuda.get_device_name(0), "dtype": "float32", "new_tokens": args.new_tokens,
            "engine": eng.info.as_dict(), "prefill_graphs": sorted(eng.runner.graphs.prefill),
            "batch1_first_divergence": first_divergence(single, reference[0]),
            "concurrent8_first_divergence": [first_divergence(b, r) for b, r in zip(batched, reference)],
        }
    finally:
        eng.close()
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
