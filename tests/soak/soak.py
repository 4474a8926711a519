"""Soak: kill -9 the job process, the worker and the server at random moments of SFT, DPO and merge.

Not run in CI (minutes of CPU). Run by hand from the repository root:

    .venv/bin/python tests/soak/soak.py                 # 3 chains (SFT -> DPO -> merge), >= 20 kills
    .venv/bin/python tests/soak/soak.py --kills 8 --chains 2 --seed 1   # a shorter run

Set-up: tiny-demo jobs queued on one server home; two processes compete for the single worker slot:
`tinyllama-mcp serve --transport http` (worker inside) and `tinyllama-mcp worker`. A killer picks
random moments while a job runs and sends SIGKILL to the job's process group, the standalone worker
or the server (which are restarted after a short pause). Afterwards it checks that
- every job ended: succeeded (after resuming) or failed with the reason of every attempt once the
  attempt limit was reached (or because its parent failed); none is lost;
- never two processes ran the same job at once (a /proc scan every 0.1 s) and never more jobs ran
  than there are slots (the store);
and prints a summary table. Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "src")]

from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE  # noqa: E402
from tinyllama_mcp.server.store import JobStore  # noqa: E402

BIN = Path(sys.executable).parent / "tinyllama-mcp"
SFT = dict(dataset=str(SFT_SAMPLE), base_model="tiny-demo", max_samples=8, max_steps=12, save_steps=3,
           per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=64, lora_r=8, lora_alpha=16,
           quantization="none")
DPO = dict(dataset=str(DPO_SAMPLE), max_samples=8, max_steps=6, save_steps=2, per_device_train_batch_size=2,
           gradient_accumulation_steps=1, max_length=64, lora_r=8, lora_alpha=16, quantization="none")


def environment(home: Path, max_attempts: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TINYLLAMA_MCP_")}
    env.update(TINYLLAMA_MCP_HOME=str(home), TINYLLAMA_MCP_LEASE_TTL_S="3", TINYLLAMA_MCP_POLL_INTERVAL_S="0.2",
               TINYLLAMA_MCP_MAX_ATTEMPTS=str(max_attempts), TINYLLAMA_MCP_TOKEN="soak-token",
               TINYLLAMA_MCP_DATA_ROOTS=str(SFT_SAMPLE.parent), HF_HUB_OFFLINE="1",
               PATH=f"{BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


async def enqueue(home: Path, chains: int, max_attempts: int) -> list[str]:
    """Queue `chains` x (SFT -> DPO -> merge) through the real tools (no worker in this process)."""
    os.environ.update(environment(home, max_attempts))
    from mcp import Client

    from tinyllama_mcp.server.app import build_server
    from tinyllama_mcp.server.runtime import Runtime
    from tinyllama_mcp.server.settings import load_settings

    runtime = Runtime(load_settings(), run_worker=False)
    ids = []
    async with runtime.running(), Client(build_server(runtime)) as client:
        for _ in range(chains):
            sft = (await client.call_tool("start_sft", SFT)).structured_content["job_id"]
            dpo = (await client.call_tool("start_dpo", {**DPO, "sft_job_id": sft})).structured_content["job_id"]
            merge = (await client.call_tool("merge", {"dpo_job_id": dpo})).structured_content["job_id"]
            ids += [sft, dpo, merge]
    return ids


class Scanner(threading.Thread):
    """Every 0.1 s: how many live processes run each job (cmdline `-m tinyllama_mcp.pipeline run JOB_DIR`)."""

    def __init__(self, store_path: Path) -> None:
        super().__init__(daemon=True)
        self.store = JobStore(store_path)
        self.most_per_job: Counter = Counter()
        self.most_running = 0
        self.scans = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            per_job: Counter = Counter()
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    cmd = (proc / "cmdline").read_bytes().split(b"\0")
                    state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
                except OSError:
                    continue
                if state != "Z" and b"pipeline" in cmd and b"run" in cmd and len(cmd) >= 2:
                    per_job[cmd[-2] if cmd[-1] == b"" else cmd[-1]] += 1
            for job, count in per_job.items():
                self.most_per_job[job] = max(self.most_per_job[job], count)
            self.most_running = max(self.most_running, len(self.store.running()))
            self.scans += 1
            self.stop.wait(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24, help="kills to make (default 24)")
    parser.add_argument("--chains", type=int, default=3, help="SFT -> DPO -> merge chains to queue (default 3)")
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--spare-attempts", type=int, default=2,
                        help="mostly spare a job's last N attempts from kills (default 2)")
    parser.add_argument("--spare-share", type=float, default=0.9,
                        help="how often such a job is spared (1: always; default 0.9, so some jobs still hit the limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", help="server home (default: a fresh temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    home = Path(args.home or tempfile.mkdtemp(prefix="tinyllama-soak-")) / "home"
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ids = asyncio.run(enqueue(home, args.chains, args.max_attempts))
    env = environment(home, args.max_attempts)
    logs = home.parent
    store = JobStore(home / "queue.sqlite3")
    scanner = Scanner(home / "queue.sqlite3")
    scanner.start()
    port = 20000 + rng.randrange(20000)

    def spawn(kind: str) -> subprocess.Popen:
        argv = [str(BIN), "worker"] if kind == "worker" else [str(BIN), "serve", "--transport", "http", "--port", str(port)]
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(logs / f"{kind}.log", "ab"))

    procs = {"server": spawn("server"), "worker": spawn("worker")}
    kills: list[tuple[str, str, str]] = []  # (target, stage of the running job, job id)
    try:
        while time.monotonic() - started < args.timeout:
            jobs = [store.get(job_id) for job_id in ids]
            if all(job.final for job in jobs):
                break
            for kind, proc in procs.items():
                if proc.poll() is not None:
                    procs[kind] = spawn(kind)
            running = [job for job in jobs if job.state == "running" and job.pid]
            if len(kills) < args.kills and running and rng.random() < 0.5:
                time.sleep(rng.uniform(0.5, 6.0))  # a random moment of the job: start-up, training, saving
                job = store.get(running[0].id)
                if job.state != "running" or not job.pid:
                    continue
                if job.attempts >= job.max_attempts - args.spare_attempts and rng.random() < args.spare_share:
                    continue  # let most jobs keep an undisturbed last attempt, so resuming is what gets tested
                target = rng.choice(["job", "job", "worker", "server"])
                if target == "job":
                    try:
                        os.killpg(job.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                else:
                    procs[target].send_signal(signal.SIGKILL)
                    procs[target].wait()
                    time.sleep(rng.uniform(0.2, 3.0))
                    procs[target] = spawn(target)
                kills.append((target, job.stage, job.id))
                print(f"[{time.monotonic() - started:6.1f}s] kill #{len(kills)}: {target} during {job.stage} {job.id} "
                      f"(attempt {job.attempts})", flush=True)
            time.sleep(0.3)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        scanner.stop.set()
        scanner.join()
    elapsed = time.monotonic() - started
    jobs = [store.get(job_id) for job_id in ids]
    problems = []
    print(f"\n{'job':<20} {'stage':<6} {'state':<10} {'attempts':>8}  kills  error")
    kills_per_job = Counter(job_id for _, _, job_id in kills)
    for job in jobs:
        if job is None:
            problems.append("a job was lost")
            continue
        print(f"{job.id:<20} {job.stage:<6} {job.state:<10} {job.attempts:>3}/{job.max_attempts:<4}  {kills_per_job[job.id]:>5}  "
              f"{(job.error or '')[:70]}")
        if job.state == "failed":
            parent_failed = job.error and "parent" in job.error
            if not parent_failed and (job.attempts < job.max_attempts or len(job.attempt_errors) < job.max_attempts):
                problems.append(f"{job.id} failed before its attempt limit: {job.error}")
        elif job.state != "succeeded":
            problems.append(f"{job.id} ended {job.state}")
        else:
            expected = job.job_dir / ("merged" if job.stage == "merge" else "adapter")
            if not expected.is_dir():
                problems.append(f"{job.id} succeeded without {expected.name}/")
    by_target = Counter(target for target, _, _ in kills)
    by_stage = Counter(stage for _, stage, _ in kills)
    most = max(scanner.most_per_job.values(), default=0)
    print(f"\nkills: {len(kills)} (job {by_target['job']}, worker {by_target['worker']}, server {by_target['server']}; "
          f"during sft {by_stage['sft']}, dpo {by_stage['dpo']}, merge {by_stage['merge']})")
    print(f"jobs: {len(jobs)}, succeeded {sum(j.state == 'succeeded' for j in jobs)}, "
          f"failed {sum(j.state == 'failed' for j in jobs)}, lost {sum(j is None for j in jobs)}")
    print(f"most processes on one job at once: {most}; most jobs running at once (store): {scanner.most_running}; "
          f"process scans: {scanner.scans}; elapsed {elapsed:.0f}s; home {home}")
    if most > 1:
        problems.append(f"{most} processes ran the same job at once")
    if scanner.most_running > 1:
        problems.append(f"{scanner.most_running} jobs were running at once on one slot")
    if len(kills) < args.kills:
        problems.append(f"only {len(kills)} of {args.kills} kills were made (jobs ended first: queue more chains)")
    if not all(job.final for job in jobs if job is not None):
        problems.append("timed out before every job ended")
    print("\nOK" if not problems else "\nPROBLEMS:\n- " + "\n- ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
