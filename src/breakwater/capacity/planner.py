"""``breakwater plan``: the fleet a traffic level needs, and what it costs a month.

The replicas come from the simulator: a trace's hour stands for the peak hour, replayed at the
peak rate (the day's average times ``peak_to_average``), and the smallest fixed fleet whose TTFT
p95 (and TPOT p95, if given) meets the objective is found by bisection. Gateways and Redis
primaries come from this project's measurements (docs/benchmarks.md), as constants a user can
override: tokens per gateway core-second and Redis CPU per token event. The rest is arithmetic, written out in
:class:`Plan` so that every figure can be checked by hand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from breakwater.bench.metrics import percentile
from breakwater.bench.profiles import Arrival
from breakwater.capacity.policies import Fixed
from breakwater.capacity.pricing import Pricing
from breakwater.capacity.service import ServiceCurve
from breakwater.capacity.simulator import Simulation

# Measured here (docs/benchmarks.md): a gateway core streams ~13,000 tokens/s of 64-token streams at
# 10 ms ITL (the peers table, "itl10"); a Redis primary spends ~54 µs per token event on a cluster.
GATEWAY_TOKENS_PER_CORE_S = 13_000.0
REDIS_US_PER_EVENT = 54.0
BYTES_PER_TOKEN_KEPT = 86.0  # ~43 KB per 500-token answer kept for resumes (docs/deploy.md)
HEADROOM = 0.7  # plan gateways and Redis at 70% of a core


@dataclass(frozen=True)
class Demand:
    requests_per_day: float
    peak_to_average: float = 2.0
    ttft_p95_s: float = 1.0
    result_ttl_s: float = 3600.0
    tpot_p95_s: float | None = None  # also an objective on the time per output token, if given

    def __post_init__(self) -> None:
        if not self.requests_per_day > 0:
            raise ValueError(f"the requests a day must be more than 0, got {self.requests_per_day:g}")
        if not self.peak_to_average >= 1:  # the peak hour is at least the day's average
            raise ValueError(f"the peak-to-average ratio must be at least 1, got {self.peak_to_average:g}")
        for name, slo in (("TTFT", self.ttft_p95_s), ("TPOT", self.tpot_p95_s)):
            if slo is not None and not slo > 0:
                raise ValueError(f"the {name} objective must be more than 0 s, got {slo:g}")

    @property
    def average_rps(self) -> float:
        return self.requests_per_day / 86_400

    @property
    def peak_rps(self) -> float:
        return self.average_rps * self.peak_to_average


@dataclass(frozen=True)
class Plan:
    peak_rps: float
    peak_tokens_per_s: float
    replicas_peak: int
    replicas_average: int  # an autoscaled fleet following the day (peak / peak_to_average)
    ttft_p95_s: float  # at the peak, with replicas_peak
    tpot_p95_s: float  # the same
    gateway_cores: int
    redis_primaries: int
    redis_gb: float
    gpu_monthly_usd: float
    gateway_monthly_usd: float
    redis_monthly_usd: float  # memory, and about one operation (ECPU) per token event
    output_tokens_per_month: float

    @property
    def monthly_usd(self) -> float:
        return self.gpu_monthly_usd + self.gateway_monthly_usd + self.redis_monthly_usd

    @property
    def usd_per_1k_tokens(self) -> float:
        return self.monthly_usd / self.output_tokens_per_month * 1000

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"monthly_usd": self.monthly_usd, "usd_per_1k_tokens": self.usd_per_1k_tokens}


def at_rate(arrivals: list[Arrival], rps: float) -> list[Arrival]:
    """The trace's arrivals with their times rescaled to a mean rate of ``rps``."""
    if len(arrivals) < 2 or arrivals[-1].t <= arrivals[0].t:
        raise ValueError("a trace needs at least two requests at different times")
    if not rps > 0:
        raise ValueError(f"the rate must be more than 0, got {rps:g}")
    span = arrivals[-1].t - arrivals[0].t
    scale = (len(arrivals) - 1) / span / rps  # planned seconds per trace second
    start = arrivals[0].t
    return [replace(a, t=(a.t - start) * scale) for a in arrivals]


