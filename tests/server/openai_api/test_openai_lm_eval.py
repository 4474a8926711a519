"""lm-eval's `local-completions` against the real /v1 server: its loglikelihoods equal transformers' own.

What local-completions (lm_eval 0.4.13: models/openai_completions.py, models/api_models.py) sends and reads:
- loglikelihood: POST base_url {"model", "prompt": [[ids], ...] (context + continuation token ids, one list per
  request of the batch; a plain string with tokenized_requests=False and batch_size 1), "temperature": 0,
  "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}, header "Authorization: Bearer $OPENAI_API_KEY".
- it reads `choices` sorted by "index" (one per prompt, in prompt order) and sums
  logprobs.token_logprobs[ctxlen:-1]: the echoed prompt tokens, then the one generated token, which the -1 drops
  (a server that echoed the prompt only would silently lose the last continuation token). is_greedy compares
  each token_logprob with max(top_logprobs[i].values()) exactly, so both must come from the same floats.
- generate_until: POST {"prompt", "model", "max_tokens", "temperature", "stop": until + [the EOS string],
  "seed", **the task's other generation kwargs (extra fields such as max_gen_toks)}; reads choices[i].text.
- tokenizer_backend "auto" probes GET <root>/tokenizer_info and POST <root>/tokenize (vLLM's unversioned routes,
  not /v1/tokenize) and falls back to a Hugging Face tokenizer; here it is named: tiny-demo's folder.
- loglikelihood_rolling sends [BOS] + text tokens per window with ctxlen 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tinyllama_mcp.pipeline.tiny_demo import ensure_tiny_demo
from tests.server.openai_api.conftest import TOKEN

TASK_DIR = Path(__file__).parent / "lm_eval_task"
TASKS = ("tinyllama_mcp_tiny_choice", "tinyllama_mcp_tiny_rolling")
TOLERANCE = 1e-4

pytestmark = pytest.mark.slow


@pytest.fixture
def lm_eval_env(monkeypatch, tmp_path):
    """No hub: datasets and transformers offline, datasets' cache in tmp; the server's token as the API key."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def task_manager(folder: Path):
    """The local task files, their data_files made absolute (lm-eval resolves them against the working directory)."""
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    for source in TASK_DIR.glob("*.yaml"):
        config = yaml.safe_load(source.read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str((TASK_DIR / name).resolve()) for split, name in files.items()}
        (folder / source.name).write_text(yaml.safe_dump(config, allow_unicode=True))
    return TaskManager(include_path=str(folder), include_defaults=False)


def local_completions(base_url: str, **model_args):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    args = dict(model="tiny-demo", base_url=f"{base_url}/v1/completions", tokenizer=str(ensure_tiny_demo()),
                tokenizer_backend="huggingface", tokenized_requests=True, max_retries=1, timeout=120)
    return LocalCompletionsAPI(**{**args, **model_args})


