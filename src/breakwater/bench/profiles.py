"""Arrival schedules: when each request is sent and how long its prompt and output are.

Every open-loop profile is a list of :class:`Arrival` computed up front (so a run is reproducible and
the schedule can be checked statistically). Rate-shaped profiles (``step``, ``burst``) integrate
their rate function: request *k* is sent when the cumulative intensity reaches *k* + 1/2 (evenly spaced
at the current rate), or, with ``poisson=True``, when it reaches the *k*-th point of a unit Poisson
process (exponential gaps warped by the rate). ``poisson`` with ``burstiness`` follows
``vllm bench serve``: gamma-distributed gaps with shape ``burstiness`` and mean ``1/rate``
(1.0 is Poisson; lower is burstier).
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson


@dataclass(frozen=True, slots=True)
class Arrival:
    t: float  # seconds after the start of the run
    input_tokens: int
    output_tokens: int
    # With repeats (``with_repeats``): the prompt's identity; equal ids are identical greedy requests.
    prompt_id: int = -1


def with_repeats(arrivals: list[Arrival], fraction: float, seed: int = 0) -> list[Arrival]:
    """The same schedule where a ``fraction`` of requests repeat an earlier one exactly (its prompt
    and lengths, drawn uniformly from the distinct requests before it), as retries, shared questions
    and evaluation harnesses do; the others are distinct."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("the repeat fraction must be between 0 and 1")
    rng = random.Random(seed + 1)
    out: list[Arrival] = []
    distinct: list[Arrival] = []
    for i, arrival in enumerate(arrivals):
        if distinct and rng.random() < fraction:
            original = rng.choice(distinct)
            out.append(Arrival(arrival.t, original.input_tokens, original.output_tokens, original.prompt_id))
        else:
            fresh = Arrival(arrival.t, arrival.input_tokens, arrival.output_tokens, i)
            distinct.append(fresh)
            out.append(fresh)
    return out


def constant(rate: float, duration_s: float, input_tokens: int, output_tokens: int) -> list[Arrival]:
    _positive(rate=rate, duration_s=duration_s)
    n = math.floor(rate * duration_s + 1e-9)
    return [Arrival(i / rate, input_tokens, output_tokens) for i in range(n)]


def poisson(
    rate: float,
    duration_s: float,
    input_tokens: int,
    output_tokens: int,
    *,
    burstiness: float = 1.0,
    seed: int = 0,
) -> list[Arrival]:
    _positive(rate=rate, duration_s=duration_s, burstiness=burstiness)
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += rng.gammavariate(burstiness, theta)
        if t >= duration_s:
            return out
        out.append(Arrival(t, input_tokens, output_tokens))


def from_rate(
    rate_fn: Callable[[float], float],
    duration_s: float,
    input_tokens: int,
    output_tokens: int,
    *,
    poisson: bool = False,
    seed: int = 0,
    dt: float = 0.001,
) -> list[Arrival]:
    """Arrivals of an inhomogeneous process with intensity ``rate_fn(t)`` over ``[0, duration_s)``."""
    rng = random.Random(seed)
    # Evenly spaced: request k goes out when the cumulative intensity reaches k + 1/2 (centred in its
    # share of the curve, so every window gets its integral's worth).
    target = rng.expovariate(1.0) if poisson else 0.5
    out: list[Arrival] = []
    cumulative = 0.0
    steps = math.ceil(duration_s / dt)
    for i in range(steps):
        t0 = i * dt
        rate = max(0.0, rate_fn(t0 + dt / 2))
        nxt = cumulative + rate * dt
        while target < nxt:  # target reached inside this slice: interpolate linearly
            frac = (target - cumulative) / (rate * dt) if rate > 0 else 0.0
            out.append(Arrival(t0 + frac * dt, input_tokens, output_tokens))
            target += rng.expovariate(1.0) if poisson else 1.0
        cumulative = nxt
    return out


