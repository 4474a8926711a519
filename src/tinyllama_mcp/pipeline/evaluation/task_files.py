"""Local lm-evaluation-harness task folders: read, checked and copied with their data paths made absolute.

Torch-free: the server checks a folder before queueing an evaluate job, the job checks it again and copies it.
Task files are data here, never code: `!function` tags (Python from the folder) are refused, every dataset is a
local file of a builtin builder (json, csv, parquet, text, arrow) inside the folder, and includes stay inside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from tinyllama_mcp.errors import UserError

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
MAX_TASK_FILES = 500


def _load(path: Path, folder: Path) -> dict[str, Any]:
    text = path.read_text("utf-8", errors="replace")
    where = path.relative_to(folder)
    try:
        config = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        tag = "!function" if "!function" in text else str(exc.problem)
        raise UserError(
            f"task file {where} uses {tag} (Python code from the task folder); this server runs no code from task "
            "files: express the task with Jinja templates and local data files only"
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"task file {where} is not valid YAML ({exc}); fix the file") from None
    if not isinstance(config, dict):
        raise UserError(f"task file {where} must hold a YAML mapping (task: ..., dataset_path: ...)")
    return config


def _inside(folder: Path, base: Path, value: Any, what: str, where: Path) -> Path:
    """`value` (a path relative to `base`) resolved, refused unless it is an existing file inside `folder`."""
    if not isinstance(value, str) or not value:
        raise UserError(f"task file {where}: {what} must be a file name, not {value!r}")
    raw = Path(value)
    if raw.is_absolute() or ".." in raw.parts:
        raise UserError(f"task file {where}: {what} {value!r} must be a path relative to the task file, without '..'")
    target = (base / raw).resolve()
    if not target.is_relative_to(folder):
        raise UserError(f"task file {where}: {what} {value!r} points outside the task folder (a symlink?)")
    if not target.is_file():
        raise UserError(f"task file {where}: {what} {value!r} does not exist beside it; add the file")
    return target


def _data_files(config: dict[str, Any]) -> list[tuple[Any, Any, Any]]:
    """(container, key, value) of every data file a config names, so they can be checked and rewritten."""
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return []
    files = kwargs["data_files"]
    if isinstance(files, str):
        return [(kwargs, "data_files", files)]
    holders = files.items() if isinstance(files, dict) else enumerate(files) if isinstance(files, list) else []
    found = []
    for key, value in holders:
        if isinstance(value, list):
            found.extend((value, i, item) for i, item in enumerate(value))
        else:
            found.append((files, key, value))
    return found


def _check(path: Path, config: dict[str, Any], folder: Path) -> list[Path]:
    """The files this config reads (data and includes), after checking each one."""
    where = path.relative_to(folder)
    used = []
    source = config.get("dataset_path")
    if source is not None and source not in LOCAL_BUILDERS:
        raise UserError(
            f"task file {where}: dataset_path {source!r} is not local; tasks run offline from files beside them: use "
            f"dataset_path {' / '.join(LOCAL_BUILDERS)} with dataset_kwargs.data_files"
        )
    if source is not None and not _data_files(config):
        raise UserError(f"task file {where}: dataset_path {source!r} needs dataset_kwargs.data_files (local files)")
    for _, _, value in _data_files(config):
        used.append(_inside(folder, path.parent, value, "data file", where))
    includes = config.get("include") or []
    for include in includes if isinstance(includes, list) else [includes]:
        used.append(_inside(folder, path.parent, include, "include", where))
    return used


def read_task_dir(folder: Path) -> dict[Path, dict[str, Any]]:
    """Every task file under `folder` (checked), by path."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise UserError(f"lm_eval_task_dir {folder} is not a folder; pass the folder holding the task .yaml files")
    paths = sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if not paths:
        raise UserError(f"lm_eval_task_dir {folder} holds no .yaml task files")
    if len(paths) > MAX_TASK_FILES:
        raise UserError(f"lm_eval_task_dir {folder} holds {len(paths)} task files (limit {MAX_TASK_FILES}); "
                        "pass a folder with only the tasks to run")
    return {path: _load(path, folder) for path in paths}


def task_names(configs: dict[Path, dict[str, Any]]) -> set[str]:
    """Names a caller may run: each file's task or group, and its tags (a tag runs every task carrying it)."""
    names: set[str] = set()
    for config in configs.values():
        names.update(config[key] for key in ("task", "group") if isinstance(config.get(key), str))
        tags = config.get("tag")
        tags = [tags] if isinstance(tags, str) else tags if isinstance(tags, list) else []
        names.update(t for t in tags if isinstance(t, str))
    return names


def check_task_dir(folder: Path, tasks: list[str]) -> str:
    """Check the folder and that it defines `tasks`; returns the sha256 of its task files and their data."""
    folder = folder.resolve()
    configs = read_task_dir(folder)
    missing = sorted(set(tasks) - task_names(configs))
    if missing:
        raise UserError(f"lm_eval_task_dir {folder} defines no task {missing}; it defines {sorted(task_names(configs))}")
    digest = hashlib.sha256()
    used = set(configs)
    for path, config in configs.items():
        used.update(_check(path, config, folder))
    for path in sorted(used):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def copy_task_dir(folder: Path, dest: Path) -> None:
    """The task files of `folder` under `dest`, same layout, data file paths absolute (lm-eval resolves relative
    ones against the working directory, not the task file)."""
    folder = folder.resolve()
    for path, config in read_task_dir(folder).items():
        for holder, key, value in _data_files(config):
            holder[key] = str(_inside(folder, path.parent, value, "data file", path.relative_to(folder)))
        target = dest / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), "utf-8")
