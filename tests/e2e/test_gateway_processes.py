"""``breakwater gateway --workers 2``: two processes share one port (SO_REUSEPORT). Requests are
answered while both run and after one of them dies; stopping the first process stops the other."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from breakwater.redis_server import RedisServer, free_port
from tests.helpers import Proc, StackProcs, wait_for

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _complete(url: str, n: int) -> list[int]:
    body = {"model": "sim", "prompt": "two processes", "max_tokens": 4, "ignore_eos": True}
    statuses = []
    for seed in range(n):  # a new connection each: the kernel spreads them over both sockets
        with httpx.Client(base_url=url, timeout=30) as client:
            reply = client.post("/v1/completions", json={**body, "seed": seed})
            statuses.append(reply.status_code)
            assert reply.status_code != 200 or reply.json()["usage"]["completion_tokens"] == 4
    return statuses


def test_two_processes_on_one_port(redis_server: RedisServer, log_dir: Path) -> None:
    procs = StackProcs(redis_server.url, f"p{uuid.uuid4().hex[:10]}", log_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The Redis URL only as a flag: the second process must get it too (not fall back to localhost).
    env = {k: v for k, v in procs.env().items() if k != "BREAKWATER_REDIS_URL"}
    args = ["gateway", "--port", str(port), "--workers", "2", "--redis-url", redis_server.url]
    first = Proc(args, env, log_dir / f"gw2-{port}.log")
    try:
        procs.add_worker(heartbeat_s=0.3)
        wait_for(lambda: len(_children(first.pid)) == 1, 30, 0.1, "the second gateway process")
        (second,) = _children(first.pid)

        def ready() -> bool:
            try:
                return bool(httpx.get(f"{url}/v1/models", timeout=1).json()["data"])
            except (httpx.HTTPError, KeyError, ValueError):
                return False

        wait_for(ready, 30, 0.1, "the gateways list the worker's model")
        assert _complete(url, 20) == [200] * 20
        os.kill(second, signal.SIGKILL)  # one process dies: the port keeps answering
        wait_for(lambda: not _alive(second), 10, 0.05, "the second process gone")
        assert _complete(url, 10) == [200] * 10
        # Stopping the first stops any sibling it started (here: a fresh look, none left).
        assert first.stop(timeout_s=40) == 0
    finally:
        first.stop()
        procs.stop()
    assert not _alive(second)


def test_stopping_the_first_process_stops_its_siblings(redis_server: RedisServer, log_dir: Path) -> None:
    env = StackProcs(redis_server.url, f"p{uuid.uuid4().hex[:10]}", log_dir).env()
    port = free_port()
    first = Proc(["gateway", "--port", str(port), "--workers", "3"], env, log_dir / f"gw3-{port}.log")
    try:
        wait_for(lambda: len(_children(first.pid)) == 2, 30, 0.1, "two more gateway processes")
        siblings = _children(first.pid)
        wait_for(lambda: _healthy(f"http://127.0.0.1:{port}"), 30, 0.1, "healthy")
        assert first.stop(timeout_s=40) == 0
        assert not any(_alive(pid) for pid in siblings)
    finally:
        first.stop()


def test_siblings_do_not_outlive_a_killed_first_process(redis_server: RedisServer, log_dir: Path) -> None:
    env = StackProcs(redis_server.url, f"p{uuid.uuid4().hex[:10]}", log_dir).env()
    port = free_port()
    first = Proc(["gateway", "--port", str(port), "--workers", "2"], env, log_dir / f"gwk-{port}.log")
    try:
        wait_for(lambda: len(_children(first.pid)) == 1, 30, 0.1, "the second gateway process")
        (second,) = _children(first.pid)
        first.proc.kill()  # SIGKILL: no chance to stop its siblings itself
        first.proc.wait(10)
        wait_for(lambda: not _alive(second), 30, 0.1, "the orphaned sibling gone")
    finally:
        first.stop()
