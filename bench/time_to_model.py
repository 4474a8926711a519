"""Time to a usable model (issue 22): the seed's whole job, SFT -> DPO -> merge -> generate, as a user waits for it.

    python -m bench.time_to_model --out OUT [--budget-s 560] [--a-steps 10] [--b-steps 10] [--unsloth-site DIR]
                                  [--base DIR] [--home DIR] [--gen-tokens 128]
    python -m bench.time_to_model --out OUT --smoke     # CPU, tiny-demo: every stage and column's code path

Model: --base, else a TinyLlama-1.1B-shaped checkpoint with random weights (bench.synthetic). Data (bench.synthetic):
3,000 multi-turn chat rows with UltraChat's length profile (~1,000 tokens a row, ~80% past 512) and 12,859 Orca-like
preference pairs (the size of argilla/distilabel-intel-orca-dpo-pairs). Columns:
  project  the server's own job path: the MCP server and its worker in a process of their own (as `tinyllama-mcp
           serve` runs; --home: its folder, default a fresh one, so no cache is warm), start_sft / start_dpo / merge /
           generate called as tools with the spec's defaults, measured in full. Each stage from the tool call to
           the job's end (the store's finished_at), split from the job row and its events.jsonl.
  a        the seed's notebook (plain TRL; bench.time_to_model_peer), each stage a fresh process.
  b        Unsloth on the same job and schedules (--unsloth-site DIR; bench/unsloth_site.sh), a fresh process a stage.
a and b train --a-steps / --b-steps optimizer steps and extrapolate the rest of the run from their mean step after
the first (0: the whole run); the table's last line says which. Splits: start-up (process start and imports to the
job's first event), load (model load and NF4, DPO's SFT merge and re-quantize, the trainer built), compile/record
(the first step's excess over a step), train, save, other (tool call, queue, eval samples, exit). Then the first
generate after the merge's end (the project: from the merge job's end to the answer; a and b: a fresh process
loading the merged model), and 32 concurrent generates (wall, tokens/s). Writes OUT/time_to_model.json (after every
stage) and OUT/time_to_model.md, and prints the table with the card, the ratios total(a)/total(project) and
total(b)/total(project) (targets 10 and 2) and the first-generate latency (target 2 s). --budget-s bounds the call:
a stage that would run past it is cancelled or skipped, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from bench.time_to_model_report import job_splits, peer_splits, ratios, table, whole_job

REPO = Path(__file__).resolve().parent.parent
STAGES = ("sft", "dpo", "merge", "generate")
MIN_STAGE_S = 20.0  # a stage is not started with less budget left than this (smoke: 2 s)


def _env(*first: str) -> dict[str, str]:
    paths = [*first, str(REPO), str(REPO / "src")]
    if not first and os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _tail(path: Path, lines: int = 12) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


# ---------------------------------------------------------------- the project column (its own process)


async def _wait(client, job_id: str, deadline: float):
    import anyio

    while True:
        view = (await client.status(job_id, log_lines=15)).job
        if view.state in ("succeeded", "failed", "cancelled"):
            return view
        if time.time() > deadline:
            await client.cancel(job_id)
            deadline = float("inf")
        await anyio.sleep(0.2)


async def project_column(cfg, inputs: dict, out: Path) -> dict:
    """The seed's job through the server: an in-process MCP client, the server's worker running the jobs."""
    from tinyllama_mcp.pipeline.events import read_events
    from tinyllama_mcp.server.app import build_server
    from tinyllama_mcp.server.client import TinyLlamaClient
    from tinyllama_mcp.server.runtime import Runtime
    from tinyllama_mcp.server.settings import Settings

    runtime = Runtime(Settings(home=cfg.home, data_roots=[cfg.work]), run_worker=True)
    column: dict[str, Any] = {"measured": "full", "home": str(cfg.home)}
    # Smoke: 16-bit bases (bitsandbytes' CPU kernels take a minute for the eval samples), 128 tokens, 3 DPO steps.
    smoke = {"quantization": inputs["quantization"], "max_length": inputs["max_length"]} if inputs["smoke"] else {}
    async with runtime.running(), TinyLlamaClient(build_server(runtime)) as client:

        async def stage(name: str, call):
            t_call = time.time()
            started = await call()
            t_returned = time.time()
            view = await _wait(client, started.job_id, cfg.deadline)
            job = runtime.store.get(started.job_id)
            row = {"started_at": job.started_at or t_returned, "finished_at": job.finished_at or time.time(),
                   "attempts": job.attempts}
            result = dict(job_splits(row, read_events(job.job_dir / "events.jsonl"), t_call, t_returned),
                          job_id=job.id, state=view.state)
            if view.state != "succeeded":
                result.update(error=f"{view.state}: {view.error}", log_tail=view.log_tail)
            column[name] = result
            out.write_text(json.dumps(column, indent=2))
            return started if view.state == "succeeded" else None, job

        sft, _ = await stage("sft", lambda: client.start_sft(dataset=inputs["sft_path"], base_model=inputs["base"],
                                                             **smoke))
        dpo_smoke = dict(smoke, max_steps=inputs["dpo_steps"]) if smoke else {}
        dpo = sft and (await stage("dpo", lambda: client.start_dpo(dataset=inputs["dpo_path"], sft_job_id=sft.job_id,
                                                                    **dpo_smoke)))[0]
        name = f"ttm-{int(time.time())}"
        merged, merge_job = (await stage("merge", lambda: client.merge(dpo_job_id=dpo.job_id, output_name=name))
                             if dpo else (None, None))
        if merged:
            cfg.torch_before_generate = "torch" in sys.modules  # False: the first generate pays torch's import
            try:
                column["generate"] = await generate(client, name, inputs["prompts"], cfg, merge_job.finished_at)
            except Exception as exc:  # the tool's error, recorded beside the stages that ran
                column["generate"] = {"error": f"{type(exc).__name__}: {exc}"}
    column["whole_job_s"] = whole_job(column)
    out.write_text(json.dumps(column, indent=2))
    return column


async def generate(client, name: str, prompts: list[str], cfg, merge_end: float) -> dict:
    """One generate as soon as the merge is done, then --batch concurrent ones (the server batches them)."""
    import anyio

    tokens = cfg.gen_tokens
    first = await client.generate(prompts[0], model=name, max_new_tokens=tokens, temperature=0.0)
    t_first = time.time()
    answers: list = []

    async def ask(prompt: str) -> None:
        answers.append(await client.generate(prompt, model=name, max_new_tokens=tokens, temperature=0.0))

    async with anyio.create_task_group() as group:
        for prompt in prompts[1:1 + cfg.batch]:
            group.start_soon(ask, prompt)
    batch_s = time.time() - t_first
    batch_tokens = sum(a.usage.completion_tokens for a in answers)
    return {"first_after_merge_s": round(t_first - merge_end, 2), "first_s": round(first.latency_ms / 1000, 2),
            "first_tokens": first.usage.completion_tokens, "batch_s": round(batch_s, 2), "batch_tokens": batch_tokens,
            "batch_rows": len(answers), "batch_tokens_per_s": round(batch_tokens / batch_s, 1),
            "torch_in_server_before_first": cfg.torch_before_generate}


# ---------------------------------------------------------------- the peer columns (a process a stage)


def peer_column(cfg, name: str, steps: int, env: dict, results: dict) -> dict:
    folder = cfg.work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    column: dict[str, Any] = {"measured": "full" if not steps else f"train: {steps} steps + extrapolated"}
    results["columns"][name] = column
    merge_exit = None
    for stage in STAGES:
        left = cfg.deadline - time.time()
        if left < cfg.min_stage_s:
            column[stage] = {"error": "skipped: over --budget-s"}
            break
        log, result_path = folder / f"{stage}.log", folder / f"{stage}.json"
        command = [sys.executable, "-m", "bench.time_to_model_peer", stage, "--column", name, "--work", str(cfg.work),
                   "--result", str(result_path), "--steps", str(steps), "--gen-tokens", str(cfg.gen_tokens),
                   "--batch", str(cfg.batch)]
        spawn = time.time()
        try:
            with open(log, "w") as handle:
                code = subprocess.run(command, env=env, cwd=folder, stdout=handle, stderr=subprocess.STDOUT,
                                      timeout=left).returncode
        except subprocess.TimeoutExpired:
            code = "timeout (over --budget-s)"
        run = json.loads(result_path.read_text()) if result_path.exists() else {}
        run.update(spawn=spawn, exit=time.time(), stage=stage)
        if code != 0 and "error" not in run:
            run["error"] = f"exit {code} before a result"
        result = peer_splits(run, steps)
        if "error" in run:
            result["log_tail"] = _tail(log)
        marks = run.get("marks", {})
        if stage == "merge":
            merge_exit = run["exit"]
        if stage == "generate" and "error" not in run:
            batch_s = marks["batch"] - marks["first"]
            result.update(first_after_merge_s=round(marks["first"] - merge_exit, 2),
                          first_s=round(marks["first"] - marks["loaded"], 2), first_tokens=run["first_tokens"],
                          batch_s=round(batch_s, 2), batch_tokens=run["batch_tokens"], batch_rows=run["batch_rows"],
                          batch_tokens_per_s=round(run["batch_tokens"] / batch_s, 1))
        column[stage] = result
        (cfg.out / "time_to_model.json").write_text(json.dumps(results, indent=2))
        if "error" in run:
            break
    column["whole_job_s"] = whole_job(column)
    return column


# ---------------------------------------------------------------- main


def _args(argv: Optional[list[str]]):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-demo, a few rows and steps: the code paths")
    ap.add_argument("--work", type=Path, default=Path("/tmp/time_to_model"))
    ap.add_argument("--home", type=Path, default=None, help="the server's home (default: a fresh WORK/home)")
    ap.add_argument("--base", type=Path, default=None, help="a local base checkpoint (default: bench.synthetic's)")
    ap.add_argument("--budget-s", type=float, default=None, help="the whole call's wall-clock bound (default 560; "
                    "smoke 1200)")
    ap.add_argument("--a-steps", type=int, default=None,
                    help="column a's training steps, the rest extrapolated (default 10; smoke 2); 0: the whole run")
    ap.add_argument("--b-steps", type=int, default=None, help="the same for column b")
    ap.add_argument("--unsloth-site", type=Path, default=None, help="Unsloth's packages (bench/unsloth_site.sh)")
    ap.add_argument("--columns", default="project,a,b", help="which columns to run, e.g. project,a")
    ap.add_argument("--gen-tokens", type=int, default=None, help="max_new_tokens of each generate (default 128)")
    ap.add_argument("--batch", type=int, default=32, help="concurrent generates after the first")
    ap.add_argument("--project-only", type=Path, default=None, help=argparse.SUPPRESS)  # the server's process
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    if cfg.unsloth_site and not (cfg.unsloth_site / "unsloth").is_dir():
        ap.error(f"--unsloth-site {cfg.unsloth_site}: no unsloth package there (build it: bench/unsloth_site.sh)")
    cfg.gen_tokens = cfg.gen_tokens or (8 if cfg.smoke else 128)
    steps = 2 if cfg.smoke else 10
    cfg.a_steps = steps if cfg.a_steps is None else cfg.a_steps
    cfg.b_steps = steps if cfg.b_steps is None else cfg.b_steps
    cfg.min_stage_s = 2.0 if cfg.smoke else MIN_STAGE_S
    cfg.budget_s = cfg.budget_s or (1200 if cfg.smoke else 560)
    cfg.home = cfg.home or cfg.work / "home"
    return cfg


def run_project(cfg, results: dict) -> None:
    """The project column in a process of its own: the bench never imports torch, so the server's first generate
    pays what a running server's does, and its GPU memory is freed before the peers run."""
    out = cfg.work / "project.json"
    out.unlink(missing_ok=True)
    if cfg.home == cfg.work / "home":
        shutil.rmtree(cfg.home, ignore_errors=True)
    command = [sys.executable, "-m", "bench.time_to_model", "--out", str(cfg.out), "--work", str(cfg.work),
               "--home", str(cfg.home), "--gen-tokens", str(cfg.gen_tokens), "--batch", str(cfg.batch),
               "--project-only", str(out), "--deadline", str(cfg.deadline), *(["--smoke"] if cfg.smoke else [])]
    log = cfg.work / "project.log"
    try:
        with open(log, "w") as handle:
            code = subprocess.run(command, env=_env(), cwd=cfg.work, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=max(cfg.deadline - time.time() + 15, 1)).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    column = json.loads(out.read_text()) if out.exists() else {}
    if code != 0:
        column.update(error=f"the server process exited {code}", log_tail=_tail(log))
    results["columns"]["project"] = column


