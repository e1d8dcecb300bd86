"""The ``openai`` engine in front of a real model served by ``llama-cpp-python[server]``.

That server has no vLLM metrics and no streaming usage, so the worker falls back to its in-flight cap
and counts streamed tokens; answers must still be the model's, and a SIGKILLed worker's request is
continued by the other worker through the same upstream.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from redis.asyncio import Redis

from breakwater.engines.models import bundled_gguf
from breakwater.redis_server import RedisServer, free_port
from tests.helpers import StackProcs, assert_knows_paris, serving, stream_killing_owner

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def llama_server(log_dir: Path) -> Iterator[str]:
    port = free_port()
    command = [
        *(sys.executable, "-m", "llama_cpp.server"),
        *("--model", str(bundled_gguf(MODEL)), "--model_alias", "smol"),
        *("--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"),
        *("--interrupt_requests", "False"),
    ]
    url = f"http://127.0.0.1:{port}"
    with serving(
        command, log_dir / "llama-cpp-server.log", f"{url}/v1/models", "llama-cpp-python server", 60
    ):
        yield url


@pytest.fixture(scope="module")
def proxied(redis_server: RedisServer, log_dir: Path, llama_server: str) -> Iterator[StackProcs]:
    procs = StackProcs(redis_server.url, f"p{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        for _ in range(2):
            procs.add_worker(
                MODEL,
                "openai",
                upstream_url=f"{llama_server}/v1",
                upstream_model="smol",
                context_length=2048,
                capacity=2,
                heartbeat_s=0.3,
            )
        procs.wait_workers(url, MODEL, count=2)
        yield procs
    finally:
        procs.stop()


def test_real_answer_through_the_upstream(proxied: StackProcs) -> None:
    client = openai.OpenAI(base_url=f"{proxied.gateways[0][1]}/v1", api_key="x")
    assert_knows_paris(client, MODEL)
    models = {m.id: m.model_extra or {} for m in client.models.list().data}
    assert models[MODEL]["context_length"] == 2048


def test_stop_and_length_through_the_upstream(proxied: StackProcs) -> None:
    client = openai.OpenAI(base_url=f"{proxied.gateways[0][1]}/v1", api_key="x")
    prompt = "Count from 1 to 50, separated by commas: 1, 2, 3,"
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 6
    stopped = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=60, stop=["8"])
    text = stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    assert "8" not in text and "7" in text


async def test_sigkilled_worker_is_continued_through_the_upstream(proxied: StackProcs, redis: Redis) -> None:
    body = {
        "model": MODEL,
        "prompt": "Count from 1 to 50, separated by commas: 1, 2, 3,",
        "temperature": 0,
        "max_tokens": 60,
    }
    got = await stream_killing_owner(proxied, redis, "/v1/completions", body, kill_after=8)
    text = got.text
    # Greedy decoding continued from prompt + emitted text: the count goes on without a repeat or gap.
    numbers = [int(n) for n in text.replace(" ", "").split(",") if n.isdigit()]
    assert numbers[:10] == list(range(4, 14))
