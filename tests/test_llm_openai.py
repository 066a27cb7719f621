"""The OpenAI-compatible routes, driven by the official ``openai`` client against a real server."""

from __future__ import annotations

import json

import openai  # the dev extra installs it: a missing client fails loudly, it is not skipped
import pytest
import transformers  # noqa: F401 - the llm backend needs it (dev extra)

from tests import llm_helpers as h

PROMPT = "A language model reads a prompt"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a token?"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(llm_server):
    c = openai.OpenAI(base_url=f"http://{llm_server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tok():
    return h.tokenizer()


def test_models_lists_the_llm(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["llm"]
    assert client.models.retrieve("llm").id == "llm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion_with_usage(client, tok):
    result = client.completions.create(model="llm", prompt=PROMPT, max_tokens=9, **GREEDY)
    assert result.object == "text_completion" and len(result.choices) == 1
    choice = result.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert result.usage.prompt_tokens == len(tok(PROMPT)["input_ids"])
    assert result.usage.completion_tokens == 9
    assert result.usage.total_tokens == result.usage.prompt_tokens + 9
    extra = result.usage.model_extra  # inferd's per-request timing
    assert extra["time_to_first_token"] > 0 and extra["compute_time"] > 0


def test_streamed_completion_equals_whole_and_reports_usage(client):
    whole = client.completions.create(model="llm", prompt=PROMPT, max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model="llm", prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert len(chunks) > 2
    text_chunks, last = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_echo_prepends_the_prompt(client):
    result = client.completions.create(model="llm", prompt=PROMPT, max_tokens=3, echo=True, **GREEDY)
    assert result.choices[0].text.startswith(PROMPT)


def test_chat_uses_the_tokenizer_template(client, tok):
    result = client.chat.completions.create(model="llm", messages=MESSAGES, max_tokens=6, **GREEDY)
    assert result.object == "chat.completion"
    message = result.choices[0].message
    assert message.role == "assistant" and message.content
    templated = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert result.usage.prompt_tokens == len(templated)
    assert result.usage.completion_tokens == 6


def test_streamed_chat_role_first_then_content_then_usage(client):
    whole = client.chat.completions.create(model="llm", messages=MESSAGES, max_completion_tokens=10, **GREEDY)
    chunks = list(client.chat.completions.create(model="llm", messages=MESSAGES, max_completion_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    body, last = chunks[1:-1], chunks[-1]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    assert body[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.total_tokens == whole.usage.total_tokens


def test_n_choices_with_seed(client):
    result = client.completions.create(model="llm", prompt=PROMPT, max_tokens=8, n=3, seed=11, temperature=1.0,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    assert result.usage.completion_tokens == 24
    again = client.completions.create(model="llm", prompt=PROMPT, max_tokens=8, n=3, seed=11, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in result.choices]  # seeded: reproducible
    streamed = list(client.completions.create(model="llm", prompt=PROMPT, max_tokens=8, n=2, stream=True,
                                              **GREEDY))
    per_index = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            per_index[choice.index] += choice.text
    assert per_index[0] == per_index[1] != ""  # greedy: both choices alike


def test_logprobs(client):
    result = client.completions.create(model="llm", prompt=PROMPT, max_tokens=4, logprobs=2, **GREEDY)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == result.choices[0].text
    chat = client.chat.completions.create(model="llm", messages=MESSAGES, max_tokens=3, logprobs=True,
                                          top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)
    assert content[0].top_logprobs[0].logprob == content[0].logprob  # greedy: the chosen is the best


def test_errors_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x")
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="llm", prompt="x", temperature=7)
    assert err.value.body["param"] == "temperature" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="can only be used when"):
        client.completions.create(model="llm", prompt="x", stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match=r"max_tokens \(5000\).*max_model_len 1024"):
        client.completions.create(model="llm", prompt="x", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # refused before any chunk is streamed
        list(client.chat.completions.create(model="llm", messages=MESSAGES, max_tokens=5000, stream=True))
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="llm", messages=[])
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="llm", prompt="x", logit_bias={"1": 5})


def test_client_disconnect_cancels_generation(client, llm_server):
    labels = {"model": "llm", "version": "1"}
    h.wait_metric(llm_server.metrics_port, "vllm:num_requests_running", 0, **labels)
    stream = client.chat.completions.create(model="llm", messages=MESSAGES, max_tokens=900, stream=True, **GREEDY)
    for seen, _ in enumerate(stream, 1):
        if seen == 3:
            break
    assert h.metric(h.scrape(llm_server.metrics_port), "vllm:num_requests_running", **labels) == 1
    stream.close()
    samples = h.wait_metric(llm_server.metrics_port, "vllm:num_requests_running", 0, **labels)
    assert h.metric(samples, "vllm:num_requests_running", **labels) == 0
    assert h.metric(samples, "vllm:kv_cache_usage_perc", **labels) == 0


def test_plain_chat_template():
    from server.core import chat

    prompt = chat.plain_prompt(chat.normalize([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]))
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"
    json.dumps(prompt)
