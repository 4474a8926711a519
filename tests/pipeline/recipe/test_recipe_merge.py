"""Merge exactness: the merged checkpoint, loaded with plain `AutoModelForCausalLM.from_pretrained`,
gives the same greedy tokens as the base + adapters served unmerged (`load_generator(adapter_dir)`),
for the SFT-only stack and the SFT + DPO stack.
"""

from __future__ import annotations

import json

import pytest
import torch

from tinyllama_mcp.pipeline.events import EventLog
from tinyllama_mcp.pipeline.samples import SFT_SAMPLE
from tinyllama_mcp.pipeline.specs import GenerationSpec, MergeSpec

from bnb_cpu import described
from pipeline_testlib import EVAL_PROMPTS, write_spec

NEW_TOKENS = 32


def prompts() -> list[list[dict]]:
    rows = [json.loads(line)["messages"] for line in SFT_SAMPLE.read_text("utf-8").splitlines()]
    # Trained conversations (the model is confident there) and untrained prompts (it is not).
    return [m[:-1] for m in rows[:6]] + [[{"role": "user", "content": p}] for p in EVAL_PROMPTS + ["Tell me a joke."]]


@pytest.fixture(scope="module")
def sft_merged(sft_job, cpu_path, tmp_path_factory):
    """The SFT-only merge, run in-process on the chain's CPU path (the SFT + DPO merge ran through the CLI in the
    session chain)."""
    from tinyllama_mcp.pipeline.recipe.merge import run_merge

    job_dir = write_spec(
        tmp_path_factory.mktemp("merge-sft") / "job",
        MergeSpec(base_model="tiny-demo", sft_adapter=str(sft_job.job_dir / "adapter"), dtype="fp32"),
    )
    log = EventLog(job_dir / "events.jsonl")
    with described(cpu_path):
        summary = run_merge(MergeSpec.model_validate_json((job_dir / "spec.json").read_text()), job_dir, log)
    log.close()
    assert summary["adapters"] == 1
    return job_dir / "merged"


@pytest.fixture(scope="module")
def plain(tokenizer):
    """Greedy decoding of a checkpoint folder with nothing but transformers."""
    from transformers import AutoModelForCausalLM

    def run(folder) -> tuple[list[list[int]], list[torch.Tensor]]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokens, logits = [], []
        for messages in prompts():
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                )
                logits.append(model(ids).logits[0, -1])
            tokens.append(out[0, ids.shape[1]:].tolist())
        return tokens, logits

    return run


def served(adapter_dir, tokenizer, cpu_path):
    """The adapter served unmerged: HF generate on the live PEFT model, and Generator.generate's text."""
    from tinyllama_mcp.pipeline.generate import generate_ids, load_generator, render_input

    with described(cpu_path):
        generator = load_generator(str(adapter_dir))
    assert type(generator.model).__name__.startswith("Peft")  # the last adapter is a live LoRA layer
    spec = GenerationSpec(temperature=0, max_new_tokens=NEW_TOKENS)
    tokens, texts, logits = [], [], []
    for messages in prompts():
        ids = render_input(tokenizer, messages, None)
        tokens.append(generate_ids(generator.model, tokenizer, ids, spec))
        texts.append(generator.generate(messages=messages, spec=spec).text)
        with torch.inference_mode():
            logits.append(generator.model(input_ids=torch.tensor([ids])).logits[0, -1])
    return tokens, texts, logits


def check_same(merged_folder, adapter_dir, tokenizer, plain, cpu_path) -> list[list[int]]:
    merged_tokens, merged_logits = plain(merged_folder)
    tokens, texts, logits = served(adapter_dir, tokenizer, cpu_path)
    assert sum(len(t) for t in merged_tokens) >= 5 * len(merged_tokens)  # real answers, not an instant EOS
    assert tokens == merged_tokens
    assert texts == [tokenizer.decode(t, skip_special_tokens=True).strip() for t in merged_tokens]
    for a, b in zip(logits, merged_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return merged_tokens


def test_sft_merge_is_exact(sft_merged, sft_job, tokenizer, plain, tiny_demo, cpu_path):
    merged = check_same(sft_merged, sft_job.job_dir / "adapter", tokenizer, plain, cpu_path)
    base, _ = plain(tiny_demo)
    assert merged != base  # the adapter is really in the merged weights


def test_sft_dpo_merge_is_exact(merge_job, dpo_job, sft_merged, tokenizer, plain, cpu_path):
    merged = check_same(merge_job.job_dir / "merged", dpo_job.job_dir / "adapter", tokenizer, plain, cpu_path)
    sft_only, _ = plain(sft_merged)
    assert merged != sft_only  # the DPO adapter is really in there too


def test_merge_refuses_a_dpo_adapter_from_another_sft_job(sft_job, dpo_job, tmp_path):
    import shutil

    from tinyllama_mcp.errors import UserError
    from tinyllama_mcp.pipeline.recipe.merge import adapter_chain

    other_sft = shutil.copytree(sft_job.job_dir / "adapter", tmp_path / "other-sft-adapter")
    assert adapter_chain(MergeSpec(sft_adapter=str(sft_job.job_dir / "adapter"), dpo_adapter=str(dpo_job.job_dir / "adapter")))
    with pytest.raises(UserError, match="was trained on top of"):
        adapter_chain(MergeSpec(sft_adapter=str(other_sft), dpo_adapter=str(dpo_job.job_dir / "adapter")))
