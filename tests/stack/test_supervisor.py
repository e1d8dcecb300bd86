"""``breakwater up`` supervises its processes: a crashed worker or gateway is restarted with backoff
while the rest keeps serving, streams of a killed worker finish exactly once, and neither scaling
down nor a clean stop restarts anything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
from openai.types.chat import ChatCompletionUserMessageParam

from breakwater.redis_server import RedisServer, free_port
from breakwater.stack import Stack
from breakwater.stack_child import Backoff, describe_exit
from breakwater.stack_config import StackConfig
from tests.helpers import async_wait_for, expected_sim, metric_samples, wait_for

pytestmark = pytest.mark.timeout(180)

MAX_TOKENS = 300
STREAMS = 6
RESTARTS = "breakwater_supervisor_restarts_total"


class Up:
    """``breakwater up`` as a subprocess, its console in a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.console = tmp_path / "up.log"
        self.data_dir = tmp_path / "bw"
        cmd = [sys.executable, "-m", "breakwater", "up", "--engine", "sim", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir), "--supervisor-metrics-port", str(self.metrics_port), *args]
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                env={**os.environ, "COLUMNS": "200", **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_serving(self, workers: int) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.output()
            try:
                data = httpx.get(f"{self.url}/v1/models", timeout=2).json()["data"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return any(m["id"] == "sim" and m["workers"] == workers for m in data)

        wait_for(ready, 60, 0.2, f"the stack serving sim with {workers} workers")
        # Until it prints its pids the supervisor is still starting, when an exit means "stop".
        wait_for(lambda: "processes: " in self.output(), 30, 0.1, "the supervisor done starting")

    def child_pid(self, argv: list[str]) -> int | None:
        """The pid of the supervisor's child whose command line holds ``argv`` in a row."""
        needle = b"\0" + b"\0".join(a.encode() for a in argv) + b"\0"
        found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        for pid in map(int, found.stdout.split()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):  # gone since pgrep listed it (ESRCH mid-exit)
                continue
            if needle in cmdline:
                return pid
        return None

    def restarts(self, process: str) -> float:
        return sum(metric_samples(self.metrics_url, RESTARTS, process=process))

    def output(self) -> str:
        return self.console.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)


def test_backoff_doubles_up_to_the_cap_and_starts_over_after_a_stable_run() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0, stable_s=60.0)
    delays = [backoff.delay(uptime_s=1.0) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.delay(uptime_s=60.0) == 0.5  # it had stayed up: the crash loop is over
    assert backoff.delay(uptime_s=0.2) == 1.0


def test_exit_codes_name_their_signal() -> None:
    assert describe_exit(-9) == "killed by SIGKILL (exit code -9)"
    assert describe_exit(3) == "exit code 3"


async def test_a_killed_worker_is_restarted_and_its_streams_finish_exactly_once(tmp_path: Path) -> None:
    # 3 sequences a worker and 6 streams: both workers are full, so the killed worker's 3 streams
    # wait for its restart (the other one stays busy ~9 s); leases lapse after 3 x 0.5 s.
    env = {"BREAKWATER_CAPACITY": "3", "BREAKWATER_SIM_DECODE_BASE_MS": "30", "BREAKWATER_HEARTBEAT_S": "0.5"}
    up = Up(tmp_path, "--workers", "2", env=env)
    try:
        up.wait_serving(workers=2)
        out = up.output()
        assert f"supervisor metrics (restarts): {up.metrics_url}/metrics" in out
        assert up.restarts("worker-0") == up.restarts("worker-1") == up.restarts("gateway") == 0
        killed = up.child_pid(["--worker-id", "local-0"])
        assert killed is not None and f"worker-0 {killed}" in out  # the console names the pids
        client = openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key="x", max_retries=0, timeout=120)
        chunks = [0] * STREAMS
        streams = [asyncio.create_task(_stream(client, i, chunks)) for i in range(STREAMS)]
        await async_wait_for(lambda: min(chunks) >= 10, 30, 0.02, "every stream under way")
        os.kill(killed, signal.SIGKILL)

        def restarted() -> bool:
            pid = up.child_pid(["--worker-id", "local-0"])
            return pid is not None and pid != killed

        await async_wait_for(restarted, 10, 0.1, "worker-0 restarted")
        assert up.proc.poll() is None  # the supervisor and the rest of the stack stayed up
        assert httpx.get(f"{up.url}/v1/models", timeout=5).status_code == 200
        assert (up.restarts("worker-0"), up.restarts("worker-1"), up.restarts("gateway")) == (1, 0, 0)
        results = await asyncio.wait_for(asyncio.gather(*streams), 120)
        await client.close()
        for i, (_rid, text, finish, usage) in enumerate(results):
            want, want_finish, want_usage = expected_sim(
                messages=_messages(i), seed=i, max_tokens=MAX_TOKENS, ignore_eos=True
            )
            assert (text, finish) == (want, want_finish), f"stream {i}"
            assert usage == want_usage and want_usage["completion_tokens"] == MAX_TOKENS
        attempts = {rid: _request(up.url, rid)["attempt"] for rid, *_ in results}
        continued = {rid for rid, attempt in attempts.items() if attempt == 2}
        assert sorted(attempts.values()) == [1, 1, 1, 2, 2, 2]  # the killed worker's three, once each
        # The other worker was full all along: the restarted worker-0 (same log file) took them over.
        assert _started(up.data_dir / "logs" / "worker-0.log", attempt=2) == continued
    finally:
        code = up.stop()
    out = up.output()
    assert code == 0, out
    assert (
        f"supervisor: worker-0 (pid {killed}) killed by SIGKILL (exit code -9); restarting it in 0.5 s" in out
    )
    assert "supervisor: worker-0 restarted (pid " in out
    assert out.count("restarting it") == 1  # the clean stop restarted nothing


