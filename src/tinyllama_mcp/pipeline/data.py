"""Training data: load rows from a local file or the hub, check them, and normalise them.

Light on purpose (no torch): the server calls `preflight` inside a tool call to refuse bad
data before a job is queued. Every problem becomes a one-line `UserError` naming the row
and what to fix.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.chat import render
from tinyllama_mcp.pipeline.messages import ROLES, check_messages, check_row_tools  # noqa: F401 (re-exported)
from tinyllama_mcp.pipeline.specs import DatasetSpec
from tinyllama_mcp.sources import hub_reachable, looks_local

Kind = Literal["sft", "dpo"]
MAX_ERRORS_SHOWN = 3


class TokenStats(BaseModel):
    """Token lengths of a dataset's rows (the longest rendered sequence of each row)."""

    min: int
    median: int
    max: int
    over_max_length: int = Field(description="Rows longer than max_length (they are truncated).")


class Preflight(BaseModel):
    """What checking a dataset before queueing found (start_sft/start_dpo return it)."""

    rows: int = Field(description="Rows the job will train on.")
    path: Optional[str] = None
    sha256: Optional[str] = Field(None, description="Hash of the local file, checked again before training.")
    layout: str = Field(description="Which column layout the rows were read as.")
    token_stats: Optional[TokenStats] = None
    warnings: list[str] = Field(default_factory=list)


class LoadedData(BaseModel):
    """Normalised rows plus where they came from (for lineage)."""

    rows: list[dict[str, Any]]
    source: str
    path: Optional[str] = None
    sha256: Optional[str] = None
    layout: str


# ---------------------------------------------------------------- reading


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path} is not valid UTF-8 (bad byte at offset {exc.start}, line {line}); re-save the file as UTF-8"
        ) from None


