"""The alias record and how a request picks a version: exact smooth weighted round robin, stable
hashing for stickiness (a weight change moves only the keys that must move), names and JSON."""

from __future__ import annotations

from collections import Counter

import pytest

from breakwater.broker.rollouts import VersionCounts
from breakwater.gateway.rollback import verdict
from breakwater.rollout.aliases import Alias, Guard, SmoothWeighted, base_of, parse_weights, served_name


def test_smooth_weighted_round_robin_gives_each_version_its_weight_spread_out() -> None:
    rr = SmoothWeighted()
    live = [("a", 90), ("b", 10)]
    picks = [rr.pick(live) for _ in range(1000)]
    assert Counter(picks) == {"a": 900, "b": 100}
    # Spread: every run of 10 holds exactly one b.
    assert all(picks[i : i + 10].count("b") == 1 for i in range(0, 1000, 10))
    # New weights start a new cycle: exact again.
    assert Counter(rr.pick([("a", 1), ("b", 1), ("c", 2)]) for _ in range(400)) == {
        "a": 100,
        "b": 100,
        "c": 200,
    }


def test_hashing_keeps_a_key_on_its_version_and_moves_only_what_a_weight_change_must() -> None:
    before = Alias("llama", {"llama@a": 90, "llama@b": 10})
    after = Alias("llama", {"llama@a": 80, "llama@b": 20})
    users = [f"u{i}" for i in range(5000)]
    was = {u: before.pick_by_hash(u) for u in users}
    assert all(before.pick_by_hash(u) == was[u] for u in users[:200])  # the same every time
    now = {u: after.pick_by_hash(u) for u in users}
    assert abs(Counter(was.values())["llama@b"] / 5000 - 0.10) < 0.02
    assert abs(Counter(now.values())["llama@b"] / 5000 - 0.20) < 0.02
    moved = [(was[u], now[u]) for u in users if was[u] != now[u]]
    assert moved and set(moved) == {("llama@a", "llama@b")}  # nobody on b went back to a
    # A version at weight 0 gets nobody.
    assert {Alias("llama", {"llama@a": 0, "llama@b": 5}).pick_by_hash(u) for u in users[:300]} == {"llama@b"}


def test_names_versions_and_weights() -> None:
    assert served_name("llama", "2026-11") == "llama@2026-11" and served_name("llama", "") == "llama"
    assert base_of("llama@2026-11") == "llama" and base_of("llama") == "llama"
    for bad in ("", "-x", "a b", "x" * 65, "a@b", "a#b"):
        if bad:
            with pytest.raises(ValueError):
                served_name("llama", bad)
    with pytest.raises(ValueError, match="already names a version"):
        served_name("llama@a", "b")
    assert parse_weights(["m@a=90", "m@b"]) == {"m@a": 90, "m@b": 100}
    with pytest.raises(ValueError, match="not an integer"):
        parse_weights(["m@a=ninety"])
    with pytest.raises(ValueError, match="at least one version"):
        Alias("llama", {})


def test_the_record_round_trips_through_json() -> None:
    alias = Alias(
        "llama",
        {"llama@b": 10, "llama@a": 90},
        sticky="tenant",
        guard=Guard(max_error_delta=0.02, min_requests=10, window_s=30, ttft_ratio=1.5),
        revision=7,
        updated_ms=123,
        by="ana",
        note="canary",
        rolled_back={"llama@c": "error rate"},
    )
    back = Alias.from_json(alias.to_json())
    assert back == alias and list(back.weights) == ["llama@b", "llama@a"]  # order kept
    assert back.baseline == "llama@a" and back.live == [("llama@b", 10), ("llama@a", 90)]


def _counts(ok: int, err: int, ttft_ms: float = 0.0) -> VersionCounts:
    counts = VersionCounts(ok=ok, err=err)
    for _ in range(ok + err):
        counts.add_ttft(ttft_ms)
    return counts