def test_a_killed_gateway_is_restarted_and_serves_again(tmp_path: Path) -> None:
    up = Up(tmp_path, "--workers", "1")
    try:
        up.wait_serving(workers=1)
        # The stack's processes reach its Redis over the unix socket beside its data, not TCP.
        sock = str(up.data_dir / "redis" / "redis.sock")
        with redis.Redis(unix_socket_path=sock, decode_responses=True) as r:
            me = r.client_id()
            addrs = [c["addr"] for c in r.client_list() if int(c["id"]) != me]
        assert len(addrs) >= 4 and all(a.startswith("/") for a in addrs), addrs  # a path, not ip:port
        gateway = up.child_pid(["breakwater", "gateway"])
        worker = up.child_pid(["--worker-id", "local-0"])
        assert gateway is not None and worker is not None
        os.kill(gateway, signal.SIGKILL)
        wait_for(lambda: up.child_pid(["breakwater", "gateway"]) not in (None, gateway), 10, 0.1, "restart")
        up.wait_serving(workers=1)
        assert (up.restarts("gateway"), up.restarts("worker-0")) == (1, 0)
        assert up.child_pid(["--worker-id", "local-0"]) == worker  # the worker was left alone
        with openai.OpenAI(base_url=f"{up.url}/v1", api_key="x", max_retries=0) as client:
            resp = client.chat.completions.create(
                model="sim",
                messages=_messages(7),
                seed=7,
                max_tokens=20,
            )
        want, finish, _ = expected_sim(messages=_messages(7), seed=7, max_tokens=20)
        assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == (want, finish)
    finally:
        code = up.stop()
    out = up.output()
    assert code == 0, out
    assert (
        f"supervisor: gateway (pid {gateway}) killed by SIGKILL (exit code -9); restarting it in 0.5 s" in out
    )
    assert out.count("restarting it") == 1


