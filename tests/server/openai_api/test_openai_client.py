"""The `openai` client against a real server: chat and completions, plain and streamed, logprobs, n and seeds,
stop strings, echo with prompt logprobs, token prompts, tokenize/detokenize, and the raw SSE framing."""

from __future__ import annotations

import json
import math

import httpx2
import pytest

from tests.server.openai_api.conftest import AUTH

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which log level should a retry use?"}]


def test_models_list_tiny_demo(openai_client):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids[0] == "tiny-demo"
    card = openai_client.models.retrieve("tiny-demo")
    assert card.owned_by == "tinyllama-mcp" and card.model_extra["root"] == "tiny-demo"
    assert card.model_extra["parent"] is None and card.created > 0


def test_chat_plain(openai_client):
    out = openai_client.chat.completions.create(model="tiny-demo", messages=CHAT, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "tiny-demo"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert out.usage.prompt_tokens > 5 and 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # greedy is deterministic; max_completion_tokens is max_tokens' newer name
    again = openai_client.chat.completions.create(model="tiny-demo", messages=CHAT, max_completion_tokens=8,
                                                  temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_chat_streamed_matches_plain(openai_client):
    plain = openai_client.chat.completions.create(model="tiny-demo", messages=CHAT, max_tokens=40, temperature=0)
    chunks = list(openai_client.chat.completions.create(
        model="tiny-demo", messages=CHAT, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_sse_framing(v1_server):
    """The exact wire format: data lines, a role delta first, finish_reason, no usage unless asked, [DONE]."""
    body = {"model": "tiny-demo", "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx2.Client(timeout=60) as http:
        with http.stream("POST", f"{v1_server.v1}/chat/completions", json=body, headers=AUTH) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)


def test_chat_logprobs(openai_client):
    out = openai_client.chat.completions.create(model="tiny-demo", messages=CHAT, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens or len(content) == out.usage.completion_tokens - 1
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert bytes(item.bytes).decode("utf-8", errors="backslashreplace") == item.token
        # greedy: the chosen token is the most likely one
        assert math.isclose(item.logprob, item.top_logprobs[0].logprob, abs_tol=1e-4)
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
    raw = b"".join(bytes(item.bytes) for item in content).decode("utf-8", errors="replace")
    assert raw.strip() == out.choices[0].message.content
    # streamed, the logprobs arrive with the chunks (here: the finish chunk) and add up to the same list
    chunks = openai_client.chat.completions.create(model="tiny-demo", messages=CHAT, max_tokens=6, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True)
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [i.model_dump() for i in streamed] == [i.model_dump() for i in content]


def test_n_choices_and_seeds(openai_client):
    kwargs = dict(model="tiny-demo", messages=CHAT, max_tokens=12, temperature=1.0, seed=11)
    out = openai_client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1, texts  # choice i is seeded with seed + i
    # each choice is reproducible on its own: choice 1 of seed 11 is choice 0 of seed 12
    alone = openai_client.chat.completions.create(**{**kwargs, "seed": 12})
    assert alone.choices[0].message.content == texts[1]
    assert openai_client.chat.completions.create(n=3, **kwargs).choices[2].message.content == texts[2]


def test_streamed_n_choices(openai_client):
    chunks = list(openai_client.chat.completions.create(model="tiny-demo", messages=CHAT, max_tokens=10,
                                                        temperature=1.0, seed=5, n=2, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    plain = openai_client.chat.completions.create(model="tiny-demo", messages=CHAT, max_tokens=10, temperature=1.0,
                                                  seed=5, n=2)
    assert texts == {c.index: c.message.content for c in plain.choices}


def test_stop_strings(openai_client):
    free = openai_client.completions.create(model="tiny-demo", prompt="hello world", max_tokens=30, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    cut = openai_client.completions.create(model="tiny-demo", prompt="hello world", max_tokens=30, temperature=0,
                                           stop=stop)
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = openai_client.completions.create(model="tiny-demo", prompt="hello world", max_tokens=30,
                                                temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_completions_plain_streamed_and_token_prompts(openai_client):
    plain = openai_client.completions.create(model="tiny-demo", prompt="The release checklist", max_tokens=12,
                                             temperature=0)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    text = plain.choices[0].text
    assert len(text) > 0 and plain.usage.completion_tokens == 12 and plain.choices[0].finish_reason == "length"
    chunks = list(openai_client.completions.create(model="tiny-demo", prompt="The release checklist", max_tokens=12,
                                                   temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    ids = openai_client.post("/tokenize", body={"model": "tiny-demo", "prompt": "The release checklist"}, cast_to=object)
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] >= 512
    by_ids = openai_client.completions.create(model="tiny-demo", prompt=ids["tokens"], max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text
    several = openai_client.completions.create(model="tiny-demo", prompt=["The release checklist", "A branch"],
                                               max_tokens=4, temperature=0, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == text[:len(several.choices[0].text)]
    batch = openai_client.completions.create(model="tiny-demo", prompt=[ids["tokens"], ids["tokens"][:3]],
                                             max_tokens=4, temperature=0)
    assert len(batch.choices) == 2 and batch.choices[0].text == several.choices[0].text


def test_echo_with_prompt_logprobs(openai_client):
    """What lm-eval's local-completions sends: echo, logprobs 1, max_tokens 1 (and 0)."""
    prompt = "hello world, the release checklist"
    scored = openai_client.completions.create(model="tiny-demo", prompt=prompt, max_tokens=1, temperature=0,
                                              echo=True, logprobs=1)
    choice = scored.choices[0]
    lp = choice.logprobs
    prompt_ids = openai_client.post("/tokenize", body={"model": "tiny-demo", "prompt": prompt}, cast_to=object)["tokens"]
    assert len(lp.tokens) == len(prompt_ids) + 1 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert choice.text.startswith(prompt)
    assert "".join(lp.tokens[:len(prompt_ids)]) == prompt
    n = len(prompt_ids)
    assert [choice.text[a:b] for a, b in zip(lp.text_offset[:n], lp.text_offset[1:n + 1])] == lp.tokens[:n]
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] == logprob and max(top.values()) >= logprob and len(top) <= 2
    # max_tokens 0: the prompt scored alone, the same numbers
    only = openai_client.completions.create(model="tiny-demo", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    # the numbers transformers computes for the same model
    import torch
    from transformers import AutoModelForCausalLM

    from tinyllama_mcp.pipeline.tiny_demo import model_dir

    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits[0].log_softmax(-1)
    expected = [logits[i - 1, prompt_ids[i]].item() for i in range(1, len(prompt_ids))]
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=2e-3)


def test_tokenize_detokenize(openai_client):
    text = "hello world"
    out = openai_client.post("/tokenize", body={"model": "tiny-demo", "prompt": text}, cast_to=object)
    assert openai_client.post("/detokenize", body={"model": "tiny-demo", "tokens": out["tokens"]},
                              cast_to=object) == {"prompt": text}
    chat = openai_client.post("/tokenize", body={"model": "tiny-demo", "messages": CHAT}, cast_to=object)
    back = openai_client.post("/detokenize", body={"model": "tiny-demo", "tokens": chat["tokens"]}, cast_to=object)
    assert back["prompt"].startswith("<|system|>\nBe brief.") and back["prompt"].endswith("<|assistant|>\n")
    plain = openai_client.chat.completions.create(model="tiny-demo", messages=CHAT, max_tokens=1)
    assert plain.usage.prompt_tokens == chat["count"]


def test_v1_beside_sse_and_hf_local_model_path(tmp_path, shared_cache):
    """The SSE transport serves /v1 too; HF_LOCAL_MODEL_PATH is listed and served under its own name."""
    from tinyllama_mcp.pipeline.tiny_demo import ensure_tiny_demo

    from tests.server.openai_api.conftest import start_server
    from tests.server.support import prepare_home

    local = str(ensure_tiny_demo())
    server = start_server(prepare_home(tmp_path / "home", shared_cache), shared_cache, transport="sse",
                          HF_LOCAL_MODEL_PATH=local)
    try:
        with httpx2.Client(timeout=60, headers=AUTH) as http:
            models = http.get(f"{server.v1}/models").json()["data"]
            assert [m["id"] for m in models] == ["tiny-demo", local] and models[1]["root"] == local
            answer = http.post(f"{server.v1}/chat/completions", json={
                "model": local, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert answer.status_code == 200 and answer.json()["model"] == local
            with http.stream("GET", f"{server.url}/sse") as events:  # MCP's SSE still served beside it
                assert events.status_code == 200 and next(events.iter_lines()).startswith("event: endpoint")
    finally:
        assert server.stop() == 0
