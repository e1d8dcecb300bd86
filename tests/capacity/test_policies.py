"""Autoscaling controllers as Kubernetes and KEDA document them, and Breakwater's own signal."""

from __future__ import annotations

import pytest

from breakwater.capacity.policies import (
    Adaptive,
    Hpa,
    HpaMechanics,
    KedaQueue,
    Observation,
    Supervisor,
    external_average,
)
from breakwater.config import GatewaySettings


def obs(now: float = 0.0, replicas: int = 2, utilisation: float = 0.0, **counts: int) -> Observation:
    fields = {"ready": replicas, "waiting": 0, "running": 0, "capacity": 0, "arrived": 0, "done": 0} | counts
    return Observation(now=now, replicas=replicas, utilisation=utilisation, **fields)


def test_the_hpa_formula_as_kubernetes_documents_it() -> None:
    """kubernetes.io, "Horizontal Pod Autoscaling", algorithm details: 200m against a 100m target
    doubles the replicas, 50m halves them; within the 0.1 tolerance nothing changes."""
    m = HpaMechanics()
    assert m.raw(current=3, ratio=200 / 100) == 6
    assert m.raw(current=4, ratio=50 / 100) == 2
    assert m.raw(current=4, ratio=1.05) == 4 and m.raw(current=4, ratio=0.95) == 4
    assert m.raw(current=4, ratio=1.2) == 5  # ceil(4.8)


def test_scale_down_is_stabilised_over_five_minutes_and_scale_up_is_rate_limited() -> None:
    m = HpaMechanics(max_replicas=100)
    assert m.decide(0.0, current=10, recommendation=10) == 10
    assert m.decide(15.0, current=10, recommendation=3) == 10  # the window still holds 10
    assert m.decide(301.0, current=10, recommendation=3) == 3  # 10 left the window
    assert m.decide(316.0, current=2, recommendation=40) == 6  # max(2 x 2, 2 + 4) per period
    assert m.decide(331.0, current=6, recommendation=40) == 12
    assert HpaMechanics(min_replicas=2, max_replicas=5).decide(0.0, current=4, recommendation=9) == 5


def test_hpa_on_utilisation() -> None:
    hpa = Hpa(target=0.85, mechanics=HpaMechanics())
    assert hpa.desired(obs(replicas=4, utilisation=1.0)) == 5  # ceil(4 x 1.0 / 0.85)
    cpu = Hpa(target=0.7)
    # Started warm: the window holds the starting count, so half the load halves the fleet after 300 s.
    assert cpu.desired(obs(replicas=4, utilisation=0.35)) == 4
    assert cpu.desired(obs(now=301.0, replicas=4, utilisation=0.35)) == 2


def test_keda_lag_is_an_average_value_and_polled() -> None:
    assert external_average(HpaMechanics(), current=2, total=50, per_pod=5) == 10
    assert external_average(HpaMechanics(), current=0, total=12, per_pod=5) == 3
    keda = KedaQueue(lag_per_pod=5, polling_s=30)
    assert keda.desired(obs(now=0.0, replicas=2, waiting=20)) == 4
    # the lag grew, but KEDA has not polled again yet: the HPA still sees 20
    assert keda.desired(obs(now=15.0, replicas=4, waiting=200)) == 4
    assert keda.desired(obs(now=30.0, replicas=4, waiting=200)) == 8  # polled: 40 wanted, +4 per period


def test_keda_scales_to_zero_after_its_cooldown_and_back_on_lag() -> None:
    """minReplicaCount 0 (KEDA's documented semantics): zero once no poll has found a trigger
    active for cooldownPeriod; one at the first poll that finds one again. On lag triggers alone,
    jobs running are not lag: a fleet that keeps up goes to zero under its jobs."""
    mechanics = HpaMechanics(min_replicas=1)
    lag_only = KedaQueue(5, 30, mechanics, min_replicas=0, cooldown_s=300, busy_active=False)
    assert lag_only.desired(obs(now=0.0, replicas=2, waiting=10)) == 2  # 10 over 2 pods: on target
    assert lag_only.desired(obs(now=30.0, replicas=2, running=8)) == 2  # no lag: cooling down
    assert lag_only.desired(obs(now=300.0, replicas=2, running=8)) == 2  # 300 s since: not past it
    # past it, but not polled: the HPA's own answer (lag 0, its 300 s window over: its minimum)
    assert lag_only.desired(obs(now=315.0, replicas=2, running=8)) == 1
    assert lag_only.desired(obs(now=330.0, replicas=1, running=8)) == 0  # the poll after: zero
    assert lag_only.desired(obs(now=345.0, replicas=0, waiting=3)) == 0  # not polled since: not seen
    assert lag_only.desired(obs(now=360.0, replicas=0, waiting=3)) == 1  # activation: one pod
    assert lag_only.desired(obs(now=375.0, replicas=1, waiting=3)) == 1  # the HPA above one
    # With a trigger on the workers' output (the shipped ScaledObject), running jobs keep it up
    # (no lag: its HPA takes the fleet to one after the 300 s scale-down window, not to zero).
    shipped = KedaQueue(5, 30, HpaMechanics(min_replicas=1), min_replicas=0, cooldown_s=300)
    wanted = [shipped.desired(obs(now=t, replicas=2, running=8)) for t in (0.0, 30.0, 300.0, 600.0)]
    assert wanted == [2, 2, 2, 1]
    assert shipped.desired(obs(now=630.0, replicas=1)) == 1  # idle: cooling down from 600 s
    assert shipped.desired(obs(now=900.0, replicas=1)) == 1
    assert shipped.desired(obs(now=930.0, replicas=1)) == 0
    assert shipped.desired(obs(now=960.0, replicas=0)) == 0
    # Activation needs more than activation_lag waiting.
    strict = KedaQueue(5, 30, HpaMechanics(min_replicas=1), min_replicas=0, cooldown_s=60, activation_lag=2)
    assert strict.desired(obs(now=0.0, replicas=1)) == 1
    assert strict.desired(obs(now=90.0, replicas=1, waiting=2)) == 0  # 2 is not more than 2
    assert strict.desired(obs(now=120.0, replicas=0, waiting=3)) == 1
    # A minimum of one never goes to zero, whatever the quiet.
    warm = KedaQueue(5, polling_s=30)
    assert warm.desired(obs(now=0.0, replicas=2)) == 2
    assert warm.desired(obs(now=3600.0, replicas=1)) == 1


