"""Rollouts on the multi-process stack (issue 19): a request keeps its version through a worker's
SIGKILL, and a blue-green switch under continuous load loses and duplicates nothing, every request
admitted before it finishing on blue."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, breakwater_cli, expected_sim, stream_killing_owner


@contextlib.contextmanager
def _stack(
    redis_server: RedisServer,
    log_dir: Path,
    versions: tuple[str, ...],
    each: int,
    alias: list[str],
    **settings: Any,
) -> Iterator[StackProcs]:
    """A gateway, ``each`` workers for every version of `llama`, and the alias llama (CLI args)."""
    procs = StackProcs(redis_server.url, f"v{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        for version in versions:
            for _ in range(each):
                procs.add_worker(model="llama", model_version=version, heartbeat_s=0.3, **settings)
            procs.wait_workers(url, model=f"llama@{version}", count=each)
        breakwater_cli(procs, "models", "alias", "set", "llama", *alias)
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def two_versions(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """Two workers for each of llama@a and llama@b, and the alias llama split 50/50."""
    alias = ["llama@a=50", "llama@b=50"]
    with _stack(redis_server, log_dir, ("a", "b"), 2, alias, sim_decode_base_ms=40, capacity=4) as procs:
        yield procs


def _version_of(procs: StackProcs, worker_id: str) -> str:
    proc = next(w for w in procs.workers if w.args[-1] == worker_id)
    return f"llama@{proc.env_settings['BREAKWATER_MODEL_VERSION']}"


async def test_a_sigkilled_workers_request_continues_on_the_same_version(
    two_versions: StackProcs, redis: Redis
) -> None:
    versions = set()
    for seed in (11, 12):  # the two requests land on the two versions (smooth round robin)
        prompt = f"keep my version {seed}"
        body = {
            "model": "llama",
            "prompt": prompt,
            "seed": seed,
            "max_tokens": 40,
            "ignore_eos": True,
        }
        got = await stream_killing_owner(two_versions, redis, "/v1/completions", body, kill_after=8)
        version = got.record.spec.model
        assert version in ("llama@a", "llama@b")
        assert _version_of(two_versions, got.killed.args[-1]) == version
        assert _version_of(two_versions, got.record.worker) == version  # continued by its own version
        expected, _, _ = expected_sim(prompt=prompt, seed=seed, max_tokens=40, ignore_eos=True)
        assert got.text == expected
        versions.add(version)
    assert versions == {"llama@a", "llama@b"}


@dataclass
class Outcome:
    index: int
    sent_at: float
    models: set[str] = field(default_factory=set)
    seqs: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    error: str = ""


@pytest.fixture
def blue_green(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    alias = ["llama@blue=100", "--note", "blue live"]
    with _stack(
        redis_server, log_dir, ("blue", "green"), 1, alias, sim_decode_base_ms=15, capacity=8
    ) as procs:
        yield procs


async def _stream(http: httpx.AsyncClient, url: str, out: Outcome) -> None:
    body = {"model": "llama", "prompt": f"blue green {out.index}", "seed": out.index, "max_tokens": 24,
            "ignore_eos": True, "stream": True}  # fmt: skip
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            out.error = f"{resp.status_code} {(await resp.aread())[:200]!r}"
            return
        seq = 0
        async for line in resp.aiter_lines():
            if line.startswith("id: "):
                seq = int(line[4:])
            elif line == "data: [DONE]":
                out.done = True
            elif line.startswith("data: {"):
                data = orjson.loads(line[6:])
                if "error" in data:
                    out.error = str(data["error"])
                    return
                out.models.add(data["model"])
                if data["choices"] and data["choices"][0]["text"]:
                    out.seqs.append(seq)
                    out.text += data["choices"][0]["text"]


async def test_a_blue_green_switch_under_load_loses_and_duplicates_nothing(blue_green: StackProcs) -> None:
    url = blue_green.gateways[0][1]
    outcomes: list[Outcome] = []
    switched_at: list[float] = []

    def sending(deadline: float) -> bool:
        # Until 2 s past the switch's end, however long the CLI took to start on a busy machine (a CI
        # run's took ~3 s: a fixed 5 s window then held no request after the change had settled).
        now = time.monotonic()
        assert now < deadline, "the alias switch did not finish"
        return len(switched_at) < 2 or now < switched_at[1] + 2.0

    async def client(k: int, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while sending(deadline):
                out = Outcome(len(outcomes), time.monotonic())
                outcomes.append(out)
                await _stream(http, url, out)

    async def switch() -> None:
        await asyncio.sleep(2.0)
        switched_at.append(time.monotonic())
        await asyncio.to_thread(
            breakwater_cli,
            blue_green,
            "models",
            "alias",
            "set",
            "llama",
            "llama@green=100",
            "--note",
            "switch",
        )
        switched_at.append(time.monotonic())

    deadline = time.monotonic() + 60.0
    await asyncio.gather(switch(), *(client(k, deadline) for k in range(12)))
    before, after = switched_at
    assert len(outcomes) >= 40  # continuous: each client sends its next as soon as one ends
    for out in outcomes:
        expected, _, _ = expected_sim(
            prompt=f"blue green {out.index}", seed=out.index, max_tokens=24, ignore_eos=True
        )
        assert out.error == "" and out.done, (out.index, out.error)
        assert out.text == expected and out.seqs == list(range(1, 25)), out.index  # no gap, no duplicate
        assert len(out.models) == 1, out.models
    on = {out.index: next(iter(out.models)) for out in outcomes}
    assert {on[o.index] for o in outcomes if o.sent_at < before} == {"llama@blue"}
    # Within a second of the change every gateway routes to green (the alias cache is 0.5 s).
    assert {on[o.index] for o in outcomes if o.sent_at > after + 1.0} == {"llama@green"}
    assert {"llama@blue", "llama@green"} == set(on.values())
    # Blue has nothing left: its worker drains and stops cleanly.
    blue = next(w for w in blue_green.workers if w.env_settings["BREAKWATER_MODEL_VERSION"] == "blue")
    assert blue.stop() == 0
    history = breakwater_cli(blue_green, "models", "alias", "history", "llama")
    assert [h["note"] for h in history] == ["blue live", "switch"]
    assert [h["weights"] for h in history] == [{"llama@blue": 100}, {"llama@green": 100}]
