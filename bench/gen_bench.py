"""Generation speed: transformers (dynamic and static cache) vs pipeline.engine, in one process on one model.

    python bench/gen_bench.py --out results/gen_bench.json          # GPU: TinyLlama-1.1B-shaped, bf16, ~3 min
    python bench/gen_bench.py --smoke --out /tmp/gen_smoke.json     # CPU: tiny-demo, seconds

Greedy, random 64-token prompts, 256 new tokens (EOS ignored everywhere). Reports:
- batch-1 latency and tokens/s for HF dynamic cache, HF static cache, and the engine;
- 1/8/32/64 concurrent requests through the engine (aggregate tokens/s, p50/p95 latency) vs HF static at batch 32;
- where the engine's greedy tokens first differ from HF's (bf16: small rounding differences add up);
- which decode path ran: compile_mode "layer" (each decode layer compiled whole by inductor and captured
  in the engine's CUDA graphs), "helpers" (compiled RMSNorm/RoPE/SiLU only) or "none", and why a
  faster path fell back (layer_compile_error, compile_error, graph_error);
- an A/B, batch 1 only, of the older "helpers" path (engine_helpers), when the time budget allows.
HF dynamic runs --hf-dynamic-tokens (64) new tokens only: it is ~50x slower per token, and its tokens
are the greedy reference for that many positions (HF static gives the full-length reference).
The JSON is rewritten after every stage, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "src")]

import torch  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_divergence(a: list[int], b: list[int]):
    """First position where the two greedy outputs differ, over their common length; None if none."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def build_model(smoke: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if smoke:
        from tinyllama_mcp.pipeline.tiny_demo import ensure_tiny_demo

        model = AutoModelForCausalLM.from_pretrained(ensure_tiny_demo(), dtype=torch.float32)
        name = "tiny-demo (fp32)"
    else:
        from bench.synthetic import TINYLLAMA_SHAPE

        config = LlamaConfig(bos_token_id=1, eos_token_id=None, pad_token_id=0, **TINYLLAMA_SHAPE)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        name = "TinyLlama-1.1B-shaped random (bf16)"
    model.generation_config.eos_token_id = None  # run every request to its full length
    model.generation_config.pad_token_id = 0
    return model.eval(), name


def hf_generate(model, prompts: list[list[int]], new: int, static: bool) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=model.device)
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    if static:
        kw["cache_implementation"] = "static"
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kw)
    sync()
    return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


class Report:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "results": {}, "errors": {}, "skipped": []}

    def put(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.save()

    def error(self, key: str, exc: BaseException) -> None:
        self.data["errors"][key] = repr(exc)[:1000]
        print(f"[gen_bench] {key} failed: {exc!r}", file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))


