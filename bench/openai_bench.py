"""What the HTTP layer costs: /v1 streaming vs MCP generate vs the engine in-process vs transformers' static cache.

    python bench/openai_bench.py --out results/openai_bench.json      # GPU: TinyLlama-1.1B-shaped random, bf16
    python bench/openai_bench.py --smoke --out /tmp/openai_smoke.json # CPU: tiny-demo, under a minute

One process, one card, one model (gen_bench.build_model's, saved to a folder the server serves as
HF_LOCAL_MODEL_PATH), the same chat prompts (rendered by the same tokenizer and template), the same max_tokens,
greedy. At 1, 8 and 32 concurrent streams it measures aggregate tokens/s (completion tokens / wall time from the
first request sent to the last answer) and time to first token (TTFT) of:
- engine: Engine.submit in this process, on the model as the server loads it (load_generator), no streaming;
  engine_text: the same with an on_text callback that does nothing (the text the server streams is decoded);
- v1: POST /v1/chat/completions with stream=true on `python -m tinyllama_mcp.server serve --transport http`
  (a subprocess, as a user starts it); TTFT is the first chunk with content;
- mcp: the MCP `generate` tool over Streamable HTTP on the same server (the mcp SDK's client, one session);
  TTFT is the first progress notification carrying text;
- hf_static: transformers' generate with cache_implementation="static": one request at 1, a left-padded batch
  at 8 and 32; TTFT from a streamer (the first token of the batch).
GenerationSpec cannot reach SamplingParams.ignore_eos, so EOS is made unreachable instead: the lm_head row of
the EOS token is zeroed (logit 0 never wins a greedy argmax over 32k random logits). Every path reports its real
completion tokens. The summary's v1_vs_engine is the fraction of the engine's throughput /v1 keeps ("the HTTP
layer costs under 5%" reads as v1_vs_engine >= 0.95). The JSON is rewritten after every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import torch  # noqa: E402

from bench.gen_bench import Report, build_model, percentile, sync  # noqa: E402

TOKEN = "openai-bench-token-0123456789"


def bench_tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole random vocabulary: one word 'w<id>' per token, TinyLlama's specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tinyllama_mcp.pipeline.chat import CHAT_TEMPLATE, ROLE_TAGS

    specials = ["<unk>", "<s>", "</s>", *ROLE_TAGS]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=list(ROLE_TAGS), model_max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_served_model(folder: Path, smoke: bool) -> str:
    """gen_bench's model with EOS made unreachable, and a tokenizer, saved where the server loads it."""
    model, name = build_model(smoke)
    if smoke:
        from tinyllama_mcp.pipeline.modeling import load_tokenizer
        from tinyllama_mcp.pipeline.tiny_demo import ensure_tiny_demo

        tokenizer = load_tokenizer(str(ensure_tiny_demo()))
    else:
        tokenizer = bench_tokenizer(model.config.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return name


def make_prompts(n: int, words: int, vocab: int, seed: int = 1234) -> list[list[dict]]:
    """n one-turn chats of about `words` random vocabulary words each (lengths vary by +-25%: batches need padding)."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        k = rng.randint(max(1, words * 3 // 4), max(1, words * 5 // 4))
        chats.append([{"role": "user", "content": " ".join(f"w{rng.randrange(10, vocab)}" for _ in range(k))}])
    return chats


def stats(rows: list[dict], wall: float) -> dict:
    tokens = sum(r["completion_tokens"] for r in rows)
    ttft = [r["ttft_ms"] for r in rows if r.get("ttft_ms") is not None]
    lat = [r["latency_ms"] for r in rows]
    return {"aggregate_tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 3), "completion_tokens": tokens,
            "min_completion_tokens": min(r["completion_tokens"] for r in rows),
            "p50_ttft_ms": round(percentile(ttft, 50), 1) if ttft else None,
            "p95_ttft_ms": round(percentile(ttft, 95), 1) if ttft else None,
            "p50_latency_ms": round(percentile(lat, 50), 1)}


def best_of(rounds: list[tuple[list[dict], float]]) -> dict:
    """The round with the shortest wall time, and every round's wall time."""
    rows, wall = min(rounds, key=lambda r: r[1])
    return dict(stats(rows, wall), walls_s=[round(w, 3) for _, w in rounds])


# ---------------------------------------------------------------- in process: the engine and transformers
def engine_stage(generator, prompt_ids, args, concurrency) -> dict:
    from tinyllama_mcp.pipeline.engine import SamplingParams
    from tinyllama_mcp.pipeline.specs import GenerationSpec

    engine = generator.engine()
    params = SamplingParams.from_spec(GenerationSpec(max_new_tokens=args.new_tokens, temperature=0.0))

    def round_(n: int, on_text) -> tuple[list[dict], float]:
        sync()
        t0 = time.perf_counter()
        handles = [engine.submit(prompt_ids[i], params, on_text=on_text) for i in range(n)]
        res = [h.result(600) for h in handles]
        wall = time.perf_counter() - t0
        return [{"completion_tokens": r.completion_tokens, "ttft_ms": r.ttft_ms, "latency_ms": r.latency_ms}
                for r in res], wall

    # engine_text: with an on_text callback that does nothing, as the server's streaming gets the text
    out = {"engine": {}, "engine_text": {}}
    for n in concurrency:
        for _ in range(args.warmup):
            round_(n, None)
        rounds = {"engine": [], "engine_text": []}
        for _ in range(args.repeats):
            rounds["engine"].append(round_(n, None))
            rounds["engine_text"].append(round_(n, lambda text, tokens: None))
        for name, got in rounds.items():
            out[name][str(n)] = best_of(got)
            print(f"[openai_bench] {name} {n}: {out[name][str(n)]}", flush=True)
    out["engine"]["info"] = engine.info.as_dict() if hasattr(engine.info, "as_dict") else str(engine.info)
    return out


class FirstToken:
    """A transformers streamer that notes when the first generated tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.t = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.t = time.perf_counter()

    def end(self) -> None:
        pass


def hf_static_stage(generator, prompt_ids, args, concurrency) -> dict:
    model, pad = generator.model, generator.tokenizer.pad_token_id

    def run(n: int) -> tuple[list[dict], float]:
        batch = prompt_ids[:n]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        streamer = FirstToken()
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=None, cache_implementation="static", streamer=streamer)
        sync()
        wall = time.perf_counter() - t0
        ttft = round((streamer.t - t0) * 1000, 2) if streamer.t else None
        new = out.shape[1] - width
        return [{"completion_tokens": new, "ttft_ms": ttft, "latency_ms": wall * 1000} for _ in batch], wall

    out = {}
    for n in concurrency:
        if time.perf_counter() - args.t_start > args.budget_s:
            out.setdefault("skipped", []).append(f"{n}: time budget {args.budget_s}s spent")
            continue
        t0 = time.perf_counter()
        run(n)  # transformers compiles the static-cache forward for these shapes on the first call
        first_s = time.perf_counter() - t0
        out[str(n)] = dict(best_of([run(n) for _ in range(args.repeats)]), first_call_s=round(first_s, 1))
        print(f"[openai_bench] hf_static {n}: {out[str(n)]}", flush=True)
    return out


# ---------------------------------------------------------------- the server: /v1 and MCP over HTTP
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, home: Path, port: int, log: Path, new_tokens: int) -> subprocess.Popen:
    env = {**os.environ, "TINYLLAMA_MCP_HOME": str(home), "TINYLLAMA_MCP_TOKEN": TOKEN, "TINYLLAMA_MCP_WORKER": "0",
           "HF_LOCAL_MODEL_PATH": str(folder), "HF_HUB_OFFLINE": "1",
           "TINYLLAMA_MCP_MAX_NEW_TOKENS": str(max(1024, new_tokens)),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "tinyllama_mcp.server", "serve", "--transport", "http",
                                "--port", str(port)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=open(log, "ab"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 120 s")


async def v1_one(http, url: str, model: str, messages: list[dict], new: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, finish = None, None, None
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"/v1/chat/completions: {response.status_code} {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices") or []:
                if ttft is None and (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - t0
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    if usage is None:
        raise RuntimeError("no usage chunk although stream_options.include_usage was set")
    return {"completion_tokens": usage["completion_tokens"], "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
            "latency_ms": round((time.perf_counter() - t0) * 1000, 2), "finish_reason": finish}


async def mcp_one(client, messages: list[dict], new: int) -> dict:
    t0 = time.perf_counter()
    first: list[float] = []

    async def progress(progress, total, message) -> None:
        if not first and message:
            first.append(time.perf_counter() - t0)

    result = await client.call_tool("generate", {"messages": messages, "max_new_tokens": new, "temperature": 0},
                                    progress_callback=progress)
    if result.is_error:
        raise RuntimeError(f"MCP generate: {' '.join(getattr(b, 'text', '') for b in result.content)}")
    out = result.structured_content
    return {"completion_tokens": out["usage"]["completion_tokens"],
            "ttft_ms": round(first[0] * 1000, 2) if first else None,
            "latency_ms": round((time.perf_counter() - t0) * 1000, 2), "finish_reason": out["finish_reason"]}


async def server_stage(base: str, prompts: list[list[dict]], args, concurrency, folder: Path) -> dict:
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = httpx2.Timeout(60.0, read=900.0)
    limits = httpx2.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx2.AsyncClient(headers=headers, timeout=timeout, limits=limits) as http, \
            httpx2.AsyncClient(headers=headers, timeout=timeout, limits=limits) as mcp_http:
        listed = (await http.get(f"{base}/v1/models")).json()
        ids = [m["id"] for m in listed.get("data", [])]
        model = args.v1_model or next((i for i in ids if i in (str(folder), str(folder.resolve()))), None) \
            or next((i for i in ids if i != "tiny-demo"), None)
        if model is None:
            raise RuntimeError(f"/v1/models lists no entry for {folder}: {ids}")
        url = f"{base}/v1/chat/completions"

        async with Client(streamable_http_client(f"{base}/mcp", http_client=mcp_http), mode="legacy",
                          read_timeout_seconds=900) as client:
            async def gather(call, n: int) -> tuple[list[dict], float]:
                rows: list = [None] * n

                async def one(i: int) -> None:
                    rows[i] = await call(prompts[i])

                t0 = time.perf_counter()
                async with anyio.create_task_group() as group:
                    for i in range(n):
                        group.start_soon(one, i)
                return rows, time.perf_counter() - t0

            paths = {"v1": lambda m: v1_one(http, url, model, m, args.new_tokens),
                     "mcp": lambda m: mcp_one(client, m, args.new_tokens)}
            out = {"v1_model": model, "v1": {}, "mcp": {}}
            for n in concurrency:
                rounds = {"v1": [], "mcp": []}
                for name, call in paths.items():  # the first calls compile and capture (the engine is shared)
                    for _ in range(args.warmup):
                        await gather(call, n)
                for _ in range(args.repeats):  # alternate, so drift in the card's clocks hits both alike
                    for name, call in paths.items():
                        rounds[name].append(await gather(call, n))
                for name in paths:
                    out[name][str(n)] = best_of(rounds[name])
                    out[name][str(n)]["finish_reasons"] = sorted({r["finish_reason"] for r in rounds[name][0][0]})
                    print(f"[openai_bench] {name} {n}: {out[name][str(n)]}", flush=True)
    return out


def summarize(res: dict, concurrency) -> dict:
    summary = {}
    server = res.get("server", {})
    paths = {"engine": res.get("engine", {}), "engine_text": res.get("engine_text", {}), "v1": server.get("v1", {}),
             "mcp": server.get("mcp", {}), "hf_static": res.get("hf_static", {})}
    for n in map(str, concurrency):
        row = {}
        tps = {k: v[n]["aggregate_tokens_per_s"] for k, v in paths.items() if n in v}
        ttft = {k: v[n]["p50_ttft_ms"] for k, v in paths.items() if n in v}
        row["tokens_per_s"], row["p50_ttft_ms"] = tps, ttft
        for a, b in (("v1", "engine"), ("mcp", "engine"), ("v1", "mcp"), ("engine_text", "engine"),
                     ("engine", "hf_static"), ("v1", "hf_static")):
            if a in tps and b in tps and tps[b]:
                row[f"{a}_vs_{b}"] = round(tps[a] / tps[b], 3)
        if "v1_vs_engine" in row:
            row["http_layer_cost_pct"] = round(100 * (1 - row["v1_vs_engine"]), 1)
        summary[n] = row
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file (or folder: openai_bench.json inside)")
    ap.add_argument("--smoke", action="store_true", help="tiny-demo on CPU, small sizes (under a minute)")
    ap.add_argument("--prompt-words", type=int, default=None, help="words per prompt (GPU: 64, one token each)")
    ap.add_argument("--new-tokens", type=int, default=None, help="max_tokens of every request (GPU: 256)")
    ap.add_argument("--concurrency", default=None, help="comma list (default 1,8,32; smoke 1,4)")
    ap.add_argument("--repeats", type=int, default=None, help="measured rounds per point, the best kept (GPU: 3)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per point first")
    ap.add_argument("--v1-model", default=None, help="the /v1 model id (default: the one naming the served folder)")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: engine, server, hf_static")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip hf_static points started past this")
    ap.add_argument("--keep", type=Path, default=None, help="folder for the saved model and server home (default: temp)")
    args = ap.parse_args()
    t_start = args.t_start = time.perf_counter()
    smoke = args.smoke or not torch.cuda.is_available()
    args.prompt_words = args.prompt_words or (12 if smoke else 64)
    args.new_tokens = args.new_tokens or (16 if smoke else 256)
    args.repeats = args.repeats or (1 if smoke else 3)
    concurrency = [int(x) for x in (args.concurrency or ("1,4" if smoke else "1,8,32")).split(",")]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out = args.out / "openai_bench.json" if args.out.suffix != ".json" else args.out
    if smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))

    import transformers

    work = args.keep or Path(tempfile.mkdtemp(prefix="openai_bench-"))
    folder, home = work / "model", work / "home"
    home.mkdir(parents=True, exist_ok=True)
    model_name = save_served_model(folder, smoke)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"
    report = Report(out, {
        "card": card, "model": model_name, "prompt_words": args.prompt_words, "new_tokens": args.new_tokens,
        "greedy": True, "concurrency": concurrency, "repeats": args.repeats, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "eos": "unreachable (lm_head row zeroed); throughput counts real completion tokens",
    })
    print(f"[openai_bench] {card}: {model_name}, ~{args.prompt_words} words, {args.new_tokens} new", flush=True)

    from tinyllama_mcp.pipeline.generate import load_generator, render_input

    generator = load_generator(str(folder))
    prompts = make_prompts(max(concurrency), args.prompt_words, min(generator.model.config.vocab_size, 32000))
    prompt_ids = [render_input(generator.tokenizer, chat, None) for chat in prompts]
    report.data["meta"]["prompt_tokens"] = [min(map(len, prompt_ids)), max(map(len, prompt_ids))]
    res = report.data["results"]

    if "engine" not in skip:
        try:
            for name, value in engine_stage(generator, prompt_ids, args, concurrency).items():
                report.put(name, value)
        except Exception as exc:
            report.error("engine", exc)
        finally:
            generator.close()
            generator._engine = None  # hf_static reuses the model; the engine's KV cache goes
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    if "server" not in skip:
        import anyio

        port, process = free_port(), None
        try:
            process = start_server(folder, home, port, work / "server.log", args.new_tokens)
            report.put("server", anyio.run(server_stage, f"http://127.0.0.1:{port}", prompts, args, concurrency, folder))
        except Exception as exc:
            report.error("server", exc)
            log_file = work / "server.log"
            log = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
            print(f"[openai_bench] server log tail:\n{log}", file=sys.stderr)
        finally:
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()

    if "hf_static" not in skip:
        try:
            report.put("hf_static", hf_static_stage(generator, prompt_ids, args, concurrency))
        except Exception as exc:
            report.error("hf_static", exc)

    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)  # the saved model: 2.2 GB on the GPU run
    summary = summarize(res, concurrency)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    report.data["summary"] = summary
    report.save()

    names = ("engine", "engine_text", "v1", "mcp", "hf_static")
    print(f"\n{card} | {model_name} | prompts {report.data['meta']['prompt_tokens']} tokens + {args.new_tokens} new, greedy")
    print(" | ".join(f"{x:>14}" for x in ("streams", *(f"{k} tok/s" for k in names), "v1/engine", "ttft v1 ms")))
    for n in map(str, concurrency):
        row = summary[n]
        cells = [n, *(row["tokens_per_s"].get(k, "") for k in names), row.get("v1_vs_engine", ""),
                 row["p50_ttft_ms"].get("v1", "")]
        print(" | ".join(f"{str(x):>14}" for x in cells))
    print(f"[openai_bench] wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
