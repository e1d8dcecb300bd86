"""The fleet simulator against closed forms and hand-worked cases: an M/M/c queue's mean wait
(Erlang C), continuous batching's step arithmetic, start-up delay, drains that lose nothing, and a
fleet too small to finish."""

from __future__ import annotations

import math
import random

import pytest

from breakwater.bench.profiles import Arrival
from breakwater.capacity.policies import Adaptive, Fixed, HpaMechanics, KedaQueue, Observation
from breakwater.capacity.service import ServiceCurve
from breakwater.capacity.simulator import Simulation
from breakwater.config import GatewaySettings
from breakwater.engines.options import SimOptions


def erlang_c_wait(arrival_rate: float, service_rate: float, servers: int) -> float:
    """Mean time in queue of an M/M/c queue."""
    a = arrival_rate / service_rate
    rho = a / servers
    top = a**servers / math.factorial(servers) / (1 - rho)
    p_wait = top / (sum(a**k / math.factorial(k) for k in range(servers)) + top)
    return p_wait / (servers * service_rate - arrival_rate)


def test_an_m_m_c_queue_waits_as_erlang_c_says() -> None:
    """4 replicas of one sequence each; Poisson arrivals at 75% load; service times geometric in
    tokens (mean 20 steps of 50 ms: close to exponential, mean 1 s). The mean wait over four
    independent runs of 50,000 requests is Erlang C's within 8%."""
    lam, mean_tokens, step_s, servers = 3.0, 20, 0.05, 4
    waits: list[float] = []
    expected: list[float] = []
    for seed in range(4):
        rng = random.Random(seed)
        t, arrivals = 0.0, []
        for _ in range(50_000):
            t += rng.expovariate(lam)
            tokens = max(1, math.ceil(math.log(1 - rng.random()) / math.log(1 - 1 / mean_tokens)))
            arrivals.append(Arrival(t, 1, tokens))
        result = Simulation(ServiceCurve(1, step_s), arrivals, Fixed(servers), replicas=servers).run()
        assert all(r.done_s >= 0 for r in result.requests)
        # busy time is exactly the service demanded: every step ran one sequence
        assert result.busy_s == pytest.approx(step_s * sum(a.output_tokens for a in arrivals))
        waits += [r.started_s - r.arrival_s for r in result.requests]
        service_mean = step_s * sum(a.output_tokens for a in arrivals) / len(arrivals)
        expected.append(erlang_c_wait(lam, 1 / service_mean, servers))
    assert sum(waits) / len(waits) == pytest.approx(sum(expected) / len(expected), rel=0.08)


def test_continuous_batching_step_arithmetic() -> None:
    """Two requests arrive together on one replica: one step costs base + 2 x per-sequence + their
    prefill; then the shorter ends and the longer runs alone."""
    curve = ServiceCurve(capacity=4, decode_base_s=0.1, decode_per_seq_s=0.01, prefill_s_per_token=0.001)
    arrivals = [Arrival(0.0, 100, 2), Arrival(0.0, 50, 4)]
    a, b = Simulation(curve, arrivals, Fixed(1)).run().requests
    first = 0.1 + 0.02 + 0.15  # two sequences, 150 prompt tokens
    assert a.first_token_s == pytest.approx(first) and b.first_token_s == pytest.approx(first)
    assert a.done_s == pytest.approx(first + 0.12)
    assert b.done_s == pytest.approx(first + 0.12 + 2 * 0.11)
    assert b.tpot_s == pytest.approx((0.12 + 0.22) / 3)


def test_a_full_replica_queues_the_rest() -> None:
    curve = ServiceCurve(capacity=2, decode_base_s=0.1)
    result = Simulation(curve, [Arrival(0.0, 1, 3) for _ in range(3)], Fixed(1)).run()
    assert [r.started_s for r in result.requests] == [0.0, 0.0, pytest.approx(0.3)]
    assert result.requests[2].done_s == pytest.approx(0.6)


def test_new_replicas_serve_only_after_their_start_up() -> None:
    curve = ServiceCurve(capacity=1, decode_base_s=0.1)
    result = Simulation(curve, [Arrival(1.0, 1, 1)], Fixed(1), replicas=0, startup_s=30.0).run()
    (request,) = result.requests
    assert request.first_token_s == pytest.approx(30.1)  # the replica asked for at t=0, ready at 30
    assert result.replica_s == pytest.approx(30.1)  # billed from the request to provision it


class Shrinking:
    """Two replicas, then one from t=1 s: the drained one finishes what it runs."""

    name = "shrinking"
    period_s = 0.5

    def desired(self, obs: Observation) -> int:
        return 2 if obs.now < 1.0 else 1


def test_a_drained_replica_finishes_what_it_runs_and_loses_nothing() -> None:
    curve = ServiceCurve(capacity=1, decode_base_s=0.1)
    arrivals = [Arrival(0.0, 1, 30), Arrival(0.0, 1, 30), Arrival(0.5, 1, 5)]
    result = Simulation(curve, arrivals, Shrinking(), replicas=2, sample_s=0.5).run()
    assert [r.tokens for r in result.requests] == [30, 30, 5]
    assert all(r.done_s >= 0 for r in result.requests)
    assert result.requests[2].started_s == pytest.approx(3.0)  # after a 30-step request ended
    assert result.samples[-1].replicas == 1