def p95s(curve: ServiceCurve, arrivals: list[Arrival], replicas: int) -> tuple[float, float]:
    """TTFT and TPOT p95 of a fixed fleet (inf when it never finishes)."""
    result = Simulation(curve, arrivals, Fixed(replicas), replicas=replicas).run()
    if any(r.done_s < 0 for r in result.requests):
        return math.inf, math.inf
    ttft = percentile([r.ttft_s for r in result.requests], 95)
    tpot = percentile([r.tpot_s for r in result.requests if r.output_tokens > 1] or [0.0], 95)
    return ttft, tpot


def ttft_p95(curve: ServiceCurve, arrivals: list[Arrival], replicas: int) -> float:
    return p95s(curve, arrivals, replicas)[0]


def smallest_fleet(
    curve: ServiceCurve,
    arrivals: list[Arrival],
    slo_s: float,
    most: int = 4096,
    *,
    tpot_slo_s: float | None = None,
) -> int:
    """The fewest replicas whose TTFT p95 meets ``slo_s`` (and TPOT p95 ``tpot_slo_s``, if given):
    more replicas never wait longer, and run smaller batches."""

    def meets(replicas: int) -> bool:
        ttft, tpot = p95s(curve, arrivals, replicas)
        return ttft <= slo_s and (tpot_slo_s is None or tpot <= tpot_slo_s)

    if tpot_slo_s is not None and curve.step_s(1) > tpot_slo_s:
        raise ValueError(f"a step alone takes {curve.step_s(1) * 1000:g} ms: no fleet meets that TPOT")
    # A request's first token comes at the end of the step its prompt joins: on an idle replica at
    # the earliest. More replicas cannot bring the p95 of those below the objective.
    floor = percentile([curve.step_s(1, a.input_tokens) for a in arrivals], 95)
    if floor > slo_s:
        raise ValueError(
            f"no fleet meets a TTFT p95 of {slo_s:g} s: the prefill of these prompts alone takes "
            f"{floor:.3g} s at the p95, on an idle replica"
        )
    low, high = 1, 1
    while not meets(high):
        low, high = high + 1, high * 2
        if high > most:
            raise ValueError(f"more than {most} replicas would be needed")
    while low < high:
        mid = (low + high) // 2
        if meets(mid):
            high = mid
        else:
            low = mid + 1
    return high


def plan(
    demand: Demand,
    trace: list[Arrival],
    curve: ServiceCurve,
    prices: Pricing,
    *,
    sku: str = "h100",
    gpus_per_replica: int = 1,
    gateway_tokens_per_core_s: float = GATEWAY_TOKENS_PER_CORE_S,
    redis_us_per_event: float = REDIS_US_PER_EVENT,
) -> Plan:
    arrivals = at_rate(trace, demand.peak_rps)
    replicas = smallest_fleet(curve, arrivals, demand.ttft_p95_s, tpot_slo_s=demand.tpot_p95_s)
    ttft, tpot = p95s(curve, arrivals, replicas)
    tokens_per_request = sum(a.output_tokens for a in trace) / len(trace)
    peak_tokens = demand.peak_rps * tokens_per_request
    hours = prices.hours_per_month
    average = max(1, math.ceil(replicas / demand.peak_to_average))
    cores = max(1, math.ceil(peak_tokens / (gateway_tokens_per_core_s * HEADROOM)))
    primaries = max(1, math.ceil(peak_tokens * redis_us_per_event / 1e6 / HEADROOM))
    kept_gb = demand.peak_rps * demand.result_ttl_s * tokens_per_request * BYTES_PER_TOKEN_KEPT / 1e9
    redis_gb = kept_gb * 2  # each primary with one replica
    monthly_tokens = demand.average_rps * tokens_per_request * hours * 3600
    return Plan(
        peak_rps=demand.peak_rps,
        peak_tokens_per_s=peak_tokens,
        replicas_peak=replicas,
        replicas_average=average,
        ttft_p95_s=ttft,
        tpot_p95_s=tpot,
        gateway_cores=cores,
        redis_primaries=primaries,
        redis_gb=redis_gb,
        gpu_monthly_usd=average * gpus_per_replica * hours * prices.gpu_hour[sku],
        gateway_monthly_usd=cores * hours * prices.vcpu_hour,
        redis_monthly_usd=redis_gb * prices.redis_gb_month + monthly_tokens / 1e6 * prices.redis_million_ops,
        output_tokens_per_month=monthly_tokens,
    )
