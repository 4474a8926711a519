"""`tinyllama-mcp demo` judges its own results (server/demo.py `checks`): a broken run must not read as success."""

from __future__ import annotations

import math

from tinyllama_mcp.server.demo import checks
from tinyllama_mcp.server.models import JobView


def job(stage: str, **summary) -> JobView:
    return JobView(job_id=f"{stage}-000000000001", stage=stage, state="succeeded", created_at="now", attempts=1,
                   max_attempts=3, job_dir="/tmp", summary=summary)


def result(sft: dict, dpo: dict, exact: int) -> dict:
    return {"sft": job("sft", **sft), "dpo": job("dpo", **dpo), "recall": {"exact": exact}}


GOOD_SFT = {"first_loss": 5.5, "last_loss": 0.4}
GOOD_DPO = {"first_loss": math.log(2) + 1e-5, "first_reward_accuracy": 0.0, "reward_accuracy": 1.0}


def failed(outcome: dict) -> list[str]:
    return [what for what, ok in checks(outcome) if not ok]


def test_a_correct_run_passes_every_check():
    assert failed(result(GOOD_SFT, GOOD_DPO, exact=3)) == []


def test_each_wrong_result_fails_its_check():
    assert failed(result({"first_loss": 5.5, "last_loss": 5.6}, GOOD_DPO, 3)) == ["SFT loss falls"]
    broken_dpo = {"first_loss": 8.20, "first_reward_accuracy": 0.0, "reward_accuracy": 0.38}  # a misread reference
    assert failed(result(GOOD_SFT, broken_dpo, 3)) == ["DPO starts at its reference (first loss ln 2)"]
    assert failed(result(GOOD_SFT, {**GOOD_DPO, "reward_accuracy": 0.0}, 3)) == ["DPO reward accuracy rises"]
    assert failed(result(GOOD_SFT, GOOD_DPO, exact=0)) == ["the merged model answers a training question word for word"]
    assert len(failed(result({}, {}, 0))) == 4  # nothing reported is nothing shown
