"""The training bench's rates (bench/train_bench.py): what its tables report is arithmetic anyone can check."""

from __future__ import annotations

from bench.train_bench import replay_rate


def _points(step_seconds: list[float], tokens_per_step: int = 1000) -> list[dict]:
    points, t = [{"t": 0.0, "tokens": 0}], 0.0
    for i, seconds in enumerate(step_seconds, start=1):
        t += seconds
        points.append({"t": t, "tokens": i * tokens_per_step})
    return points


def test_replay_rate_leaves_out_the_recording_steps():
    # ten replayed steps of 0.1 s and two recordings of 3 s: the replay rate is the replayed steps' alone
    points = _points([0.1] * 5 + [3.0] + [0.1] * 5 + [3.0])
    assert replay_rate(points) == 10_000.0


def test_replay_rate_of_a_run_without_recordings_is_its_rate_and_carries_the_charge():
    points = _points([0.1, 0.12, 0.08, 0.1])
    assert replay_rate(points) == 10_000.0
    # DPO's precomputed reference pass, charged per step: 0.1 s more each step halves the rate
    assert replay_rate(points, charge_per_step=0.1) == 5_000.0
    assert replay_rate(points[:1]) is None


def test_paired_rates_compare_the_steps_both_runs_replayed():
    from bench.train_bench import paired_rates

    def curve(step_seconds):
        points, t = [{"step": 0, "t": 0.0, "tokens": 0}], 0.0
        for i, seconds in enumerate(step_seconds, start=1):
            t += seconds
            points.append({"step": i, "t": t, "tokens": i * 1000})
        return points

    # the lever run records at step 2, the reference at step 5; steps 1, 3, 4 and 6 are compared
    lever = curve([0.08, 3.0, 0.08, 0.08, 0.08, 0.08])
    reference = curve([0.1, 0.1, 0.1, 0.1, 3.0, 0.1])
    paired = paired_rates(lever, reference)
    assert paired == {"steps": 4, "tokens_per_s": 12500.0, "reference_tokens_per_s": 10000.0, "ratio": 1.25}
    assert paired_rates(curve([0.1]), curve([])) is None


def test_full_rows_fill_max_length_and_the_spread_does_not(tmp_path):
    """--full-rows: every SFT row and every DPO pair's prompt and answer past max_length (the shape of PERF_NOTES'
    Unsloth figures, cut to max_length); the default rows spread far below it."""
    import argparse

    from bench.train_bench import prepare_inputs
    from tinyllama_mcp.pipeline.chat import render
    from tinyllama_mcp.pipeline.data import load
    from tinyllama_mcp.pipeline.modeling import load_tokenizer
    from tinyllama_mcp.pipeline.specs import DatasetSpec

    for full in (True, False):
        cfg = argparse.Namespace(smoke=True, seconds=None, work=tmp_path / str(full), full_rows=full)
        inputs = prepare_inputs(cfg)  # smoke: tiny-demo's model and tokenizer, max_length 256
        tokenizer = load_tokenizer(cfg.base)

        def tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        sft = [tokens(render(r["messages"], add_generation_prompt=False)) for r in load(DatasetSpec(source=str(inputs["sft_path"])), "sft").rows]
        dpo = load(DatasetSpec(source=str(inputs["dpo_path"])), "dpo").rows
        # a pair's shorter sequence: its prompt and its shorter answer
        pairs = [tokens(render(r["prompt_messages"], add_generation_prompt=True))
                 + min(tokens(r["chosen"]), tokens(r["rejected"])) for r in dpo]
        if full:
            assert min(sft) > inputs["sft_len"] and min(pairs) > inputs["dpo_len"]
        else:
            assert min(sft) < inputs["sft_len"] // 2 and min(pairs) < inputs["dpo_len"] // 2


def test_the_unsloth_runs_need_its_packages(tmp_path, capsys):
    import pytest

    from bench.train_bench import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--smoke", "--runs", "unsloth"])
    assert "needs --unsloth-site DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--smoke", "--unsloth-site", str(tmp_path)])
    assert "no unsloth package there" in capsys.readouterr().err
