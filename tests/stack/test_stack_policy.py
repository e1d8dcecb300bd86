"""The controllers ``breakwater up --autoscale-policy`` runs, and what they are shown (pure parts; the
processes themselves: tests/stack/test_autoscale.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from breakwater.capacity.policies import Hpa, HpaMechanics, KedaQueue, policy_from_spec
from breakwater.stack_policy import busy_seconds, gateway_load, stack_policy


def _gateway_metrics() -> str:
    r = CollectorRegistry()
    Gauge("breakwater_workers", "", ["model"], registry=r).labels("sim").set(2)
    Gauge("breakwater_workers", "", ["model"], registry=CollectorRegistry())  # another registry: unseen
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
    with pytest.raises(ValueError, match="time scale"):
        stack_policy("hpa", 1, 4, 0.0)


def test_policies_made_from_one_mechanics_keep_their_own_windows() -> None:
    mechanics = HpaMechanics()
    a, b = policy_from_spec("hpa:0.5", mechanics), policy_from_spec("hpa:0.9", mechanics)
    assert isinstance(a, Hpa) and isinstance(b, Hpa)
    a.mechanics.decide(0.0, 2, 8)
    assert not b.mechanics._history and not mechanics._history