def test_a_killed_embedded_redis_is_restarted_from_its_aof(tmp_path: Path) -> None:
    """Redis went unwatched: killed, it stayed down and every request was a 503 for ever, without a
    word on the console. Now it comes back with what its AOF had, and the stack serves again."""
    up = Up(tmp_path, "--workers", "1")
    try:
        up.wait_serving(workers=1)
        with openai.OpenAI(base_url=f"{up.url}/v1", api_key="x", max_retries=0) as client:
            before = client.chat.completions.create(model="sim", messages=_messages(1), seed=1, max_tokens=5)
        aof = up.data_dir / "redis" / "appendonlydir"
        wait_for(lambda: any(before.id.encode() in f.read_bytes() for f in aof.iterdir()), 10, 0.1, "the AOF")
        found = subprocess.run(["pgrep", "-P", str(up.proc.pid), "-f", "redis-server|valkey-server"],
                               capture_output=True, text=True)  # fmt: skip
        (killed,) = map(int, found.stdout.split())
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: "supervisor: redis restarted" in up.output(), 30, 0.1, "redis restarted")
        assert up.restarts("redis") == 1

        def served() -> bool:
            try:
                status = httpx.get(f"{up.url}/v1/requests/{before.id}", timeout=5)
            except httpx.HTTPError:
                return False
            return status.status_code == 200 and status.json()["status"] == "done"

        wait_for(served, 30, 0.2, "the request from before readable again")
        with openai.OpenAI(base_url=f"{up.url}/v1", api_key="x", max_retries=0) as client:
            after = client.chat.completions.create(model="sim", messages=_messages(2), seed=2, max_tokens=5)
        assert (
            after.choices[0].message.content == expected_sim(messages=_messages(2), seed=2, max_tokens=5)[0]
        )
    finally:
        code = up.stop()
    out = up.output()
    assert code == 0, out
    assert f"supervisor: redis (pid {killed}) killed by SIGKILL (exit code -9)" in out


async def test_a_stopped_up_finishes_the_streams_it_is_answering_whole(tmp_path: Path) -> None:
    """SIGTERM (or Ctrl-C) of ``up`` stopped its gateway, with no stream grace, and its workers at
    once: every open stream was cut mid-body (no [DONE], no error). Now its gateway lets them run
    on (15 s by default) and the workers serve until it has gone: one stream under way and one
    still queued behind it (one sequence a worker) both end whole, and ``up`` exits."""
    env = {"BREAKWATER_CAPACITY": "1", "BREAKWATER_SIM_DECODE_BASE_MS": "25"}
    up = Up(tmp_path, "--workers", "1", env=env)
    try:
        up.wait_serving(workers=1)
        chunks = [0, 0]
        opened = [False, False]
        async with httpx.AsyncClient(timeout=60) as http:

            async def read(i: int) -> tuple[list[str], list[int], str]:
                body = {**_stopped_body(i), "stream": True}
                async with http.stream("POST", f"{up.url}/v1/completions", json=body) as resp:
                    assert resp.status_code == 200, await resp.aread()
                    opened[i] = True
                    lines: list[str] = []
                    ids: list[int] = []
                    parts: list[str] = []
                    async for line in resp.aiter_lines():
                        lines.append(line)
                        if line.startswith("id: "):
                            ids.append(int(line[4:]))
                        elif line.startswith("data: {"):
                            data = orjson.loads(line[6:])
                            assert "error" not in data, data
                            parts.extend(c["text"] for c in data["choices"])
                            chunks[i] += 1
                return lines, ids, "".join(parts)

            streams = [asyncio.create_task(read(i)) for i in range(2)]
            await async_wait_for(lambda: all(opened) and max(chunks) >= 10, 30, 0.02, "one stream under way")
            up.proc.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        for i, (lines, ids, text) in enumerate(results):
            want, _, _ = expected_sim(
                prompt=_stopped_body(i)["prompt"], seed=i, max_tokens=120, ignore_eos=True
            )
            assert text == want, f"stream {i}: {len(text)} of {len(want)} characters"
            assert ids == sorted(set(ids)), f"stream {i}: a token twice or out of order"
            assert [line for line in lines if line][-1] == "data: [DONE]", f"stream {i}"
        code = up.proc.wait(60)
    finally:
        if up.proc.poll() is None:
            up.stop()
    out = up.output()
    assert code == 0, out
    assert "stopping… (requests under way may run on for up to 15 s)" in out and "restarting it" not in out


