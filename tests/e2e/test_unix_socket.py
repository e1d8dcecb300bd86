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

from breakwater.broker import connect, connect_with
from breakwater.config import CommonSettings
from breakwater.redis_server import RedisServer, RedisServerError
from tests.e2e.test_resume import _chunk_text, _read_sse
from tests.helpers import StackProcs, expected_sim, one_gateway_one_worker


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
    with one_gateway_one_worker(
        unix_redis.local_url, "u", log_dir, sim_decode_base_ms=20, heartbeat_s=0.5
    ) as procs:
        yield procs


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


async def test_an_acl_user_over_a_unix_socket(unix_redis: RedisServer, tmp_path: Path) -> None:
    """The settings' user and password reach Redis over a socket too, over any given in the URL."""
    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = connect(unix_redis.local_url)
    await admin.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["bw:*"], commands=["+@all"], reset=True
    )
    try:
        (tmp_path / "password").write_text(password)
        url = f"{unix_redis.local_url}&password=not-this-one"
        settings = CommonSettings(
            redis_url=url, redis_username=user, redis_password_file=str(tmp_path / "password")
        )
        client = connect_with(settings)
        assert await client.acl_whoami() == user
        assert await client.set("bw:unix", "1") and await client.get("bw:unix") == "1"
        await client.aclose()
    finally:
        await admin.delete("bw:unix")
        await admin.acl_deluser(user)
        await admin.aclose()


async def test_a_data_dir_with_url_characters_in_its_path(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "a #b?c%41", unix_socket=True)
    server.start()
    try:
        client = connect(server.local_url)
        assert await client.ping()
        assert any(c["addr"].startswith("/") for c in await client.client_list())  # over the socket
        await client.aclose()
    finally:
        server.stop()


async def test_a_socket_that_cannot_be_bound_falls_back_to_tcp(tmp_path: Path) -> None:
    (tmp_path / "r" / "redis.sock").mkdir(parents=True)  # a directory where the socket would go
    server = RedisServer(tmp_path / "r", unix_socket=True)
    server.start()
    try:
        assert server.socket_path is None and server.local_url == server.url
        client = connect(server.local_url)
        assert await client.ping()
        await client.aclose()
    finally:
        server.stop()


def test_a_second_redis_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = RedisServer(tmp_path / "r", unix_socket=True)
    second = RedisServer(tmp_path / "r", unix_socket=True)
    first.start()
    try:
        with pytest.raises(RedisServerError, match="already serves"):
            second.start()
        assert second.proc is None
        with redis.Redis(unix_socket_path=str(first.socket_path)) as r:
            assert r.ping()  # the first one's socket is still its own
    finally:
        second.stop()  # (started only if the refusal failed)
        first.stop(kill=True)  # a crash: its socket file stays behind
    assert first.socket_path is not None and first.socket_path.exists()
    again = RedisServer(tmp_path / "r", unix_socket=True)  # a stale socket is not refused
    again.start()
    try:
        with redis.Redis(unix_socket_path=str(again.socket_path)) as r:
            assert r.ping()
    finally:
        again.stop()


def test_without_tcp_it_listens_on_its_socket_alone_and_keeps_its_files_to_its_owner(tmp_path: Path) -> None:
    """The embedded stack's Redis has no password: a TCP port on 127.0.0.1 would let any local user
    read every prompt and answer, or move a key to another tenant. Without ``tcp`` it listens on its
    owner-only socket alone, and its directory and AOF are its owner's."""
    server = RedisServer(tmp_path / "r", unix_socket=True, tcp=False)
    server.start()
    try:
        assert server.url == server.local_url and server.url.startswith("unix://")
        with redis.Redis(unix_socket_path=str(server.socket_path)) as r:
            assert r.config_get("port") == {"port": "0"}
            assert r.set("written", "1")
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=server.port, socket_connect_timeout=1).ping()
        assert (tmp_path / "r").stat().st_mode & 0o777 == 0o700
        aof = [p for p in (tmp_path / "r").rglob("*.aof")]
        assert aof and all(p.stat().st_mode & 0o077 == 0 for p in aof), aof
    finally:
        server.stop()


def test_without_tcp_a_data_dir_too_deep_for_a_socket_gets_a_private_one(tmp_path: Path) -> None:
    """A socket path longer than 103 bytes fell back to TCP (no password): without ``tcp`` the
    socket goes to a directory of its own under the system's temporary one, removed at stop."""
    server = RedisServer(tmp_path / ("d" * 120), unix_socket=True, tcp=False)
    server.start()
    private = server.socket_path.parent if server.socket_path else None
    try:
        assert private is not None and private != tmp_path / ("d" * 120)
        assert private.stat().st_mode & 0o777 == 0o700 and server.url.startswith("unix://")
        with redis.Redis(unix_socket_path=str(server.socket_path)) as r:
            assert r.config_get("port") == {"port": "0"}
    finally:
        server.stop()
    assert not private.exists()
