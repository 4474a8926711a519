"""The export stage end to end on tiny-demo, then verify_export on the finished folder: it passes as written, and a
corrupted tensor byte region, a truncated file, a changed Modelfile template or a damaged checkpoint each fail it
with an error naming the file and what was wrong."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from tinyllama_mcp.errors import SelfCheckError, UserError
from tinyllama_mcp.pipeline.events import EventLog, read_events
from tinyllama_mcp.pipeline.export.run import run_export
from tinyllama_mcp.pipeline.export.verify import verify_export
from tinyllama_mcp.pipeline.specs import ExportSpec

FORMATS = ["gguf-f16", "gguf-q8_0", "ollama", "safetensors"]


@pytest.fixture(scope="module")
def exported(tiny_demo, tmp_path_factory):
    job = tmp_path_factory.mktemp("export-job")
    spec = ExportSpec(base_model="tiny-demo", model="tiny-demo", model_label="tiny-demo", formats=FORMATS)
    log = EventLog(job / "events.jsonl")
    summary = run_export(spec, job, log)
    log.close()
    return job, summary


@pytest.fixture
def copy(exported, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(exported[0] / "export", folder)
    return folder


def test_export_job_writes_verified_files_and_manifest(exported):
    job, summary = exported
    manifest = json.loads((job / "export" / "manifest.json").read_text())
    assert manifest["model"] == "tiny-demo" and manifest["kind"] == "model"
    assert [f["format"] for f in manifest["files"]] == ["gguf-f16", "gguf-q8_0", "ollama", "safetensors"]
    for f in manifest["files"]:
        assert (job / "export" / f["path"]).exists() and len(f["sha256"]) == 64 and f["bytes"] > 0
        v = f["verification"]
        assert v["passed"] and v["method"]
        if f["format"] != "ollama":
            assert 0 <= v["max_abs_logit_diff"] <= v["bound"]
    assert manifest["files"][2]["from"] == "model-f16.gguf"
    assert {p["path"] for p in manifest["files"][3]["parts"]} >= {"safetensors/model.safetensors",
                                                                  "safetensors/tokenizer.json"}
    assert [row["format"] for row in summary["files"]] == FORMATS and not (job / ".export.tmp").exists()
    steps = [e for e in read_events(job / "events.jsonl") if e["event"] == "step"]
    assert [e["format"] for e in steps] == FORMATS and steps[-1]["step"] == steps[-1]["total"] == 4


def test_verify_export_passes_on_the_files_as_written(exported):
    results = verify_export(exported[0] / "export")
    assert set(results) == {"model-f16.gguf", "model-q8_0.gguf", "Modelfile", "safetensors"}
    assert all(r["passed"] for r in results.values())


def _overwrite_tensor(path, name: str, size: int) -> None:
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    with open(path, "r+b") as handle:
        handle.seek(tensor.data_offset + 16)
        handle.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("file", ["model-f16.gguf", "model-q8_0.gguf"])
def test_a_corrupted_tensor_fails_verification(copy, file):
    _overwrite_tensor(copy / file, "blk.0.attn_q.weight", 64)
    with pytest.raises(SelfCheckError, match=rf"export check failed for {file}: tensor blk\.0\.attn_q\.weight differs "
                                             r"from the source .* over the bound"):
        verify_export(copy)


def test_a_truncated_file_fails_verification(copy):
    path = copy / "model-f16.gguf"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SelfCheckError, match="model-f16.gguf is (truncated|not a readable GGUF file)"):
        verify_export(copy)


def test_a_changed_modelfile_template_fails_verification(copy):
    path = copy / "Modelfile"
    path.write_text(path.read_text().replace("{{ .Content }}</s>", "{{ .Content }}"))
    with pytest.raises(SelfCheckError, match="Modelfile: its TEMPLATE renders"):
        verify_export(copy)


def test_a_damaged_checkpoint_fails_verification(copy):
    weights = copy / "safetensors" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SelfCheckError, match="safetensors/: transformers cannot load it"):
        verify_export(copy)


def test_adapter_formats_of_a_whole_model_are_refused(tiny_demo, tmp_path):
    spec = ExportSpec(base_model="tiny-demo", model="tiny-demo", model_label="tiny-demo", formats=["peft"])
    with pytest.raises(UserError, match=r"\['peft'\] export a LoRA adapter, and tiny-demo is a whole model"):
        run_export(spec, tmp_path, EventLog(tmp_path / "events.jsonl"))