def run_engine(model, args, report: Report, prompts: list[list[int]], tag: str, compile_mode, concurrency,
               max_batch=None):
    from tinyllama_mcp.pipeline.engine import Engine, EngineConfig, SamplingParams

    new, plen = args.new_tokens, args.prompt_len
    max_len = plen + new + 64
    t0 = time.perf_counter()
    eng = Engine(model, None, EngineConfig(
        max_batch=max_batch or max(concurrency), max_len=max_len, max_queue=1024, eos_token_ids=[],
        compile_mode=compile_mode, attention=args.attention, idle_exit_s=600))
    build_s = time.perf_counter() - t0
    capture_s = eng.warmup(batch_sizes=sorted(set(concurrency)))
    graphs = eng.runner.graphs
    info = dict(eng.info.as_dict(), build_s=round(build_s, 2), capture_s=round(capture_s, 2),
                graphs=len(graphs.decode), capture_sizes=graphs.capture_sizes, buckets=graphs.buckets,
                chunk=eng.config.chunk)
    print(f"[gen_bench] {tag}: engine ready in {build_s:.1f}s + capture {capture_s:.1f}s: {eng.info}", flush=True)
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    try:
        # warm the prefill path at every batch size we will see, and the decode loop
        for n in sorted(set(concurrency)):
            hs = [eng.submit(prompts[i % len(prompts)], SamplingParams(max_new_tokens=2 * eng.config.chunk)) for i in range(n)]
            [h.result(300) for h in hs]
        # batch 1 latency: best of a few
        runs = [eng.generate(prompts[0], params, timeout=300) for _ in range(args.repeats)]
        lat = sorted(r.latency_ms for r in runs)
        bs1 = {"latency_ms": lat[len(lat) // 2], "tokens_per_s": round(new / (lat[len(lat) // 2] / 1000), 1),
               "ttft_ms": runs[-1].ttft_ms, "tokens": runs[-1].token_ids}
        conc = {}
        for n in concurrency:
            sync()
            t = time.perf_counter()
            hs = [eng.submit(prompts[i % len(prompts)], params) for i in range(n)]
            res = [h.result(600) for h in hs]
            wall = time.perf_counter() - t
            lats = [r.latency_ms for r in res]
            assert all(r.completion_tokens == new for r in res)
            conc[str(n)] = {"aggregate_tokens_per_s": round(n * new / wall, 1), "wall_s": round(wall, 3),
                            "p50_latency_ms": round(percentile(lats, 50), 1),
                            "p95_latency_ms": round(percentile(lats, 95), 1),
                            "p50_ttft_ms": round(percentile([r.ttft_ms for r in res], 50), 1)}
            print(f"[gen_bench] {tag}: {n} concurrent: {conc[str(n)]}", flush=True)
        # Where batch-1 latency goes besides decode: one prompt's prefill, synchronised (the engine is idle now;
        # it writes slot 0's cache rows, which the next prefill overwrites).
        dev = eng.runner.device
        ids = torch.tensor([prompts[0]], device=dev)
        lengths = torch.tensor([len(prompts[0])], device=dev)
        rows = torch.zeros(1, dtype=torch.long, device=dev)
        prefill_ms = []
        for _ in range(5):
            sync()
            t = time.perf_counter()
            eng.runner.prefill_forward(ids, lengths, rows)
            sync()
            prefill_ms.append((time.perf_counter() - t) * 1000)
        bs1["prefill_eager_ms"] = round(sorted(prefill_ms)[2], 2)
        graphed = graphs.prefill.get(next((b for b in graphs.prefill_buckets if b >= len(prompts[0])), -1))
        if graphed is not None:  # what the engine replays for a batch-1 prompt of this length
            replay_ms = []
            for _ in range(5):
                sync()
                t = time.perf_counter()
                graphed.graph.replay()
                sync()
                replay_ms.append((time.perf_counter() - t) * 1000)
            bs1["prefill_graph_ms"] = round(sorted(replay_ms)[2], 2)
        info["prefill_graphs"] = sorted(graphs.prefill)
        info["stats"] = dict(eng.stats)
        info["cuda_graphs_at_end"] = graphs.enabled
        return {"info": info, "batch1": bs1, "concurrent": conc}
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file (or folder: gen_bench.json inside)")
    ap.add_argument("--smoke", action="store_true", help="tiny-demo on CPU, small sizes")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--concurrency", default=None, help="comma list, e.g. 1,8,32,64")
    ap.add_argument("--hf-batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="skip the A/B past this many seconds (the HF static stages past this + 150)")
    ap.add_argument("--no-ab", action="store_true", help="skip the batch-1 A/B of the older 'helpers' decode path")
    ap.add_argument("--compile-mode", default=None, choices=["layer", "helpers", "none"],
                    help="the main engine's decode path (default: the engine's default, layer; it falls back itself)")
    ap.add_argument("--attention", default=None, choices=["reduce", "sdpa"],
                    help="decode attention at every batch size (default: reduce at batch 1 and sdpa above when the layer is compiled, else sdpa)")
    ap.add_argument("--hf-dynamic-tokens", type=int, default=None, help="new tokens for HF dynamic (GPU default 64)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    smoke = args.smoke or not torch.cuda.is_available()
    args.prompt_len = args.prompt_len or (16 if smoke else 64)
    args.new_tokens = args.new_tokens or (32 if smoke else 256)
    concurrency = [int(x) for x in (args.concurrency or ("1,4" if smoke else "1,8,32,64")).split(",")]
    hf_batch = args.hf_batch or (4 if smoke else 32)
    out = args.out / "gen_bench.json" if args.out.suffix != ".json" else args.out
    if smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))

    import transformers

    model, model_name = build_model(smoke)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"
    report = Report(out, {
        "card": card, "model": model_name, "dtype": str(next(model.parameters()).dtype),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "greedy": True, "concurrency": concurrency,
        "hf_static_batch": hf_batch, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    })
    print(f"[gen_bench] {card}: {model_name}, prompt {args.prompt_len}, new {args.new_tokens}", flush=True)
    g = torch.Generator().manual_seed(1234)
    vocab = min(model.config.vocab_size, 1024)
    prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(max(concurrency + [hf_batch]))]
    new = args.new_tokens
    res = report.data["results"]

    # 1. the engine (compiled decode layers + CUDA graphs where possible; it records what it fell back to)
    variants = [("engine", args.compile_mode, concurrency, None)]
    if not (smoke or args.no_ab):
        variants.append(("engine_helpers", "helpers", [1], max(concurrency)))

    def engine_stage(tag, comp, conc, max_batch):
        try:
            report.put(tag, run_engine(model, args, report, prompts, tag, comp, conc, max_batch))
        except Exception as exc:
            report.error(tag, exc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    engine_stage(*variants[0])

    # 2. HF dynamic cache, batch 1 (also the greedy reference, over its first hf_dynamic_tokens)
    dyn_new = min(new, args.hf_dynamic_tokens or (new if smoke else 64))
    try:
        hf_generate(model, prompts[:1], 8, static=False)
        t, toks = hf_generate(model, prompts[:1], dyn_new, static=False)
        report.put("hf_dynamic_bs1", {"latency_ms": round(t * 1000, 1), "tokens_per_s": round(dyn_new / t, 1),
                                      "new_tokens": dyn_new, "tokens": toks[0]})
    except Exception as exc:
        report.error("hf_dynamic_bs1", exc)

    # 3. HF static cache (transformers compiles the forward on the first call): batch 1, then batch hf_batch
    for key, batch in (("hf_static_bs1", 1), (f"hf_static_bs{hf_batch}", hf_batch)):
        if time.perf_counter() - t_start > args.budget_s + 150:  # the ratios need these: a looser bound
            report.data["skipped"].append(f"{key}: time budget {args.budget_s + 150}s spent")
            report.save()
            continue
        try:
            t_warm, _ = hf_generate(model, prompts[:batch], new, static=True)  # compile + warm with the same shapes
            t, toks = hf_generate(model, prompts[:batch], new, static=True)
            entry = {"latency_ms": round(t * 1000, 1), "tokens_per_s": round(batch * new / t, 1),
                     "first_call_s": round(t_warm, 1)}
            if batch == 1:
                entry["tokens"] = toks[0]
            report.put(key, entry)
        except Exception as exc:
            report.error(key, exc)

    # 4. optional A/B: the engine with its elementwise helpers eager (CUDA graphs only), if time is left
    for tag, *rest in variants[1:]:
        if time.perf_counter() - t_start > args.budget_s:
            report.data["skipped"].append(f"{tag}: time budget {args.budget_s}s spent")
            report.save()
            continue
        engine_stage(tag, *rest)

    # 5. summary
    summary = {}
    ours = res.get("engine")
    ref = res.get("hf_dynamic_bs1", {}).get("tokens") or res.get("hf_static_bs1", {}).get("tokens")
    if ours:
        for k in ("hf_dynamic_bs1", "hf_static_bs1"):
            if k in res and "tokens" in res[k]:
                summary[f"first_divergence_vs_{k}"] = first_divergence(ours["batch1"]["tokens"], res[k]["tokens"])
        if ref is None:
            summary["first_divergence"] = "no HF reference"
        st1, stb = res.get("hf_static_bs1"), res.get(f"hf_static_bs{hf_batch}")
        if st1:
            summary["bs1_speedup_vs_hf_static"] = round(ours["batch1"]["tokens_per_s"] / st1["tokens_per_s"], 2)
        if stb and str(hf_batch) in ours["concurrent"]:
            summary[f"concurrent{hf_batch}_speedup_vs_hf_static_bs{hf_batch}"] = round(
                ours["concurrent"][str(hf_batch)]["aggregate_tokens_per_s"] / stb["tokens_per_s"], 2)
        summary["cuda_graphs_used"] = ours["info"]["cuda_graphs_at_end"]
        summary["graph_error"] = ours["info"]["graph_error"]
        for k in ("compile_mode", "attention", "batch1_gemv", "compile_s", "layer_compile_error", "compile_error"):
            summary[k] = ours["info"].get(k)
        if "engine_helpers" in res:
            summary["bs1_speedup_vs_engine_helpers"] = round(
                ours["batch1"]["tokens_per_s"] / res["engine_helpers"]["batch1"]["tokens_per_s"], 2)
    # the batch-1 floors (weights ~2.2 GB read per step): H200 ~1,950 tok/s, H100 ~1,360 tok/s
    floor = next((v for k, v in {"H200": 1950.0, "H100": 1360.0}.items() if k in card), None)
    if ours and floor:
        summary["bs1_fraction_of_bandwidth_floor"] = round(ours["batch1"]["tokens_per_s"] / floor, 3)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    report.data["summary"] = summary
    report.save()

    # table
    rows = [("method", "requests", "tok/s", "latency p50 ms", "p95 ms")]
    for k in ("hf_dynamic_bs1", "hf_static_bs1", f"hf_static_bs{hf_batch}"):
        if k in res:
            rows.append((k.rsplit("_bs", 1)[0], k.rsplit("_bs", 1)[1], res[k]["tokens_per_s"], res[k]["latency_ms"], ""))
    for tag, *_ in variants:
        if tag in res:
            r = res[tag]
            rows.append((f"{tag} bs1", "1", r["batch1"]["tokens_per_s"], r["batch1"]["latency_ms"], ""))
            for n, c in r["concurrent"].items():
                rows.append((tag, n, c["aggregate_tokens_per_s"], c["p50_latency_ms"], c["p95_latency_ms"]))
    print(f"\n{card} | {model_name} | prompt {args.prompt_len} + {new} new, greedy")
    for row in rows:
        print(" | ".join(f"{str(x):>16}" for x in row))
    print(json.dumps(summary, indent=2))
    print(f"[gen_bench] wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