class Reference:
    """Loglikelihoods from transformers: the tiny-demo checkpoint in fp32, one forward per token list."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(ensure_tiny_demo(), dtype=torch.float32).eval()

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        torch = self.torch
        ids = torch.tensor([context + continuation])
        with torch.inference_mode():
            logps = torch.log_softmax(self.model(ids).logits[0].double(), dim=-1)
        rows = logps[len(context) - 1 : -1]  # row i predicts token len(context) + i
        target = torch.tensor(continuation)
        picked = rows.gather(1, target[:, None])[:, 0]
        return float(picked.sum()), bool((rows.argmax(-1) == target).all())

    def greedy(self, context: list[int], steps: int) -> list[int]:
        ids = list(context)
        with self.torch.inference_mode():
            for _ in range(steps):
                ids.append(int(self.model(self.torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(context):]


def test_local_completions_loglikelihoods_match_transformers(v1_server, lm_eval_env, tmp_path):
    import lm_eval

    base_url = v1_server.url
    tasks = task_manager(tmp_path / "tasks")
    # batch_size 3: each POST carries several token lists (choices come back by index), as users run it
    lm = local_completions(base_url, batch_size=3)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=tasks, log_samples=True,
                                  num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0, bootstrap_iters=0)
    reference = Reference()

    choice = out["samples"]["tinyllama_mcp_tiny_choice"]
    assert len(choice) == 6
    compared = 0
    for sample in choice:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ll, greedy = resp[0]
            want_ll, want_greedy = reference.score(*lm._encode_pair(context, continuation))
            assert abs(ll - want_ll) < TOLERANCE, (context, continuation, ll, want_ll)
            assert greedy == want_greedy, (context, continuation)
            compared += 1
    assert compared == sum(len(s["doc"]["choices"]) for s in choice) == 18
    acc = out["results"]["tinyllama_mcp_tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0

    rolling = out["samples"]["tinyllama_mcp_tiny_rolling"]
    assert len(rolling) == 6
    for sample in rolling:
        (text,) = sample["arguments"][0]
        ll = sample["resps"][0][0]
        tokens = lm.tok_encode(text)
        want_ll, _ = reference.score([lm.prefix_token_id], tokens)  # one window: the text is short
        assert abs(ll - want_ll) < TOLERANCE, (text, ll, want_ll)
    assert math.isfinite(out["results"]["tinyllama_mcp_tiny_rolling"]["word_perplexity,none"])

    # The model's own greedy continuation: is_greedy compares floats exactly (token vs top), so it must be True.
    context = lm.tok_encode("Question: What does the release checklist start with?\nAnswer:")
    greedy = reference.greedy(context, 4)
    [(ll, is_greedy)] = lm._loglikelihood_tokens([(None, context, greedy)])
    want_ll, want_greedy = reference.score(context, greedy)
    assert want_greedy and is_greedy and abs(ll - want_ll) < TOLERANCE


def test_the_server_refuses_nothing_lm_eval_sends(v1_server, lm_eval_env):
    """Every payload shape local-completions builds, posted by lm-eval's own model_call."""
    from lm_eval.api.instance import Instance

    base_url = v1_server.url
    tokens_lm = local_completions(base_url, batch_size=2)
    text_lm = local_completions(base_url, tokenized_requests=False)
    prompts = [tokens_lm.tok_encode("Question: How do I name a feature branch?\nAnswer:"),
               tokens_lm.tok_encode("Which log level should a retry use?")]

    scored = tokens_lm.model_call(prompts, generate=False)  # token lists, echo + logprobs, max_tokens 1
    assert [c["index"] for c in sorted(scored["choices"], key=lambda c: c["index"])] == [0, 1]
    for choice in sorted(scored["choices"], key=lambda c: c["index"]):
        logprobs = choice["logprobs"]
        n = len(prompts[choice["index"]]) + 1  # every prompt token, then the generated one
        assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(logprobs["tokens"]) == n
        assert logprobs["token_logprobs"][0] is None
        assert all(isinstance(top, dict) and len(top) >= 1 for top in logprobs["top_logprobs"][1:])
    assert len(tokens_lm.parse_logprobs(scored, ctxlens=[3, 3])) == 2

    as_text = text_lm.model_call([prompts[0]], generate=False)  # decoded back to one string
    assert len(as_text["choices"]) == 1 and as_text["choices"][0]["logprobs"]["token_logprobs"][0] is None

    gen_kwargs = {"until": ["\n\n", "Question:"], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0}
    for lm, messages in ((tokens_lm, prompts), (text_lm, ["How do I name a feature branch?"])):
        generated = lm.model_call(messages, generate=True, gen_kwargs=gen_kwargs)
        assert len(lm.parse_generations(generated)) == len(messages)
        assert all(isinstance(text, str) for text in lm.parse_generations(generated))

    # generate_until as the evaluator calls it: extra generation fields go through as they are
    requests = [Instance("generate_until", {}, ("Question: 2 + 2 =\nAnswer:", dict(gen_kwargs, max_tokens=4)), 0),
                Instance("generate_until", {}, ("Where do build artefacts go?", dict(gen_kwargs)), 1)]
    texts = tokens_lm.generate_until(requests, disable_tqdm=True)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
