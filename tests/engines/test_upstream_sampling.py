"""The ``openai`` engine passes the client's sampling parameters on to the upstream, as OpenAI names
them (penalties, ``logit_bias`` with its token ids as strings); those at their defaults are left out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from breakwater.engines.base import GenerationRequest, SequenceDelta
from breakwater.engines.upstream import OpenAIUpstreamEngine
from tests.engines.raw_upstream import RawUpstream, started_engine


class RecordingUpstream(RawUpstream):
    """Records each completion's body and answers "ok"."""

    def __init__(self) -> None:
        super().__init__("sampling")
        self.bodies: list[dict[str, Any]] = []

    async def complete(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.bodies.append(body)
        await self.answer(
            writer, [{"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}]
        )


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[RecordingUpstream, OpenAIUpstreamEngine]]:
    server = RecordingUpstream()
    async with started_engine(server) as engine:
        yield server, engine


async def _run(engine: OpenAIUpstreamEngine, request: GenerationRequest) -> list[SequenceDelta]:
    engine.add(request)
    deltas: list[SequenceDelta] = []
    async with asyncio.timeout(10):
        while not any(d.finished for d in deltas):
            deltas += await engine.step()
    return deltas


async def test_penalties_and_logit_bias_reach_the_upstream(
    upstream: tuple[RecordingUpstream, OpenAIUpstreamEngine],
) -> None:
    server, engine = upstream
    messages = [{"role": "user", "content": "hi"}]
    asked = GenerationRequest(
        "r1", messages=messages, presence_penalty=0.5, frequency_penalty=-1.0, logit_bias={42: -100.0, 7: 2.5}
    )
    assert "".join(d.text for d in await _run(engine, asked)) == "ok"
    await _run(engine, GenerationRequest("r2", messages=messages))
    sent, plain = server.bodies
    assert (sent["presence_penalty"], sent["frequency_penalty"]) == (0.5, -1.0)
    assert sent["logit_bias"] == {"42": -100.0, "7": 2.5}
    assert not {"presence_penalty", "frequency_penalty", "logit_bias"} & set(plain)


async def test_a_text_completion_without_a_bound_says_so_to_the_upstream(
    upstream: tuple[RecordingUpstream, OpenAIUpstreamEngine],
) -> None:
    """OpenAI's and vLLM's ``/v1/completions`` stop at 16 tokens when ``max_tokens`` is left out: a
    request without a bound sends ``null``; a bounded one its bound; a chat request, nothing."""
    server, engine = upstream
    await _run(engine, GenerationRequest("r1", prompt="once upon"))
    await _run(engine, GenerationRequest("r2", prompt="once upon", max_tokens=40))
    await _run(engine, GenerationRequest("r3", messages=[{"role": "user", "content": "hi"}]))
    unbounded, bounded, chat = server.bodies
    assert "max_tokens" in unbounded and unbounded["max_tokens"] is None
    assert bounded["max_tokens"] == 40
    assert "max_tokens" not in chat
