"""The autoscaling signal's arithmetic (``ModelLoad``): a worker's capacity is measured only while
the workers are saturated, never from a job that waits a moment for an idle worker."""

from __future__ import annotations

import pytest

from breakwater.config import GatewaySettings
from breakwater.gateway.load import ModelLoad

SETTINGS = GatewaySettings(autoscale_min_workers=1, autoscale_max_workers=64, autoscale_horizon_s=10)


def _feed(load: ModelLoad, seconds: int, *, per_s: tuple[int, int], **state: int) -> None:
    """``seconds`` observations, 1 s apart, of ``per_s`` = (admitted, finished) a second."""
    added = done = 0
    for second in range(seconds):
        added, done = added + per_s[0], done + per_s[1]
        load.observe(float(second), added, done, **state)


def test_a_job_waiting_for_an_idle_worker_is_not_saturation() -> None:
    """8 workers of 32 slots run 8 sequences and finish 5 a second (each lasts 1.6 s); one job is
    seen waiting each time (not yet claimed). A worker with its 32 slots full would finish
    5 / 8 x 32 = 20 a second, so one worker does. (Read as saturation, the fleet's 5 a second had
    been taken for 8 workers' capacity, and every worker added lowered it again.)"""
    load = ModelLoad()
    _feed(load, 30, per_s=(5, 5), waiting=1, in_flight=8, workers=8, capacity=256)
    assert not load.saturated and load.per_worker_rate == pytest.approx(20.0)
    assert load.desired_workers(SETTINGS) == 1


def test_a_fleet_barely_full_is_not_asked_to_grow() -> None:
    """4 workers with 120 of their 128 slots taken, a job waiting now and then, finishing what
    arrives (12 a second, each job running 10 s): they are where they should be."""
    load = ModelLoad()
    _feed(load, 30, per_s=(12, 12), waiting=1, in_flight=120, workers=4, capacity=128)
    assert load.per_worker_rate == pytest.approx(12 / 120 * 32)
    assert load.desired_workers(SETTINGS) == 4  # ceil((12 + 1/10) / 3.2)


def test_saturated_workers_are_measured_and_sized_by_rate() -> None:
    """Every slot taken and jobs waiting: 2 workers finishing 4 jobs/s each, 12 arriving a second
    and a backlog of 40 -> (12 + 40/10) / 4 = 4 workers."""
    load = ModelLoad()
    _feed(load, 30, per_s=(12, 8), waiting=40, in_flight=64, workers=2, capacity=64)
    assert load.saturated and load.per_worker_rate == pytest.approx(4.0)
    assert load.desired_workers(SETTINGS) == 4


def test_an_engine_out_of_kv_cache_is_saturated_with_slots_left() -> None:
    """vLLM short of KV blocks takes no more (no free slots) although its sequence slots are not
    all taken: jobs wait, and that is saturation."""
    load = ModelLoad()
    _feed(load, 30, per_s=(6, 3), waiting=20, in_flight=40, workers=1, capacity=256, free=0)
    assert load.saturated and load.per_worker_rate == pytest.approx(3.0)
    assert load.desired_workers(SETTINGS) == 3  # (6 + 20/10) / 3, rounded up


def test_from_zero_workers_a_waiting_job_wants_one() -> None:
    load = ModelLoad()
    _feed(load, 3, per_s=(1, 0), waiting=3, in_flight=0, workers=0, capacity=0)
    assert load.desired_workers(SETTINGS) == 1


def test_a_target_occupancy_sizes_for_part_of_the_slots() -> None:
    """At a target of half the slots the saturated fleet above wants twice the workers."""
    load = ModelLoad()
    _feed(load, 30, per_s=(12, 8), waiting=40, in_flight=64, workers=2, capacity=64)
    half = SETTINGS.model_copy(update={"autoscale_target_occupancy": 0.5})
    assert load.desired_workers(half) == 2 * load.desired_workers(SETTINGS) == 8


def _burst_then_quiet(load: ModelLoad, settings: GatewaySettings, quiet_s: int) -> list[int]:
    """10 s of a saturated burst (2 workers, 12 arriving a second, 40 waiting: 4 wanted), then
    ``quiet_s`` seconds with nothing running; the count reported after each second."""
    added = done = 0
    counts = []
    for second in range(10 + quiet_s):
        burst = second < 10
        added, done = added + (12 if burst else 0), done + (8 if burst else 0)
        state = {"waiting": 40, "in_flight": 64} if burst else {"waiting": 0, "in_flight": 0}
        load.observe(float(second), added, done, workers=2, capacity=64, **state)
        counts.append(load.desired_workers(settings))
    return counts