def test_adaptive_is_the_gateways_desired_workers_signal() -> None:
    """Breakwater's policy runs the gateway's own ModelLoad: a measured per-worker rate of 2 jobs/s
    against 6 arrivals/s and a backlog wants 3 workers plus the backlog over the horizon."""
    settings = GatewaySettings(autoscale_horizon_s=10, autoscale_max_workers=64)
    policy = Adaptive(settings, HpaMechanics(max_replicas=64))
    arrived = done = 0
    for second in range(60):  # 6 arrivals/s, 2 workers each finishing 2/s, a backlog growing by 2/s
        arrived, done = arrived + 6, done + 4
        want = policy.desired(
            obs(
                now=float(second),
                replicas=2,
                ready=2,
                waiting=arrived - done,
                running=4,
                arrived=arrived,
                done=done,
            )
        )
    backlog = arrived - done  # 120
    assert policy._load.per_worker_rate == pytest.approx(2.0)
    assert policy._load.desired_workers(settings) == -(-(6 + backlog / 10) // 2)
    assert want >= 4  # scaled out (rate-limited from 2)


def test_supervisor_scales_up_at_once_and_down_one_at_a_time_after_a_stable_spell() -> None:
    """``breakwater up --autoscale``: every 2 s it takes the gateway's desired workers; more at once,
    fewer only after 10 s below, one retired at a time."""
    settings = GatewaySettings(
        autoscale_min_workers=1, autoscale_max_workers=4, autoscale_horizon_s=10, autoscale_window_s=0
    )  # the count of the moment: the window is ModelLoad's (tests/gateway/test_model_load.py)
    policy = Supervisor(settings)
    arrived = done = 0
    wants = []
    for second in range(20):  # a backlog and 8 arrivals/s, one busy worker finishing 2/s: wants 4
        arrived, done = arrived + 8, done + 2
        wants.append(
            policy.desired(obs(now=float(second), replicas=1, ready=1, waiting=arrived - done, running=4,
                               arrived=arrived, done=done))
        )  # fmt: skip
    # First read: nothing measured, one more for the backlog; then 4 (the max) at each read, 2 s apart.
    assert wants == [2, 1] + [4, 1] * 9
    # Idle now: below the count of 4 for 10 s (read every 2 s), then one fewer, then again 10 s.
    idle = [
        policy.desired(obs(now=20.0 + s, replicas=4, ready=4, arrived=arrived, done=arrived))
        for s in range(24)
    ]
    assert idle == [4] * 10 + [3] + [4] * 11 + [3] + [4]  # reads at 20, 22, ...: 30 and 42 retire one


def test_the_supervisor_feeds_the_window_every_second() -> None:
    """The gateway refreshes breakwater_desired_workers every second; the supervisor reads it every
    2 s. A burst seen on an odd second, between two reads, must still be read (the window holds
    it), and the fleet must not shrink while the window holds the burst."""
    settings = GatewaySettings(
        autoscale_min_workers=1, autoscale_max_workers=8, autoscale_horizon_s=10, autoscale_window_s=20
    )
    policy = Supervisor(settings)
    arrived = done = 0
    wants: list[int] = []
    for second in range(40):
        burst = second == 5  # one second of 40 arrivals and a backlog, then quiet
        arrived += 40 if burst else 0
        done = arrived if not burst else done
        wants.append(
            policy.desired(
                obs(now=float(second), replicas=wants[-1] if wants else 1, ready=1,
                    waiting=40 if burst else 0, running=4 if burst else 0, arrived=arrived, done=done)
            )
        )  # fmt: skip
    assert wants[6] > 1  # read at 6 s: the burst of 5 s was between reads (4 s and 6 s)
    assert wants[6:25] == [wants[6]] * 19  # held while the window (20 s) and the down delay run
