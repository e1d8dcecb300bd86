"""A hot model split into partitions on a real local Redis Cluster (3 primaries): requests spread
over its job queues, one per primary; a full partition passes a request on and the lane refuses
only when all are full; depth gauges sum them; a killed worker's jobs are continued from any
partition; fair share holds in each."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from breakwater.broker.cluster import slot_of
from breakwater.keys import Keys, queues
from breakwater.redis_cluster import LocalCluster
from tests.chaos.harness import ResumingClient, books, make_specs
from tests.chaos.test_chaos import WORKER, assert_exact, streams_mid_flight, urls
from tests.helpers import StackProcs, expected_sim, metric_samples, sync_redis, wait_for

pytestmark = pytest.mark.timeout(240)

QUEUES = queues("sim", 3)
PARTITION_DEPTH = "breakwater_partition_queue_depth"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("partitions"), primaries=3, replicas=0)
    local.start()
    yield local
    local.stop()


def stack(cluster: LocalCluster, log_dir: Path, workers: int, **gateway: Any) -> StackProcs:
    procs = StackProcs(cluster.url, f"p{uuid.uuid4().hex[:10]}", log_dir)
    for _ in range(2):
        procs.add_gateway(partitions="sim=3", **gateway)
    for _ in range(workers):
        procs.add_worker(partitions="sim=3", **WORKER)
    if workers:
        procs.wait_workers(procs.gateways[0][1], count=workers)
    return procs


def added(cluster: LocalCluster, prefix: str, queue: str, lane: str = "interactive") -> int:
    """Jobs ever queued on one partition's lane."""
    info: Any = sync_redis(cluster.url).xinfo_stream(Keys(prefix).jobs(queue, lane))
    return int(info["entries-added"])


def test_each_partition_of_the_hot_model_is_on_a_primary_of_its_own(cluster: LocalCluster) -> None:
    owners = {cluster.owner(slot_of(Keys().jobs(q, "interactive"))).port for q in QUEUES}
    assert len(owners) == 3


async def test_requests_spread_over_the_partitions_and_every_one_completes(
    cluster: LocalCluster, log_dir: Path
) -> None:
    procs = stack(cluster, log_dir, workers=2)
    try:
        gateways = [url for _, url in procs.gateways]
        clients = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) for url in gateways]

        async def ask(i: int) -> str:
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"partitioned {i}"}]
            resp = await clients[i % 2].chat.completions.create(
                model="sim", messages=messages, max_tokens=6, seed=i, extra_body={"ignore_eos": True}
            )
            return resp.choices[0].message.content or ""

        answers = await asyncio.gather(*(ask(i) for i in range(45)))
        for c in clients:
            await c.close()
        for i, answer in enumerate(answers):
            want, _, _ = expected_sim(
                messages=[{"role": "user", "content": f"partitioned {i}"}],
                seed=i,
                max_tokens=6,
                ignore_eos=True,
            )
            assert answer == want != "", i
        per_partition = [added(cluster, procs.prefix, q) for q in QUEUES]
        assert sum(per_partition) == 45
        assert min(per_partition) >= 3, per_partition  # the less loaded of two: none is starved
        # Workers claim from every partition: nothing is left queued or pending anywhere.
        redis = sync_redis(cluster.url)
        assert all(redis.xlen(Keys(procs.prefix).jobs(q, "interactive")) == 0 for q in QUEUES)
    finally:
        procs.stop()


def test_a_full_partition_passes_the_request_on_and_the_lane_refuses_when_all_are_full(
    cluster: LocalCluster, log_dir: Path
) -> None:
    """No worker yet (a declared model scales from zero): a lane bound of 3 gives each partition
    one job; the fourth request is refused with 429 and a Retry-After; the depth gauges add up the
    partitions; a worker that starts then serves all three, from every partition."""
    procs = stack(cluster, log_dir, workers=0, models="sim", lane_max_queued=3)
    url = procs.gateways[0][1]
    sync = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    streams: list[Any] = []
    try:
        for i in range(3):
            streams.append(
                sync.completions.create(
                    model="sim",
                    prompt=f"waiting {i}",
                    max_tokens=5,
                    seed=i,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
            )
        assert [added(cluster, procs.prefix, q) for q in QUEUES] == [1, 1, 1]
        with pytest.raises(openai.RateLimitError) as refused:
            sync.completions.create(model="sim", prompt="one too many", max_tokens=5)
        assert refused.value.code == "queue_full"
        assert "3 waiting" in refused.value.message
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        assert [added(cluster, procs.prefix, q) for q in QUEUES] == [1, 1, 1]  # nothing half-queued

        def gauges() -> bool:
            total = metric_samples(url, "breakwater_queue_depth", model="sim", lane="interactive")
            parts = [
                metric_samples(
                    url, "breakwater_partition_queue_depth", model="sim", partition=q, lane="interactive"
                )
                for q in QUEUES
            ]
            return total == [3.0] and parts == [[1.0]] * 3

        wait_for(gauges, 20, 0.2, "the queue depth of the model and of each partition")
        procs.add_worker(partitions="sim=3", **WORKER)
        for i, stream in enumerate(streams):
            text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
            want, _, _ = expected_sim(prompt=f"waiting {i}", seed=i, max_tokens=5, ignore_eos=True)
            assert text == want != ""
    finally:
        for stream in streams:
            stream.close()
        sync.close()
        procs.stop()


async def test_a_killed_workers_jobs_are_continued_from_every_partition(
    cluster: LocalCluster, log_dir: Path
) -> None:
    """A worker is SIGKILLed mid-stream; the other reclaims its jobs from all three partitions and
    continues them: every answer exact, none lost or duplicated."""
    procs = stack(cluster, log_dir, workers=2, detach_grace_s=60)
    specs = make_specs("partitions", 30, max_tokens=50)
    client = ResumingClient(urls(procs), deadline_s=120)
    try:
        task = client.start(specs, rate=None, tag=uuid.uuid4().hex[:8])
        await streams_mid_flight(client, 8)
        procs.workers[0].kill()
        outcomes = await task
    finally:
        await client.close()
        procs.stop()
    b = books("partitions-worker-sigkill", specs, outcomes)
    assert_exact(b)
    assert b.completed == 30, b
    assert all(added(cluster, procs.prefix, q) > 0 for q in QUEUES)
