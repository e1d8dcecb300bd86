"""Text with the characters JSON leaves raw but Python's line splitting breaks at (NEL, LINE and
PARAGRAPH SEPARATOR) streams intact through the whole path: an upstream that writes them, the
``openai`` worker, Redis, the gateway's SSE, and a client reading with httpx's ``aiter_lines()`` (as
many Python clients do) or with the ``openai`` SDK. Before the gateway escaped them, the line-reading
client saw a data line cut in two and a broken stream (seen as a JSONDecodeError in a load test of
vLLM); the SDK splits bytes at CR and LF only and was not affected, its test checks the text end to
end."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from breakwater.redis_server import RedisServer, free_port
from tests.helpers import StackProcs, serving

ROOT = Path(__file__).resolve().parents[2]
MODEL = "fake"
TOKEN = " one\u2028two\x85three\u2029"
TOKENS = 12


@pytest.fixture(scope="module")
def upstream(log_dir: Path) -> Iterator[str]:
    """``benchmarks/fake_openai.py``: every token is ``TOKEN``."""
    port = free_port()
    command = [sys.executable, str(ROOT / "benchmarks" / "fake_openai.py"), "--port", str(port)]
    command += ["--model", MODEL, "--ttft-ms", "5", "--itl-ms", "2", "--token", TOKEN]
    url = f"http://127.0.0.1:{port}"
    with serving(command, log_dir / f"fake-openai-{port}.log", f"{url}/health", "the fake upstream", 30):
        yield url


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, log_dir: Path, upstream: str) -> Iterator[str]:
    procs = StackProcs(redis_server.url, f"n{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        procs.add_worker(MODEL, "openai", upstream_url=f"{upstream}/v1", upstream_metrics_url="off")
        procs.wait_workers(url, MODEL)
        yield url
    finally:
        procs.stop()


def test_a_line_reading_client_gets_every_event_whole(gateway: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": TOKENS,
        "stream": True,
    }
    text, ids = "", []
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = list(resp.iter_lines())  # splits as str.splitlines() does
    for line in lines:
        if line.startswith("id: "):
            ids.append(int(line[4:]))
        elif line.startswith("data: {"):
            chunk = orjson.loads(line[6:])  # a cut data line would fail here
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
        else:  # nothing else: no piece of a cut line
            assert line in ("", "data: [DONE]"), line
    assert text == TOKEN * TOKENS
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert ids == sorted(ids) and ids[0] == 1


def test_the_openai_sdk_gets_the_same_text_streamed_and_whole(gateway: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x")
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == TOKEN * TOKENS
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS)
    assert whole.choices[0].message.content == TOKEN * TOKENS
