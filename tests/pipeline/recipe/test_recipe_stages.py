"""Every stage end to end through `python -m tinyllama_mcp.pipeline run JOB_DIR`: SFT (NF4) -> DPO (NF4, on the SFT
adapter) -> merge (fp32) -> generate, on tiny-demo. The jobs run once per session (conftest.py);
these tests read what they wrote: events.jsonl, lineage.json, eval_samples.jsonl, the artifacts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from tinyllama_mcp.pipeline import data, modeling
from tinyllama_mcp.pipeline.checkpoints import is_complete
from tinyllama_mcp.pipeline.samples import DEMO_SFT_OVERRIDES, DPO_SAMPLE, SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import DatasetSpec, GenerationSpec, LLAMA_PROJECTIONS, parse_stage_spec

from bnb_cpu import described
from pipeline_testlib import DPO_STEPS, EVAL_PROMPTS, SFT_ROWS, SFT_SAVE_STEPS, read_jsonl

STEP_FIELDS = ("step", "total", "loss", "learning_rate", "grad_norm", "tokens_per_s", "eta_s", "epoch")
DPO_FIELDS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
_demo = DEMO_SFT_OVERRIDES
SFT_STEPS = math.ceil(  # optimizer steps of the demo settings on SFT_ROWS rows
    _demo["num_train_epochs"]
    * math.ceil(math.ceil(SFT_ROWS / _demo["per_device_train_batch_size"]) / _demo["gradient_accumulation_steps"])
)


def kinds(run) -> list[str]:
    return [e["event"] for e in run.events]


def check_event_stream(run, stage: str, total: int, rows: int, extra_step_fields=()) -> None:
    """start, then steps 1..total with every field, checkpoints, artifacts, and `end` last."""
    events = run.events
    assert all(isinstance(e["time"], float) for e in events)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    order = kinds(run)
    assert order[0] == "start" and order[-1] == "end" and "error" not in order
    start = run.one("start")
    assert start == {**start, "stage": stage, "device": "cpu", "dtype": "fp32", "resume_step": None,
                     "total_steps": total, "rows": rows}

    steps = run.of("step")
    assert [s["step"] for s in steps] == list(range(1, total + 1))
    for s in steps:
        missing = [f for f in (*STEP_FIELDS, *extra_step_fields) if f not in s]
        assert not missing, f"step event lacks {missing}: {s}"
        assert s["total"] == total
        assert math.isfinite(s["loss"]) and s["learning_rate"] > 0 and s["grad_norm"] >= 0
        assert s["tokens_per_s"] > 0 and s["eta_s"] >= 0 and s["epoch"] > 0
    assert steps[-1]["eta_s"] == 0
    assert [s["epoch"] for s in steps] == sorted(s["epoch"] for s in steps)

    artifacts = {a["kind"]: a["path"] for a in run.of("artifact")}
    assert artifacts == {
        "adapter": str(run.job_dir / "adapter"),
        "eval_samples": str(run.job_dir / "eval_samples.jsonl"),
        "lineage": str(run.job_dir / "lineage.json"),
    }
    assert order.index("artifact") > max(i for i, k in enumerate(order) if k == "step")
    (samples_event,) = [e for e in run.of("eval") if "samples" in e]
    assert samples_event["samples"] == artifacts["eval_samples"]

    end = run.one("end")
    assert end["status"] == "succeeded"
    summary = end["summary"]
    assert summary["steps"] == total
    assert summary["first_loss"] == steps[0]["loss"] and summary["last_loss"] == steps[-1]["loss"]
    assert summary["runtime_s"] > 0 and summary["tokens_per_s"] > 0
    assert "peak_memory_gib" in summary and summary["peak_memory_gib"] is None  # CPU


def check_adapter(adapter: Path, lora: dict) -> dict:
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == lora["r"] and config["lora_alpha"] == lora["alpha"]
    assert set(config["target_modules"]) == set(LLAMA_PROJECTIONS)
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (adapter / "tokenizer.json").is_file()
    return json.loads((adapter / modeling.STACK_FILE).read_text())


def check_lineage(run, dataset: Path, rows: int) -> dict:
    lineage = json.loads((run.job_dir / "lineage.json").read_text())
    spec = parse_stage_spec((run.job_dir / "spec.json").read_text())
    assert lineage["stage"] == spec.stage and lineage["job_dir"] == str(run.job_dir)
    assert lineage["base_model"] == "tiny-demo"
    assert lineage["base_model_resolved"] == modeling.resolve_model("tiny-demo")
    assert lineage["spec"] == spec.model_dump(mode="json")
    assert lineage["parents"] == spec.parents
    if dataset is not None:
        (ds,) = lineage["datasets"]
        assert ds["path"] == str(dataset.resolve())
        assert ds["sha256"] == hashlib.sha256(dataset.read_bytes()).hexdigest()
        assert ds["rows"] == rows
    libraries = lineage["libraries"]
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert libraries[name] == version(name)
    return lineage


# ---------------------------------------------------------------- SFT


def test_sft_events(sft_job):
    check_event_stream(sft_job, "sft", SFT_STEPS, SFT_ROWS)
    assert "warning" not in kinds(sft_job)  # every sample row fits max_length 128


def test_sft_checkpoints(sft_job):
    checkpoints = sft_job.of("checkpoint")
    expected = list(range(SFT_SAVE_STEPS, SFT_STEPS + 1, SFT_SAVE_STEPS))
    expected += [] if expected[-1] == SFT_STEPS else [SFT_STEPS]  # and one at the end
    assert [c["step"] for c in checkpoints] == expected
    for c in checkpoints[-2:]:  # save_total_limit 2: the older ones are rotated away
        folder = Path(c["path"])
        assert folder == sft_job.job_dir / "checkpoints" / f"checkpoint-{c['step']}"
        assert is_complete(folder)
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == c["step"]


def test_sft_adapter_and_stack(sft_job):
    spec = parse_stage_spec((sft_job.job_dir / "spec.json").read_text())
    stack = check_adapter(sft_job.job_dir / "adapter", spec.lora.model_dump())
    assert stack == {
        "base_model": "tiny-demo",
        "quant": {"quantization": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "adapters": [str(sft_job.job_dir / "adapter")],
    }


def test_sft_lineage(sft_job):
    lineage = check_lineage(sft_job, SFT_SAMPLE, SFT_ROWS)
    (ds,) = lineage["datasets"]
    assert ds["layout"] == "messages"
    # The preflight's torch-free token counter agrees with the training tokenizer's counts.
    spec = DatasetSpec(source=str(SFT_SAMPLE), max_samples=SFT_ROWS)
    report = data.preflight(spec, "sft", max_length=128, base_model="tiny-demo")
    assert ds["token_lengths"] == report.token_stats.model_dump()
    effective = lineage["effective"]
    assert effective["device"] == "cpu" and effective["compute_dtype"] == "fp32"
    assert effective["optim"] == "adamw_torch"  # the spec's paged_adamw_32bit needs CUDA
    assert effective["total_steps"] == SFT_STEPS


def test_sft_eval_samples(sft_job):
    samples = read_jsonl(sft_job.job_dir / "eval_samples.jsonl")
    assert [s["prompt"] for s in samples] == EVAL_PROMPTS
    assert all(isinstance(s["answer"], str) for s in samples)
    assert "feature/" in samples[0]["answer"]  # a training question, answered as trained


# ---------------------------------------------------------------- the tiny model learns


def training_conversations(rows: int) -> list[tuple[list[dict], str]]:
    """(messages up to the last user turn, the trained answer) of the first SFT sample rows."""
    out = []
    for line in SFT_SAMPLE.read_text("utf-8").splitlines()[:rows]:
        messages = json.loads(line)["messages"]
        out.append((messages[:-1], messages[-1]["content"]))
    return out


def similarity(tokenizer, answer: str, reference: str) -> float:
    """Token-level similarity (difflib ratio over token ids): 1.0 is the trained answer verbatim."""
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    b = tokenizer(reference, add_special_tokens=False)["input_ids"]
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def greedy_answers(generator, conversations) -> list[str]:
    spec = GenerationSpec(temperature=0, max_new_tokens=48)
    return [generator.generate(messages=messages, spec=spec).text for messages, _ in conversations]


def test_sft_loss_falls(sft_job):
    losses = [s["loss"] for s in sft_job.of("step")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 5.0  # random init: about ln(vocab)
    assert last < 0.35 * first, (first, last)


def test_sft_answers_reflect_the_training_answers(sft_job, tokenizer):
    from tinyllama_mcp.pipeline.generate import load_generator

    conversations = training_conversations(SFT_ROWS)
    trained = greedy_answers(load_generator(str(sft_job.job_dir / "adapter")), conversations)
    untrained = greedy_answers(load_generator("tiny-demo"), conversations)
    after = [similarity(tokenizer, got, want) for got, (_, want) in zip(trained, conversations)]
    before = [similarity(tokenizer, got, want) for got, (_, want) in zip(untrained, conversations)]
    report = "\n".join(f"{b:.2f} -> {a:.2f}: {t!r}" for b, a, t in zip(before, after, trained))
    assert sum(after) / len(after) > 0.6, report
    assert sum(before) / len(before) < 0.2, report
    assert sum(a == 1.0 for a in after) >= SFT_ROWS // 2, report  # half or more verbatim

    # The question of the issue: "How do I name a feature branch?"
    index = [m[-1]["content"] for m, _ in conversations].index("How do I name a feature branch?")
    assert "feature/" in trained[index] and after[index] > 0.8, report
    assert "feature/" not in untrained[index]


# ---------------------------------------------------------------- DPO


def test_dpo_events(dpo_job):
    check_event_stream(dpo_job, "dpo", DPO_STEPS, 32, extra_step_fields=DPO_FIELDS)
    summary, steps = dpo_job.one("end")["summary"], dpo_job.of("step")
    assert summary["reward_accuracy"] == steps[-1]["reward_accuracy"]
    assert summary["first_reward_accuracy"] == steps[0]["reward_accuracy"]


def test_dpo_starts_at_the_reference_and_learns(dpo_job):
    steps = dpo_job.of("step")
    # The policy starts as the reference (the SFT model with the new adapter off): loss ln 2, no margin.
    # (Its reward accuracy counts margins > 0: at a tie, float rounding between the reference pass and the
    # policy pass decides it, so it is not checked here.)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    last = steps[-2:]
    assert max(s["loss"] for s in last) < 0.5 * steps[0]["loss"]
    assert min(s["reward_accuracy"] for s in last) >= 0.75
    assert min(s["reward_margin"] for s in last) > 0.5


def test_dpo_adapter_stack_and_lineage(dpo_job, sft_job):
    spec = parse_stage_spec((dpo_job.job_dir / "spec.json").read_text())
    stack = check_adapter(dpo_job.job_dir / "adapter", spec.lora.model_dump())
    assert stack["base_model"] == "tiny-demo"
    assert stack["quant"]["quantization"] == "nf4"  # the SFT job's base quantization
    assert stack["adapters"] == [str(sft_job.job_dir / "adapter"), str(dpo_job.job_dir / "adapter")]
    assert stack["policy_quant"] == spec.quant.model_dump()  # DPO trained on the merged SFT model, NF4 again

    lineage = check_lineage(dpo_job, DPO_SAMPLE, 32)
    assert lineage["datasets"][0]["layout"] == "orca"
    assert lineage["parents"] == ["sft"]
    assert lineage["effective"]["total_steps"] == DPO_STEPS
    assert not (dpo_job.job_dir / "work").exists()  # the merged SFT base is not left behind


def test_dpo_eval_samples(dpo_job):
    samples = read_jsonl(dpo_job.job_dir / "eval_samples.jsonl")
    assert [s["prompt"] for s in samples] == EVAL_PROMPTS and all(isinstance(s["answer"], str) for s in samples)


@pytest.mark.parametrize("job", ["sft_job", "dpo_job"])
def test_served_adapter_reproduces_the_trained_model(request, job, cpu_path):
    """eval_samples.jsonl is generated by the trained model itself (NF4 + live adapter) right after
    training; serving the adapter folder (dequantized base + stack) must give the same greedy text."""
    from tinyllama_mcp.pipeline.generate import load_generator

    run = request.getfixturevalue(job)
    with described(cpu_path):
        generator = load_generator(str(run.job_dir / "adapter"))
    spec = GenerationSpec(temperature=0, max_new_tokens=32)
    for sample in read_jsonl(run.job_dir / "eval_samples.jsonl"):
        served = generator.generate(messages=[{"role": "user", "content": sample["prompt"]}], spec=spec)
        assert served.text == sample["answer"], sample["prompt"]


# ---------------------------------------------------------------- merge and generate


def test_merge_events_and_files(merge_job, sft_job, dpo_job):
    assert kinds(merge_job) == ["start", "artifact", "artifact", "end"]
    start = merge_job.one("start")
    assert start == {**start, "stage": "merge", "device": "cpu", "dtype": "fp32", "resume_step": None,
                     "total_steps": None, "rows": None}
    merged = merge_job.job_dir / "merged"
    assert {a["kind"]: a["path"] for a in merge_job.of("artifact")} == {
        "merged": str(merged), "lineage": str(merge_job.job_dir / "lineage.json")
    }
    assert merge_job.one("end")["summary"] == {"merged": str(merged), "dtype": "fp32", "adapters": 2}

    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint, not a 4-bit one
    assert list(merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    assert (merged / "tokenizer.json").is_file()

    lineage = check_lineage(merge_job, None, 0)
    assert lineage["datasets"] == [] and lineage["parents"] == ["sft", "dpo"]
    assert lineage["effective"]["adapters"] == [str(sft_job.job_dir / "adapter"), str(dpo_job.job_dir / "adapter")]


def test_merged_checkpoint_is_standalone(merge_job):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = merge_job.job_dir / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(merged)  # plain transformers: template and pad come along
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n"
    )
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_generate_from_every_kind_of_reference(merge_job, dpo_job, tokenizer):
    """A job folder, a merged folder and an adapter folder of the same model answer alike."""
    from tinyllama_mcp.pipeline.generate import load_generator, render_input

    messages = [{"role": "user", "content": "How do I name a feature branch?"}]
    spec = GenerationSpec(temperature=0, max_new_tokens=24)
    answers = {}
    for ref in (merge_job.job_dir, merge_job.job_dir / "merged", dpo_job.job_dir / "adapter"):
        result = load_generator(str(ref)).generate(messages=messages, spec=spec)
        assert result.prompt_tokens == len(render_input(tokenizer, messages, None))
        assert 0 < result.completion_tokens <= 24 and result.latency_ms > 0
        assert result.finish_reason in (("stop", "length") if result.completion_tokens == 24 else ("stop",))
        answers[str(ref)] = result.text
    assert len(set(answers.values())) == 1, answers


def test_generate_options(merge_job):
    from tinyllama_mcp.pipeline.generate import load_generator

    generator = load_generator(str(merge_job.job_dir))
    prompt = "<|user|>\nWhere do secrets live?</s>\n<|assistant|>\n"
    greedy = generator.generate(prompt=prompt, spec=GenerationSpec(temperature=0, max_new_tokens=20))
    assert greedy.text
    stop_word = greedy.text.split()[1]
    cut = generator.generate(prompt=prompt, spec=GenerationSpec(temperature=0, max_new_tokens=20, stop=[stop_word]))
    assert stop_word not in cut.text and greedy.text.startswith(cut.text) and cut.finish_reason == "stop"
    one = generator.generate(prompt=prompt, spec=GenerationSpec(temperature=1.0, seed=7, max_new_tokens=12))
    two = generator.generate(prompt=prompt, spec=GenerationSpec(temperature=1.0, seed=7, max_new_tokens=12))
    assert one.text == two.text
    short = generator.generate(prompt=prompt, spec=GenerationSpec(temperature=0, max_new_tokens=2))
    assert short.completion_tokens <= 2


@pytest.mark.parametrize(
    "kwargs, expected",
    [({}, "exactly one of"), ({"messages": [{"role": "assistant", "content": "x"}]}, "roles out of order")],
)
def test_generate_input_errors(merge_job, kwargs, expected):
    from tinyllama_mcp.errors import UserError
    from tinyllama_mcp.pipeline.generate import load_generator

    generator = load_generator(str(merge_job.job_dir / "merged"))
    with pytest.raises(UserError, match=expected):
        generator.generate(**kwargs)


def test_dpo_on_the_base_model_with_prompt_pairs(tmp_path):
    """The other DPO path, in-process: no SFT adapter (DPO straight on the base), the prompt/chosen/rejected
    layout, no quantization, and pairs longer than max_length (counted as the preflight counts them)."""
    from tinyllama_mcp.pipeline.recipe.dpo import run_dpo
    from tinyllama_mcp.pipeline.events import EventLog, read_events
    from tinyllama_mcp.pipeline.generate import load_generator
    from tinyllama_mcp.pipeline.samples import DPO_SAMPLE_PAIRS

    from pipeline_testlib import dpo_demo_spec

    max_length = 32
    spec = dpo_demo_spec(DPO_SAMPLE_PAIRS, sft_adapter=None, training={"max_steps": 2, "max_length": max_length},
                         quant={"quantization": "none"},
                         eval_prompts={"prompts": ["Where do secrets live?"], "max_new_tokens": 12})
    log = EventLog(tmp_path / "events.jsonl")
    summary = run_dpo(spec, tmp_path, log)
    log.close()
    events = read_events(tmp_path / "events.jsonl")

    report = data.preflight(spec.dataset, "dpo", max_length=max_length, base_model="tiny-demo")
    assert report.layout == "prompt" and report.token_stats.over_max_length > 0
    (warning,) = [e for e in events if e["event"] == "warning"]
    assert warning["message"] == report.warnings[0]

    steps = [e for e in events if e["event"] == "step"]
    assert [s["step"] for s in steps] == [1, 2] and all(f in steps[0] for f in DPO_FIELDS)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference (the base) at first
    assert summary["steps"] == 2
    stack = json.loads((tmp_path / "adapter" / modeling.STACK_FILE).read_text())
    assert stack == {"base_model": "tiny-demo", "quant": spec.quant.model_dump(), "adapters": [str(tmp_path / "adapter")]}

    (sample,) = read_jsonl(tmp_path / "eval_samples.jsonl")
    served = load_generator(str(tmp_path / "adapter")).generate(
        messages=[{"role": "user", "content": sample["prompt"]}], spec=GenerationSpec(temperature=0, max_new_tokens=12)
    )
    assert served.text == sample["answer"]
