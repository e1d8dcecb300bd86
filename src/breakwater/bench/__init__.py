"""``breakwater bench``: open- and closed-loop load against any OpenAI-compatible server.

See docs/bench.md for the profiles, the metric definitions (those of ``vllm bench serve``) and the
cost model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from breakwater.bench import profiles
from breakwater.bench.metrics import SLO, Cost, summarize
from breakwater.bench.profiles import Arrival
from breakwater.bench.runner import Runner, RunResult, Target

PROFILES = ("constant", "poisson", "step", "burst", "trace", "concurrency")


@dataclass(slots=True)
class Profile:
    name: str = "constant"
    rate: float = 5.0
    duration_s: float = 30.0
    burstiness: float = 1.0
    poisson: bool = False  # step / burst: Poisson arrivals around the rate curve instead of even spacing
    start_rate: float = 1.0
    end_rate: float = 10.0
    steps: int = 4
    peak: float = 20.0
    ramp_s: float = 5.0
    hold_s: float = 10.0
    decay_s: float = 5.0
    trace: str | None = None
    time_scale: float = 1.0
    trace_start_s: float = 0.0
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    concurrency: int = 8
    num_requests: int | None = None
    input_tokens: int = 128
    output_tokens: int = 64
    seed: int = 0
    repeat_fraction: float | None = None  # this share of requests repeat an earlier one (greedy)

    def arrivals(self) -> list[Arrival]:
        arrivals = self._schedule()
        if self.repeat_fraction is None:
            return arrivals
        return profiles.with_repeats(arrivals, self.repeat_fraction, self.seed)

    def _schedule(self) -> list[Arrival]:
        inp, out = self.input_tokens, self.output_tokens
        if self.name == "constant":
            return profiles.constant(self.rate, self.duration_s, inp, out)
        if self.name == "poisson":
            return profiles.poisson(
                self.rate, self.duration_s, inp, out, burstiness=self.burstiness, seed=self.seed
            )
        if self.name == "step":
            fn = profiles.step_rate(self.start_rate, self.end_rate, self.duration_s, self.steps)
            return profiles.from_rate(fn, self.duration_s, inp, out, poisson=self.poisson, seed=self.seed)
        if self.name == "burst":
            fn = profiles.burst_rate(self.peak, self.ramp_s, self.hold_s, self.decay_s)
            total = self.ramp_s + self.hold_s + self.decay_s
            return profiles.from_rate(fn, total, inp, out, poisson=self.poisson, seed=self.seed)
        if self.name == "trace":
            if not self.trace:
                raise ValueError("the trace profile needs --trace FILE (Azure CSV or Mooncake JSONL)")
            arrivals = profiles.trace(
                Path(self.trace),
                time_scale=self.time_scale,
                start_s=self.trace_start_s,
                duration_s=self.duration_s * self.time_scale,
                max_requests=self.num_requests,
                max_input_tokens=self.max_input_tokens,
                max_output_tokens=self.max_output_tokens,
            )
            return arrivals
        raise ValueError(f"unknown profile {self.name!r} (known: {', '.join(PROFILES)})")

    def lengths(self) -> Iterator[Arrival]:
        """Request shapes for the closed loop (lengths only; it sends when a sender is free)."""
        return itertools.repeat(Arrival(0.0, self.input_tokens, self.output_tokens))


async def run_profile(target: Target, profile: Profile) -> RunResult:
    runner = Runner(target)
    try:
        await runner.start()
        if profile.name == "concurrency":
            return await runner.closed_loop(
                profile.lengths(),
                concurrency=profile.concurrency,
                num_requests=profile.num_requests,
                duration_s=None if profile.num_requests else profile.duration_s,
            )
        return await runner.open_loop(profile.arrivals())
    finally:
        await runner.close()


async def sweep(
    target: Target,
    profile: Profile,
    slo: SLO,
    *,
    attainment: float = 0.99,
    max_rate: float = 10_000.0,
    refine: int = 3,
) -> tuple[float, list[dict[str, Any]]]:
    """The highest constant (or Poisson) rate whose requests meet the SLOs: doubling, then bisection."""
    if not slo.given():
        raise ValueError("a sweep needs --slo (e.g. ttft=500,tpot=50)")
    trials: list[dict[str, Any]] = []

    async def meets(rate: float) -> bool:
        trial = Profile(**{**asdict(profile), "rate": rate})
        result = await run_profile(target, trial)
        summary = summarize(result.records, duration_s=result.duration_s, slo=slo)
        share = sum(1 for r in result.records if slo.met(r)) / max(1, len(result.records))
        ok = share >= attainment
        trials.append({"rate": rate, "attained": share, "meets": ok, **_headline(summary)})
        return ok

    good, rate = 0.0, profile.rate
    while rate <= max_rate and await meets(rate):
        good, rate = rate, rate * 2
    bad = rate
    for _ in range(refine if good else 0):
        mid = (good + bad) / 2
        if await meets(mid):
            good = mid
        else:
            bad = mid
    return good, trials


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("completed", "failed", "request_throughput", "output_throughput", "p99_ttft_ms", "p99_tpot_ms")
    return {k: summary[k] for k in keys}


__all__ = ["PROFILES", "SLO", "Cost", "Profile", "RunResult", "Target", "run_profile", "summarize", "sweep"]
