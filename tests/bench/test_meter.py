"""The measured cost model's parts: reading process and supervisor pages, counting CPU over a process
tree, turning two snapshots into usage, and pricing it (hand-computed cases)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from breakwater.bench.meter import Reading, RedisReading, Snapshot, measure, merged, parse_page
from breakwater.capacity.pricing import Pricing
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.proc_cpu import ProcessCPU, tree_cpu_seconds
from breakwater.worker.metrics import WorkerMetrics
from tests.helpers import wait_for


def _cpu_now() -> float:
    times = os.times()
    return times.user + times.system


def test_gateway_and_worker_pages_give_their_process_cpu_pid_and_busy_seconds() -> None:
    gateway, worker = GatewayMetrics(), WorkerMetrics()
    worker.engine_busy.labels("sim").inc(2.5)
    gw = parse_page("gw", generate_latest(gateway.registry).decode())
    wk = parse_page("wk", generate_latest(worker.registry).decode())
    assert gw["gw"].role == "gateway" and gw["gw"].busy_s is None and gw["gw"].pid == os.getpid()
    assert wk["wk"].role == "worker" and wk["wk"].busy_s == 2.5 and wk["wk"].pid == os.getpid()
    assert 0 < gw["gw"].cpu_s <= _cpu_now() + 0.02  # this process's own CPU seconds


def test_a_page_without_process_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="process_cpu_seconds_total"):
        parse_page("http://x/metrics", "# TYPE up gauge\nup 1\n")


def test_process_tree_cpu_counts_the_children() -> None:
    """A shell whose children burn CPU, one exiting, one staying: the shell's tree has both. They
    burn 0.5 s each, so one alone (~0.55 s) cannot reach 0.8: burns of 0.4 s summed to 0.8 only
    with Python's start-up, and /proc's truncated 10 ms ticks left them below it once (CI)."""
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\n"
    script = f'{sys.executable} -c "{burn}"; {sys.executable} -c "{burn}time.sleep(30)" & wait'
    parent = subprocess.Popen(["sh", "-c", script])
    try:
        wait_for(lambda: tree_cpu_seconds([parent.pid]).get(parent.pid, 0) >= 0.8, 20, 0.05, "burn")
        registry = CollectorRegistry()
        registry.register(ProcessCPU(lambda: [("worker-0", "worker", parent.pid)]))
        readings = parse_page("sup", generate_latest(registry).decode())
        (reading,) = readings.values()
        assert reading == Reading("worker", reading.cpu_s, pid=parent.pid, supervised=True)
        assert reading.cpu_s >= 0.8
    finally:
        parent.kill()
        parent.wait()
    assert tree_cpu_seconds([parent.pid]) == {}  # gone: nothing


def test_the_supervisors_reading_and_the_process_own_are_one_process() -> None:
    readings = {
        "sup#gateway": Reading("gateway", 3.0, pid=10, supervised=True),
        "sup#worker-0": Reading("worker", 9.0, pid=11, supervised=True),  # has an engine child
        "sup#redis": Reading("redis", 1.0, pid=12, supervised=True),
        "http://w/metrics": Reading("worker", 4.0, busy_s=2.0, pid=11),
        "http://g/metrics": Reading("gateway", 2.9, pid=10),
    }
    assert merged(readings) == {
        "sup#redis": Reading("redis", 1.0, pid=12, supervised=True),
        "http://w/metrics": Reading("worker", 9.0, busy_s=2.0, pid=11),
        "http://g/metrics": Reading("gateway", 3.0, pid=10),
    }


def test_usage_and_cost_by_hand() -> None:
    before = Snapshot(
        {
            "g": Reading("gateway", 10.0),
            "w1": Reading("worker", 5.0, busy_s=1.0, pid=1),
            "w2": Reading("worker", 7.0, busy_s=3.0),
        },
        {"r": RedisReading(commands=1_000, used_memory=0)},
        at=100.0,
    )
    after = Snapshot(
        {
            "g": Reading("gateway", 46.0),
            "w1": Reading("worker", 2.0, busy_s=0.5, pid=2),  # restarted (another pid): from zero
            "w2": Reading("worker", 25.0, busy_s=3603.0),
        },
        {"r": RedisReading(commands=2_001_000, used_memory=0)},
        at=3700.0,
    )
    used = measure(before, after, [1_000_000_000, 3_000_000_000], output_tokens=2_000_000)
    assert used.duration_s == 3600.0
    assert used.cpu_s == {"gateway": 36.0, "worker": 20.0}
    assert [r["busy_s"] for r in used.replicas] == [0.5, 3600.0]
    assert used.redis_commands == 2_000_000 and used.redis_memory_gb == 2.0
    prices = Pricing(gpu_hour={"l4": 0.8}, vcpu_hour=0.05, redis_gb_month=73.0, redis_million_ops=0.5)
    report = used.report(prices, "l4")
    # 2 replicas x 1 h x $0.8; 36 + 20 CPU-s at $0.05/h; 2 GB for 1 h of a 730-h month at $73; 2M ops.
    parts = {"gpu": 1.6, "gateway": 0.0005, "worker": 20 / 3600 * 0.05, "redis_memory": 0.2, "redis_ops": 1.0}
    assert report["cost_usd"] == pytest.approx({**parts, "total": sum(parts.values())})
    assert report["per_1k_output_tokens"] == pytest.approx(sum(parts.values()) / 2000)
    assert report["usage"]["accelerator_s"] == 7200.0
    assert used.report(prices, "l4", replicas=1)["cost_usd"]["gpu"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no price for GPU `h200`"):
        used.report(prices, "h200")


def test_a_counter_that_dips_in_one_process_does_not_count_its_lifetime() -> None:
    """The same pid reading a little lower (a child reaped between two /proc scans) adds nothing;
    a process under a new name but the same pid (retired by the autoscaler) is the same process."""
    before = Snapshot({"sup#pid7": Reading("worker", 100.0, pid=7, supervised=True)}, {}, at=0.0)
    after = Snapshot({"sup#pid7": Reading("worker", 99.5, pid=7, supervised=True)}, {}, at=10.0)
    assert measure(before, after, [], output_tokens=1).cpu_s == {"worker": 0.0}


def test_passwords_in_urls_stay_out_of_the_results() -> None:
    from breakwater.cli_tools import _redacted

    args = ["--redis-url", "redis://bench:s3cret@10.0.0.1:6379/0", "--url", "http://127.0.0.1:8000"]
    assert _redacted(args) == "--redis-url redis://***@10.0.0.1:6379/0 --url http://127.0.0.1:8000"
