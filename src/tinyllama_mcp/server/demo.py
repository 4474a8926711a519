"""`tinyllama-mcp demo`: the whole retrain loop on the embedded tiny model, through the MCP server.

It starts the server over stdio as an agent host would, then calls start_sft, polls status until
the job is done (with a progress bar), start_dpo, merge, and generate, on `tiny-demo` with the
bundled sample data, and prints what happened. Nothing here trains by itself: every step is a tool
call, so the demo exercises exactly what agents use.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import anyio

from tinyllama_mcp.pipeline.samples import DEMO_DPO_OVERRIDES, DEMO_SFT_OVERRIDES, DPO_SAMPLE, SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import TINY_DEMO
from tinyllama_mcp.server.client import TinyLlamaClient, ToolCallError
from tinyllama_mcp.server.models import JobView

# A question from the SFT samples. The 0.5M-parameter toy model memorizes only part of the 32 answers
# (the recall line reports how many, for all of them); the run is deterministic on a CPU, and this is
# one it reproduces after SFT -> DPO -> merge.
QUESTION = "What goes in a commit message?"
DPO_START_TOLERANCE = 0.01  # DPO's first loss on a CPU in fp32 is ln 2 to ~1e-4: the policy is its reference


class ProgressBar:
    """One redrawn line on a terminal; a line every few seconds when stderr is a file or pipe."""

    def __init__(self, label: str, stream=sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.last_line = 0.0

    def __call__(self, job: JobView) -> None:
        p, m = job.progress, job.metrics
        width = 24
        fraction = (p.percent or 0) / 100 if p is not None else 0.0
        bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
        steps = f"{p.step}/{p.total}" if p is not None and p.total else ""
        details = [job.state, steps]
        if m is not None and m.loss is not None:
            details.append(f"loss {m.loss:.3f}")
        if m is not None and m.reward_accuracy is not None:
            details.append(f"reward acc {m.reward_accuracy:.2f}")
        if job.eta_s:
            details.append(f"eta {job.eta_s:.0f}s")
        line = f"{self.label:<6} [{bar}] {' '.join(d for d in details if d)}  {time.monotonic() - self.started:5.1f}s"
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:100])
            if job.state in ("succeeded", "failed", "cancelled"):
                self.stream.write("\n")
        elif job.state in ("succeeded", "failed", "cancelled") or time.monotonic() - self.last_line > 5:
            self.stream.write(line + "\n")
            self.last_line = time.monotonic()
        self.stream.flush()


async def _run_stage(client: TinyLlamaClient, label: str, job_id: str) -> JobView:
    job = await client.wait(job_id, poll_s=0.5, on_update=ProgressBar(label))
    if job.state != "succeeded":
        tail = "\n  ".join(job.log_tail or (await client.status(job_id, log_lines=15)).job.log_tail)
        raise RuntimeError(f"{label} job {job_id} {job.state}: {job.error}\n  {tail}")
    return job


async def demo(home: Path) -> dict:
    env = {
        "TINYLLAMA_MCP_HOME": str(home),
        "TINYLLAMA_MCP_DATA_ROOTS": str(SFT_SAMPLE.parent),
        "TINYLLAMA_MCP_POLL_INTERVAL_S": "0.25",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    home.mkdir(parents=True, exist_ok=True)
    server_log = open(home / "server.log", "a", encoding="utf-8")
    # The server starts as a host starts it: a child process speaking MCP on stdin/stdout.
    client = TinyLlamaClient.stdio(sys.executable, ["-m", "tinyllama_mcp.server", "serve"], env=env, errlog=server_log)
    started = time.monotonic()
    async with client:
        print(f"server started over stdio in {time.monotonic() - started:.1f}s (log: {home / 'server.log'})",
              file=sys.stderr)
        sft = await client.start_sft(dataset=str(SFT_SAMPLE), base_model=TINY_DEMO, **DEMO_SFT_OVERRIDES)
        if sft.preflight is not None:
            print(f"start_sft -> {sft.job_id}: {sft.preflight.rows} rows checked, queued", file=sys.stderr)
        before: dict = {}

        async def ask_the_untrained_model() -> None:
            # While SFT trains: the base model's answer, for comparison (and the server loads the model stack now).
            before["answer"] = await client.generate(QUESTION, model=TINY_DEMO, max_new_tokens=40, temperature=0.0)

        async with anyio.create_task_group() as group:
            group.start_soon(ask_the_untrained_model)
            sft_done = await _run_stage(client, "sft", sft.job_id)

        dpo = await client.start_dpo(dataset=str(DPO_SAMPLE), sft_job_id=sft.job_id, **DEMO_DPO_OVERRIDES)
        print(f"start_dpo -> {dpo.job_id}", file=sys.stderr)
        dpo_done = await _run_stage(client, "dpo", dpo.job_id)

        name = f"demo-{secrets.token_hex(3)}"
        merged = await client.merge(dpo_job_id=dpo.job_id, output_name=name)
        print(f"merge -> {merged.job_id} ({name})", file=sys.stderr)
        merge_done = await _run_stage(client, "merge", merged.job_id)

        answer = await client.generate(QUESTION, model=name, max_new_tokens=40, temperature=0.0)
        recall = await _recall_training_answers(client, name)
    server_log.close()
    return {
        "sft": sft_done, "dpo": dpo_done, "merge": merge_done, "answer": answer, "before": before["answer"],
        "recall": recall, "elapsed_s": time.monotonic() - started,
    }


async def _recall_training_answers(client: TinyLlamaClient, model: str) -> dict:
    """Ask every SFT training question at once (the server batches them): how many answers come back verbatim?"""
    pairs = []
    for line in SFT_SAMPLE.read_text("utf-8").splitlines():
        messages = json.loads(line)["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        reply = next(m["content"] for m in messages if m["role"] == "assistant")
        pairs.append((user, reply))
    answers: dict[str, str] = {}

    async def ask(question: str) -> None:
        out = await client.generate(question, model=model, max_new_tokens=40, temperature=0.0)
        answers[question] = out.text

    started = time.monotonic()
    async with anyio.create_task_group() as group:
        for question, _ in pairs:
            group.start_soon(ask, question)
    exact = [(q, a) for q, a in pairs if answers[q].strip() == a.strip()]
    return {"exact": len(exact), "total": len(pairs), "example": exact[0] if exact else None,
            "seconds": time.monotonic() - started}


def _summary(result: dict) -> str:
    sft, dpo, merge, answer = result["sft"].summary or {}, result["dpo"].summary or {}, result["merge"], result["answer"]

    def loss(summary: dict) -> str:
        first, last = summary.get("first_loss"), summary.get("last_loss")
        return f"{first:.3f} -> {last:.3f}" if first is not None and last is not None else "n/a"

    accuracies = dpo.get("first_reward_accuracy"), dpo.get("reward_accuracy")
    accuracy_text = " -> ".join(f"{a:.2f}" for a in accuracies) if None not in accuracies else "n/a"
    lines = [
        "",
        "tinyllama-mcp demo: SFT -> DPO -> merge -> generate on tiny-demo, all through MCP tool calls",
        f"  SFT   {result['sft'].job_id}: loss {loss(sft)} over {sft.get('steps', '?')} steps",
        f"  DPO   {result['dpo'].job_id}: loss {loss(dpo)}, reward accuracy {accuracy_text}",
        f"  merge {merge.job_id}: {merge.artifacts.get('merged', 'n/a')}",
        f"  generate: {QUESTION!r}",
        f"    tiny-demo before training -> {result['before'].text!r}",
        f"    {merge.output_name} (merged)  -> {answer.text!r} ({answer.usage.completion_tokens} tokens, "
        f"{answer.latency_ms:.0f} ms)",
        f"  recall: {result['recall']['exact']} of {result['recall']['total']} training answers reproduced word for "
        f"word ({result['recall']['total']} concurrent generate calls, {result['recall']['seconds']:.1f}s)",
        *([f"    e.g. {result['recall']['example'][0]!r} -> {result['recall']['example'][1]!r}"]
          if result["recall"]["example"] else []),
        f"  total {result['elapsed_s']:.0f}s",
    ]
    return "\n".join(lines)


def checks(result: dict) -> list[tuple[str, bool]]:
    """What a correct run shows, each as (what, whether it holds): the demo fails when one does not."""
    sft, dpo = result["sft"].summary or {}, result["dpo"].summary or {}
    sft_first, sft_last = sft.get("first_loss"), sft.get("last_loss")
    dpo_first = dpo.get("first_loss")
    accuracy_first, accuracy_last = dpo.get("first_reward_accuracy"), dpo.get("reward_accuracy")
    return [
        ("SFT loss falls", sft_first is not None and sft_last is not None and sft_last < sft_first),
        ("DPO starts at its reference (first loss ln 2)",
         dpo_first is not None and abs(dpo_first - math.log(2)) < DPO_START_TOLERANCE),
        ("DPO reward accuracy rises", accuracy_first is not None and accuracy_last is not None
         and accuracy_last > accuracy_first),
        ("the merged model answers a training question word for word", result["recall"]["exact"] > 0),
    ]


def run_demo(home: Optional[str] = None) -> int:
    folder = Path(home).expanduser() if home else Path(tempfile.mkdtemp(prefix="tinyllama-mcp-demo-"))
    try:
        result = anyio.run(demo, folder)
    except (ToolCallError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print(_summary(result))
    results = checks(result)
    print("  checks: " + "; ".join(f"{what}: {'ok' if ok else 'FAILED'}" for what, ok in results))
    if home is None:
        print(f"  (jobs and the merged model are in {folder}; delete it when done)")
    failed = [what for what, ok in results if not ok]
    if failed:
        print(f"demo failed its own checks: {', '.join(failed)} (the jobs' events.jsonl and log.txt are in {folder})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
