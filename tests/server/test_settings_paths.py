"""Settings from the environment, and which paths a caller may name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.server.paths import dataset_source, resolve_local
from tinyllama_mcp.sources import is_hub_id, looks_local
from tinyllama_mcp.server.settings import Settings, load_settings


def test_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYLLAMA_MCP_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("TINYLLAMA_MCP_DATA_ROOTS", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    monkeypatch.setenv("HF_GENERATE_KWARGS", '{"max_new_tokens": 64, "temperature": 0.0}')
    monkeypatch.setenv("HF_LOCAL_MODEL_PATH", "/models/x")
    monkeypatch.setenv("PREFER_LLM_PROVIDER", "huggingface")
    monkeypatch.setenv("TINYLLAMA_MCP_TOKEN", "s3cret")
    monkeypatch.setenv("TINYLLAMA_MCP_MAX_NEW_TOKENS", "99")
    monkeypatch.setenv("TINYLLAMA_MCP_ALLOWED_HOSTS", "gpu-box, gpu-box.lan")
    s = Settings()
    assert s.home == tmp_path / "h"
    assert s.data_roots == [tmp_path / "a", tmp_path / "b"]
    assert s.hf_generate_kwargs == {"max_new_tokens": 64, "temperature": 0.0}
    assert s.hf_local_model_path == "/models/x"
    assert s.prefer_llm_provider == "huggingface"
    assert s.token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    assert s.max_new_tokens == 99
    assert s.allowed_hosts == ["gpu-box", "gpu-box.lan"]
    assert s.data_root_paths()[:2] == [(tmp_path / "h" / "data").resolve(), Path.cwd().resolve()]


def test_default_home_is_the_user_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings().home == tmp_path / "tinyllama-mcp"


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("HF_GENERATE_KWARGS", '{"temperature": -1}', "HF_GENERATE_KWARGS is not valid generation settings (temperature"),
        ("HF_GENERATE_KWARGS", '{"max_new_token": 5}', "max_new_token: unknown argument"),
        ("TINYLLAMA_MCP_MAX_QUEUED_JOBS", "0", "max_queued_jobs: Input should be greater than or equal to 1"),
        ("TINYLLAMA_MCP_WORKER_SLOTS", "many", "worker_slots: Input should be a valid integer"),
    ],
)
def test_bad_configuration_is_one_readable_line(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        load_settings()
    message = str(exc.value)
    assert message.startswith("tinyllama-mcp: invalid configuration: ")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["TinyLlama/TinyLlama-1.1B-Chat-v1.0", "gpt2", "argilla/distilabel-intel-orca-dpo-pairs"])
def test_hub_ids(name):
    assert is_hub_id(name) and not looks_local(name)


@pytest.mark.parametrize("text", ["/etc/passwd", "./data.jsonl", "../x", "~/data", "data/train.jsonl", "a/b/c", "x.parquet", "dir\\f"])
def test_path_like_arguments_are_local(text):
    assert looks_local(text)


def test_resolve_local_accepts_files_inside_a_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "d.jsonl").write_text("{}\n")
    assert resolve_local(str(root / "sub" / "d.jsonl"), [root], "dataset") == root / "sub" / "d.jsonl"


def test_resolve_local_refuses_outside_dotdot_symlinks_and_nul(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.jsonl"
    secret.write_text("{}\n")
    (root / "link.jsonl").symlink_to(secret)
    (root / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    cases = {
        str(secret): "outside the allowed folders",
        str(root / ".." / "secret.jsonl"): "contains '..'",
        str(root / "link.jsonl"): "symlink that points outside",
        str(root / "linkdir" / "secret.jsonl"): "symlink that points outside",
        str(root / "a\x00b"): "NUL character",
        "/etc/passwd": "outside the allowed folders",
    }
    for text, reason in cases.items():
        with pytest.raises(UserError) as exc:
            resolve_local(text, [root], "dataset")
        assert reason in str(exc.value), text
        assert "TINYLLAMA_MCP_DATA_ROOTS" in str(exc.value) or reason in ("contains '..'", "NUL character")


def test_dataset_source_keeps_hub_names_and_checks_files(tmp_path):
    assert dataset_source("HuggingFaceH4/ultrachat_200k", [tmp_path]) == "HuggingFaceH4/ultrachat_200k"
    with pytest.raises(UserError, match="does not exist or is not a file"):
        dataset_source(str(tmp_path / "missing.jsonl"), [tmp_path])
