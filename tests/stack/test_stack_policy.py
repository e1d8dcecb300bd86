"""The controllers ``breakwater up --autoscale-policy`` runs, and what they are shown (pure parts; the
processes themselves: tests/stack/test_autoscale.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from breakwater.capacity.policies import Hpa, HpaMechanics, KedaQueue, policy_from_spec
from breakwater.stack_policy import PolicyScaler, busy_seconds, gateway_load, stack_policy


def _gateway_metrics() -> str:
    r = CollectorRegistry()
    Gauge("breakwater_workers", "", ["model"], registry=r).labels("sim").set(2)
    depth = Gauge("breakwater_queue_depth", "", ["model", "lane"], registry=r)
    depth.labels("sim", "interactive").set(5)
    depth.labels("sim", "batch").set(7)
    depth.labels("other", "interactive").set(100)
    running = Gauge("breakwater_jobs_in_flight", "", ["model", "lane"], registry=r)
    running.labels("sim", "interactive").set(3)
    running.labels("other", "batch").set(4)
    return generate_latest(r).decode()


def test_the_gateway_gauges_are_summed_over_lanes_for_the_model() -> None:
    text = _gateway_metrics()
    assert gateway_load(text, "sim") == (2, 12, 3)
    assert gateway_load(text, None) == (2, 112, 7)  # the openai engine: whatever model registers
    assert gateway_load(text, "absent") == (0, 0, 0)


def test_a_workers_busy_seconds_are_read_from_its_counter() -> None:
    r = CollectorRegistry()
    Counter("breakwater_engine_busy_seconds", "", ["model"], registry=r).labels("sim").inc(12.5)
    assert busy_seconds(generate_latest(r).decode()) == pytest.approx(12.5)
    assert busy_seconds("") == 0.0


def test_a_time_scale_runs_the_kubernetes_clocks_faster() -> None:
    mechanics = HpaMechanics(min_replicas=1, max_replicas=8)
    hpa = policy_from_spec("hpa:0.7", mechanics, time_scale=10)
    assert isinstance(hpa, Hpa) and hpa.target == 0.7 and hpa.period_s == 1.5
    assert hpa.mechanics.scale_down_window_s == 30 and hpa.mechanics.scale_up_period_s == 1.5
    assert hpa.mechanics.max_replicas == 8
    keda = policy_from_spec("keda:2", mechanics, time_scale=10)
    assert isinstance(keda, KedaQueue) and (keda.lag_per_pod, keda.polling_s, keda.period_s) == (2, 3, 1.5)
    assert mechanics.scale_down_window_s == 300  # the caller's mechanics are not changed
    real = policy_from_spec("hpa", mechanics)
    assert isinstance(real, Hpa) and (real.target, real.period_s) == (0.85, 15)


@pytest.mark.parametrize("spec", ["hpa:0", "hpa:1.5", "keda:0", "keda:x", "fixed:0", "nope", "adaptive:1"])
def test_a_bad_spec_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="expected one of"):
        policy_from_spec(spec, HpaMechanics())


def test_the_stack_runs_the_kubernetes_controllers_not_the_simulators_own() -> None:
    assert stack_policy("supervisor", 1, 4, 1.0) is None  # its own rules, on the gateway's signal
    assert isinstance(stack_policy("hpa:0.7", 1, 4, 1.0), Hpa)
    with pytest.raises(ValueError, match="expected one of"):
        stack_policy("adaptive", 1, 4, 1.0)  # the supervisor already follows that signal
    with pytest.raises(ValueError, match="keeps one worker at least"):
        stack_policy("keda-zero:5", 1, 4, 1.0)  # scale to zero: the simulator's
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="time scale"):
            stack_policy("hpa", 1, 4, bad)


def test_policies_made_from_one_mechanics_keep_their_own_windows() -> None:
    mechanics = HpaMechanics()
    a, b = policy_from_spec("hpa:0.5", mechanics), policy_from_spec("hpa:0.9", mechanics)
    assert isinstance(a, Hpa) and isinstance(b, Hpa)
    a.mechanics.decide(0.0, 2, 8)
    assert not b.mechanics._history and not mechanics._history


class Exporter:
    """A /metrics endpoint on 127.0.0.1 serving ``text`` (or not answering while ``down``)."""

    def __init__(self) -> None:
        self.text, self.down = "", False
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if exporter.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = exporter.text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def busy(self, seconds: float) -> None:
        r = CollectorRegistry()
        Counter("breakwater_engine_busy_seconds", "", ["model"], registry=r).labels("sim").inc(seconds)
        self.text = generate_latest(r).decode()


@pytest.fixture
def exporters() -> Iterator[list[Exporter]]:
    made = [Exporter() for _ in range(4)]
    yield made
    for e in made:
        e.server.shutdown()
        e.server.server_close()


def test_the_busy_share_is_averaged_over_the_workers_read_twice(exporters: list[Exporter]) -> None:
    """As the HPA averages over the pods it has metrics for: a new worker's first reading is its
    baseline, a retiring one's busy time still counts (as the simulator counts a draining
    replica's steps) but not as a serving worker, one that does not answer keeps its reading."""
    gateway, a, b, old = exporters
    gateway.text = _gateway_metrics()
    url = f"http://127.0.0.1:{gateway.port}"
    scaler = PolicyScaler(Hpa(0.5))
    ports = {"worker-0": a.port, "worker-1": b.port}
    a.busy(10.0)
    b.busy(3.0)
    first = scaler.observe(100.0, url, "sim", 2, ports, {})
    assert first is not None and first.utilisation == 0.0  # baselines only
    assert (first.ready, first.waiting, first.running, first.replicas) == (2, 12, 3, 2)
    a.busy(18.0)  # 8 s busy of 10
    b.busy(5.0)  # 2 s of 10
    second = scaler.observe(110.0, url, "sim", 2, ports, {})
    assert second is not None and second.utilisation == pytest.approx(10 / 20)
    # worker-1 retires (draining, busy 4 s more) and worker-2 starts: its first reading is a baseline
    c = old
    c.busy(50.0)
    a.busy(21.0)
    b.busy(9.0)
    third = scaler.observe(
        120.0, url, "sim", 2, {"worker-0": a.port, "worker-2": c.port}, {"worker-1": b.port}
    )
    assert third is not None and third.utilisation == pytest.approx((3 + 4) / (10 * 1))
    # worker-0 does not answer: nothing of it this time, its busy time comes with its next answer
    a.down = True
    c.busy(55.0)
    fourth = scaler.observe(130.0, url, "sim", 2, {"worker-0": a.port, "worker-2": c.port}, {})
    assert fourth is not None and fourth.utilisation == pytest.approx(5 / 10)
    a.down = False
    a.busy(2.0)  # restarted meanwhile: its counter began again at 0
    c.busy(60.0)
    fifth = scaler.observe(140.0, url, "sim", 2, {"worker-0": a.port, "worker-2": c.port}, {})
    assert fifth is not None and fifth.utilisation == pytest.approx((2 + 5) / (10 * 2))


def test_a_gateway_that_does_not_answer_gives_no_observation(exporters: list[Exporter]) -> None:
    gateway = exporters[0]
    gateway.down = True
    scaler = PolicyScaler(Hpa(0.5))
    assert scaler.observe(1.0, f"http://127.0.0.1:{gateway.port}", "sim", 1, {}, {}) is None
    assert scaler.failing
    gateway.down = False
    gateway.text = _gateway_metrics()
    assert scaler.observe(2.0, f"http://127.0.0.1:{gateway.port}", "sim", 1, {}, {}) is not None
    assert not scaler.failing
