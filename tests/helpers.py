"""Test helpers: processes of the real stack, expected sim output, polling with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import RedisCluster

from breakwater.broker import Broker, RequestRecord, RequestSpec, Status
from breakwater.broker.connection import ClusterUrl
from breakwater.engines.base import GenerationRequest
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from breakwater.keys import Keys
from breakwater.redis_server import free_port

T = TypeVar("T")


def sync_redis(url: str) -> redis.Redis:
    """A blocking client for ``url``: redis-py's cluster client for a ``redis+cluster://`` one."""
    cluster = ClusterUrl.parse(url)
    if cluster is None:
        return redis.Redis.from_url(url, decode_responses=True)
    host, port = cluster.seeds[0]  # one seed tells the client the whole cluster
    return cast(redis.Redis, RedisCluster(host=host, port=port, decode_responses=True))


def wait_for(
    predicate: Callable[[], bool], timeout_s: float = 20.0, interval_s: float = 0.05, what: str = ""
) -> None:
    """Poll ``predicate`` until it is true or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


async def async_wait_for(
    predicate: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.05, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


def expected_sim(
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    seed: int,
    max_tokens: int | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    context_length: int = 4096,
) -> tuple[str, str, dict[str, int]]:
    """What an undisturbed sim run produces: (text, finish_reason, usage)."""

    async def run() -> tuple[str, str, dict[str, int]]:
        engine = SimEngine(SimOptions(context_length=context_length, decode_base_ms=0, decode_per_seq_ms=0))
        engine.add(
            GenerationRequest(
                "x",
                prompt=prompt,
                messages=[{k: str(v) for k, v in m.items()} for m in messages] if messages else None,
                max_tokens=max_tokens,
                seed=seed,
                stop=stop or [],
                ignore_eos=ignore_eos,
            )
        )
        parts: list[str] = []
        while True:
            for delta in await engine.step():
                parts.append(delta.text)
                if delta.finished:
                    return "".join(parts), str(delta.finish_reason), dict(delta.usage or {})

    return _drive(run())


def _drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that only ever awaits ``asyncio.sleep(0)``, without an event loop.

    (The sim engine with zero timings is such a coroutine; tests may already run inside a loop.)
    """
    try:
        while True:
            coro.send(None)
    except StopIteration as stop:
        return cast(T, stop.value)


