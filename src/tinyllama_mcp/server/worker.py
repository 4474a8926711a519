"""The worker: runs queued jobs, one per GPU slot, as `python -m tinyllama_mcp.pipeline run JOB_DIR` subprocesses.

A worker holds its slot's lease (renewed by heartbeats), requeues the jobs of workers that died,
claims the oldest runnable job, starts the job process and folds its events into the store until it
exits. Job processes:
- start in their own process group (so cancel can stop the whole group) with a clean environment:
  the slot's CUDA_VISIBLE_DEVICES, the cache folder, offline flags where configured, never the
  server's bearer token;
- never inherit the server's stdout (over stdio that is the protocol channel): output goes to
  JOB_DIR/log.txt;
- never outlive their worker: on Linux the kernel kills them when the worker thread dies
  (PR_SET_PDEATHSIG), and a worker that finds an orphaned job kills what is left of its process
  group before the job runs again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import tinyllama_mcp
from tinyllama_mcp.server.events import fold, log_tail, read_new_events
from tinyllama_mcp.server.settings import Settings
from tinyllama_mcp.server.store import STAGE_OUTPUT, Job, JobStore

log = logging.getLogger("tinyllama_mcp.worker")

STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long

# Variables a job process may see from the server's environment; everything else is dropped.
_PASSTHROUGH = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "VIRTUAL_ENV",
    "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN", "HF_ENDPOINT",
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
    "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
)
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

_PR_SET_PDEATHSIG = 1
try:  # loaded once here: the child must do as little as possible between fork and exec
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - exotic libc
    _LIBC = None


def visible_gpus() -> list[str]:
    """GPU ids this machine offers, without importing torch: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    configured = os.environ.get("CUDA_VISIBLE_DEVICES")
    if configured is not None:
        ids = []
        for part in configured.split(","):
            part = part.strip()
            if not part or part.startswith("-"):
                break  # CUDA ignores everything from the first invalid id on
            ids.append(part)
        return ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def slot_devices(settings: Settings) -> list[Optional[str]]:
    """One entry per worker slot: the GPU id it runs on, or None on a machine without GPUs."""
    gpus = visible_gpus()
    count = settings.worker_slots or max(len(gpus), 1)
    return [gpus[i % len(gpus)] if gpus else None for i in range(count)]


def _source_root() -> Path:
    """The folder holding the `tinyllama_mcp` package, so `python -m tinyllama_mcp.pipeline` works from a source
    checkout too."""
    return Path(tinyllama_mcp.__file__).resolve().parent.parent


def job_environment(settings: Settings, gpu: Optional[str]) -> dict[str, str]:
    env = {name: os.environ[name] for name in _PASSTHROUGH if name in os.environ}
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONNOUSERSITE="1",
        TOKENIZERS_PARALLELISM="false",
        TINYLLAMA_MCP_CACHE=str(settings.cache_dir),
        # The server's own PYTHONPATH after the source root: packages it was started with stay importable.
        PYTHONPATH=os.pathsep.join(filter(None, [str(_source_root()), os.environ.get("PYTHONPATH")])),
    )
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if settings.offline is not None:
        for flag in _OFFLINE_FLAGS:
            env[flag] = "1" if settings.offline else "0"
    return env


def _die_with_parent(parent_pid: int):
    def setup() -> None:  # runs in the child between fork and exec
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the worker died before prctl took effect
            os._exit(70)

    return setup


