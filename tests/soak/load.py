"""Load: 50 concurrent clients over Streamable HTTP for 60 s: status, the job listing and generate.

Not run in CI. Run by hand from the repository root:

    .venv/bin/python tests/soak/load.py                    # 50 clients, 60 s
    .venv/bin/python tests/soak/load.py --clients 10 --seconds 15

Starts a real `tinyllama-mcp serve --transport http` (token on, worker off, one job queued so that
status(job_id) has something to show). Each client is its own MCP session (the project's typed
client, `TinyLlamaClient.http`) and loops over status(job_id), status() (the listing) and
generate(model='tiny-demo', max_new_tokens=4). Reports errors (must be 0), p50/p99 latency per call
and the server process's RSS at start, middle and end. Exit status 0 when there were no errors and
RSS grew less than --max-rss-growth-mib from the start to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "src")]

from tinyllama_mcp.pipeline.samples import SFT_SAMPLE  # noqa: E402
from tinyllama_mcp.server.client import TinyLlamaClient  # noqa: E402

BIN = Path(sys.executable).parent / "tinyllama-mcp"
TOKEN = "load-test-token"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def run(args) -> int:
    home = Path(args.home or tempfile.mkdtemp(prefix="tinyllama-load-")) / "home"
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("TINYLLAMA_MCP_")}
    env.update(TINYLLAMA_MCP_HOME=str(home), TINYLLAMA_MCP_TOKEN=TOKEN, TINYLLAMA_MCP_WORKER="0",
               TINYLLAMA_MCP_DATA_ROOTS=str(SFT_SAMPLE.parent), HF_HUB_OFFLINE="1",
               PATH=f"{BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    server = subprocess.Popen([str(BIN), "serve", "--transport", "http", "--port", str(port)], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(home.parent / "server.log", "ab"))
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start; see " + str(home.parent / "server.log"))
                await asyncio.sleep(0.1)
        async with TinyLlamaClient.http(url, TOKEN) as warm:
            job = await warm.start_sft(dataset=str(SFT_SAMPLE), base_model="tiny-demo", max_samples=8, max_steps=2,
                                       max_length=64, quantization="none")
            await warm.generate("warm up", model="tiny-demo", max_new_tokens=2)  # load the model once
        job_id = job.job_id
        rss = {"start": rss_mib(server.pid)}
        latencies: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        stop_at = time.monotonic() + args.seconds
        middle_at = time.monotonic() + args.seconds / 2

        async def sample_middle() -> None:
            await asyncio.sleep(max(0.0, middle_at - time.monotonic()))
            rss["middle"] = rss_mib(server.pid)

        async def one_client(n: int) -> None:
            rng = random.Random(n)
            try:
                async with TinyLlamaClient.http(url, TOKEN) as client:
                    while time.monotonic() < stop_at:
                        pick = rng.random()
                        started = time.perf_counter()
                        try:
                            if pick < 0.5:
                                kind = "status(job_id)"
                                out = await client.status(job_id)
                                assert out.job is not None and out.job.job_id == job_id
                            elif pick < 0.8:
                                kind = "status() listing"
                                out = await client.status()
                                assert any(j.job_id == job_id for j in out.jobs)
                            else:
                                kind = "generate"
                                out = await client.generate(f"client {n} says hi", model="tiny-demo",
                                                            max_new_tokens=args.max_new_tokens)
                                assert out.usage.completion_tokens <= args.max_new_tokens
                        except Exception as exc:  # counted, never hidden
                            errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
                            continue
                        latencies[kind].append((time.perf_counter() - started) * 1000)
            except Exception as exc:
                errors.append(f"client {n} session: {type(exc).__name__}: {str(exc)[:200]}")

        began = time.monotonic()
        await asyncio.gather(sample_middle(), *(one_client(n) for n in range(args.clients)))
        elapsed = time.monotonic() - began
        rss["end"] = rss_mib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    total = sum(len(v) for v in latencies.values())
    print(f"{args.clients} clients over Streamable HTTP for {elapsed:.0f} s: {total} calls ({total / elapsed:.0f}/s), "
          f"errors {len(errors)}")
    print(f"{'call':<18} {'count':>7} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for kind in ("status(job_id)", "status() listing", "generate"):
        values = latencies.get(kind, [])
        print(f"{kind:<18} {len(values):>7} {percentile(values, 50):>9.1f} {percentile(values, 99):>9.1f} "
              f"{max(values, default=float('nan')):>9.1f}")
    print(f"server RSS MiB: start {rss['start']:.0f}, middle {rss.get('middle', float('nan')):.0f}, end {rss['end']:.0f} "
          f"(growth {rss['end'] - rss['start']:+.0f})")
    for error in errors[:20]:
        print("  error:", error)
    ok = not errors and rss["end"] - rss["start"] < args.max_rss_growth_mib
    print("OK" if ok else "PROBLEMS")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--max-rss-growth-mib", type=float, default=100)
    parser.add_argument("--home")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
