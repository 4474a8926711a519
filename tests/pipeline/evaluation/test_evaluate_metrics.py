"""The evaluate stage's numbers against independent computations on tiny-demo: transformers' own loss on the chat
template's assistant labels, summed answer log-probs of each preference pair, lm-eval's accuracy from
loglikelihoods, and greedy answers from transformers' generate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tinyllama_mcp.errors import UserError
from tinyllama_mcp.pipeline.events import EventLog
from tinyllama_mcp.pipeline.evaluation.run import run_evaluate
from tinyllama_mcp.pipeline.samples import DPO_SAMPLE, SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import DatasetSpec, EvaluateSpec

TASK_DIR = Path(__file__).resolve().parents[2] / "server" / "openai_api" / "lm_eval_task"
ROWS = 8
PROMPTS = ["How do I name a feature branch?", "Which log level should a retry use?"]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:ROWS]]


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_demo, datasets_cache) -> dict:
    job_dir = tmp_path_factory.mktemp("evaluate")
    spec = EvaluateSpec(
        base_model="tiny-demo", model="tiny-demo", model_label="tiny-demo", max_new_tokens=6, batch_size=3,
        chat_dataset=DatasetSpec(source=str(SFT_SAMPLE), max_samples=ROWS),
        preference_dataset=DatasetSpec(source=str(DPO_SAMPLE), max_samples=ROWS),
        prompts=PROMPTS, lm_eval_tasks=["tinyllama_mcp_tiny_choice"], lm_eval_task_dir=str(TASK_DIR),
    )
    log = EventLog(job_dir / "events.jsonl")
    summary = run_evaluate(spec, job_dir, log)
    log.close()
    record = json.loads((job_dir / "evaluation" / "metrics.json").read_text())
    return {"summary": summary, "record": record, "job_dir": job_dir}


@pytest.fixture(scope="module")
def model(tiny_demo):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_demo, dtype=torch.float32).eval()


def test_chat_loss_is_transformers_loss_on_assistant_labels(evaluated, model, tokenizer):
    batch, labels = [], []
    for row in rows_of(SFT_SAMPLE):
        encoded = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
        # the template's mask is exactly each assistant turn's text and its EOS
        marked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert marked == "".join(m["content"] + "</s>" for m in row["messages"] if m["role"] == "assistant")
        batch.append(ids)
        labels.append([t if m else -100 for t, m in zip(ids, mask)])
    width = max(map(len, batch))
    input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in batch])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attention, labels=label_ids)
    shifted = label_ids[:, 1:]
    scored = shifted != -100
    accuracy = ((out.logits[:, :-1].argmax(-1) == shifted) & scored).sum() / scored.sum()

    metrics = evaluated["record"]["metrics"]
    assert abs(metrics["chat_loss"] - out.loss.item()) < 1e-5
    assert metrics["chat_perplexity"] == pytest.approx(math.exp(metrics["chat_loss"]))
    assert metrics["chat_token_accuracy"] == pytest.approx(accuracy.item())
    assert evaluated["summary"]["chat_tokens"] == int(scored.sum())


def test_preference_accuracy_and_margin_are_summed_answer_log_probs(evaluated, model, tokenizer):
    margins = []
    for row in rows_of(DPO_SAMPLE):
        system = f"<|system|>\n{row['system']}</s>\n" if row["system"].strip() else ""
        prompt = f"{system}<|user|>\n{row['input']}</s>\n<|assistant|>\n"
        prompt_len = len(tokenizer(prompt)["input_ids"])
        logps = []
        for answer in (row["chosen"], row["rejected"]):
            ids = tokenizer(prompt + answer + "</s>")["input_ids"]
            assert ids[:prompt_len] == tokenizer(prompt)["input_ids"]
            with torch.inference_mode():
                logits = model(torch.tensor([ids])).logits[0].double()
            per_token = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            logps.append(per_token[prompt_len - 1 :].sum().item())
        margins.append(logps[0] - logps[1])

    metrics = evaluated["record"]["metrics"]
    assert metrics["preference_accuracy"] == sum(m > 0 for m in margins) / len(margins)
    assert abs(metrics["preference_margin"] - sum(margins) / len(margins)) < 1e-5
    assert evaluated["summary"]["preference_pairs"] == ROWS


def test_lm_eval_accuracy_comes_from_this_model(evaluated, model, tokenizer):
    docs = [json.loads(line) for line in (TASK_DIR / "tiny_choice.jsonl").read_text().splitlines()]
    hits = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(context + " " + choice)["input_ids"]
            with torch.inference_mode():
                logits = model(torch.tensor([whole])).logits[0].double()
            per_token = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(whole[1:])[:, None])[:, 0]
            scores.append(per_token[len(context_ids) - 1 :].sum().item())
        hits += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    task = evaluated["record"]["metrics"]["lm_eval"]["tinyllama_mcp_tiny_choice"]
    assert task["acc,none"] == pytest.approx(hits / len(docs))
    assert set(task) == {"acc,none", "acc_norm,none"}


def test_generations_are_greedy_answers_and_the_record_names_its_inputs(evaluated, model, tokenizer):
    job_dir, record = evaluated["job_dir"], evaluated["record"]
    lines = [json.loads(line) for line in (job_dir / "evaluation" / "generations.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS and record["generations"] == "generations.jsonl"
    for line in lines:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": line["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        assert line["answer"] == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert record["model"] == record["model_ref"] == "tiny-demo"
    assert [d["kind"] for d in record["datasets"]] == ["chat", "preference", "prompts", "lm_eval"]
    assert all(len(d["sha256"]) == 64 and d["rows"] > 0 for d in record["datasets"])
    lineage = json.loads((job_dir / "lineage.json").read_text())
    assert lineage["stage"] == "evaluate" and lineage["datasets"] == record["datasets"]
    events = [json.loads(line)["event"] for line in (job_dir / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events.count("step") == 4 and "artifact" in events


def test_a_template_that_reaches_for_python_fails_the_job(tmp_path, tiny_demo, datasets_cache, evaluated):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rows.jsonl").write_text('{"q": "2 + 2 =", "a": "4"}\n')
    (tasks / "escape.yaml").write_text(
        "task: escape\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: rows.jsonl\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: \"{{ cycler.__init__.__globals__.os.getcwd() }}\"\n"
        "doc_to_target: \"{{a}}\"\nmetric_list:\n  - metric: acc\n")
    spec = EvaluateSpec(base_model="tiny-demo", model="tiny-demo", model_label="tiny-demo",
                        lm_eval_tasks=["escape"], lm_eval_task_dir=str(tasks))
    log = EventLog(tmp_path / "events.jsonl")
    with pytest.raises(UserError, match="Python internals"):
        run_evaluate(spec, tmp_path, log)
    log.close()