def _process_runs_job(pid: int, job_dir: Path) -> bool:
    """Whether `pid` is still a process of this job (guards against the pid having been reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(job_dir).encode() in cmdline


def kill_leftover(job: Job, host: str) -> None:
    """Make sure no process of a dead attempt still runs before the job runs again."""
    if job.pid is None or job.host != host or not _process_runs_job(job.pid, job.job_dir):
        return
    log.warning("killing leftover process group %s of job %s", job.pid, job.id)
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not _process_runs_job(job.pid, job.job_dir):
            return
        time.sleep(0.05)


def _stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory, or killed by someone)" if -returncode == signal.SIGKILL else ""
        return f"the job process was killed by {name}{hint}"
    return f"the job process exited with status {returncode}"


class Worker:
    """Runs jobs on one slot until `stop` is set."""

    def __init__(self, settings: Settings, slot: int, gpu: Optional[str], stop: threading.Event) -> None:
        self.settings = settings
        self.slot = slot
        self.gpu = gpu
        self.stop = stop
        self.host = socket.gethostname()
        self.worker_id = f"{self.host}:{os.getpid()}:{slot}:{uuid.uuid4().hex[:8]}"
        self.store = JobStore(settings.db_path)  # its own connection: tool calls never wait on it

    @property
    def ttl(self) -> float:
        return self.settings.lease_ttl_s

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    self._step()
                except Exception:  # e.g. the database stayed locked past its timeout: log, pause, go on
                    log.exception("worker %s: unexpected error; retrying shortly", self.worker_id)
                    self.stop.wait(min(self.ttl / 3, 5.0))
        finally:
            try:
                self.store.release_lease(self.slot, self.worker_id)
            finally:
                self.store.close()

    def _step(self) -> None:
        """Hold the slot, requeue orphans, run the next job if there is one."""
        if not self.store.acquire_lease(self.slot, self.worker_id, os.getpid(), self.host, self.ttl):
            # Another worker owns this slot; stand by and take over if its heartbeats stop.
            self.stop.wait(min(self.ttl / 3, 2.0))
            return
        for job, state in self.store.recover_orphans(self.ttl):
            log.warning("job %s lost its worker; now %s", job.id, state)
            kill_leftover(job, self.host)
        for job in self.store.running():
            if job.worker_id == self.worker_id:  # an attempt of ours whose end could not be recorded
                self.store.retry_or_fail(job.id, self.worker_id, "the worker lost track of its process")
        job = self.store.claim(self.slot, self.worker_id, self.host)
        if job is None:
            self.stop.wait(self.settings.poll_interval_s)
            return
        self._run_job(job)

    def _run_job(self, job: Job) -> None:
        log.info("slot %s: running %s (attempt %s of %s)", self.slot, job.id, job.attempts, job.max_attempts)
        events_path = job.job_dir / "events.jsonl"
        log_path = job.job_dir / "log.txt"
        try:
            with open(log_path, "ab") as log_file:
                banner = f"\n=== attempt {job.attempts} of {job.max_attempts}, worker {self.worker_id}, {time.ctime()} ===\n"
                log_file.write(banner.encode())
                log_file.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tinyllama_mcp.pipeline", "run", str(job.job_dir)],
                    cwd=job.job_dir, env=job_environment(self.settings, self.gpu),
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True, preexec_fn=_die_with_parent(os.getpid()),
                )
        except OSError as exc:  # the job folder vanished, the disk is full, ...: this job fails, the worker goes on
            self.store.finish(job.id, self.worker_id, "failed", f"could not start the job process: {exc}")
            return
        try:
            self.store.set_pid(job.id, self.worker_id, proc.pid)
            returncode, ending, progress = self._watch(job, proc, events_path)
        except Exception as exc:
            # Never leave a job process running unwatched: stop it and give the job back to the queue.
            _stop_group(proc, grace_s=0.0)
            try:
                self.store.retry_or_fail(job.id, self.worker_id, f"the worker failed while watching it ({exc})")
            except Exception:
                log.exception("could not requeue %s now; the worker's next round does", job.id)
            raise
        self._record_end(job, returncode, ending, progress, log_path)

    def _watch(self, job: Job, proc: subprocess.Popen, events_path: Path) -> tuple[int, Optional[str], dict]:
        """Fold events, heartbeat and obey cancel/shutdown until the job process exits."""
        progress: dict = {}
        offset = 0
        ending: Optional[str] = None  # why we stopped the process ourselves: cancel, shutdown, lost
        last_beat = time.monotonic()
        while True:
            returncode = proc.poll()
            events, offset = read_new_events(events_path, offset)
            for event in events:
                fold(progress, event)
            if events and not self.store.update_progress(job.id, self.worker_id, progress):
                ending = ending or "lost"
            if returncode is not None:
                break
            if ending is None:
                if time.monotonic() - last_beat >= self.ttl / 3:
                    last_beat = time.monotonic()
                    if not self.store.renew_lease(self.slot, self.worker_id, self.ttl):
                        ending = "lost"
                current = self.store.get(job.id)
                if current is None or current.cancel_requested:
                    ending = ending or "cancel"
                elif self.stop.is_set():
                    ending = "shutdown"
                if ending is not None:
                    log.info("stopping job %s (%s)", job.id, ending)
                    _stop_group(proc, grace_s=0.0 if ending == "lost" else STOP_GRACE_S)
                    continue
            time.sleep(self.settings.poll_interval_s)
        return returncode, ending, progress

    def _record_end(self, job: Job, returncode: int, ending: Optional[str], progress: dict, log_path: Path) -> None:
        if ending == "lost":
            # We stalled past our lease and another worker has taken over the slot and this job.
            log.warning("lost the lease while running %s; leaving it to the worker that took over", job.id)
            return
        if returncode == 0:  # finished, even if a cancel or shutdown arrived at the last moment
            expected = job.job_dir / STAGE_OUTPUT[job.stage]
            if expected.is_dir():
                self.store.finish(job.id, self.worker_id, "succeeded")
            else:
                self.store.finish(
                    job.id, self.worker_id, "failed", f"the pipeline exited successfully but wrote no {expected.name}/ folder"
                )
            return
        if ending == "cancel":
            self.store.finish(job.id, self.worker_id, "cancelled", "cancelled while running")
            return
        if returncode < 0:
            # Killed by a signal: the log's last line is whatever the process was printing at that
            # moment (a progress dict, a warning), not the reason; the signal is.
            reason = progress.get("error") or _describe_exit(returncode)
        else:
            reason = progress.get("error") or next(iter(log_tail(log_path, 1)), "") or _describe_exit(returncode)
        if returncode > 0 and reason != _describe_exit(returncode):
            reason = f"{reason} (exit status {returncode})"
        if ending == "shutdown":
            state = self.store.retry_or_fail(job.id, self.worker_id, "the worker shut down", count_attempt=False)
            log.info("job %s interrupted by shutdown; now %s", job.id, state)
        elif returncode == 2:
            # The spec or the data is wrong: retrying cannot help (docs/PIPELINE_CLI.md).
            self.store.finish(job.id, self.worker_id, "failed", progress.get("error") or reason)
        else:
            state = self.store.retry_or_fail(job.id, self.worker_id, reason)
            log.warning("job %s attempt %s failed (%s); now %s", job.id, job.attempts, reason, state)


class WorkerPool:
    """One worker thread per slot, inside a server process or `tinyllama-mcp worker`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.devices = slot_devices(settings)
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for slot, gpu in enumerate(self.devices):
            worker = Worker(self.settings, slot, gpu, self.stop_event)
            thread = threading.Thread(target=worker.run, name=f"tinyllama-worker-{slot}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout_s: float = STOP_GRACE_S + 10) -> None:
        """Stop the workers: running jobs are stopped and queued again, to resume later."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def wait(self) -> None:
        for thread in self.threads:
            while thread.is_alive():
                thread.join(0.5)