class Proc:
    """A Breakwater process (gateway, worker, sim-server) started with ``python -m breakwater``."""

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, python: str = sys.executable
    ) -> None:
        self.args = args
        self.env_settings = env
        self.log_path = log_path
        self.terminated = False
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [python, "-m", "breakwater", *args],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and its children (a crashed pod loses them all, e.g. vLLM's engine)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM (a clean stop: drain), once, without waiting; :meth:`stop` waits."""
        if self.alive() and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout_s: float = 15.0) -> int:
        self.terminate()
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class StackProcs:
    """Gateways and workers of one test stack sharing a Redis and a key prefix."""

    def __init__(self, redis_url: str, prefix: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.log_dir = log_dir
        self.gateways: list[tuple[Proc, str]] = []
        self.workers: list[Proc] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {
            "BREAKWATER_REDIS_URL": self.redis_url,
            "BREAKWATER_KEY_PREFIX": self.prefix,
            "BREAKWATER_LOG_LEVEL": "INFO",
            **(extra or {}),
        }

    def keys_request(self, rid: str) -> str:
        return Keys(self.prefix).request(rid)

    def add_gateway(self, **settings: Any) -> str:
        port = free_port()
        env = self.env({f"BREAKWATER_{k.upper()}": str(v) for k, v in settings.items()})
        proc = Proc(["gateway", "--port", str(port)], env, self.log_dir / f"{self.prefix}-gw-{port}.log")
        url = f"http://127.0.0.1:{port}"
        self.gateways.append((proc, url))  # stopped with the rest even if it never becomes ready
        wait_for(lambda: _ready(url, proc), 30, 0.1, f"gateway {url} ready")
        return url

    def add_worker(
        self,
        model: str = "sim",
        engine: str = "sim",
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        **settings: Any,
    ) -> Proc:
        n = len(self.workers)
        env = self.env({f"BREAKWATER_{k.upper()}": str(v) for k, v in settings.items()} | (extra_env or {}))
        worker_id = f"{self.prefix}-w{n}"
        proc = Proc(
            ["worker", "--engine", engine, "--model", model, "--worker-id", worker_id],
            env,
            self.log_dir / f"{worker_id}.log",
            python,
        )
        self.workers.append(proc)
        return proc

    def wait_workers(
        self,
        url: str,
        model: str = "sim",
        count: int | None = None,
        timeout_s: float = 30,
        headers: dict[str, str] | None = None,
    ) -> None:
        want = count if count is not None else sum(1 for w in self.workers if w.alive())

        def ready() -> bool:
            try:
                data = httpx.get(f"{url}/v1/models", timeout=2, headers=headers).json()["data"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return any(m["id"] == model and m["workers"] >= want for m in data)

        wait_for(ready, timeout_s, 0.1, f"{want} workers for {model}")

    def stop(self) -> None:
        """The workers, then the gateways: each group signalled at once, then waited for."""
        for group in (self.workers, [proc for proc, _ in self.gateways]):
            for proc in group:
                proc.terminate()
            for proc in group:
                proc.stop()


@contextlib.contextmanager
def one_gateway_one_worker(
    redis_url: str, tag: str, log_dir: Path, gateway: Mapping[str, Any] | None = None, **worker: Any
) -> Iterator[StackProcs]:
    """A stack of one gateway (``gateway``: its settings) and one sim worker (``worker``: its
    settings) under a fresh key prefix starting with ``tag``, serving once the worker has registered;
    everything stopped on exit."""
    procs = StackProcs(redis_url, f"{tag}{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(**(gateway or {}))
        procs.add_worker(**worker)
        procs.wait_workers(url)
        yield procs
    finally:
        procs.stop()


def breakwater_cli(procs: StackProcs, *args: str, pepper: str | None = None) -> Any:
    """``breakwater ARGS`` against the stack's Redis (and key pepper); its JSON output."""
    env = {**os.environ, "BREAKWATER_REDIS_URL": procs.redis_url, "BREAKWATER_KEY_PREFIX": procs.prefix}
    if pepper is not None:
        env["BREAKWATER_AUTH_PEPPER"] = pepper
    done = subprocess.run(
        [sys.executable, "-m", "breakwater", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"breakwater {' '.join(args)}: {done.stderr}"
    return orjson.loads(done.stdout)


def _ready(url: str, proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"process exited: {proc.log()[-2000:]}")
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class KilledStream:
    """What a client saw of a stream whose worker was SIGKILLed part-way."""

    rid: str
    text: str
    seqs: list[int]  # the SSE id of every chunk that carried choices, in arrival order
    usage: dict[str, int] | None
    killed: Proc
    record: RequestRecord  # the request record after the stream ended


async def stream_killing_owner(
    procs: StackProcs, redis: Any, path: str, body: dict[str, Any], *, kill_after: int, timeout_s: float = 120
) -> KilledStream:
    """Stream ``body`` (SSE) from the first gateway and SIGKILL the worker running it once it has
    generated ``kill_after`` tokens (by the request record, not by what the client has read: a
    client that lags behind would see the job end before its kill); another worker must continue it."""
    url = procs.gateways[0][1]
    seqs: list[int] = []
    parts: list[str] = []
    usage = None
    async with (
        httpx.AsyncClient(timeout=timeout_s) as http,
        http.stream("POST", f"{url}{path}", json={**body, "stream": True}) as resp,
    ):
        rid = resp.headers["x-breakwater-request-id"]
        killer = asyncio.create_task(kill_owner_at(procs, redis, rid, kill_after))
        try:
            async for seq, data in sse_chunks(resp):
                usage = data.get("usage") or usage
                if data["choices"]:
                    seqs.append(seq)
                    choice = data["choices"][0]
                    parts.append(
                        (choice["delta"].get("content") if "delta" in choice else choice["text"]) or ""
                    )
            killed = await asyncio.wait_for(killer, 1)
        finally:
            killer.cancel()
    record = await read_record(procs, redis, rid)
    assert record.status is Status.DONE and record.attempt == 2 and record.worker != killed.args[-1], (
        f"killed {killed.args[-1]}; record after: status {record.status}, attempt {record.attempt}, "
        f"worker {record.worker}"
    )
    assert seqs == list(range(1, len(seqs) + 1)), "gap or duplicate in the client's stream"
    return KilledStream(rid, "".join(parts), seqs, usage, killed, record)


async def sse_chunks(resp: httpx.Response) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """An SSE response's JSON chunks, each with the id of the event it came in (0 before any); an
    error chunk fails the test."""
    seq = 0
    async for line in resp.aiter_lines():
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("data: {"):
            data = orjson.loads(line[6:])
            assert "error" not in data, data
            yield seq, data


async def kill_owner_at(procs: StackProcs, redis: Any, rid: str, tokens: int) -> Proc:
    """SIGKILL the worker running ``rid`` as soon as the record counts ``tokens`` generated."""
    key = procs.keys_request(rid)
    while True:
        status, done, owner = await redis.hmget(key, "status", "tokens", "worker")
        assert status in (None, "queued", "running"), f"{rid} was {status} before its worker was killed"
        if status == "running" and int(done or 0) >= tokens:
            killed = next(w for w in procs.workers if w.args[-1] == owner)
            killed.kill()
            return killed
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def serving(
    command: Sequence[str],
    log_path: Path,
    ready_url: str,
    what: str,
    timeout_s: float,
    interval_s: float = 0.2,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server that is not Breakwater's (a fake upstream, llama-cpp-python's, vLLM's) started as
    ``command`` with its output in ``log_path``, yielded once ``ready_url`` answers 200, terminated
    after (killed if it will not stop). Its exit while starting fails with the end of its log."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(command),
            env=None if env is None else {**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def up() -> bool:
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        try:
            return httpx.get(ready_url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout_s, interval_s, f"{what} up")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_sim_server(log_dir: Path, model: str = "up-sim", **settings: object) -> tuple[Proc, str]:
    """``breakwater sim-server`` (vLLM-style gauges at /metrics) on a free port; returns (proc, url)."""
    port = free_port()
    env = {"BREAKWATER_MODEL": model, **{f"BREAKWATER_{k.upper()}": str(v) for k, v in settings.items()}}
    proc = Proc(["sim-server", "--port", str(port)], env, log_dir / f"sim-server-{port}.log")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.alive(), proc.log()[-2000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, 0.1, "sim-server up")
    return proc, url


@contextlib.contextmanager
def sse_started(url: str, path: str, body: dict[str, Any]) -> Iterator[tuple[str, Iterator[str]]]:
    """POST a streaming request and wait for its first event: (request id, the remaining lines)."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        while not next(lines).startswith("id: "):
            pass
        yield resp.headers["x-breakwater-request-id"], lines


def assert_knows_paris(client: Any, model: str) -> None:
    """A real model's greedy answer to a simple instruction: correct, stopped by itself, counted."""
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0,
        max_tokens=40,
    )
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and 0 < resp.usage.completion_tokens < 40


def metric_samples(url: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` at ``url``/metrics whose labels include ``labels``."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


def upstream_gauges(url: str) -> dict[str, float]:
    """The sim-server's vLLM-style gauges, by name without labels."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


async def read_record(procs: StackProcs, redis: Any, rid: str) -> RequestRecord:
    """The typed request record, as the broker reads it."""
    record = await Broker(redis, Keys(procs.prefix)).get_record(rid)
    assert record is not None, f"no record for {rid}"
    return record


def queued_spec(timeout_s: float, **fields: Any) -> RequestSpec:
    """A completion's spec for model ``m`` on the interactive lane (``fields``: any other of its own),
    for a test that queues it with ``Broker.enqueue``."""
    base: dict[str, Any] = {
        "model": "m",
        "lane": "interactive",
        "kind": "completion",
        "request_id": "x",
        "prompt": "p",
    }
    return RequestSpec(timeout_s=timeout_s, **{**base, **fields})
