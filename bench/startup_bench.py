"""Stdio start-up: how long a host waits for `initialize` and `tools/list` from `tinyllama-mcp serve`.

    python bench/startup_bench.py --runs 5 [--out results/startup_bench.json]

Each run starts the server as a host does (a fresh process, raw JSON-RPC over its stdin/stdout, no SDK
in the client), sends initialize, notifications/initialized and tools/list, and times the two answers
from the moment the process was started. Two variants alternate in one home, run for run:
- "sdk answers": the handshake cache (handshake.json in TINYLLAMA_MCP_CACHE, a scratch folder here) is
  deleted first, so the MCP SDK answers once it has loaded (what every start did before the cache, and
  what the first start after an install does);
- "cache answers": the cache the previous start stored is there, so the answers come while the SDK loads.
Reports the median and the spread of each, their ratio, and the machine (CPU count, Python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "startup-bench", "version": "1"}}}


def one_start(home: Path) -> tuple[float, float]:
    """Seconds from process start to the initialize answer and to the tools/list answer."""
    env = {**os.environ, "TINYLLAMA_MCP_HOME": str(home), "TINYLLAMA_MCP_CACHE": str(home.parent / "cache")}
    started = time.perf_counter()
    server = subprocess.Popen(["tinyllama-mcp", "serve", "--no-worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        def request(message: dict) -> None:
            server.stdin.write((json.dumps(message) + "\n").encode())
            server.stdin.flush()

        request(INITIALIZE)
        assert json.loads(server.stdout.readline())["id"] == 1
        initialized = time.perf_counter() - started
        request({"jsonrpc": "2.0", "method": "notifications/initialized"})
        request({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        tools = json.loads(server.stdout.readline())
        listed = time.perf_counter() - started
        assert len(tools["result"]["tools"]) == 6, tools
        server.stdin.close()
        server.wait(timeout=60)
        return initialized, listed
    finally:
        if server.poll() is None:
            server.kill()


def summarize(samples: list[tuple[float, float]]) -> dict:
    listed = [s[1] for s in samples]
    return {"initialize_median_s": round(statistics.median(s[0] for s in samples), 3),
            "initialize_and_tools_list_median_s": round(statistics.median(listed), 3),
            "initialize_and_tools_list_min_s": round(min(listed), 3),
            "initialize_and_tools_list_max_s": round(max(listed), 3), "runs": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="starts of each variant (default 5)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "home"
        one_start(home)  # creates the home and the queue database, so both variants start alike
        sdk, cached = [], []
        for _ in range(args.runs):
            (home.parent / "cache" / "handshake.json").unlink(missing_ok=True)
            sdk.append(one_start(home))  # the SDK answers, and stores its answers
            cached.append(one_start(home))
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "sdk answers": summarize(sdk), "cache answers": summarize(cached),
    }
    result["speedup"] = round(result["sdk answers"]["initialize_and_tools_list_median_s"]
                              / result["cache answers"]["initialize_and_tools_list_median_s"], 1)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
