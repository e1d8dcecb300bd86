"""A stream's live tokens written to the client from the gateway's Pub/Sub callback
(gateway/streaming.py ``ClientWrites``): the gateway really takes that path under uvicorn, and what
the client gets, and what the gateway's metrics count, are what the stream task would have sent."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, expected_sim, one_gateway_one_worker

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "write straight to me"}]
DIRECT = "breakwater_stream_events_direct_total"
ITL_COUNT = 'breakwater_itl_seconds_count{model="sim"}'
TTFT_COUNT = 'breakwater_ttft_seconds_count{model="sim"}'


@pytest.fixture(scope="module")
def paced_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """A gateway and a sim worker at ~15 ms per step: a stream's reader waits between its tokens."""
    with one_gateway_one_worker(
        redis_server.url, "d", log_dir, sim_decode_base_ms=15, heartbeat_s=0.5
    ) as procs:
        yield procs


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_tokens_go_straight_to_the_client_exactly(paced_stack: StackProcs) -> None:
    url = paced_stack.gateways[0][1]
    text, finish, usage = expected_sim(messages=MESSAGES, seed=31, max_tokens=24)
    direct0, itl0, ttft0 = _metric(url, DIRECT), _metric(url, ITL_COUNT), _metric(url, TTFT_COUNT)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model="sim",
                messages=MESSAGES,
                seed=31,
                max_tokens=24,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    contents = [d.content for d in deltas if d.content]
    assert "".join(contents) == text
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == usage["completion_tokens"]
    assert len({c.id for c in chunks}) == 1
    # The final chunks go through the stream's task; with ~15 ms between tokens its reader is
    # waiting when each token arrives, so (nearly) all of them are written from the callback.
    direct = _metric(url, DIRECT) - direct0
    assert len(contents) >= direct >= len(contents) // 2, (direct, len(contents))
    # One first token (its TTFT) and one inter-token interval per later token, whichever way each went.
    assert _metric(url, TTFT_COUNT) - ttft0 == 1
    assert _metric(url, ITL_COUNT) - itl0 == len(contents) - 1


def test_a_completion_stream_keeps_its_chunks_whichever_way_they_go(paced_stack: StackProcs) -> None:
    url = paced_stack.gateways[0][1]
    text, finish, _ = expected_sim(prompt="plain text, straight", seed=32, max_tokens=20)
    direct0 = _metric(url, DIRECT)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        chunks = list(
            client.completions.create(
                model="sim", prompt="plain text, straight", seed=32, max_tokens=20, stream=True
            )
        )
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert _metric(url, DIRECT) > direct0


def test_event_ids_are_each_seq_once_in_order(paced_stack: StackProcs) -> None:
    """The raw stream: every token event carries its seq as the SSE id, 1, 2, ... with no gap or
    repeat, across the events written from the callback and those the task wrote."""
    url = paced_stack.gateways[0][1]
    body = {"model": "sim", "messages": MESSAGES, "seed": 33, "max_tokens": 16, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = list(resp.iter_lines())
    ids = [int(line[4:]) for line in lines if line.startswith("id: ")]
    assert [line for line in lines if line][-1] == "data: [DONE]"
    # the final chunk (finish_reason) carries the terminal event's seq: one past the last token
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 2
