"""The CLI's failure contract: exit 2 for a wrong spec or wrong data, an `error` event, and the same
one-line reason as the last line on stderr (docs/PIPELINE_CLI.md). The data errors are the ones of
test_pipeline_data.py, for SFT and both DPO layouts, through `python -m tinyllama_mcp.pipeline run`.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tinyllama_mcp.pipeline import data
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.specs import DatasetSpec, DPOSpec, MergeSpec, SFTSpec

from pipeline_testlib import run_cli, write_spec

SFT_ROW = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
ORCA_ROW = {"system": "", "input": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
PAIRS_ROW = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(path: Path, rows) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


# case id -> (stage, file name, file content (bytes, or a function writing the file), expected words)
DATA_CASES = {
    "sft-missing-columns": ("sft", "d.jsonl", jsonl([SFT_ROW, {"text": "x"}]), "missing column 'messages'"),
    "sft-empty-file": ("sft", "d.jsonl", b"", "has no rows"),
    "sft-roles-out-of-order-parquet": (
        "sft", "d.parquet",
        lambda p: parquet(p, [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}]),
        "roles out of order",
    ),
    "sft-invalid-utf8": ("sft", "d.jsonl", jsonl([SFT_ROW]) + b'{"messages": "\xff"}\n', "not valid UTF-8"),
    "sft-invalid-json-line": ("sft", "d.jsonl", jsonl([SFT_ROW]) + b'{"messages": [\n', "line 2 is not valid JSON"),
    "sft-hub-offline": ("sft", None, None, "cannot be reached (offline)"),
    "dpo-orca-missing-columns-json": (
        "dpo", "d.json", json.dumps([{k: v for k, v in ORCA_ROW.items() if k != "rejected"}]).encode(),
        "missing column(s) ['rejected']",
    ),
    "dpo-pairs-roles-out-of-order": (
        "dpo", "d.jsonl",
        jsonl([{"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "x", "rejected": "y"}]),
        "roles out of order",
    ),
}
HUB = {"sft": "HuggingFaceH4/ultrachat_200k", "dpo": "argilla/distilabel-intel-orca-dpo-pairs"}


def data_case_spec(case: str, folder: Path):
    stage, name, content, _ = DATA_CASES[case]
    if name is None:
        source = HUB[stage]
    else:
        path = folder / name
        content(path) if callable(content) else path.write_bytes(content)
        source = str(path)
    spec_type = SFTSpec if stage == "sft" else DPOSpec
    return spec_type(base_model="tiny-demo", dataset=DatasetSpec(source=source))


def corrupt_adapter(folder: Path) -> Path:
    """An adapter folder whose weights file is garbage: loading it fails with a library exception."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
    }))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    (folder / "stack.json").write_text(json.dumps({
        "base_model": "tiny-demo", "quant": {"quantization": "none"}, "adapters": [str(folder.resolve())],
    }))
    return folder


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, env, tiny_demo):
    """All cases through the CLI, two at a time; -> {case: (JobRun, expected in-process message or None)}."""
    root = tmp_path_factory.mktemp("cli-errors")
    jobs = {}
    for case in DATA_CASES:
        folder = root / case
        (root / f"{case}-data").mkdir()
        spec = data_case_spec(case, root / f"{case}-data")
        try:
            data.load(spec.dataset, spec.stage)
            raise AssertionError(f"{case}: the data was accepted in-process")
        except UserError as exc:
            expected = str(exc)
        jobs[case] = (write_spec(folder, spec), expected)

    good_data = root / "good.jsonl"
    good_data.write_bytes(jsonl([SFT_ROW]))
    folder = root / "invalid-spec-field"
    folder.mkdir()
    (folder / "spec.json").write_text(json.dumps({"stage": "sft", "lora": {"r": 0}}))
    jobs["invalid-spec-field"] = (folder, None)
    folder = root / "unknown-spec-field"
    folder.mkdir()
    (folder / "spec.json").write_text(json.dumps({"stage": "dpo", "betta": 0.2}))
    jobs["unknown-spec-field"] = (folder, None)
    folder = root / "missing-spec"
    folder.mkdir()
    jobs["missing-spec"] = (folder, None)
    jobs["model-folder-missing"] = (
        write_spec(root / "model-folder-missing",
                   SFTSpec(base_model=str(root / "no-such-model"), dataset=DatasetSpec(source=str(good_data)))),
        None,
    )
    jobs["merge-not-an-adapter"] = (
        write_spec(root / "merge-not-an-adapter", MergeSpec(base_model="tiny-demo", sft_adapter=str(root))), None
    )

    jobs["merge-corrupt-adapter"] = (
        write_spec(root / "merge-corrupt-adapter",
                   MergeSpec(base_model="tiny-demo", sft_adapter=str(corrupt_adapter(root / "corrupt-adapter")))),
        None,
    )

    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(jobs, pool.map(lambda folder: run_cli(folder, env, timeout=300), [j[0] for j in jobs.values()])))
    return {case: (runs[case], jobs[case][1]) for case in jobs}


def check_failed_cleanly(run, code: int = 2) -> str:
    assert run.returncode == code, run.stderr[-3000:]
    events = run.events
    assert [e["event"] for e in events] == ["error"], events  # nothing started, nothing half-written
    error = events[0]
    assert error["exit_code"] == code and isinstance(error["time"], float)
    message = error["message"]
    assert message and "\n" not in message and "Traceback" not in run.stderr
    assert run.last_stderr_line == message
    assert not (run.job_dir / "checkpoints").exists() and not (run.job_dir / "adapter").exists()
    return message


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_error_through_the_cli(cli_runs, case):
    run, expected = cli_runs[case]
    message = check_failed_cleanly(run)
    assert message == expected  # the same message as pipeline.data.load gives in-process
    assert DATA_CASES[case][3] in message


def test_invalid_spec_value(cli_runs):
    message = check_failed_cleanly(cli_runs["invalid-spec-field"][0])
    assert message.startswith("invalid spec.json: sft.lora.r:") and "greater than or equal to 1" in message


def test_unknown_spec_field(cli_runs):
    message = check_failed_cleanly(cli_runs["unknown-spec-field"][0])
    assert message.startswith("invalid spec.json: dpo.betta:") and "Extra inputs are not permitted" in message


def test_missing_spec(cli_runs):
    message = check_failed_cleanly(cli_runs["missing-spec"][0])
    assert "spec.json does not exist" in message


def test_missing_model_folder(cli_runs):
    message = check_failed_cleanly(cli_runs["model-folder-missing"][0])
    assert "no-such-model does not exist" in message


def test_merge_of_something_that_is_no_adapter(cli_runs):
    message = check_failed_cleanly(cli_runs["merge-not-an-adapter"][0])
    assert "is not an adapter folder made by this tool" in message


def test_anything_else_is_exit_1_with_the_traceback_kept(cli_runs):
    """Not the user's fault (here a library cannot read a weights file): exit 1, the worker may retry;
    the traceback stays in the log, and the last line is still the one-line reason."""
    run = cli_runs["merge-corrupt-adapter"][0]
    assert run.returncode == 1
    error = run.one("error")
    assert error["exit_code"] == 1 and "\n" not in error["message"]
    assert run.last_stderr_line == error["message"]
    assert "Traceback (most recent call last)" in run.stderr
    assert not (run.job_dir / "merged").exists()


def test_missing_job_folder(tmp_path, env):
    run = run_cli(tmp_path / "no-such-job", env, timeout=120)
    assert run.returncode == 2
    assert run.last_stderr_line == f"job folder {tmp_path / 'no-such-job'} does not exist"
