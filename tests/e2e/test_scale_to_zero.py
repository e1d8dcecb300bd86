"""Scale to zero: a declared model (BREAKWATER_MODELS) is served with no live worker. Requests
queue, the gauges the autoscalers read say so, and the first worker to start answers them."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from openai import NotFoundError, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, expected_sim, metric_samples, wait_for

pytestmark = pytest.mark.timeout(120)


def gauge(url: str, name: str, model: str) -> float | None:
    values = metric_samples(url, name, model=model)
    return values[0] if values else None


def test_declared_model_queues_until_a_worker_starts(redis_server: RedisServer, log_dir: Path) -> None:
    model = f"zero-{uuid.uuid4().hex[:6]}"
    procs = StackProcs(redis_server.url, f"z{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(models=f"other, {model}", autoscale_min_workers=0)
        listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]}
        assert listed[model]["workers"] == 0
        # Idle and scaled to zero: nothing wanted.
        wait_for(lambda: gauge(url, "breakwater_desired_workers", model) == 0, 10, 0.1, "desired 0")

        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "wake up"}]
        # The request is admitted and waits in the queue (no worker): the client's stream is open.
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=12,
            seed=3,
            stream=True,
        )
        wait_for(lambda: _queued(url, model) == 1, 10, 0.1, "one job queued")
        assert gauge(url, "breakwater_workers", model) == 0
        wait_for(lambda: (gauge(url, "breakwater_desired_workers", model) or 0) >= 1, 10, 0.1, "desired >= 1")

        procs.add_worker(model=model, sim_decode_base_ms=1, heartbeat_s=0.5)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == expected_sim(messages=messages, seed=3, max_tokens=12)[0]
        wait_for(lambda: gauge(url, "breakwater_workers", model) == 1, 10, 0.1, "one worker")
        # The gauges are sampled each refresh; the one that saw the worker may predate its ack.
        wait_for(lambda: _queued(url, model) == 0, 10, 0.1, "queue empty")
        # A model neither declared nor served is still unknown.
        with pytest.raises(NotFoundError) as refused:
            client.chat.completions.create(model="nobody", messages=messages)
        assert refused.value.code == "model_not_found"
        client.close()
    finally:
        procs.stop()


def _queued(url: str, model: str) -> float:
    return sum(metric_samples(url, "breakwater_queue_depth", model=model))  # both lanes
