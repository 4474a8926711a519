"""bench/time_to_model.py: its smoke run reports every stage and column; its splits are arithmetic anyone can check."""

from __future__ import annotations

import json

import pytest

from bench.time_to_model_report import SPLITS, job_splits, peer_splits

NUMBERS = (int, float)


def test_a_job_is_split_by_its_events():
    job = {"started_at": 100.0, "finished_at": 160.0, "attempts": 1}
    step = lambda k, t: {"event": "step", "step": k, "time": t}  # noqa: E731
    events = [{"event": "warning", "time": 105.0},
              {"event": "start", "time": 115.0, "reference_logps": {"seconds": 2.0}},
              step(1, 125.0), step(2, 127.0), step(3, 129.0),  # the first step 8 s over the others' 2 s
              {"event": "checkpoint", "step": 3, "time": 130.0}, step(4, 132.0), step(5, 134.0),
              {"event": "artifact", "kind": "adapter", "time": 135.0},
              {"event": "artifact", "kind": "eval_samples", "time": 150.0}, {"event": "end", "time": 151.0}]
    split = job_splits(job, events, t_call=99.0, t_returned=99.5)
    assert split["startup"] == 5.0 and split["load"] == 8.0 and split["reference_logps_s"] == 2.0
    assert split["per_step_s"] == 2.0 and split["compile"] == 8.0
    assert split["train"] == 2.0 + 4 * 2.0 + 2.0  # the first step's own 2 s, four more, the reference pass
    assert split["save"] == 2.0 and split["checkpoints_s"] == 1.0  # the checkpoint's 1 s and the adapter's
    assert split["other"] == 1.0 + 16.0 + 9.0  # the call and queue, eval samples to the end, the exit
    assert sum(split[part] for part in SPLITS) == pytest.approx(split["total"]) == 61.0


def test_a_merge_splits_its_save_off_where_an_event_marks_the_merge():
    job = {"started_at": 10.0, "finished_at": 30.0, "attempts": 1}
    events = [{"event": "start", "stage": "merge", "time": 14.0}, {"event": "artifact", "kind": "merged", "time": 25.0},
              {"event": "end", "time": 26.0}]
    split = job_splits(job, events, t_call=9.0, t_returned=9.2)
    assert (split["startup"], split["load"], split["save"], split["other"]) == (4.0, 11.0, None, 6.0)
    assert "note" in split
    split = job_splits(job, [events[0], {"event": "merged", "time": 20.0}, *events[1:]], t_call=9.0, t_returned=9.2)
    assert (split["load"], split["save"]) == (6.0, 5.0) and "note" not in split


def test_a_peer_stage_is_extrapolated_from_its_steps():
    run = {"stage": "sft", "spawn": 0.0, "exit": 40.0, "total_steps": 100,
           "marks": {"imported": 6.0, "train_call": 10.0, "train_begin": 11.0, "train_end": 26.0, "saved": 27.0},
           "curve": [{"t": 4.0}, {"t": 5.0}, {"t": 6.0}, {"t": 7.0}]}  # steps of 1 s, the first 3 s over
    split = peer_splits(run, steps_asked=4)
    # compile/record: the first step's excess from the train() call, the Trainer's own 1 s of set-up included
    assert split["startup"] == 6.0 and split["load"] == 4.0 and split["compile"] == 4.0
    assert split["train"] == 16.0 - 4.0 + 96 * 1.0 and split["extrapolated_s"] == 96.0
    assert split["measured"] == "4 of 100 steps, extrapolated"
    assert split["total"] == 40.0 + 96.0


def test_chat_rows_have_ultrachats_length_profile():
    from bench.synthetic import chat_rows
    from tinyllama_mcp.pipeline.chat import render
    from tinyllama_mcp.pipeline.modeling import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("tiny-demo"))
    rows = chat_rows(200, seed=1)
    lengths = [len(tokenizer(render(r["messages"], add_generation_prompt=False), add_special_tokens=False)["input_ids"])
               for r in rows]
    assert sum(n > 512 for n in lengths) / len(lengths) > 0.6  # most rows past the recipe's 512
    assert sum(len(r["messages"]) > 2 for r in rows) / len(rows) > 0.6  # multi-turn


@pytest.mark.slow
def test_smoke_reports_every_stage_and_column(tmp_path, capsys):
    from bench.time_to_model import main

    out = tmp_path / "out"
    assert main(["--smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    results = json.loads((out / "time_to_model.json").read_text())
    project, a = results["columns"]["project"], results["columns"]["a"]
    for stage in ("sft", "dpo", "merge"):
        assert project[stage]["state"] == "succeeded", project[stage]
        for column in (project, a):
            assert "error" not in column[stage], column[stage]
            assert isinstance(column[stage]["total"], NUMBERS)
            for part in SPLITS:  # None only where an event to split at is missing, which a note says
                value = column[stage][part]
                assert isinstance(value, NUMBERS) or (part in ("load", "save") and "note" in column[stage])
    for stage in ("sft", "dpo"):
        assert a[stage]["measured"].endswith("extrapolated") and a[stage]["extrapolated_s"] > 0
        assert project[stage]["steps"] == project[stage]["total_steps"] == 3
    for column in (project, a):
        generate = column["generate"]
        assert generate["batch_rows"] == 32 and generate["batch_tokens"] > 0
        for key in ("first_after_merge_s", "first_s", "batch_s", "batch_tokens_per_s"):
            assert isinstance(generate[key], NUMBERS) and generate[key] > 0
        assert isinstance(column["whole_job_s"], NUMBERS)
    assert project["generate"]["torch_in_server_before_first"] is False
    assert results["columns"]["b"]["skipped"] == "skipped: no --unsloth-site"
    assert isinstance(results["ratios"]["a/project"], NUMBERS) and results["ratios"]["b/project"] is None
    printed = capsys.readouterr().out
    assert "card: cpu" in printed and "| dpo | compile/record s |" in printed and "total(a)/total(project)" in printed
    assert (out / "time_to_model.md").read_text().strip() == printed.split("\ntotal wall")[0].strip()
