"""Helpers for the pipeline tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 600

# ---------------------------------------------------------------- specs


def demo_sections(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """pipeline.samples.DEMO_*_OVERRIDES (flat tool arguments) as spec sections: lora_* under `lora`."""
    lora = {key.removeprefix("lora_"): value for key, value in overrides.items() if key.startswith("lora_")}
    training = {key: value for key, value in overrides.items() if not key.startswith("lora_")}
    return {"lora": lora, "training": training}


def sft_demo_spec(source: Path | str, *, max_samples: Optional[int] = None, training: Optional[dict] = None,
                  **fields: Any):
    """An SFTSpec on tiny-demo with the demo hyperparameters, plus test-specific changes."""
    from tinyllama_mcp.pipeline.samples import DEMO_SFT_OVERRIDES
    from tinyllama_mcp.pipeline.specs import SFTSpec

    sections = demo_sections(DEMO_SFT_OVERRIDES)
    sections["training"].update(training or {})
    return SFTSpec(
        base_model="tiny-demo",
        dataset={"source": str(source), "max_samples": max_samples},
        lora=sections["lora"],
        training=sections["training"],
        **fields,
    )


def dpo_demo_spec(source: Path | str, *, sft_adapter: Optional[str], training: Optional[dict] = None, **fields: Any):
    from tinyllama_mcp.pipeline.samples import DEMO_DPO_OVERRIDES
    from tinyllama_mcp.pipeline.specs import DPOSpec

    sections = demo_sections(DEMO_DPO_OVERRIDES)
    sections["training"].update(training or {})
    return DPOSpec(
        base_model="tiny-demo",
        sft_adapter=sft_adapter,
        dataset={"source": str(source)},
        lora=sections["lora"],
        training=sections["training"],
        **fields,
    )


def write_spec(job_dir: Path, spec) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "spec.json").write_text(spec.model_dump_json(), "utf-8")
    return job_dir


# ---------------------------------------------------------------- running the CLI


@dataclass
class JobRun:
    """A finished `python -m tinyllama_mcp.pipeline run JOB_DIR`."""

    job_dir: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict]:
        from tinyllama_mcp.pipeline.events import read_events

        return read_events(self.job_dir / "events.jsonl")

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def one(self, kind: str) -> dict:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind!r} event, got {found}"
        return found[0]

    @property
    def last_stderr_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def check_ok(self) -> "JobRun":
        assert self.returncode == 0, f"job {self.job_dir} failed ({self.returncode}):\n{self.stderr[-4000:]}"
        return self


def cli_env(cache: Path, **extra: str) -> dict[str, str]:
    """The job's environment: the session cache, offline, one torch thread (jobs may run two at a time)."""
    env = dict(os.environ)
    env.update(
        TINYLLAMA_MCP_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    env.update(extra)
    return env


def output_files(job_dir: Path) -> tuple[Path, Path]:
    """Where a job's stdout and stderr go: next to JOB_DIR (which need not exist)."""
    return job_dir.parent / f"{job_dir.name}.stdout.txt", job_dir.parent / f"{job_dir.name}.stderr.txt"


def start_cli(job_dir: Path, env: dict[str, str], cpu_path: Optional[str] = None) -> subprocess.Popen:
    """Start the job in its own process group, as the worker does; its output goes to files (never a
    pipe nobody drains while the test waits on something else). `cpu_path`: the bitsandbytes CPU path the job
    takes (bnb_cpu.CPU_PATHS; None: this machine's)."""
    out, err = output_files(job_dir)
    command = [sys.executable, "-m", "tinyllama_mcp.pipeline"]
    if cpu_path is not None:
        command = [sys.executable, str(Path(__file__).with_name("bnb_cpu.py")), cpu_path]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        return subprocess.Popen(
            [*command, "run", str(job_dir)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True,
        )


def finish_cli(proc: subprocess.Popen, job_dir: Path, timeout: float = CLI_TIMEOUT_S) -> JobRun:
    out, err = output_files(job_dir)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()
        raise AssertionError(f"job {job_dir} ran past {timeout}s:\n{err.read_text()[-4000:]}") from None
    return JobRun(job_dir, proc.returncode, out.read_text(), err.read_text())


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def run_cli(job_dir: Path, env: dict[str, str], timeout: float = CLI_TIMEOUT_S) -> JobRun:
    return finish_cli(start_cli(job_dir, env), job_dir, timeout)


# ---------------------------------------------------------------- the shared SFT -> DPO -> merge chain

# SFT: the demo hyperparameters unchanged (20 epochs, batch 4, lr 1e-2, LoRA r16) on the first 8 rows of
# the bundled sample: 40 steps instead of 160 for all 32 rows. DPO: the demo settings but 8 steps, not 24
# (its reward accuracy reaches 1.0 within a few).
SFT_ROWS = 8
SFT_SAVE_STEPS = 20
DPO_STEPS = 8
EVAL_PROMPTS = ["How do I name a feature branch?", "What is the capital of France?"]


@dataclass
class JobChain:
    """SFT (nf4) -> DPO (nf4, on the SFT adapter) -> merge (fp32), each through the CLI, in one thread, on the
    bitsandbytes CPU path `cpu_path`. Chains given one executor run one after another."""

    root: Path
    env: dict[str, str]
    executor: ThreadPoolExecutor
    cpu_path: Optional[str] = None
    current: Optional[subprocess.Popen] = None
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    futures: dict[str, Future] = field(default_factory=dict)

    def start(self) -> "JobChain":
        from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE
        from tinyllama_mcp.pipeline.specs import EvalPromptsSpec, MergeSpec

        prompts = EvalPromptsSpec(prompts=EVAL_PROMPTS, max_new_tokens=32)
        sft_dir = write_spec(
            self.root / "sft",
            sft_demo_spec(SFT_SAMPLE, max_samples=SFT_ROWS, training={"save_steps": SFT_SAVE_STEPS},
                          eval_prompts=prompts, parents=[]),
        )
        dpo_dir = write_spec(
            self.root / "dpo",
            dpo_demo_spec(DPO_SAMPLE, sft_adapter=str(sft_dir / "adapter"), training={"max_steps": DPO_STEPS},
                          eval_prompts=prompts, parents=["sft"]),
        )
        merge_dir = write_spec(
            self.root / "merge",
            MergeSpec(base_model="tiny-demo", sft_adapter=str(sft_dir / "adapter"),
                      dpo_adapter=str(dpo_dir / "adapter"), dtype="fp32", parents=["sft", "dpo"]),
        )
        self.futures["sft"] = self.executor.submit(self._run, sft_dir, None)
        self.futures["dpo"] = self.executor.submit(self._run, dpo_dir, "sft")
        self.futures["merge"] = self.executor.submit(self._run, merge_dir, "dpo")
        return self

    def _run(self, job_dir: Path, after: Optional[str]) -> JobRun:
        if after is not None:
            parent = self.futures[after].result()
            if parent.returncode != 0:
                raise RuntimeError(f"not run: the {after} job failed ({parent.last_stderr_line})")
        with self.lock:
            if self.cancelled:
                raise RuntimeError("cancelled")
            self.current = start_cli(job_dir, self.env, self.cpu_path)
        return finish_cli(self.current, job_dir)

    def result(self, name: str) -> JobRun:
        return self.futures[name].result(timeout=CLI_TIMEOUT_S * 3).check_ok()

    def close(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.current is not None:
                kill_group(self.current)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
