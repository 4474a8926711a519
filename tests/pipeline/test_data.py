"""Training data: every problem is one clear UserError line; long rows are counted, not hidden.

Each error is checked through `pipeline.data.load` and `preflight` here, and through the CLI in
test_pipeline_cli_errors.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tinyllama_mcp.pipeline import data
from tinyllama_mcp.errors import UserError
from tinyllama_mcp.sources import looks_local
from tinyllama_mcp.pipeline.events import EventLog, read_events
from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, DPO_SAMPLE_PAIRS, SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import DatasetSpec

SFT_ROW = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
ORCA_ROW = {"system": "", "input": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
PAIRS_ROW = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}


def write_rows(path: Path, rows: list) -> Path:
    """Rows as .jsonl, .json (an array) or .parquet, chosen by the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), "utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load_error(source: Path | str, kind: str) -> str:
    """The UserError message of load() and of preflight(); they must agree and be one line."""
    spec = DatasetSpec(source=str(source))
    with pytest.raises(UserError) as from_load:
        data.load(spec, kind)
    with pytest.raises(UserError) as from_preflight:
        data.preflight(spec, kind, max_length=128, base_model="tiny-demo")
    message = str(from_load.value)
    assert message == str(from_preflight.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------- good data


@pytest.mark.parametrize(
    "path, kind, layout",
    [(SFT_SAMPLE, "sft", "messages"), (DPO_SAMPLE, "dpo", "orca"), (DPO_SAMPLE_PAIRS, "dpo", "prompt")],
)
def test_bundled_samples_load_with_lineage_facts(path, kind, layout):
    loaded = data.load(DatasetSpec(source=str(path)), kind)
    assert loaded.layout == layout
    assert len(loaded.rows) == len(path.read_text("utf-8").splitlines()) == 32
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.path == str(path.resolve())


def test_both_dpo_layouts_normalise_to_the_same_rows():
    orca = data.load(DatasetSpec(source=str(DPO_SAMPLE)), "dpo").rows
    pairs = data.load(DatasetSpec(source=str(DPO_SAMPLE_PAIRS)), "dpo").rows
    # The pairs file is the orca file without system prompts.
    strip = [{**row, "prompt_messages": [m for m in row["prompt_messages"] if m["role"] != "system"]} for row in orca]
    assert strip == pairs
    assert any(m["role"] == "system" for row in orca for m in row["prompt_messages"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("kind, row", [("sft", SFT_ROW), ("dpo", ORCA_ROW), ("dpo", PAIRS_ROW)])
def test_every_format_loads(tmp_path, suffix, kind, row):
    path = write_rows(tmp_path / f"rows{suffix}", [row] * 3)
    loaded = data.load(DatasetSpec(source=str(path)), kind)
    assert len(loaded.rows) == 3
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_orca_rows_with_null_system_from_parquet(tmp_path):
    path = write_rows(tmp_path / "orca.parquet", [{**ORCA_ROW, "system": None}, {**ORCA_ROW, "system": "Be brief."}])
    rows = data.load(DatasetSpec(source=str(path)), "dpo").rows
    assert rows[0]["prompt_messages"] == [{"role": "user", "content": "Hi?"}]
    assert rows[1]["prompt_messages"][0] == {"role": "system", "content": "Be brief."}


def test_shuffle_and_max_samples(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    path = write_rows(tmp_path / "p.jsonl", rows)
    first = data.load(DatasetSpec(source=str(path), max_samples=5), "dpo").rows
    assert [r["prompt_messages"][0]["content"] for r in first] == [f"q{i}" for i in range(5)]
    shuffled = data.load(DatasetSpec(source=str(path), shuffle_seed=42, max_samples=5), "dpo").rows
    again = data.load(DatasetSpec(source=str(path), shuffle_seed=42, max_samples=5), "dpo").rows
    assert shuffled == again != first


def test_changed_file_is_refused(tmp_path):
    path = write_rows(tmp_path / "sft.jsonl", [SFT_ROW])
    stale = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(UserError, match="changed since the job was queued"):
        data.load(DatasetSpec(source=str(path), sha256=stale), "sft")
    ok = hashlib.sha256(path.read_bytes()).hexdigest()
    assert data.load(DatasetSpec(source=str(path), sha256=ok), "sft").sha256 == ok


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize(
    "kind, row, expected",
    [
        ("sft", {"text": "Hi"}, "missing column 'messages'"),
        ("dpo", {k: v for k, v in ORCA_ROW.items() if k != "rejected"}, "missing column(s) ['rejected']"),
        ("dpo", {k: v for k, v in PAIRS_ROW.items() if k != "chosen"}, "missing column(s) ['chosen']"),
        ("dpo", {"chosen": "a", "rejected": "b"}, "missing column(s) ['input (or prompt)']"),
    ],
)
def test_missing_columns(tmp_path, suffix, kind, row, expected):
    # A parquet file has one schema for all rows, so every row lacks the column.
    path = write_rows(tmp_path / f"bad{suffix}", [row, row])
    message = load_error(path, kind)
    assert expected in message and "row 1" in message and "row 2" in message


@pytest.mark.parametrize("kind", ["sft", "dpo"])
@pytest.mark.parametrize("suffix, content", [(".jsonl", ""), (".jsonl", "\n\n"), (".json", "[]"), (".json", "")])
def test_empty_file(tmp_path, kind, suffix, content):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    assert "has no rows" in load_error(path, kind)


def test_empty_parquet(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string())])), path)
    assert "has no rows" in load_error(path, "dpo")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
    ],
)
def test_sft_roles_out_of_order(tmp_path, suffix, messages):
    path = write_rows(tmp_path / f"sft{suffix}", [SFT_ROW, SFT_ROW, {"messages": messages}])
    message = load_error(path, "sft")
    assert "row 3" in message and "roles out of order" in message


