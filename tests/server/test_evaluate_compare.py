"""evaluate, compare, compare_results and judge through the MCP tools, with a real worker running the jobs.

tiny-demo and the session's trained tiny-demo chain (its DPO job, trained on its SFT job: tests/server/chain.py) are
evaluated; compare then reuses both jobs (identical evaluation) and shows their answers to 24 prompts as blinded
pairs; judge un-blinds only what it judged and scores each model. The blinding draw itself is checked over thousands
of pairs, and bad input gives errors that say what to do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE
from tinyllama_mcp.server import comparisons
from tests.server.support import error_text, serving, wait_state

PROMPTS = [f"{question} (case {n})" for n, question in enumerate(
    ["How do I name a feature branch?", "Which log level should a retry use?", "Where do build artefacts go?",
     "What does the release checklist start with?"] * 6)]
EVALUATION = dict(chat_dataset=str(SFT_SAMPLE), preference_dataset=str(DPO_SAMPLE), max_samples=8,
                  prompts=PROMPTS, max_new_tokens=4, max_length=64)
METRICS = {"chat_loss", "chat_perplexity", "chat_token_accuracy", "preference_accuracy", "preference_margin"}
HUB_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"  # never loaded: these tests run no worker


async def call(client, tool: str, arguments: dict) -> dict:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, error_text(result)
    return result.structured_content


def answers_of(job: dict) -> list[str]:
    path = Path(job["job_dir"]) / "evaluation" / "generations.jsonl"
    return [json.loads(line)["answer"] for line in path.read_text().splitlines()]


@pytest.mark.slow
async def test_evaluate_then_compare_blinded_and_judge(tiny_chain):
    trained = tiny_chain.dpo  # not its SFT or merge job: the lineage tests count the evaluations of those
    async with serving(tiny_chain.settings(), run_worker=True) as (client, _):
        base_eval = await call(client, "evaluate", {"model": "tiny-demo", **EVALUATION})
        assert base_eval["stage"] == "evaluate" and base_eval["parents"] == [] and "wait(job_id=" in base_eval["next_step"]
        assert set(base_eval["preflights"]) == {"chat", "preference"} and base_eval["preflights"]["chat"]["rows"] == 8
        trained_eval = await call(client, "evaluate", {"model": trained, **EVALUATION})
        assert trained_eval["parents"] == [trained]

        views = [await wait_state(client, job["job_id"]) for job in (base_eval, trained_eval)]
        for view in views:
            assert view["state"] == "succeeded", view
            assert set(view["evaluation"]) == METRICS and view["progress"]["percent"] == 100.0
        base_view, trained_view = views
        assert trained_view["evaluation"]["chat_loss"] < base_view["evaluation"]["chat_loss"]  # trained on these rows

        compared = await call(client, "compare", {"models": ["tiny-demo", trained], **EVALUATION})
        assert [m["job_id"] for m in compared["models"]] == [base_eval["job_id"], trained_eval["job_id"]]
        assert all(m["reused"] for m in compared["models"]) and compared["pairs"] == len(PROMPTS)
        cid = compared["comparison_id"]

        unknown_pair = await client.call_tool("judge", {"comparison_id": cid,
                                                        "verdicts": [{"pair_id": "pair-000000000000", "winner": "A"}]})
        assert "has no pair" in error_text(unknown_pair) and "compare_results" in error_text(unknown_pair)

        results = await call(client, "compare_results", {"comparison_id": cid})
        assert results["state"] == "ready" and "judge(" in results["next_step"]
        assert [row["metrics"] for row in results["table"]] == [base_view["evaluation"], trained_view["evaluation"]]
        pairs = results["pairs"]
        assert len(pairs) == len(PROMPTS) and len({p["pair_id"] for p in pairs}) == len(PROMPTS)
        labels = [m["model"] for m in results["models"]] + [base_eval["job_id"], trained_eval["job_id"], trained]
        for pair in pairs:  # nothing but the prompt and the two answers; ids carry no model
            assert set(pair) == {"pair_id", "prompt", "A", "B"} and re.fullmatch(r"pair-[0-9a-f]{12}", pair["pair_id"])
            assert not any(label in pair["pair_id"] for label in labels)
        assert [p["prompt"] for p in pairs] != PROMPTS  # the pairs are shuffled, not in prompt order
        base_answers, trained_answers = answers_of(base_view), answers_of(trained_view)
        for pair in pairs:
            i = PROMPTS.index(pair["prompt"])
            assert sorted([pair["A"], pair["B"]]) == sorted([base_answers[i], trained_answers[i]])

        # judge half the pairs 'A' and the rest 'tie'; judged pairs are un-blinded, and scored from that mapping
        verdicts = [{"pair_id": p["pair_id"], "winner": "A" if k < 12 else "tie"} for k, p in enumerate(pairs)]
        judged = await call(client, "judge", {"comparison_id": cid, "verdicts": verdicts})
        writer = {u["pair_id"]: u for u in judged["unblinded"]}
        assert judged["judged"] == judged["total_pairs"] == len(PROMPTS) and len(writer) == len(PROMPTS)
        baseline, challenger = "tiny-demo", results["models"][1]["model"]
        for pair in pairs:
            shown = writer[pair["pair_id"]]
            i = PROMPTS.index(pair["prompt"])
            assert pair["A"] == (base_answers[i] if shown["A"] == baseline else trained_answers[i])
        baseline_as_a = sum(writer[p["pair_id"]]["A"] == baseline for p in pairs)
        assert 1 <= baseline_as_a <= len(pairs) - 1  # both positions occur (all one way: p = 2 ** -23)
        base_wins = sum(writer[p["pair_id"]]["A"] == baseline for p in pairs[:12])
        scores = {s["model"]: s for s in judged["scores"]}
        assert scores[baseline]["win_rate"] == pytest.approx((base_wins + 6) / 24)
        assert scores[challenger]["win_rate"] == pytest.approx((12 - base_wins + 6) / 24)
        assert scores[baseline]["ties"] == 12 and scores[baseline]["judged"] == 24

        # judging again replaces: the first twelve now go to B
        again = await call(client, "judge", {"comparison_id": cid, "verdicts": [
            {"pair_id": p["pair_id"], "winner": "B"} for p in pairs[:12]]})
        scores = {s["model"]: s for s in again["scores"]}
        assert again["judged"] == 24 and scores[baseline]["win_rate"] == pytest.approx((12 - base_wins + 6) / 24)
        assert (await call(client, "compare_results", {"comparison_id": cid}))["judged"] == 24


async def test_bad_input_says_what_to_do(make_settings, tmp_path):
    async with serving(make_settings(), run_worker=False) as (client, _):
        async def error(tool: str, arguments: dict) -> str:
            return error_text(await client.call_tool(tool, arguments))

        assert "no job 'sft-000000000000'" in await error("evaluate", {"model": "sft-000000000000", "prompts": ["Hi"]})
        assert "nothing to evaluate" in await error("evaluate", {"model": "tiny-demo"})
        assert "at least two models" in await error("compare", {"models": ["tiny-demo"], "prompts": ["Hi"]})
        assert "listed twice" in await error("compare", {"models": ["tiny-demo", "tiny-demo"], "prompts": ["Hi"]})
        assert "go together" in await error("evaluate", {"model": "tiny-demo", "lm_eval_tasks": ["x"]})
        assert "no comparison 'cmp-0000000000000000'" in await error(
            "compare_results", {"comparison_id": "cmp-0000000000000000"})
        assert "comparison_id" in await error("compare_results", {"comparison_id": "../../etc/passwd"})
        assert "outside the allowed folders" in await error(
            "evaluate", {"model": "tiny-demo", "lm_eval_tasks": ["t"], "lm_eval_task_dir": str(tmp_path)})

        # queued but not run (no worker): results are pending and judging is refused until they exist
        compared = await call(client, "compare", {"models": ["tiny-demo", HUB_MODEL], "prompts": ["Hi", "Bye"]})
        assert [m["state"] for m in compared["models"]] == ["queued", "queued"] and compared["pairs"] == 2
        assert not any(m["reused"] for m in compared["models"])
        cid = compared["comparison_id"]
        pending = await call(client, "compare_results", {"comparison_id": cid})
        assert pending["state"] == "pending" and pending["pairs"] == [] and "again" in pending["next_step"]
        refused = await error("judge", {"comparison_id": cid, "verdicts": [{"pair_id": "pair-000000000000",
                                                                            "winner": "tie"}]})
        assert "no results to judge yet" in refused and "compare_results" in refused
        # the same evaluation again reuses the queued jobs instead of queueing twice
        again = await call(client, "compare", {"models": ["tiny-demo", HUB_MODEL], "prompts": ["Hi", "Bye"]})
        assert [m["job_id"] for m in again["models"]] == [m["job_id"] for m in compared["models"]]
        assert again["comparison_id"] != cid


def test_blinding_draw_carries_no_model_information():
    pairs = comparisons.draw_pairs(4000, 2)
    assert 0.46 < sum(p["a"] == 0 for p in pairs) / len(pairs) < 0.54  # baseline is A about half the time
    rising = sum(x["prompt"] < y["prompt"] for x, y in zip(pairs, pairs[1:])) / (len(pairs) - 1)
    assert 0.46 < rising < 0.54  # the order of the pairs is not the order of the prompts
    ids = {p["pair_id"] for p in pairs}
    assert len(ids) == len(pairs) and not ids & {p["pair_id"] for p in comparisons.draw_pairs(4000, 2)}
    three = comparisons.draw_pairs(50, 3)  # more models: each one against the baseline, once per prompt
    assert sorted((p["prompt"], max(p["a"], p["b"])) for p in three) == [(i, j) for i in range(50) for j in (1, 2)]
    assert all(0 in (p["a"], p["b"]) for p in three)


def test_scores_count_ties_half_over_judged_pairs():
    record = {"models": [{"model": "base"}, {"model": "new"}, {"model": "other"}], "pairs": [
        {"pair_id": "p1", "a": 0, "b": 1}, {"pair_id": "p2", "a": 1, "b": 0}, {"pair_id": "p3", "a": 0, "b": 2},
        {"pair_id": "p4", "a": 2, "b": 0}], "verdicts": {"p1": "A", "p2": "A", "p3": "tie"}}
    scores = {row["model"]: row for row in comparisons.scores(record)}
    assert scores["base"] == {"model": "base", "judged": 3, "wins": 1, "losses": 1, "ties": 1, "win_rate": 0.5}
    assert scores["new"]["win_rate"] == 0.5 and scores["other"]["win_rate"] == 0.5
    assert [u["winner_model"] for u in comparisons.unblinded(record)] == ["base", "new", None]
