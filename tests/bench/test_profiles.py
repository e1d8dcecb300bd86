"""Arrival schedules checked statistically: rates per window, burst shape, trace gaps preserved."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import orjson
import pytest

from breakwater.bench import Profile
from breakwater.bench.profiles import (
    DAY_S,
    Arrival,
    burst_rate,
    constant,
    diurnal_day,
    diurnal_share,
    from_rate,
    poisson,
    step_rate,
    trace,
    with_repeats,
)


def counts(arrivals: list[Arrival], edges: list[float]) -> list[int]:
    return [sum(1 for a in arrivals if lo <= a.t < hi) for lo, hi in itertools.pairwise(edges)]


def test_constant_is_evenly_spaced() -> None:
    arrivals = constant(20, 3, 10, 5)
    assert len(arrivals) == 60
    gaps = {round(b.t - a.t, 9) for a, b in itertools.pairwise(arrivals)}
    assert gaps == {0.05}
    assert (arrivals[0].input_tokens, arrivals[0].output_tokens) == (10, 5)


@pytest.mark.parametrize(("burstiness", "cv"), [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_poisson_rate_and_burstiness(burstiness: float, cv: float) -> None:
    arrivals = poisson(50, 200, 1, 1, burstiness=burstiness, seed=3)
    gaps = [b.t - a.t for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == pytest.approx(10_000, rel=0.06)
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.06)
    # gamma gaps with shape k have coefficient of variation 1/sqrt(k)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.1)
    assert poisson(50, 200, 1, 1, burstiness=burstiness, seed=3) == arrivals  # seeded: reproducible


def test_step_plateaus_have_their_rates() -> None:
    # the seed's step profile scaled: 5 -> 20 req/s over 40 s in 4 plateaus of 10 s
    fn = step_rate(5, 20, 40, 4)
    arrivals = from_rate(fn, 40, 1, 1)
    assert counts(arrivals, [0, 10, 20, 30, 40]) == [50, 100, 150, 200]
    jittered = from_rate(fn, 40, 1, 1, poisson=True, seed=1)
    for got, want in zip(counts(jittered, [0, 10, 20, 30, 40]), [50, 100, 150, 200], strict=True):
        assert abs(got - want) <= 4 * want**0.5  # Poisson: within 4 sigma


def test_burst_ramps_holds_and_decays() -> None:
    # 0 -> 40 req/s in 5 s, hold 10 s, decay over 5 s
    arrivals = from_rate(burst_rate(40, 5, 10, 5), 20, 1, 1)
    ramp, hold, decay = counts(arrivals, [0, 5, 15, 20])
    assert ramp == pytest.approx(100, abs=1)  # area of the ramp triangle: 40 * 5 / 2
    assert hold == pytest.approx(400, abs=1)
    assert decay == pytest.approx(100, abs=1)
    per_second = counts(arrivals, [float(s) for s in range(21)])
    assert per_second[:5] == sorted(per_second[:5])  # rising
    assert all(v == 40 for v in per_second[5:15])
    assert per_second[15:] == sorted(per_second[15:], reverse=True)  # falling


def test_azure_trace_keeps_gaps_and_lengths(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,879,55\n"
        "2023-11-16 18:15:51.3910170,91,16\n"
    )
    arrivals = trace(path)
    assert [round(a.t, 4) for a in arrivals] == [0.0, 4.3146, 4.5419, 4.7104]
    assert [(a.input_tokens, a.output_tokens) for a in arrivals] == [
        (374, 44),
        (396, 109),
        (879, 55),
        (91, 16),
    ]
    fast = trace(path, time_scale=2.0, max_input_tokens=400)
    assert [round(a.t, 3) for a in fast] == [0.0, 2.157, 2.271, 2.355]
    assert [a.input_tokens for a in fast] == [374, 396, 400, 91]
    window = trace(path, start_s=4.0, duration_s=0.5)  # trace seconds [4, 4.5)
    assert [round(a.t, 4) for a in window] == [0.3146]


def test_mooncake_trace(tmp_path: Path) -> None:
    path = tmp_path / "mooncake.jsonl"
    rows = [(0, 6758, 500), (0, 7322, 490), (3000, 100, 10), (3500, 50, 5)]
    path.write_bytes(
        b"\n".join(
            orjson.dumps({"timestamp": t, "input_length": i, "output_length": o, "hash_ids": [1]})
            for t, i, o in rows
        )
    )
    arrivals = trace(path, time_scale=10.0, max_output_tokens=100)
    assert [a.t for a in arrivals] == [0.0, 0.0, 0.3, 0.35]
    assert [(a.input_tokens, a.output_tokens) for a in arrivals] == [
        (6758, 100),
        (7322, 100),
        (100, 10),
        (50, 5),
    ]
    profile = Profile("trace", trace=str(path), duration_s=0.32, time_scale=10.0)
    assert len(profile.arrivals()) == 3  # 0.32 s of replay = 3.2 s of trace


def test_bad_profile_values_are_refused() -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        constant(0, 10, 1, 1)
    with pytest.raises(ValueError, match="unknown profile"):
        Profile("zigzag").arrivals()
    with pytest.raises(ValueError, match="needs --trace"):
        Profile("trace").arrivals()


def test_repeats_copy_an_earlier_request_exactly() -> None:
    base = constant(100, 20, 32, 16)
    assert len({a.prompt_id for a in with_repeats(base, 0.0)}) == len(base)
    arrivals = with_repeats([Arrival(i / 100, 10 + i % 7, 5 + i % 3) for i in range(2000)], 0.3, seed=1)
    firsts: dict[int, Arrival] = {}
    repeats = 0
    for i, a in enumerate(arrivals):
        if a.prompt_id in firsts:
            repeats += 1
            first = firsts[a.prompt_id]
            assert (a.input_tokens, a.output_tokens) == (first.input_tokens, first.output_tokens)
        else:
            assert a.prompt_id == i  # a distinct request is its own first
            firsts[a.prompt_id] = a
        assert a.t == i / 100  # the schedule is unchanged
    assert abs(repeats / len(arrivals) - 0.3) < 0.03
    with pytest.raises(ValueError):
        with_repeats(base, 1.5)


def test_a_diurnal_day_follows_its_shape_and_keeps_the_peak_hour_whole() -> None:
    hour = [Arrival(i * 0.5, 100 + i % 7, 10 + i % 5) for i in range(7200)]  # 2 req/s for an hour
    day = diurnal_day(hour, trough=0.25, peak_at_s=15.5 * 3600, seed=3)
    assert all(0 <= a.t < DAY_S for a in day)
    assert [a.t for a in day] == sorted(a.t for a in day)
    per_hour = counts(day, [h * 3600.0 for h in range(25)])
    for h, n in enumerate(per_hour):
        expected = 7200 * statistics.fmean(
            diurnal_share(h * 3600 + s, 0.25, 15.5 * 3600) for s in range(3600)
        )
        assert abs(n - expected) <= 4 * expected**0.5, (h, n, expected)
    assert per_hour[15] == pytest.approx(7200, rel=0.02)  # the peak hour: nearly every request
    assert per_hour[3] == pytest.approx(7200 * 0.25, rel=0.1)  # the night: a quarter
    assert {(a.input_tokens, a.output_tokens) for a in day} <= {
        (a.input_tokens, a.output_tokens) for a in hour
    }
    assert diurnal_day(hour, trough=0.25, peak_at_s=15.5 * 3600, seed=3) == day  # the seed fixes it


def test_a_diurnal_day_needs_a_trough_between_0_and_1() -> None:
    with pytest.raises(ValueError, match="trough"):
        diurnal_day([Arrival(0, 1, 1), Arrival(1, 1, 1)], trough=0)
    assert diurnal_day([]) == []
