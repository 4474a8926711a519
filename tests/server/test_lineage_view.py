"""One model's lineage end to end, from a real tiny-demo SFT -> DPO -> merge chain: the datasets' sha256, each job's
spec and lineage.json, its evaluations and export files (written in their contract shapes), its alias history; as
models://{ref}, models:// and status show it."""

from __future__ import annotations

import hashlib
import json

import pytest

from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE
from tests.server.chain import record_job
from tests.server.support import error_text, serving

pytestmark = pytest.mark.slow


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_one_models_lineage_from_data_to_alias_history(tiny_chain):
    chain = tiny_chain
    weights = b"GGUF, as the export job's file stands in the contract shape"
    eval_old = record_job(chain.home, "evaluate", chain.merge, chain.merge, {"evaluation/metrics.json": json.dumps(
        {"model": chain.merge, "metrics": {"valid_loss": 3.5}, "datasets": [{"source": "held-out", "rows": 4}]})})
    eval_new = record_job(chain.home, "evaluate", chain.merge, "lineage-prod", {"evaluation/metrics.json": json.dumps(
        {"model": "lineage-prod", "metrics": {"valid_loss": 3.25, "exact_match": 0.5}, "datasets": []})})
    export = record_job(chain.home, "export", chain.merge, chain.merge, {
        "export/model-f16.gguf": weights.decode(),
        "export/manifest.json": json.dumps({"files": [{"format": "gguf-f16", "path": "model-f16.gguf",
                                                       "bytes": len(weights), "sha256": _sha256(weights),
                                                       "verification": {"max_logit_diff": 0.0}}]})})

    async with serving(chain.settings()) as (client, _):
        for model, reason in ((chain.merge, "first"), ("chain-sft", "try the SFT model"), (None, "it was worse")):
            call = ("promote", {"model": model, "alias": "lineage-prod", "reason": reason}) if model else \
                ("rollback", {"alias": "lineage-prod", "reason": reason})
            result = await client.call_tool(*call)
            assert not result.is_error, error_text(result)

        lineage = json.loads((await client.read_resource("models://lineage-prod")).contents[0].text)
        by_name = json.loads((await client.read_resource("models://chain-merged")).contents[0].text)
        overview = json.loads((await client.read_resource("models://")).contents[0].text)
        status = (await client.call_tool("status", {"job_id": chain.merge})).structured_content["job"]

    # the chain, oldest first, from the base model; each step with its data, recipe and libraries
    assert lineage["model"] == "lineage-prod" and lineage["target"] == chain.merge
    assert lineage["summary"]["root"] == "tiny-demo"
    assert lineage["summary"]["chain"] == [chain.sft, chain.dpo, chain.merge]
    sft, dpo, merge = lineage["steps"]
    assert [s["stage"] for s in (sft, dpo, merge)] == ["sft", "dpo", "merge"]
    assert sft["datasets"][0]["sha256"] == _sha256(SFT_SAMPLE.read_bytes()) and sft["datasets"][0]["rows"] == 8
    assert dpo["datasets"][0]["sha256"] == _sha256(DPO_SAMPLE.read_bytes())
    assert [d["sha256"] for d in lineage["summary"]["datasets"]] == [sft["datasets"][0]["sha256"],
                                                                      dpo["datasets"][0]["sha256"]]
    assert sft["hyperparameters"]["lora"]["r"] == 8 and dpo["hyperparameters"]["beta"] == 0.1
    assert dpo["parents"] == [chain.sft] and merge["parents"] == [chain.sft, chain.dpo] and merge["datasets"] == []
    for step in (sft, dpo, merge):
        assert step["state"] == "succeeded" and step["libraries"]["torch"] and step["lineage_file"].endswith(
            f"{step['job_id']}/lineage.json")
    assert sft["output_name"] == "chain-sft" and merge["output_name"] == "chain-merged"

    # evaluations newest first, the export's files with their sha256, the alias moves onto and off the model
    # (other tests share the chain and may add evaluations and exports of it: only this test's are checked)
    evaluations = [e for e in lineage["evaluations"] if e["job_id"] in (eval_new, eval_old)]
    assert [e["job_id"] for e in evaluations] == [eval_new, eval_old]
    assert evaluations[0]["metrics"] == {"valid_loss": 3.25, "exact_match": 0.5}
    assert evaluations[1]["datasets"] == [{"source": "held-out", "rows": 4}]
    (exported,) = [e for e in lineage["exports"] if e["job_id"] == export]
    assert exported["job_id"] == export and exported["files"][0]["sha256"] == _sha256(weights)
    assert exported["files"][0]["path"] == str(chain.home / "jobs" / export / "export" / "model-f16.gguf")
    moves = [m for m in lineage["alias_history"] if m["alias"] == "lineage-prod"]  # other tests share the chain
    assert [(m["action"], m["target"], m["previous"], m["reason"]) for m in moves] == [
        ("promote", chain.merge, None, "first"),
        ("promote", chain.sft, chain.merge, "try the SFT model"),
        ("rollback", chain.merge, chain.sft, "it was worse"),
    ]
    assert all(m["by"] and m["at"] for m in moves)
    assert "lineage-prod" in lineage["aliases"]
    assert by_name == {**lineage, "model": "chain-merged"}

    # models:// lists each model once with its aliases, newest metrics and lineage summary
    models = {m["model"]: m for m in overview["models"]}
    assert set(models) >= {"tiny-demo", chain.sft, chain.dpo, chain.merge}
    assert "lineage-prod" in models[chain.merge]["aliases"] and models[chain.merge]["evaluation_job"] == eval_new
    assert models[chain.merge]["metrics"] == {"valid_loss": 3.25, "exact_match": 0.5}
    assert models[chain.merge]["lineage"] == lineage["summary"] and models[chain.sft]["metrics"] is None
    prod = next(a for a in overview["aliases"] if a["alias"] == "lineage-prod")
    assert prod["target"] == chain.merge and prod["servable"] and prod["problem"] is None

    # status shows the compact lineage and the aliases pointing at the job
    assert status["lineage"] == lineage["summary"] and status["aliases"] == lineage["aliases"]


async def test_lineage_of_a_base_model_and_bad_references(tiny_chain):
    async with serving(tiny_chain.settings()) as (client, _):
        base = json.loads((await client.read_resource("models://tiny-demo")).contents[0].text)
        assert base["target"] == "tiny-demo" and base["steps"] == [] and base["summary"]["chain"] == []
        sft = json.loads((await client.read_resource(f"models://{tiny_chain.sft}")).contents[0].text)
        assert sft["summary"]["chain"] == [tiny_chain.sft] and sft["evaluations"] == []
        for ref, words in (("no-such-model", "is no model of this server"),
                           ("sft-000000000000", "no job 'sft-000000000000'")):
            with pytest.raises(Exception, match=words):
                await client.read_resource(f"models://{ref}")
