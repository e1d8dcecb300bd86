"""``gateway --embed-engine``: a worker inside the gateway process, served and recovered as any worker.

Checked as a user runs it: the model is listed and answers exactly through the official client
(streamed and not), and the worker's metrics are on the gateway's /metrics; a gateway SIGKILLed
mid-stream takes its worker with it, and another gateway's embedded worker reclaims and continues
the job while the client resumes there with Last-Event-ID, every token once; an embedded engine
that crashes is started again while the gateway keeps serving; a draining gateway's worker
finishes its jobs while their clients resume elsewhere.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from breakwater.engines.sim import POISON_MARKER
from breakwater.redis_server import RedisServer, free_port
from tests.helpers import (
    StackProcs,
    expected_sim,
    metric_samples,
    start_sim_server,
    sync_redis,
    wait_for,
)

MODEL = "emb-sim"


@pytest.fixture(scope="module")
def upstream(log_dir: Path) -> Iterator[str]:
    proc, url = start_sim_server(log_dir, model=MODEL, capacity=8, sim_decode_base_ms=40)
    try:
        yield f"{url}/v1"
    finally:
        proc.stop()


def _embedded(procs: StackProcs, upstream: str, name: str) -> str:
    return procs.add_gateway(
        embed_engine="openai",
        upstream_url=upstream,
        model=MODEL,
        capacity=8,
        heartbeat_s=0.3,
        worker_id=f"{procs.prefix}-{name}",
    )


@pytest.fixture
def procs(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    stack = StackProcs(redis_server.url, f"e{uuid.uuid4().hex[:10]}", log_dir)
    try:
        yield stack
    finally:
        stack.stop()


Chunk = tuple[int, dict[str, Any]]


def _chunks(lines: Iterator[str]) -> Iterator[Chunk | None]:
    """An SSE body's chunks with choices, each with its event id; None for ``[DONE]``."""
    seq = 0
    for line in lines:
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line == "data: [DONE]":
            yield None
        elif line.startswith("data: {"):
            data = orjson.loads(line[6:])
            assert "error" not in data, data
            if data["choices"]:
                yield seq, data


def test_the_model_answers_exactly_through_the_embedded_worker(procs: StackProcs, upstream: str) -> None:
    url = _embedded(procs, upstream, "a")
    procs.wait_workers(url, MODEL, count=1)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "embedded"}]
    expected, finish, usage = expected_sim(messages=messages, seed=5, max_tokens=30)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        chat = client.chat.completions.create(model=MODEL, messages=messages, seed=5, max_tokens=30)
        assert chat.choices[0].message.content == expected
        assert chat.choices[0].finish_reason == finish
        assert chat.usage is not None and chat.usage.completion_tokens == usage["completion_tokens"]
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            seed=5,
            max_tokens=30,
            stream=True,
        )
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == expected
    assert len(parts) > 5  # streamed token by token, not in one piece
    # The worker's series are on the gateway's /metrics, beside the gateway's, each family once.
    assert metric_samples(url, "breakwater_worker_tokens_total", model=MODEL) == [
        2.0 * usage["completion_tokens"]
    ]
    assert metric_samples(url, "breakwater_process_pid") == [float(procs.gateways[0][0].pid)]
    families = [
        line.split()[2] for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("# TYPE")
    ]
    assert len(families) == len(set(families))


