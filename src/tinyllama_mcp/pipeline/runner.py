"""`python -m tinyllama_mcp.pipeline run JOB_DIR`: read spec.json, run the stage, report through events.jsonl.

Exit 0 on success, 2 when the spec or data must change, 1 otherwise (maybe transient), 143
when stopped by SIGTERM. On failure the last stderr line is a one-line reason, also written
as the `error` event.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.events import EventLog

EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_TERMINATED = 0, 1, 2, 143


class Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Terminated()


def _quiet_libraries() -> None:
    """Progress bars and hub chatter would bloat log.txt; events.jsonl carries progress.

    Environment only, set before the libraries are imported (transformers takes its progress-bar
    setting from huggingface_hub's), so a job that fails on its spec or data imports none of them.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Tokenizing train dataset: ..." bars
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load_spec(job_dir: Path):
    from pydantic import ValidationError

    from tinyllama_mcp.pipeline.specs import parse_stage_spec

    path = job_dir / "spec.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist; write the stage spec there first")
    try:
        return parse_stage_spec(path.read_text("utf-8"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"invalid spec.json: {where}: {first['msg']} ({exc.error_count()} error(s))") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run(job_dir: Path) -> int:
    job_dir = job_dir.resolve()
    if not job_dir.is_dir():
        print(f"job folder {job_dir} does not exist", file=sys.stderr)
        return EXIT_USER
    log = EventLog(job_dir / "events.jsonl")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        spec = _load_spec(job_dir)
        _quiet_libraries()
        summary = _run_stage(spec, job_dir, log)
        log.emit("end", status="succeeded", summary=summary)
        return EXIT_OK
    except UserError as exc:
        return _fail(log, str(exc), EXIT_USER)
    except Terminated:
        return _fail(log, "stopped by SIGTERM (cancelled or shutting down); rerun to resume", EXIT_TERMINATED)
    except Exception as exc:  # anything else: keep the traceback in the log, one line for people
        traceback.print_exc()
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            message = "out of GPU memory; lower per_device_train_batch_size or max_length (raise gradient_accumulation_steps to keep the batch)"
            return _fail(log, message, EXIT_USER)
        return _fail(log, _one_line(exc), EXIT_FAILED)
    finally:
        log.close()


def _fail(log: EventLog, message: str, code: int) -> int:
    log.emit("error", message=message, exit_code=code)
    print(message, file=sys.stderr, flush=True)
    return code


def _run_stage(spec, job_dir: Path, log: EventLog) -> dict:
    if spec.stage == "sft":
        from tinyllama_mcp.pipeline.recipe.sft import run_sft

        return run_sft(spec, job_dir, log)
    if spec.stage == "dpo":
        from tinyllama_mcp.pipeline.recipe.dpo import run_dpo

        return run_dpo(spec, job_dir, log)
    if spec.stage == "evaluate":
        from tinyllama_mcp.pipeline.evaluation.run import run_evaluate

        return run_evaluate(spec, job_dir, log)
    if spec.stage == "export":
        from tinyllama_mcp.pipeline.export.run import run_export

        return run_export(spec, job_dir, log)
    from tinyllama_mcp.pipeline.recipe.merge import run_merge

    return run_merge(spec, job_dir, log)