def test_the_guard_judges_a_ttft_slos_burn() -> None:
    alias = Alias("m", {"m@a": 90, "m@b": 10}, guard=Guard(min_requests=20, ttft_slo_ms=500))
    slow = _counts(10, 0, 600)  # every first token late
    slow.ok += 10
    for _ in range(10):
        slow.add_ttft(100)  # half of 20 late
    why = verdict(alias, "m@b", {"m@a": _counts(100, 0, 100), "m@b": slow})
    assert (
        why is not None and "TTFT over 500 ms for 50.0% of 20 requests" in why and "baseline m@a 0.0%" in why
    )
    # Late as often as the baseline (within the delta): kept; mean TTFT alone is not judged without a ratio.
    assert verdict(alias, "m@b", {"m@a": _counts(100, 0, 600), "m@b": slow}) is None
    assert _counts(3, 0, 1500).missed(1000) == 1.0 and _counts(3, 0, 1500).missed(2000) == 0.0
    with pytest.raises(ValueError, match="250, 500, 1000"):
        Alias("m", {"m@a": 90, "m@b": 10}, guard=Guard(ttft_slo_ms=300))


def test_the_guards_verdict_needs_evidence_on_both_sides() -> None:
    guard = Guard(max_error_delta=0.05, min_requests=50, ttft_ratio=1.5)
    alias = Alias("m", {"m@a": 90, "m@b": 10}, guard=guard)
    assert alias.baseline == "m@a"
    # A canary 20 points worse than a baseline with enough requests: rolled back, with the numbers.
    why = verdict(alias, "m@b", {"m@a": _counts(95, 5, 100), "m@b": _counts(40, 10, 100)})
    assert why is not None and "error rate 20.0% over 50" in why and "baseline m@a 5.0% over 100" in why
    # Within the allowed delta: kept.
    assert verdict(alias, "m@b", {"m@a": _counts(95, 5), "m@b": _counts(45, 5)}) is None
    # Too few on the canary, or on the baseline (just changed, sticky tenants elsewhere): not judged.
    assert verdict(alias, "m@b", {"m@a": _counts(95, 5), "m@b": _counts(30, 19)}) is None
    assert verdict(alias, "m@b", {"m@a": _counts(3, 0), "m@b": _counts(40, 10)}) is None
    # Slower first tokens than the ratio allows.
    slow = verdict(alias, "m@b", {"m@a": _counts(100, 0, 100), "m@b": _counts(60, 0, 151)})
    assert slow is not None and "mean TTFT 151 ms" in slow
    assert verdict(alias, "m@b", {"m@a": _counts(100, 0, 100), "m@b": _counts(60, 0, 149)}) is None
    # The baseline is never judged; a named baseline is the one judged against.
    assert verdict(alias, "m@a", {"m@a": _counts(0, 100), "m@b": _counts(100, 0)}) is None
    named = Alias("m", {"m@new": 50, "m@old": 50}, guard=Guard(baseline="m@old", min_requests=10))
    assert verdict(named, "m@new", {"m@old": _counts(20, 0), "m@new": _counts(10, 10)}) is not None
    with pytest.raises(ValueError, match="--guard-baseline"):
        Alias("m", {"m@new": 50, "m@old": 50}, guard=Guard())
    with pytest.raises(ValueError, match="not one of the versions"):
        Alias("m", {"m@a": 50}, guard=Guard(baseline="m@z"))


def test_a_rollback_takes_the_version_out_of_every_split() -> None:
    alias = Alias("m", {"m@a": 90, "m@b": 10}, tenants={"acme": {"m@b": 100}, "x": {"m@a": 1}})
    out = alias.without("m@b", by="rollback-guard", why="error rate")
    # acme's own split had only m@b: dropped, acme is back on the alias's split (not left with none).
    assert out.weights == {"m@a": 90, "m@b": 0} and out.tenants == {"x": {"m@a": 1}}
    assert out.rolled_back == {"m@b": "error rate"} and out.note == "rolled back m@b: error rate"
    assert out.live_for("acme") == [("m@a", 90)] and out.live_for("x") == [("m@a", 1)]
    assert out.versions == ["m@a", "m@b"]
    kept = Alias("m", {"m@a": 90}, tenants={"acme": {"m@b": 50, "m@c": 50}}).without("m@b", by="g", why="w")
    assert kept.tenants == {"acme": {"m@b": 0, "m@c": 50}}
    with pytest.raises(ValueError, match="has weight 0"):
        Alias("m", {"m@old": 0, "m@new": 100}, guard=Guard(baseline="m@old"))