def main(argv: Optional[list[str]] = None) -> int:
    cfg = _args(argv)
    t_start = time.time()
    cfg.work.mkdir(parents=True, exist_ok=True)
    if cfg.project_only:
        import anyio

        cfg.deadline = cfg.deadline or float("inf")
        inputs = json.loads((cfg.work / "inputs.json").read_text())
        anyio.run(project_column, cfg, inputs, cfg.project_only)
        return 0
    cfg.deadline = t_start + cfg.budget_s
    cfg.out.mkdir(parents=True, exist_ok=True)
    prepare = [sys.executable, "-m", "bench.time_to_model_peer", "prepare", "--work", str(cfg.work),
               *(["--smoke"] if cfg.smoke else []), *(["--base", str(cfg.base.resolve())] if cfg.base else [])]
    subprocess.run(prepare, env=_env(), check=True, stdout=subprocess.DEVNULL)
    inputs = json.loads((cfg.work / "inputs.json").read_text())
    results: dict[str, Any] = {
        "card": inputs["card"], "torch": inputs["torch"], "smoke": cfg.smoke, "command": sys.argv[1:] if argv is None
        else argv, "budget_s": cfg.budget_s, "prepare_s": round(time.time() - t_start, 1), "gen_tokens": cfg.gen_tokens,
        "inputs": {k: inputs[k] for k in ("base", "sft_rows", "dpo_rows", "dpo_steps", "quantization", "max_length")},
        "columns": {}}
    wanted = cfg.columns.split(",")
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    if "project" in wanted and extra:  # worker.job_environment sets a job's PYTHONPATH to src/ alone
        results["warning"] = (f"the server's job processes do not get PYTHONPATH's {extra}: their packages must be "
                              f"importable by {sys.executable} without it")
        print(f"warning: {results['warning']}", file=sys.stderr, flush=True)
    if "project" in wanted:
        run_project(cfg, results)
        (cfg.out / "time_to_model.json").write_text(json.dumps(results, indent=2))
    if "a" in wanted:
        peer_column(cfg, "a", cfg.a_steps, _env(), results)
    if "b" in wanted and cfg.unsloth_site:
        peer_column(cfg, "b", cfg.b_steps, _env(str(cfg.unsloth_site)), results)
    elif "b" in wanted:
        results["columns"]["b"] = {"skipped": "skipped: no --unsloth-site", "measured": "-"}
    results["ratios"] = ratios(results)
    results["wall_s"] = round(time.time() - t_start, 1)
    (cfg.out / "time_to_model.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (cfg.out / "time_to_model.md").write_text(text + "\n")
    print(text, flush=True)
    print(f"total wall {results['wall_s']} s; JSON: {cfg.out / 'time_to_model.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