def _read_local(path: Path) -> list[Any]:
    if not path.exists():
        raise UserError(f"dataset file {path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"dataset path {path} is not a file; pass a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise UserError(f"{path} is not a readable parquet file ({exc}); re-export it") from None
    text = _decode_utf8(path)
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
        if not isinstance(data, list):
            raise UserError(f"{path} must hold a JSON array of row objects")
        return data
    raise UserError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json or .parquet")


def _read_hub(spec: DatasetSpec) -> list[Any]:
    if not hub_reachable():
        raise UserError(
            f"dataset '{spec.source}' is not a local file and the Hugging Face Hub cannot be reached (offline); "
            "download it where a network exists and pass a local .jsonl/.json/.parquet path"
        )
    import datasets

    try:
        return list(datasets.load_dataset(spec.source, split=spec.split))
    except Exception as exc:
        raise UserError(f"could not load hub dataset '{spec.source}' split '{spec.split}': {exc}") from None


def read_rows(spec: DatasetSpec) -> tuple[list[Any], Optional[Path]]:
    """Raw rows after shuffle and max_samples, plus the local path (None for hub datasets)."""
    path: Optional[Path] = None
    if looks_local(spec.source):
        path = Path(spec.source).expanduser().resolve()
        rows = _read_local(path)
    else:
        rows = _read_hub(spec)
    if not rows:
        raise UserError(f"dataset '{spec.source}' has no rows; add training examples")
    if spec.shuffle_seed is not None:
        import random

        random.Random(spec.shuffle_seed).shuffle(rows)
    if spec.max_samples is not None:
        rows = rows[: spec.max_samples]
    return rows, path


# ---------------------------------------------------------------- checking


def _completion_text(value: Any, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return str(value[-1].get("content", ""))
    raise ValueError(f"{where}: '{column}' must be a string (or a list ending with an assistant message)")


def _normalise_sft(row: Any, where: str) -> dict:
    """{'messages'} plus, for function-calling rows (OpenAI's fine-tuning format), 'tools' as a JSON string."""
    if not isinstance(row, dict) or "messages" not in row:
        raise ValueError(f"{where}: missing column 'messages' (SFT rows need a chat 'messages' list)")
    messages = check_messages(row["messages"], where, need_final_assistant=True)
    tools = check_row_tools(row, messages, where)
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def _normalise_dpo(row: Any, where: str) -> dict:
    """Return {'prompt_messages', 'chosen', 'rejected'} from either accepted layout."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be an object")
    missing = [c for c in ("chosen", "rejected") if c not in row]
    if "input" in row:  # distilabel Orca pairs: system, input, chosen, rejected
        system = row.get("system") or ""
        if not isinstance(system, str) or not isinstance(row["input"], str):
            raise ValueError(f"{where}: 'system' and 'input' must be strings")
        prompt = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": row["input"]}
        ]
    elif "prompt" in row:
        value = row["prompt"]
        if isinstance(value, str):
            prompt = [{"role": "user", "content": value}]
        else:
            prompt = check_messages(value, where, need_final_assistant=False)
            if prompt[-1]["role"] != "user":
                raise ValueError(f"{where}: a 'prompt' conversation must end with a user turn")
    else:
        missing.insert(0, "input (or prompt)")
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; DPO rows need system/input/chosen/rejected or prompt/chosen/rejected"
        )
    chosen = _completion_text(row["chosen"], where, "chosen")
    rejected = _completion_text(row["rejected"], where, "rejected")
    if not chosen.strip() or not rejected.strip():
        raise ValueError(f"{where}: 'chosen' and 'rejected' must not be empty")
    return {"prompt_messages": prompt, "chosen": chosen, "rejected": rejected}


def normalise(rows: list[Any], kind: Kind, source: str) -> list[dict]:
    fix = _normalise_sft if kind == "sft" else _normalise_dpo
    out, errors = [], []
    for number, row in enumerate(rows, start=1):
        try:
            out.append(fix(row, f"row {number}"))
        except ValueError as exc:
            errors.append(str(exc))
    if kind == "sft" and any("tools" in r for r in out):
        out = [{"messages": r["messages"], "tools": r.get("tools")} for r in out]  # one column set for datasets
    if errors:
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more bad rows)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise UserError(f"dataset '{source}': " + "; ".join(errors[:MAX_ERRORS_SHOWN]) + more)
    return out


def load(spec: DatasetSpec, kind: Kind) -> LoadedData:
    """Read, check and normalise a dataset; verifies spec.sha256 when given."""
    raw, path = read_rows(spec)
    digest = sha256_file(path) if path else None
    if spec.sha256 and digest != spec.sha256:
        raise UserError(
            f"dataset {path} changed since the job was queued (sha256 {digest[:12]}..., expected {spec.sha256[:12]}...); "
            "restore the file or start a new job"
        )
    rows = normalise(raw, kind, spec.source)
    layout = ("messages+tools" if any(r.get("tools") for r in rows) else "messages") if kind == "sft" else ("orca" if raw and isinstance(raw[0], dict) and "input" in raw[0] else "prompt")
    return LoadedData(rows=rows, source=spec.source, path=str(path) if path else None, sha256=digest, layout=layout)


# ---------------------------------------------------------------- lengths


def row_texts(row: dict, kind: Kind) -> list[str]:
    """The rendered text(s) whose token count must fit max_length."""
    if kind == "sft":
        tools = json.loads(row["tools"]) if row.get("tools") else None
        return [render(row["messages"], add_generation_prompt=False, tools=tools)]
    prompt = render(row["prompt_messages"], add_generation_prompt=True)
    return [prompt + row["chosen"] + "</s>", prompt + row["rejected"] + "</s>"]


def token_lengths(rows: list[dict], kind: Kind, encode) -> list[int]:
    """Longest rendered length per row, with `encode(list[str]) -> list[int]` giving token counts."""
    texts = [row_texts(r, kind) for r in rows]
    flat = encode([t for group in texts for t in group])
    lengths, i = [], 0
    for group in texts:
        lengths.append(max(flat[i : i + len(group)]))
        i += len(group)
    return lengths


def length_stats(lengths: list[int], max_length: int) -> TokenStats:
    return TokenStats(
        min=min(lengths),
        median=int(statistics.median(lengths)),
        max=max(lengths),
        over_max_length=sum(1 for n in lengths if n > max_length),
    )


def over_length_warning(stats: TokenStats, rows: int, max_length: int) -> Optional[str]:
    if not stats.over_max_length:
        return None
    return (
        f"{stats.over_max_length} of {rows} rows are longer than max_length {max_length} tokens "
        f"(longest {stats.max}) and will be truncated; raise max_length to keep them whole"
    )


def preflight(spec: DatasetSpec, kind: Kind, max_length: int, base_model: str) -> Preflight:
    """Check a dataset before queueing: readable, right columns, roles in order, token lengths."""
    from tinyllama_mcp.pipeline.tokenizer_light import light_token_counter

    data = load(spec, kind)
    warnings = []
    stats = None
    counter = light_token_counter(base_model)
    if counter is None:
        warnings.append(f"token lengths not checked: no local tokenizer for '{base_model}' yet")
    else:
        stats = length_stats(token_lengths(data.rows, kind, counter), max_length)
        warning = over_length_warning(stats, len(data.rows), max_length)
        if warning:
            warnings.append(warning)
    return Preflight(
        rows=len(data.rows), path=data.path, sha256=data.sha256, layout=data.layout, token_stats=stats, warnings=warnings
    )