def test_the_count_is_the_highest_of_the_window() -> None:
    """A controller reads the gauge every 15-30 s: the count of a burst stays up for the window
    (here 20 s), so a read between bursts still sees it, and falls once the window has passed."""
    counts = _burst_then_quiet(ModelLoad(), SETTINGS.model_copy(update={"autoscale_window_s": 20}), 40)
    assert counts[9] == 4  # the burst: (12 + 40/10) / 4
    assert counts[10:30] == [4] * 20  # quiet since 10 s: the window still holds the burst
    # The burst's last second (9 s) leaves the window at 30 s; the arrival rate's EWMA then decays
    # (8.4, 5.9, 4.1, 2.9 a second at 10-13 s: 3, 2, 2, 1 workers), each held for the window too.
    assert counts[30:] == [3, 2, 2] + [1] * 17


def test_a_window_of_zero_reports_the_count_of_the_moment() -> None:
    counts = _burst_then_quiet(ModelLoad(), SETTINGS.model_copy(update={"autoscale_window_s": 0}), 5)
    assert counts[9] == 4 and counts[10:] == [3, 2, 2, 1, 1]  # the EWMA's decay, second by second


def test_asking_twice_between_observations_counts_once() -> None:
    """The gauge refresh and a reader may both ask within one observation: the window holds one
    entry per observation, and the answer is the same."""
    load = ModelLoad()
    _feed(load, 30, per_s=(12, 8), waiting=40, in_flight=64, workers=2, capacity=64)
    assert [load.desired_workers(SETTINGS) for _ in range(3)] == [4, 4, 4]
    assert len(load._recent) == 1


def test_workers_rating_below_littles_law_sizes_the_fleet() -> None:
    """Prefill-heavy jobs: Little's law on a half-full fleet reads 4 workers x 32 slots finishing
    12/s with 64 running -> 6 jobs/s per worker; the workers' own step costs say a full worker
    finishes 2 a second (each job's prefill is not shared). 12 arriving a second, no backlog:
    6 workers, not 2."""
    load = ModelLoad()
    _feed(load, 30, per_s=(12, 12), waiting=0, in_flight=64, workers=4, capacity=128)
    assert load.desired_workers(SETTINGS) == 2
    rated = ModelLoad()
    added = done = 0
    for second in range(30):
        added, done = added + 12, done + 12
        rated.observe(float(second), added, done, 0, 64, 4, 128, rated=2.0)
    assert rated.desired_workers(SETTINGS) == 6


def test_a_rating_above_littles_law_changes_nothing() -> None:
    """The lower of the two counts: an engine short of KV cache runs fewer than its slots, which
    the step cost does not know."""
    load = ModelLoad()
    added = done = 0
    for second in range(30):
        added, done = added + 6, done + 3
        load.observe(float(second), added, done, 20, 40, 1, 256, 0, rated=50.0)
    assert load.desired_workers(SETTINGS) == 3  # as without a rating: (6 + 20/10) / 3


def test_a_rating_sizes_the_fleet_before_littles_law_is_measured() -> None:
    """Fewer running than workers (nothing measured by Little's law yet), 10 arriving a second and
    each worker rated at 4 jobs/s: 3 workers."""
    load = ModelLoad()
    added = 0
    for second in range(30):
        added += 10
        load.observe(float(second), added, added, 0, 1, 2, 64, rated=4.0)
    assert load.per_worker_rate == 0
    assert load.desired_workers(SETTINGS) == 3


def test_a_first_look_with_a_rating_keeps_the_workers_that_run_the_jobs() -> None:
    """A gateway's first observation (just restarted): no rates yet, 60 jobs running on 2 workers
    of 32 slots, each rated at 100 jobs/s. The rating alone would ask for the minimum (nothing
    has been seen arriving yet); the slots that hold what runs (60 / (0.9 x 32)) keep 3."""
    load = ModelLoad()
    load.observe(0.0, 100, 40, 0, 60, 2, 64, rated=100.0)
    assert load.desired_workers(SETTINGS) == 3
