"""lm-evaluation-harness tasks from a local task folder, run in process on the loaded model through lm-eval's HFLM.

The folder is checked and copied first (task_files: no code, local data only); its templates render in Jinja's
sandbox, because lm-eval's own environment lets a template reach Python.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.evaluation.task_files import check_task_dir, copy_task_dir


def checked_digest(spec) -> str:
    """The task folder checked against the digest the server saw when it queued the job."""
    from importlib.util import find_spec

    if find_spec("lm_eval") is None:
        raise UserError("lm_eval_tasks need lm-evaluation-harness: pip install lm-eval (or tinyllama-mcp[eval])")
    digest = check_task_dir(Path(spec.lm_eval_task_dir), spec.lm_eval_tasks)
    if spec.lm_eval_sha256 and digest != spec.lm_eval_sha256:
        raise UserError(f"the task files in {spec.lm_eval_task_dir} changed since the job was queued; restore them or "
                        "start a new evaluation")
    return digest


@contextmanager
def sandboxed_templates() -> Iterator[None]:
    """lm-eval renders every task template with one module-level Jinja environment; for this run it is Jinja's
    immutable sandbox with the same filters, so `{{ x.__init__.__globals__ }}` and the like raise SecurityError."""
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval import utils

    plain = utils.env
    sandbox = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    sandbox.filters.update(plain.filters)
    utils.env = sandbox
    try:
        yield
    finally:
        utils.env = plain


def _numbers(results: dict[str, Any]) -> dict[str, float]:
    """A task's "metric,filter" values, without its name, alias, sample count and the stderr placeholders of
    bootstrap_iters=0."""
    return {key: float(value) for key, value in results.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)}


def run_tasks(model, tokenizer, spec, work: Path) -> tuple[dict[str, dict[str, float]], int]:
    """({task: {"metric,filter": value}}, documents scored) for spec.lm_eval_tasks, zero-shot unless a task file
    says otherwise."""
    import lm_eval
    from jinja2.exceptions import SecurityError
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    copy_task_dir(Path(spec.lm_eval_task_dir), work)
    manager = TaskManager(include_path=str(work), include_defaults=False)  # only the folder's tasks, no hub ones
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    try:
        with sandboxed_templates():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(spec.lm_eval_tasks), task_manager=manager, limit=spec.lm_eval_limit,
                bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                fewshot_random_seed=0,
            )
    except SecurityError as exc:
        raise UserError(f"a task template in {spec.lm_eval_task_dir} reaches for Python internals ({exc}); task "
                        "templates may only read the document's fields") from None
    documents = sum(int(n.get("effective", 0)) for n in (out.get("n-samples") or {}).values())
    return {task: _numbers(values) for task, values in out["results"].items()}, documents
