"""The real model through gateway + Redis + llamacpp workers, including a SIGKILL mid-generation."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import openai
import orjson
import pytest
import websockets
from openai.types.chat import ChatCompletionMessageParam
from redis.asyncio import Redis

from tests.helpers import StackProcs, assert_knows_paris, stream_killing_owner

MODEL = "smollm2-135m-instruct"


def test_chat_answers_a_simple_instruction(client: openai.OpenAI) -> None:
    assert_knows_paris(client, MODEL)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra is not None and models.data[0].model_extra["context_length"] == 1024


def test_prompt_over_context_is_refused_before_queueing(llama_stack: StackProcs) -> None:
    url = llama_stack.gateways[0][1]
    resp = httpx.post(
        f"{url}/v1/completions", json={"model": MODEL, "prompt": "word " * 8000, "max_tokens": 4}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_an_empty_prompt_is_a_400_and_the_worker_serves_on(client: openai.OpenAI) -> None:
    """It had no tokens (SmolLM2 adds no BOS): the worker crashed on it, and again on each reclaim,
    and its client got a 500 (``max_attempts_exceeded``) after three restarts."""
    for prompt in ("", ["The sky is", ""]):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
        assert info.value.code == "empty_prompt" and info.value.param == "prompt"
    assert_knows_paris(client, MODEL)


async def test_sigkilled_llamacpp_worker_is_continued_seamlessly(
    llama_stack: StackProcs, redis: Redis
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "temperature": 0,
        "max_tokens": 120,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    got = await stream_killing_owner(llama_stack, redis, "/v1/chat/completions", body, kill_after=15)
    text, usage, record = got.text, got.usage, got.record
    assert text == record.emitted
    assert usage is not None and usage["completion_tokens"] == 120
    assert len(text.split()) > 40


def test_embeddings_from_the_bundled_model(client: openai.OpenAI) -> None:
    """Mean-pooled SmolLM2 embeddings through the queue: shape, order, `dimensions`, and meaning."""
    texts = [
        "The cat sits on the mat.",
        "A cat is sitting on a rug.",
        "Quarterly revenue grew by eight percent.",
    ]
    got = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in got.data] == [0, 1, 2]
    cat, rug, revenue = (d.embedding for d in got.data)
    assert len(cat) == 576  # SmolLM2-135M's hidden size
    assert math.isclose(sum(x * x for x in cat), 1.0, rel_tol=1e-4)

    def similarity(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert similarity(cat, rug) > similarity(cat, revenue) and similarity(cat, rug) > similarity(rug, revenue)
    assert got.usage.prompt_tokens > 15
    short = client.embeddings.create(model=MODEL, input=texts[0], dimensions=64).data[0].embedding
    assert len(short) == 64
    models = {m.id: m.model_extra or {} for m in client.models.list().data}
    assert "embeddings" in models[MODEL]["features"]


def test_logprobs_come_from_the_model(client: openai.OpenAI) -> None:
    """Greedy decoding with logprobs: every chosen token is the top-1 of its distribution, values are
    <= 0 and sorted, the tokens spell the answer; streamed chunks carry them too; completions get
    OpenAI's legacy shape."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a primary color."}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    choice = chat.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    assert chat.usage is not None and len(entries) == chat.usage.completion_tokens - (
        choice.finish_reason == "stop"
    )
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen token is a most likely one
        assert entry.token in {t.token for t in entry.top_logprobs}
        assert bytes(entry.bytes or []).decode() == entry.token
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=12, logprobs=True, stream=True
    )
    pieces = [
        e
        for chunk in streamed
        for c in chunk.choices
        if c.logprobs and c.logprobs.content
        for e in c.logprobs.content
    ]
    assert [e.token for e in pieces] == [e.token for e in entries]
    assert [e.logprob for e in pieces] == pytest.approx([e.logprob for e in entries], abs=1e-3)
    assert all(e.top_logprobs == [] for e in pieces)  # top_logprobs not asked for: none
    text = client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, logprobs=2
    )
    lp = text.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert "".join(lp.tokens) == text.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == value and top[token] == value


async def test_websocket_token_messages_carry_the_logprobs(
    llama_stack: StackProcs, client: openai.OpenAI
) -> None:
    """Over the WebSocket, each token message carries its tokens' entries: the same as the HTTP
    answer's (greedy), spelling the message's text."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a primary color."}]
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 8, "top_logprobs": 2}
    answer = client.chat.completions.create(**body, logprobs=True)  # type: ignore[call-overload]
    assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content
    want = [(e.token, e.logprob) for e in answer.choices[0].logprobs.content]
    url = llama_stack.gateways[0][1].replace("http://", "ws://") + "/v1/ws"
    tokens: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws, asyncio.timeout(60):
        await ws.send(orjson.dumps({**body, "logprobs": True}).decode())
        while (message := orjson.loads(await ws.recv()))["type"] not in ("done", "error"):
            if message["type"] == "token":
                tokens.append(message)
    assert message["type"] == "done", message
    assert tokens and all("".join(e["token"] for e in m["logprobs"]) == m["text"] for m in tokens)
    got = [(e["token"], e["logprob"]) for m in tokens for e in m["logprobs"]]
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-3)
    assert all(len(e["top_logprobs"]) == 2 for m in tokens for e in m["logprobs"])


def test_n_sampled_choices_differ_and_repeat_with_the_seed(client: openai.OpenAI) -> None:
    """n=3 at temperature 1 with a seed: three choices (each its own request, seed + index), not all
    the same; the same seed gives the same three again."""
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name an animal."}]

    def ask() -> list[str]:
        resp = client.chat.completions.create(
            model=MODEL, messages=messages, n=3, temperature=1.0, seed=42, max_tokens=10
        )
        assert [c.index for c in resp.choices] == [0, 1, 2]
        assert resp.usage is not None and resp.usage.completion_tokens >= 3
        return [c.message.content or "" for c in resp.choices]

    first = ask()
    assert all(first) and len(set(first)) > 1, first
    assert ask() == first


def test_logit_bias_and_penalties_through_the_stack(client: openai.OpenAI) -> None:
    """As a client sends them: a token biased +100 is the whole greedy answer (and a different
    answer from the unbiased one, which the response cache must not give); a token id the model's
    vocabulary lacks is 400 at admission; a frequency penalty changes the greedy answer."""
    france: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model=MODEL, messages=france, temperature=0, max_tokens=6)
    paris = 7042  # " Paris" in SmolLM2's vocabulary (tests/engines/test_llamacpp.py finds it by tokenizing)
    biased = client.chat.completions.create(
        model=MODEL, messages=france, temperature=0, max_tokens=6, logit_bias={str(paris): 100}
    )
    assert biased.choices[0].message.content == " Paris" * 6 != plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=france, max_tokens=6, logit_bias={"1000000": 5})
    assert isinstance(info.value.body, dict)
    assert (info.value.body["param"], info.value.body["code"]) == ("logit_bias", "invalid_value")
    days: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "List the days of the week, one per line, then the months of the year."}
    ]
    answers = [
        client.chat.completions.create(
            model=MODEL, messages=days, temperature=0, max_tokens=60, frequency_penalty=penalty
        )
        .choices[0]
        .message.content
        for penalty in (0.0, 2.0)
    ]
    assert answers[0] != answers[1] and (answers[0] or "").count("\n") > (answers[1] or "").count("\n")