def step_rate(start: float, end: float, duration_s: float, steps: int) -> Callable[[float], float]:
    """``steps`` equal plateaus from ``start`` to ``end`` (the seed's 50→200 RPS over 5 minutes)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    width = duration_s / steps

    def rate(t: float) -> float:
        k = min(steps - 1, int(t // width))
        return start + (end - start) * (k / (steps - 1) if steps > 1 else 1.0)

    return rate


def burst_rate(
    peak: float, ramp_s: float, hold_s: float, decay_s: float, base: float = 0.0
) -> Callable[[float], float]:
    """Linear ramp ``base``→``peak`` over ``ramp_s``, hold, then linear decay back to ``base``."""

    def rate(t: float) -> float:
        if t < ramp_s:
            return base + (peak - base) * t / ramp_s
        if t < ramp_s + hold_s:
            return peak
        if t < ramp_s + hold_s + decay_s:
            return peak - (peak - base) * (t - ramp_s - hold_s) / decay_s
        return base

    return rate


def trace(
    path: Path,
    *,
    time_scale: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    max_requests: int | None = None,
    max_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> list[Arrival]:
    """Replay a trace: Azure LLM inference CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``) or
    Mooncake JSONL (``timestamp`` in ms, ``input_length``, ``output_length``).

    The window ``[start_s, start_s + duration_s)`` of the trace's own time is kept and shifted to 0;
    ``time_scale`` > 1 replays faster (inter-arrival times divided by it). Lengths are kept, clipped
    to ``max_*_tokens`` when given.
    """
    _positive(time_scale=time_scale)
    rows = _read_trace(path)
    if not rows:
        return []
    t_first = rows[0][0]
    out: list[Arrival] = []
    for t_abs, inp, outp in rows:
        t = t_abs - t_first - start_s
        if t < 0:
            continue
        if duration_s is not None and t >= duration_s:
            break
        inp = min(inp, max_input_tokens) if max_input_tokens else inp
        outp = min(outp, max_output_tokens) if max_output_tokens else outp
        out.append(Arrival(t / time_scale, max(1, inp), max(1, outp)))
        if max_requests is not None and len(out) >= max_requests:
            break
    return out


def _read_trace(path: Path) -> list[tuple[float, int, int]]:
    rows: list[tuple[float, int, int]] = []
    if path.suffix == ".jsonl":
        with path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    rec = orjson.loads(line)
                    rows.append(
                        (
                            float(rec["timestamp"]) / 1000.0,
                            int(rec["input_length"]),
                            int(rec["output_length"]),
                        )
                    )
    else:
        with path.open(newline="") as fh:
            for rec in csv.DictReader(fh):
                ts = datetime.fromisoformat(rec["TIMESTAMP"].strip()[:26])
                rows.append((ts.timestamp(), int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
    rows.sort(key=lambda r: r[0])
    return rows


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


DAY_S = 86_400.0


def diurnal_share(t: float, trough: float, peak_at_s: float) -> float:
    """The day's rate at ``t`` as a share of its peak: a cosine from ``trough`` (12 hours from the
    peak) to 1 (at ``peak_at_s``), the shape of an interactive service's day."""
    if not 0.0 < trough <= 1.0:
        raise ValueError("trough must be in (0, 1]")
    phase = math.cos(2 * math.pi * (t - peak_at_s) / DAY_S)
    return trough + (1.0 - trough) * (1.0 + phase) / 2.0


def diurnal_day(
    arrivals: list[Arrival], *, trough: float = 0.25, peak_at_s: float = 15 * 3600.0, seed: int = 0
) -> list[Arrival]:
    """A synthetic day from a shorter trace: ``arrivals`` (at the peak's pace) repeated back to back
    for 24 hours, each request kept with the probability ``diurnal_share`` gives at its new time, so
    the rate at the peak is the arrivals' own, the night's ``trough`` of it, and every request
    keeps its lengths (and its ``prompt_id``: with ``with_repeats`` each tile repeats the same
    prompts). The traces here are an hour each; the day's shape is an assumption, stated where it
    is used."""
    if not arrivals:
        return []
    period = arrivals[-1].t + (arrivals[-1].t - arrivals[0].t) / max(1, len(arrivals) - 1)
    if period <= 0:
        raise ValueError("the trace must span some time")
    rng = random.Random(seed)
    out: list[Arrival] = []
    for tile in range(math.ceil(DAY_S / period)):
        offset = tile * period
        for a in arrivals:
            t = offset + a.t
            if t >= DAY_S:
                break
            if rng.random() < diurnal_share(t, trough, peak_at_s):
                out.append(Arrival(t, a.input_tokens, a.output_tokens, a.prompt_id))
    return out