async def test_a_second_ctrl_c_stops_up_at_once_without_orphans(tmp_path: Path) -> None:
    """The first signal stops ``up`` with its gateway's stream grace (here 120 s); a second one was
    ignored, so an operator's only way out was ``kill -9``, which left the gateway, the workers and
    Redis running (own sessions). Now a second one gives what is left a few seconds, then kills."""
    env = {"BREAKWATER_STREAM_GRACE_S": "120", "BREAKWATER_SIM_DECODE_BASE_MS": "25"}
    up = Up(tmp_path, "--workers", "1", env=env)
    children: list[int] = []
    try:
        up.wait_serving(workers=1)
        children += [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(up.proc.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(children) >= 3  # redis, gateway, worker
        async with httpx.AsyncClient(timeout=60) as http:
            body = {
                "model": "sim",
                "prompt": "a long one",
                "max_tokens": 4000,
                "ignore_eos": True,
                "stream": True,
            }
            async with http.stream("POST", f"{up.url}/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):
                    pass
                up.proc.send_signal(signal.SIGINT)
                wait_for(lambda: "Ctrl-C again stops at once" in up.output(), 30, 0.05, "up stopping")
                up.proc.send_signal(signal.SIGINT)
                code = up.proc.wait(30)  # not the 120 s grace
        assert code == 0, up.output()
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 10, 0.1, "no child left")
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
        for pid in children:  # (what a failed stop would leave)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _stopped_body(i: int) -> dict[str, Any]:
    return {
        "model": "sim",
        "prompt": f"stopped mid-stream {i}",
        "seed": i,
        "max_tokens": 120,
        "ignore_eos": True,
    }


def test_a_retired_worker_is_not_restarted_nor_is_anything_after_stop(tmp_path: Path) -> None:
    said: list[str] = []
    config = StackConfig(port=free_port(), workers=2, engine="sim", model="sim", data_dir=tmp_path)
    stack = Stack(config, log=said.append)
    stack.start()
    try:
        retired = stack.workers[-1]
        stack.retire_worker()  # SIGTERM: it drains and exits on purpose

        def gone() -> bool:
            stack.supervise()
            return retired.proc is not None and retired.proc.poll() is not None

        wait_for(gone, 30, 0.1, "the retired worker to exit")
        stack.supervise()
        assert [w.name for w in stack.workers] == ["worker-0"] and stack.workers[0].running()
        assert stack.processes().keys() == {"gateway", "worker-0"}
        # The cost model's CPU-seconds: each process the supervisor runs, Redis included, by pid.
        assert isinstance(stack.redis, RedisServer) and stack.redis.proc is not None
        pids = {**stack.processes(), "redis": stack.redis.proc.pid}
        for name, pid in pids.items():
            labels = {"process": name, "role": name.split("-")[0], "pid": str(pid)}
            cpu = stack.registry.get_sample_value("breakwater_process_tree_cpu_seconds_total", labels)
            assert cpu is not None and (cpu > 0 or name == "redis"), (name, labels)  # Python starts busy
    finally:
        stack.stop()
    stack.supervise()  # after a clean stop every child has exited; none may come back
    assert not stack.processes()
    assert said == []
    assert stack.registry.get_sample_value(RESTARTS, {"process": "worker-0"}) == 0
    assert stack.registry.get_sample_value(RESTARTS, {"process": "worker-1"}) == 0
    assert stack.registry.get_sample_value(RESTARTS, {"process": "gateway"}) == 0


def _messages(i: int) -> list[ChatCompletionUserMessageParam]:
    return [{"role": "user", "content": f"supervised stream {i}"}]


async def _stream(
    client: openai.AsyncOpenAI, i: int, chunks: list[int]
) -> tuple[str, str, str | None, dict[str, int] | None]:
    """(request id, text, finish reason, usage) of one streamed chat; counts its chunks in ``chunks``."""
    stream = await client.chat.completions.create(
        model="sim",
        messages=_messages(i),
        seed=i,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    rid, parts, finish, usage = "", [], None, None
    async for chunk in stream:
        rid = chunk.id  # Breakwater's request id
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            chunks[i] += 1
        if chunk.usage is not None:
            usage = {
                "prompt_tokens": chunk.usage.prompt_tokens,
                "completion_tokens": chunk.usage.completion_tokens,
            }
    return rid, "".join(parts), finish, usage


def _request(url: str, rid: str) -> dict[str, Any]:
    resp = httpx.get(f"{url}/v1/requests/{rid}", timeout=5)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == "done"
    return body


def _started(log: Path, attempt: int) -> set[str]:
    """Request ids a worker's JSON log says it started at this attempt."""
    rids = set()
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if entry.get("msg") == "job started" and entry.get("attempt") == attempt:
                rids.add(str(entry["rid"]))
    return rids
