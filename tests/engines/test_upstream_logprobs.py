"""The ``openai`` engine's logprobs: one entry per token of the text it writes. An upstream chunk
with a token but no text (vLLM's server ends an answer with its end-of-sequence token so) gives no
entry to the text before it, also when one network read brings both (the server here sends the
whole answer in one write; deltas that steps gather: tests/engines/test_streams.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from breakwater.engines.base import GenerationRequest, SequenceDelta
from breakwater.engines.options import UpstreamOptions
from breakwater.engines.upstream import OpenAIUpstreamEngine
from tests.engines.raw_upstream import RawUpstream


def _entry(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.25, "bytes": list(token.encode()), "top_logprobs": []}


def _chunk(content: str, token: str | None, finish: str | None = None) -> dict[str, Any]:
    logprobs = {"content": [_entry(token)]} if token is not None else None
    choice = {"index": 0, "delta": {"content": content}, "logprobs": logprobs, "finish_reason": finish}
    return {"choices": [choice]}


# "Hi", " there", then the end-of-sequence token (no text), then the finish with the usage.
ANSWER = [
    _chunk("Hi", "Hi"),
    _chunk(" there", " there"),
    _chunk("", "<|im_end|>"),
    {**_chunk("", None, "stop"), "usage": {"prompt_tokens": 3, "completion_tokens": 3}},
]


class OneWriteServer(RawUpstream):
    """Answers every completion with :data:`ANSWER`, all in one write."""

    def __init__(self) -> None:
        super().__init__("lp")

    async def complete(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        await self.answer(writer, ANSWER)


@pytest.fixture
async def engine() -> AsyncIterator[OpenAIUpstreamEngine]:
    async with OneWriteServer() as url:
        engine = OpenAIUpstreamEngine(UpstreamOptions(url=url, metrics_url="off", wait_s=5))
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()


async def test_a_token_without_text_gives_its_entry_to_no_text(engine: OpenAIUpstreamEngine) -> None:
    engine.add(
        GenerationRequest("r1", messages=[{"role": "user", "content": "hi"}], max_tokens=8, logprobs=0)
    )
    deltas: list[SequenceDelta] = []
    async with asyncio.timeout(10):
        while not any(d.finished for d in deltas):
            deltas += await engine.step()
    # Each text with its own entries; the end-of-sequence token's entry apart, on no text (the
    # worker drops it there: the answer has no text for it). However the steps group the deltas.
    texts = [(d.text, "".join(e["token"] for e in d.logprobs or ())) for d in deltas if d.text]
    assert texts == [("Hi there", "Hi there")]
    assert [e["token"] for d in deltas if not d.text for e in d.logprobs or ()] == ["<|im_end|>"]
    assert deltas[-1].finish_reason == "stop"
    assert sum(d.tokens for d in deltas) == 3  # the upstream's count: the end token is one