def test_a_fleet_too_small_stops_at_the_horizon() -> None:
    class Never:
        name, period_s = "none", 10.0

        def desired(self, obs: Observation) -> int:
            return 0

    result = Simulation(ServiceCurve(1, 0.1), [Arrival(0.0, 1, 1)], Never(), replicas=0).run(horizon_s=60)
    assert result.requests[0].done_s < 0 and result.end_s <= 60


def test_a_fleet_scaled_to_zero_wakes_for_the_next_request() -> None:
    """KEDA with minReplicaCount 0 (cooldown 300 s, polled every 30 s, the HPA every 15 s): one
    request, a lull of 20 minutes, another. The fleet is at zero by the second one, which waits for
    KEDA's next poll and a replica's start-up (60 s); a minimum of one pays for the lull instead."""
    curve = ServiceCurve(capacity=1, decode_base_s=0.1)
    arrivals = [Arrival(0.0, 1, 1), Arrival(1201.0, 1, 1)]

    def keda(minimum: int) -> KedaQueue:
        mechanics = HpaMechanics(min_replicas=1)
        return KedaQueue(5, 30.0, mechanics, period_s=15.0, min_replicas=minimum, cooldown_s=300.0)

    zero = Simulation(curve, arrivals, keda(0), replicas=1, startup_s=60.0).run()
    one = Simulation(curve, arrivals, keda(1), replicas=1, startup_s=60.0).run()
    assert [r.done_s >= 0 for r in zero.requests] == [True, True]
    assert zero.requests[0].ttft_s == pytest.approx(0.1)
    # Arrived at 1201 s; KEDA's next poll at 1230 s asks for a replica, ready at 1290 s.
    assert zero.requests[1].ttft_s == pytest.approx(89.1)
    assert one.requests[1].ttft_s == pytest.approx(0.1)
    # Zero from the first poll past the cooldown (330 s) to 1230 s, then a replica billed through
    # its start-up: 330 + 60.1 replica-seconds, against 1201.1 for a minimum of one.
    assert zero.replica_s == pytest.approx(330.0 + 60.1)
    assert one.replica_s == pytest.approx(1201.1)


def test_the_sim_engines_own_curve() -> None:
    curve = ServiceCurve.of_sim(SimOptions(capacity=8, decode_base_ms=5, decode_per_seq_ms=0.2))
    assert curve.step_s(8) == pytest.approx(0.0066)
    with pytest.raises(ValueError):
        ServiceCurve(0, 0.1)


def test_adaptive_does_not_mistake_idle_workers_for_saturated_ones() -> None:
    """A light load on a fleet started too big: a job waits a moment at the first look (no replica
    has pulled it yet), which once read as 8 busy workers finishing almost nothing each, and the
    measured 'capacity' of an idle worker then asked for ever more of them (8 -> 36 here).
    Measured only when the slots are nearly all taken, the fleet shrinks to what the load needs."""
    rng = random.Random(7)
    t, arrivals = 0.0, []
    while t < 900:
        arrivals.append(Arrival(t, 400, 60))
        t += rng.expovariate(5.0)  # 5 req/s x 60 tokens: about one replica of 32 sequences
    curve = ServiceCurve(32, 0.02, 0.0005, 0.00005)
    settings = GatewaySettings(autoscale_min_workers=1, autoscale_max_workers=64)
    policy = Adaptive(settings, HpaMechanics(max_replicas=64))
    result = Simulation(curve, arrivals, policy, replicas=8, startup_s=60).run()
    assert max(s.replicas for s in result.samples) == 8  # never above where it started
    assert result.samples[-1].replicas <= 2


def test_a_prefill_budget_spreads_long_prompts_over_steps() -> None:
    """``max_batched_tokens`` 2,000: of four 1,000-token prompts arriving together, two join the
    first step and two the next (without a budget all four join the first)."""
    curve = ServiceCurve(capacity=8, decode_base_s=0.01, decode_per_seq_s=0.001, prefill_s_per_token=0.001,
                         max_batched_tokens=2000)  # fmt: skip
    arrivals = [Arrival(0.0, 1000, 3) for _ in range(4)]
    result = Simulation(curve, arrivals, Fixed(1), replicas=1, startup_s=0).run()
    first = sorted(round(r.first_token_s, 3) for r in result.requests)
    step1 = 0.01 + 0.002 + 2.0  # two running, 2,000 prompt tokens
    step2 = 0.01 + 0.004 + 2.0  # four running, the other two's 2,000
    assert first == [round(step1, 3)] * 2 + [round(step1 + step2, 3)] * 2
    unlimited = ServiceCurve(
        capacity=8, decode_base_s=0.01, decode_per_seq_s=0.001, prefill_s_per_token=0.001
    )
    together = Simulation(unlimited, arrivals, Fixed(1), replicas=1, startup_s=0).run()
    assert {round(r.first_token_s, 3) for r in together.requests} == {round(0.01 + 0.004 + 4.0, 3)}