def test_a_killed_gateway_is_continued_by_another_and_resumed_there(procs: StackProcs, upstream: str) -> None:
    first = _embedded(procs, upstream, "a")
    procs.wait_workers(first, MODEL, count=1)
    redis = sync_redis(procs.redis_url)
    messages = [{"role": "user", "content": "outlive the gateway"}]
    # ~12 s of tokens: the second gateway starts well within them, also on a loaded machine
    body = {"model": MODEL, "messages": messages, "seed": 9, "max_tokens": 300, "ignore_eos": True}
    head: list[Chunk] = []
    with httpx.stream(
        "POST", f"{first}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        chunks = _chunks(resp.iter_lines())
        while len(head) < 5:  # a few tokens in
            chunk = next(chunks)
            assert chunk is not None, "the stream ended before the kill"
            head.append(chunk)
        second = _embedded(procs, upstream, "b")  # its worker cannot have taken the running job
        status, owner = redis.hmget(procs.keys_request(rid), "status", "worker")
        assert (status, owner) == ("running", f"{procs.prefix}-a"), "the job ended before the kill"
        procs.gateways[0][0].kill()
        with pytest.raises(httpx.HTTPError):  # what was buffered, then the broken connection
            for chunk in chunks:
                assert chunk is not None, "the stream ended although its gateway was killed"
                head.append(chunk)
    seqs = [s for s, _ in head]
    assert seqs == list(range(1, len(seqs) + 1))
    with httpx.stream(
        "GET", f"{second}/v1/requests/{rid}/events", headers={"Last-Event-ID": str(seqs[-1])}, timeout=60
    ) as resp:
        assert resp.status_code == 200
        rest = list(_chunks(resp.iter_lines()))
    assert rest[-1] is None, "the resumed stream did not end with [DONE]"
    tail = [c for c in rest if c is not None]
    assert [s for s, _ in tail] == list(range(seqs[-1] + 1, seqs[-1] + 1 + len(tail)))
    text = "".join(d["choices"][0]["delta"].get("content") or "" for _, d in head + tail)
    expected, _, _ = expected_sim(messages=messages, seed=9, max_tokens=300, ignore_eos=True)
    assert text == expected
    status, attempt, owner = redis.hmget(procs.keys_request(rid), "status", "attempt", "worker")
    assert (status, attempt, owner) == ("done", "2", f"{procs.prefix}-b")


def test_a_crashed_embedded_engine_is_started_again(procs: StackProcs) -> None:
    url = procs.add_gateway(embed_engine="sim", heartbeat_s=0.3, max_attempts=2)
    procs.wait_workers(url, "sim", count=1)
    body = {"model": "sim", "prompt": f"crash {POISON_MARKER}", "max_tokens": 5}
    with ThreadPoolExecutor(1) as pool:
        poison = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
        gateway = procs.gateways[0][0]
        wait_for(lambda: "embedded worker failed" in gateway.log(), 30, 0.1, "the embedded engine's crash")
        assert gateway.alive()
        expected, _, _ = expected_sim(prompt="after the crash", seed=3, max_tokens=12)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
            done = client.completions.create(model="sim", prompt="after the crash", seed=3, max_tokens=12)
        assert done.choices[0].text == expected
        refused = poison.result()
    assert refused.json()["error"]["code"] == "max_attempts_exceeded", refused.text
    assert gateway.log().count("embedded worker failed; starting it again") == 2  # per attempt, then DLQ
    assert metric_samples(url, "breakwater_embedded_worker_restarts_total") == [2.0]


def test_an_engine_that_computes_in_process_is_refused() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "breakwater",
            "gateway",
            "--port",
            str(free_port()),
            "--embed-engine",
            "llamacpp",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--embed-engine llamacpp: one of openai, sim" in done.stdout + done.stderr


def test_a_draining_gateway_finishes_its_workers_jobs_and_hands_the_client_on(procs: StackProcs) -> None:
    """SIGTERM: the gateway ends the stream (resume elsewhere) and its worker stops pulling, but
    finishes what it runs (attempt 1, no reclaim) before the process exits."""
    first = procs.add_gateway(embed_engine="sim", sim_decode_base_ms=40, heartbeat_s=0.3, worker_id="drainer")
    second = procs.add_gateway()  # no worker: only the draining gateway's can finish the job
    procs.wait_workers(first, "sim", count=1)
    gateway = procs.gateways[0][0]
    prompt = "drain with the worker"
    body = {"model": "sim", "prompt": prompt, "seed": 4, "max_tokens": 80, "ignore_eos": True}
    head: list[Chunk] = []
    with httpx.stream("POST", f"{first}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        rid = resp.headers["x-breakwater-request-id"]
        chunks = _chunks(resp.iter_lines())
        for chunk in chunks:
            assert chunk is not None
            head.append(chunk)
            if len(head) == 5:
                gateway.proc.send_signal(signal.SIGTERM)
        assert 5 <= len(head) < 80  # ended early, without [DONE]: the client must resume
    with httpx.stream(
        "GET", f"{second}/v1/requests/{rid}/events", headers={"Last-Event-ID": str(head[-1][0])}, timeout=60
    ) as resp:
        rest = list(_chunks(resp.iter_lines()))
    assert rest[-1] is None
    text = "".join(d["choices"][0]["text"] for _, d in head + [c for c in rest if c is not None])
    assert text == expected_sim(prompt=prompt, seed=4, max_tokens=80, ignore_eos=True)[0]
    wait_for(lambda: not gateway.alive(), 30, what="the drained gateway exits")
    status, attempt, owner = sync_redis(procs.redis_url).hmget(
        procs.keys_request(rid), "status", "attempt", "worker"
    )
    assert (status, attempt, owner) == ("done", "1", "drainer")
    assert '"msg":"drained"' in gateway.log()
