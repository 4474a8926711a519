"""The wait tool: a job's status once it has ended or after timeout_s, its progress sent meanwhile.

It wakes when the runtime's job watcher publishes a change of the job (runtime.bus, fed by the store's change
counter, whichever process made the change), never in a tight poll; store reads run in a worker thread.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

import anyio
import anyio.to_thread
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus
from pydantic import Field

from tinyllama_mcp.server import tools as logic
from tinyllama_mcp.server.models import JOB_ID_FIELD, JobView, StatusInput, StatusOutput, ToolInput
from tinyllama_mcp.server.services import Services
from tinyllama_mcp.server.store import FINAL_STATES

MAX_WAIT_S = 600
RECHECK_S = 5.0  # read the job again at least this often, should a change notification go missing

DESCRIPTION = (
    "Wait until a job has ended (succeeded, failed or cancelled) or timeout_s seconds have passed, whichever comes "
    "first, and return its status (what status(job_id) returns) with timed_out. Meanwhile a call that carries a "
    "progress token receives the job's progress as MCP progress notifications (progress = step, total = steps, "
    "message with the loss, DPO's reward accuracy and the validation figures). Use it instead of calling status in "
    "a loop; on timed_out, call wait again."
)

ReportProgress = Callable[[float, Optional[float], Optional[str]], Awaitable[None]]


class WaitInput(ToolInput):
    job_id: str = Field(..., **JOB_ID_FIELD, description="The job to wait for.")
    timeout_s: float = Field(
        60, gt=0, le=MAX_WAIT_S,
        description="Return after this many seconds even if the job is still queued or running (at most 600; keep "
        "it under your MCP client's request timeout).",
    )
    log_lines: int = Field(20, ge=0, le=200, description="How many last lines of the job's log to include.")


class WaitOutput(StatusOutput):
    timed_out: bool = Field(description="True: the job had not ended when timeout_s passed (hint says what next).")
    waited_s: float = Field(description="Seconds this call waited.")


def progress_message(job: JobView) -> str:
    """One line for a progress notification: state, step, loss, DPO's reward accuracy, validation figures."""
    parts = [f"{job.job_id} {job.state}"]
    p, m = job.progress, job.metrics
    if p is not None and p.step is not None:
        parts.append(f"step {p.step}/{p.total}" + (f" ({p.percent}%)" if p.percent is not None else ""))
    if m is not None:
        for name in ("loss", "reward_accuracy", "valid_loss", "valid_reward_accuracy"):
            value = getattr(m, name)
            if value is not None:
                parts.append(f"{name} {value:.4g}")
    return ", ".join(parts)


def _timed_out_hint(job: JobView, hint: str, timeout_s: float) -> str:
    again = (f"The job is still {job.state} after {timeout_s:g} s: call wait(job_id='{job.job_id}') again to keep "
             f"waiting, or cancel(job_id='{job.job_id}') to stop it.")
    return f"{again} {hint}" if hint else again


async def wait(svc: Services, bus: SubscriptionBus, args: WaitInput,
               report_progress: Optional[ReportProgress] = None) -> WaitOutput:
    """The job's status view when it ends or after args.timeout_s; progress reported as its step grows."""
    uri = f"jobs://{args.job_id}"
    changed = [anyio.Event()]  # the event of the current wait, replaced before each read

    def on_event(event) -> None:
        if isinstance(event, ResourceUpdated) and str(event.uri) == uri:
            changed[0].set()

    query = StatusInput(job_id=args.job_id, log_lines=args.log_lines)
    start = anyio.current_time()
    reported = -1
    unsubscribe = bus.subscribe(on_event)
    try:
        while True:
            changed[0] = anyio.Event()  # a change after this line wakes the next wait
            out = await anyio.to_thread.run_sync(logic.status, svc, query)  # unknown job: UserError
            job = out.job
            assert job is not None
            step = job.progress.step if job.progress is not None and job.progress.step is not None else None
            if report_progress is not None and step is not None and step > reported:  # MCP: progress only grows
                reported = step
                await report_progress(step, job.progress.total, progress_message(job))
            waited = anyio.current_time() - start
            if job.state in FINAL_STATES or waited >= args.timeout_s:
                timed_out = job.state not in FINAL_STATES
                hint = _timed_out_hint(job, out.hint, args.timeout_s) if timed_out else out.hint
                return WaitOutput(**{**dict(out), "hint": hint}, timed_out=timed_out, waited_s=round(waited, 3))
            with anyio.move_on_after(min(args.timeout_s - waited, RECHECK_S)):
                await changed[0].wait()
    finally:
        unsubscribe()
