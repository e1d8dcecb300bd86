"""The official openai client against gateway + Redis + sim worker: sync, async, streaming, both APIs."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.helpers import StackProcs, expected_sim, wait_for


def _url(stack: StackProcs) -> str:
    return stack.gateways[0][1]


def test_chat_completion_non_streaming(stack: StackProcs) -> None:
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused")
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello to the harbor"}]
    resp = client.chat.completions.create(model="sim", messages=messages, seed=7)
    text, reason, usage = expected_sim(messages=messages, seed=7)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "sim"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text
    assert resp.choices[0].finish_reason == reason
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == usage["prompt_tokens"]
    assert resp.usage.completion_tokens == usage["completion_tokens"]
    assert resp.usage.total_tokens == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_completion_streaming_with_usage(stack: StackProcs) -> None:
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused")
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "stream please"},
    ]
    chunks = list(
        client.chat.completions.create(
            model="sim",
            messages=messages,
            seed=11,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text, reason, usage = expected_sim(messages=messages, seed=11, max_tokens=20)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == usage["completion_tokens"] == 20
    assert len({c.id for c in chunks}) == 1


def test_completion_non_streaming_and_stop(stack: StackProcs) -> None:
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused")
    full, _, _ = expected_sim(prompt="tell me about tides", seed=3, max_tokens=30)
    stop = full.split()[5]  # a word that certainly occurs
    resp = client.completions.create(
        model="sim", prompt="tell me about tides", seed=3, max_tokens=30, stop=[stop]
    )
    text, reason, usage = expected_sim(prompt="tell me about tides", seed=3, max_tokens=30, stop=[stop])
    assert resp.object == "text_completion"
    assert resp.choices[0].text == text
    assert stop not in resp.choices[0].text
    assert resp.choices[0].finish_reason == reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == usage["completion_tokens"]


def test_completion_streaming_sse_ids_are_sequence_numbers(stack: StackProcs) -> None:
    body = {"model": "sim", "prompt": "count with me", "seed": 5, "max_tokens": 12, "stream": True}
    ids: list[int] = []
    datas: list[str] = []
    with httpx.stream("POST", f"{_url(stack)}/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if line.startswith("id: "):
                ids.append(int(line[4:]))
            elif line.startswith("data: "):
                datas.append(line[6:])
    assert ids == [*range(1, 14)]  # 12 tokens, then the final chunk (seq 13)
    assert datas[-1] == "[DONE]"


async def test_async_client_streaming_and_non_streaming(stack: StackProcs) -> None:
    client = openai.AsyncOpenAI(base_url=f"{_url(stack)}/v1", api_key="unused")
    resp = await client.completions.create(model="sim", prompt="async hello", seed=21, max_tokens=16)
    text, _, _ = expected_sim(prompt="async hello", seed=21, max_tokens=16)
    assert resp.choices[0].text == text
    stream = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "async stream"}], seed=22, stream=True
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    expected, _, _ = expected_sim(messages=[{"role": "user", "content": "async stream"}], seed=22)
    assert "".join(parts) == expected
    await client.close()


def test_same_seed_same_output_different_seed_differs(stack: StackProcs) -> None:
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused")
    a = client.completions.create(model="sim", prompt="determinism", seed=99, max_tokens=16).choices[0].text
    b = client.completions.create(model="sim", prompt="determinism", seed=99, max_tokens=16).choices[0].text
    c = client.completions.create(model="sim", prompt="determinism", seed=100, max_tokens=16).choices[0].text
    assert a == b
    assert a != c


def test_identical_greedy_requests_get_one_answer(stack: StackProcs) -> None:
    """Temperature 0 is greedy: 20 identical unseeded requests give one answer, as real engines do
    (the sim used to seed each request by its id). Sampled ones still differ."""
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused")
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "the same question"}]
    greedy = {
        client.chat.completions.create(model="sim", messages=ask, temperature=0).choices[0].message.content
        for _ in range(20)
    }
    assert len(greedy) == 1 and next(iter(greedy))
    sampled = {
        client.chat.completions.create(model="sim", messages=ask, temperature=1).choices[0].message.content
        for _ in range(5)
    }
    assert len(sampled) > 1


def test_models_lists_live_worker_model(stack: StackProcs) -> None:
    client = openai.OpenAI(base_url=f"{_url(stack)}/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == ["sim"]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


def test_request_id_header_echoed_validated_and_generated(stack: StackProcs) -> None:
    url = _url(stack)
    ok = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "trace-abc.123"})
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == "trace-abc.123"
    bad = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "has spaces\tand tabs"})
    assert bad.headers["x-request-id"] != "has spaces\tand tabs"
    assert len(bad.headers["x-request-id"]) == 32
    err = httpx.post(f"{url}/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert err.status_code == 400
    assert len(err.headers["x-request-id"]) == 32


def test_request_id_reaches_worker_logs(stack: StackProcs) -> None:
    url = _url(stack)
    resp = httpx.post(
        f"{url}/v1/completions",
        json={"model": "sim", "prompt": "trace me", "max_tokens": 2},
        headers={"X-Request-ID": "e2e-trace-42"},
        timeout=30,
    )
    assert resp.status_code == 200
    rid = resp.json()["id"]

    def lines() -> list[str]:
        return [line for line in stack.workers[0].log().splitlines() if rid in line]

    # The client has its answer before the worker has logged the job's end: poll the log.
    wait_for(lambda: any('"job finished"' in line for line in lines()), 10, what="job finished logged")
    assert all('"request_id":"e2e-trace-42"' in line for line in lines())


def test_metrics_expose_token_centric_set(stack: StackProcs) -> None:
    url = _url(stack)
    httpx.post(
        f"{url}/v1/completions",
        json={"model": "sim", "prompt": "metric", "max_tokens": 3, "stream": True},
        timeout=30,
    )
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "breakwater_ttft_seconds_bucket",
        "breakwater_itl_seconds_bucket",
        "breakwater_e2e_seconds_bucket",
        "breakwater_tpot_seconds_bucket",
        "breakwater_queue_depth",
        "breakwater_active_streams",
        'breakwater_tokens_total{direction="out",model="sim"}',
        'breakwater_requests_total{model="sim",status="completed"}',
        "breakwater_workers",
        "breakwater_batch_occupancy",
    ):
        assert name in text, name
