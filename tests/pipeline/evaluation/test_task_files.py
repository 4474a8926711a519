"""Local lm-eval task folders are data, never code: what check_task_dir accepts, refuses, and how its digest
follows the files (torch-free, as the server runs it before queueing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.evaluation.task_files import check_task_dir, copy_task_dir

TASK = ("task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\n")


def folder_with(tmp_path: Path, text: str) -> Path:
    """tasks/sub/task.yaml holding `text` ({name} and {data} filled in), with sub/rows.jsonl beside it."""
    folder = tmp_path / "tasks"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "sub" / "rows.jsonl").write_text('{"q": "2 + 2 =", "a": "4"}\n')
    (folder / "sub" / "task.yaml").write_text(text.replace("{name}", "mine").replace("{data}", "rows.jsonl"))
    return folder


def test_a_local_task_is_accepted_and_copied_with_absolute_data_paths(tmp_path):
    folder = folder_with(tmp_path, TASK)
    digest = check_task_dir(folder, ["mine"])
    copy_task_dir(folder, tmp_path / "copy")
    copied = yaml.safe_load((tmp_path / "copy" / "sub" / "task.yaml").read_text())
    assert copied["dataset_kwargs"]["data_files"]["test"] == str((folder / "sub" / "rows.jsonl").resolve())
    (folder / "sub" / "rows.jsonl").write_text('{"q": "1 + 1 =", "a": "3"}\n')  # the data changed: so does the digest
    assert check_task_dir(folder, ["mine"]) != digest


@pytest.mark.parametrize("text, message", [
    (TASK + "process_docs: !function utils.process\n", "runs no code from task files"),
    (TASK.replace("dataset_path: json", "dataset_path: cais/mmlu"), "is not local"),
    ("task: mine\ndataset_path: json\n", "needs dataset_kwargs.data_files"),
    (TASK.replace("{data}", "/etc/hostname"), "relative to the task file"),
    (TASK.replace("{data}", "../../outside.jsonl"), "without '..'"),
    (TASK.replace("{data}", "missing.jsonl"), "does not exist"),
    ("include: ../../elsewhere.yaml\ntask: mine\n", "without '..'"),
    ("- not a mapping\n", "must hold a YAML mapping"),
])
def test_task_files_that_reach_outside_or_run_code_are_refused(tmp_path, text, message):
    (tmp_path / "outside.jsonl").write_text("{}\n")
    folder = folder_with(tmp_path, text)
    with pytest.raises(UserError, match=message):
        check_task_dir(folder, ["mine"])


def test_a_symlink_out_of_the_folder_and_unknown_tasks_are_refused(tmp_path):
    (tmp_path / "secret.jsonl").write_text("{}\n")
    folder = folder_with(tmp_path, TASK.replace("{data}", "link.jsonl"))
    (folder / "sub" / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    with pytest.raises(UserError, match="points outside the task folder"):
        check_task_dir(folder, ["mine"])
    folder = folder_with(tmp_path / "b", TASK)
    with pytest.raises(UserError, match=r"defines no task \['other'\]; it defines \['mine'\]"):
        check_task_dir(folder, ["other"])