def test_sft_must_end_with_an_assistant_turn(tmp_path):
    path = write_rows(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    assert "must end with an assistant turn" in load_error(path, "sft")


def test_sft_unknown_role(tmp_path):
    path = write_rows(tmp_path / "sft.jsonl", [{"messages": [{"role": "bot", "content": "a"}]}])
    assert "role 'bot'" in load_error(path, "sft")


def test_dpo_prompt_conversation_roles_out_of_order(tmp_path):
    prompt = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": "x", "rejected": "y"}])
    assert "roles out of order" in load_error(path, "dpo")
    ends_with_assistant = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    write_rows(path, [{"prompt": ends_with_assistant, "chosen": "x", "rejected": "y"}])
    assert "must end with a user turn" in load_error(path, "dpo")


def test_many_bad_rows_are_summarised_on_one_line(tmp_path):
    path = write_rows(tmp_path / "sft.jsonl", [{"text": str(i)} for i in range(10)])
    message = load_error(path, "sft")
    assert "row 1" in message and "row 3" in message and "row 4" not in message
    assert "(and 7 more bad rows)" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_invalid_utf8(tmp_path, suffix, kind):
    good = json.dumps(SFT_ROW if kind == "sft" else ORCA_ROW)
    path = tmp_path / f"latin1{suffix}"
    bad = good.replace("Hi?", "Caf\xe9?")  # written as Latin-1: a lone 0xe9 byte
    text = f"{good}\n{good}\n{bad}\n" if suffix == ".jsonl" else f"[\n{good},\n{good},\n{bad}\n]"
    path.write_bytes(text.encode("latin-1"))
    message = load_error(path, kind)
    line = 3 if suffix == ".jsonl" else 4
    assert "not valid UTF-8" in message and f"line {line})" in message and "re-save" in message


@pytest.mark.parametrize("kind, row", [("sft", SFT_ROW), ("dpo", ORCA_ROW), ("dpo", PAIRS_ROW)])
def test_invalid_json_line(tmp_path, kind, row):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row)[:-5] + "\n" + json.dumps(row) + "\n")
    message = load_error(path, kind)
    assert "line 2 is not valid JSON" in message


def test_invalid_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": ]')
    assert "is not valid JSON" in load_error(path, "dpo")
    path.write_text('{"a": 1, "b": 2}')
    assert "must hold a JSON array" in load_error(path, "dpo")


def test_json_object_wrapping_one_list_is_accepted(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"train": [PAIRS_ROW, PAIRS_ROW]}))
    assert len(data.load(DatasetSpec(source=str(path)), "dpo").rows) == 2


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    assert "not a readable parquet file" in load_error(path, "sft")


@pytest.mark.parametrize("source", [str(Path("missing") / "train.jsonl"), "/no/such/file.parquet"])
def test_missing_file(source):
    assert "does not exist" in load_error(source, "sft")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n")
    assert "unsupported file type '.csv'" in load_error(path, "sft")


@pytest.mark.parametrize("kind, source", [("sft", "HuggingFaceH4/ultrachat_200k"), ("dpo", "argilla/distilabel-intel-orca-dpo-pairs")])
def test_hub_name_while_offline(monkeypatch, kind, source):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert looks_local(source) is False
    message = load_error(source, kind)
    assert source in message and "offline" in message and "local .jsonl/.json/.parquet" in message


