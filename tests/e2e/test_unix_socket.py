"""Redis on a unix socket (``unix://`` URL): the gateway and a worker serve, stream and resume through
it as through TCP; the embedded stack's own processes use one (tests/stack/test_supervisor.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from breakwater.redis_server import RedisServer
from tests.e2e.test_resume import _chunk_text, _read_sse
from tests.helpers import StackProcs, expected_sim


@pytest.fixture(scope="module")
def unix_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("unix-redis"), unix_socket=True)
    assert server.socket_path is not None, "the test's socket path must fit (103 bytes)"
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def unix_stack(unix_redis: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    assert unix_redis.local_url.startswith("unix://")
    procs = StackProcs(unix_redis.local_url, f"u{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        procs.add_worker(sim_decode_base_ms=20, heartbeat_s=0.5)
        procs.wait_workers(url)
        yield procs
    finally:
        procs.stop()


def test_completions_and_streams_over_a_unix_socket(unix_stack: StackProcs, unix_redis: RedisServer) -> None:
    url = unix_stack.gateways[0][1]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "over the socket"}]
    resp = client.chat.completions.create(model="sim", messages=messages, seed=3, max_tokens=12)
    text, reason, _ = expected_sim(messages=messages, seed=3, max_tokens=12)
    assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == (text, reason)
    chunks = list(
        client.chat.completions.create(model="sim", messages=messages, seed=4, max_tokens=16, stream=True)
    )
    text, reason, _ = expected_sim(messages=messages, seed=4, max_tokens=16)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [reason]
    # Every connection the gateway and the worker hold is the socket's: none came over TCP.
    with redis.Redis(port=unix_redis.port, decode_responses=True) as tcp:
        me = tcp.client_id()
        addrs = [c["addr"] for c in tcp.client_list() if int(c["id"]) != me]
    assert len(addrs) >= 4  # each process's pool, raw pipeline and Pub/Sub reader (and the worker's read)
    assert all(a.startswith("/") for a in addrs), addrs  # its path (Redis may shorten it), not ip:port


def test_resume_over_a_unix_socket(unix_stack: StackProcs) -> None:
    url = unix_stack.gateways[0][1]
    messages = [{"role": "user", "content": "resume over the socket"}]
    body = {"model": "sim", "messages": messages, "seed": 77, "max_tokens": 30, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        head, done = _read_sse(resp, stop_after=5)
    assert not done and [s for s, _ in head] == [1, 2, 3, 4, 5]
    with httpx.stream(
        "GET", f"{url}/v1/requests/{rid}/events", headers={"Last-Event-ID": "5"}, timeout=30
    ) as resp:
        assert resp.status_code == 200
        tail, done = _read_sse(resp)
    assert done and [s for s, _ in tail] == list(range(6, 6 + len(tail)))
    expected, reason, _ = expected_sim(messages=messages, seed=77, max_tokens=30)
    assert "".join(_chunk_text(d) for _, d in head + tail) == expected
    assert tail[-1][1]["choices"][0]["finish_reason"] == reason


def test_a_socket_path_too_long_falls_back_to_tcp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    server = RedisServer(deep, unix_socket=True)
    assert server.socket_path is None and server.local_url == server.url
    assert server.local_url.startswith("redis://127.0.0.1:")
    near = RedisServer(tmp_path / "r", unix_socket=True)
    assert near.socket_path == (tmp_path / "r" / "redis.sock").absolute()
    assert near.local_url == f"unix://{near.socket_path}?db=0"
    assert RedisServer(tmp_path / "r").socket_path is None  # only when asked for
