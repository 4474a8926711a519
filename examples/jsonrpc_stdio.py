"""A plain JSON-RPC session with tinyllama-mcp over stdio: no MCP SDK, only the standard library.

    python examples/jsonrpc_stdio.py                 # initialize, tools/list, tools/call status
    python examples/jsonrpc_stdio.py --train         # ... and start_sft on tiny-demo, polled until done
    python examples/jsonrpc_stdio.py --json          # print a machine-readable summary (used by the tests)

The server is started the way agents.example.toml's [mcp_servers.tinyllama] block says (command,
args, env). MCP over stdio is newline-delimited JSON-RPC 2.0: one message a line on the server's
stdin and stdout; the server logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SFT_SAMPLE = ROOT / "pipeline" / "samples" / "sft_sample.jsonl"


class Session:
    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr, env=env, text=True
        )
        self.next_id = 1

    def send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def request(self, method: str, params: dict | None = None) -> dict:
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, **({"params": params} if params else {})})
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the server closed stdout (exit status {self.process.wait()})")
            message = json.loads(line)  # every line on stdout must be JSON-RPC
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message["result"]
            # anything else is a notification (e.g. notifications/resources/updated): skip it

    def notify(self, method: str) -> None:
        self.send({"jsonrpc": "2.0", "method": method})

    def call_tool(self, name: str, arguments: dict) -> dict:
        result = self.request("tools/call", {"name": name, "arguments": arguments})
        if result.get("isError"):
            raise RuntimeError(result["content"][0]["text"])
        return result["structuredContent"]

    def close(self) -> int:
        self.process.stdin.close()  # end of input: the server stops
        return self.process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "agents.example.toml")
    parser.add_argument("--server", default="tinyllama", help="which [mcp_servers.*] block to start")
    parser.add_argument("--train", action="store_true", help="also run start_sft on tiny-demo and poll status")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of prose")
    args = parser.parse_args()

    block = tomllib.loads(args.config.read_text())["mcp_servers"][args.server]
    env = {**os.environ, **block.get("env", {})}  # a host passes its environment plus the block's env
    started = time.perf_counter()
    session = Session([block["command"], *block.get("args", [])], env)

    init = session.request("initialize", {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "jsonrpc-example", "version": "1.0"},
    })
    initialized_s = time.perf_counter() - started
    session.notify("notifications/initialized")
    tools = session.request("tools/list")["tools"]
    listed_s = time.perf_counter() - started
    status = session.call_tool("status", {})
    summary = {
        "server": init["serverInfo"], "protocol_version": init["protocolVersion"],
        "initialize_s": round(initialized_s, 3), "initialize_and_tools_list_s": round(listed_s, 3),
        "tools": [tool["name"] for tool in tools], "status": status,
    }
    if not args.json:
        print(f"initialize answered after {initialized_s:.2f}s by {init['serverInfo']['name']} "
              f"(protocol {init['protocolVersion']}); tools/list after {listed_s:.2f}s")
        for tool in tools:
            print(f"  {tool['name']}: {tool['description'][:90]}...")
        print(f"status: {len(status['jobs'])} jobs, queue {status['queue']}, devices: {status['devices']}")

    if args.train:
        job = session.call_tool("start_sft", {
            "dataset": str(SFT_SAMPLE), "base_model": "tiny-demo", "max_steps": 4, "max_samples": 8,
            "max_length": 64, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        })
        if not args.json:
            print(f"start_sft -> {job['job_id']} ({job['state']}, {job['preflight']['rows']} rows checked)")
        while True:
            view = session.call_tool("status", {"job_id": job["job_id"], "log_lines": 0})["job"]
            if view["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        summary["trained"] = {"job_id": job["job_id"], "state": view["state"], "summary": view["summary"],
                              "error": view["error"]}
        if not args.json:
            print(f"{job['job_id']} {view['state']}: {view['summary'] or view['error']}")

    summary["exit_status"] = session.close()
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