# ---------------------------------------------------------------- over-long rows


def long_rows(kind: str, layout: str) -> list[dict]:
    """Ten rows; rows 2, 5 and 7 have long answers (or, in one, a long prompt)."""
    rows = []
    for i in range(10):
        answer = "Keep it short." if i not in (2, 5, 7) else " ".join(["the release checklist"] * (8 + i))
        question = f"Question {i}?" if i != 5 else " ".join(["why"] * 60) + "?"
        if kind == "sft":
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        elif layout == "orca":
            rows.append({"system": "Be brief." if i % 2 else "", "input": question, "chosen": answer, "rejected": "No."})
        else:
            rows.append({"prompt": question, "chosen": "No.", "rejected": answer})
    return rows


def reference_lengths(tokenizer, rows: list[dict], kind: str) -> list[int]:
    """Token counts the way training sees them: the tokenizer's own chat template, not pipeline.chat."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    lengths = []
    for row in rows:
        if kind == "sft":
            lengths.append(count(tokenizer.apply_chat_template(row["messages"], tokenize=False)))
            continue
        if "input" in row:
            prompt = ([{"role": "system", "content": row["system"]}] if row["system"] else []) + [
                {"role": "user", "content": row["input"]}
            ]
        else:
            prompt = [{"role": "user", "content": row["prompt"]}]
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        lengths.append(max(count(text + row[c] + tokenizer.eos_token) for c in ("chosen", "rejected")))
    return lengths


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("kind, layout", [("sft", "messages"), ("dpo", "orca"), ("dpo", "prompt")])
def test_rows_longer_than_max_length_are_counted(tmp_path, tokenizer, suffix, kind, layout):
    rows = long_rows(kind, layout)
    max_length = 48
    expected = reference_lengths(tokenizer, rows, kind)
    over = sum(n > max_length for n in expected)
    assert 0 < over < len(rows)  # the data really mixes short and long rows
    path = write_rows(tmp_path / f"long{suffix}", rows)

    report = data.preflight(DatasetSpec(source=str(path)), kind, max_length=max_length, base_model="tiny-demo")
    assert report.rows == 10 and report.layout == layout
    stats = report.token_stats
    assert (stats.over_max_length, stats.max, stats.min) == (over, max(expected), min(expected))
    assert report.warnings == [
        f"{over} of 10 rows are longer than max_length {max_length} tokens (longest {max(expected)}) and will be "
        "truncated; raise max_length to keep them whole"
    ]
    roomy = data.preflight(DatasetSpec(source=str(path)), kind, max_length=max(expected), base_model="tiny-demo")
    assert roomy.token_stats.over_max_length == 0 and roomy.warnings == []


@pytest.mark.parametrize("kind, layout", [("sft", "messages"), ("dpo", "orca"), ("dpo", "prompt")])
def test_training_emits_the_count_as_a_warning_event(tmp_path, tokenizer, kind, layout):
    """The stages call training.warn_long_rows with the real tokenizer: same count, as a `warning` event."""
    from tinyllama_mcp.pipeline.recipe.common import warn_long_rows

    rows = long_rows(kind, layout)
    loaded = data.load(DatasetSpec(source=str(write_rows(tmp_path / "long.jsonl", rows))), kind)
    log = EventLog(tmp_path / "events.jsonl")
    stats = warn_long_rows(log, loaded, kind, tokenizer, 48)
    log.close()
    over = sum(n > 48 for n in reference_lengths(tokenizer, rows, kind))
    assert stats["over_max_length"] == over
    (warning,) = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "warning"]
    assert warning["message"].startswith(f"{over} of 10 rows are longer than max_length 48 tokens")


def test_preflight_without_a_local_tokenizer_says_so(tmp_path):
    path = write_rows(tmp_path / "sft.jsonl", [SFT_ROW])
    report = data.preflight(DatasetSpec(source=str(path)), "sft", max_length=64, base_model="someorg/not-cached-model")
    assert report.token_stats is None and report.rows == 1
    assert report.warnings == ["token lengths not checked: no local tokenizer for 'someorg/not-cached-model' yet"]


# ---------------------------------------------------------------- function calling (OpenAI's fine-tuning format)

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_TURN = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
RESULT_TURN = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
TOOL_ROW = {"messages": [{"role": "user", "content": "Weather?"}, CALL_TURN, RESULT_TURN,
                         {"role": "assistant", "content": "Sunny."}], "tools": [WEATHER_TOOL]}


def test_tools_sample_loads_and_counts_tokens_as_the_template_renders(tokenizer):
    from tinyllama_mcp.pipeline.samples import SFT_TOOLS_SAMPLE

    spec = DatasetSpec(source=str(SFT_TOOLS_SAMPLE))
    loaded = data.load(spec, "sft")
    assert loaded.layout == "messages+tools" and all(isinstance(r["tools"], str) for r in loaded.rows)
    expected = [len(tokenizer(tokenizer.apply_chat_template(json.loads(line)["messages"], tools=json.loads(line)["tools"],
                                                            tokenize=False), add_special_tokens=False)["input_ids"])
                for line in SFT_TOOLS_SAMPLE.read_text("utf-8").splitlines()]
    report = data.preflight(spec, "sft", max_length=4096, base_model="tiny-demo")
    assert (report.token_stats.min, report.token_stats.max) == (min(expected), max(expected))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_function_calling_rows_are_normalised(tmp_path, suffix):
    as_string = {**TOOL_ROW, "tools": json.dumps([WEATHER_TOOL])}  # parquet-friendly: tools as a JSON string
    path = write_rows(tmp_path / f"tools{suffix}", [TOOL_ROW if suffix != ".parquet" else as_string, SFT_ROW])
    loaded = data.load(DatasetSpec(source=str(path)), "sft")
    tools, plain = loaded.rows
    assert plain == {"messages": SFT_ROW["messages"], "tools": None}  # one column set for every row
    assert json.loads(tools["tools"]) == [WEATHER_TOOL]
    call = tools["messages"][1]
    assert call["content"] == ""
    assert call["tool_calls"] == [{"id": "c1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert tools["messages"][2] == RESULT_TURN
    assert data.row_texts(tools, "sft")[0].count("<tool_call>") == 2  # the how-to and the call


def test_rows_without_tools_normalise_as_before(tmp_path):
    loaded = data.load(DatasetSpec(source=str(write_rows(tmp_path / "sft.jsonl", [SFT_ROW]))), "sft")
    assert loaded.rows == [SFT_ROW] and loaded.layout == "messages"


@pytest.mark.parametrize("row, expected", [
    ({**TOOL_ROW, "tools": "[{"}, "'tools' is a string but not JSON"),
    ({**TOOL_ROW, "tools": [{"type": "function", "function": {"name": "get weather"}}]}, "1-64 letters"),
    ({**TOOL_ROW, "tools": [{"type": "function", "function": {"name": "other"}}]},
     "calls 'get_weather', which is not in the row's tools ['other']"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
     "arguments are not valid JSON"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     "arguments must be a JSON object"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": []}]},
     "content must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": "f"}]},
     "tool_calls must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}, RESULT_TURN, {"role": "assistant", "content": "b"}]},
     "roles out of order (turn 2 is 'tool', expected 'assistant')"),
    ({"messages": [{"role": "user", "content": "a"}, CALL_TURN, {"role": "assistant", "content": "b"}]},
     "roles out of order (turn 3 is 'assistant', expected 'tool')"),
    ({"messages": [{"role": "user", "content": "a"}, CALL_TURN, RESULT_TURN, RESULT_TURN,
                   {"role": "assistant", "content": "b"}]}, "answers no tool call"),
    ({"messages": [{"role": "user", "content": "a"}, CALL_TURN, {**RESULT_TURN, "tool_call_id": "zz"},
                   {"role": "assistant", "content": "b"}]}, "answers no tool call of the assistant turn before it"),
    ({"messages": [{"role": "user", "content": "a"}, CALL_TURN, RESULT_TURN]}, "must end with an assistant turn"),
])
def test_bad_function_calling_rows(tmp_path, row, expected):
    message = load_error(write_rows(tmp_path / "sft.jsonl", [row]), "sft")
    assert "row 1" in message and expected in message


def test_generation_requests_take_tool_turns_and_openai_shapes():
    """generate.render_input checks requests with check_messages: OpenAI clients' shapes are accepted."""
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "now?"}]},
                CALL_TURN, RESULT_TURN]
    clean = data.check_messages(messages, "messages", need_final_assistant=False)
    assert clean[0] == {"role": "system", "content": "Be brief."}
    assert clean[1] == {"role": "user", "content": "Weather now?"}
    assert clean[3] == RESULT_TURN
    ends_with_a_call = data.check_messages(messages[:3], "messages", need_final_assistant=True)
    assert ends_with_a_call[-1]["tool_calls"][0]["function"]["name"] == "get_weather"  # SFT may teach a call
    with pytest.raises(ValueError, match="content must be a string"):
        data.check_messages([{"role": "user", "content": [{"type": "image_url"}]}], "messages", False)
