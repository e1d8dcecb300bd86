"""One model's load as the gateway measures it (arrival and service rates, the backlog) and the
workers it would take: the gateway's autoscaling signal, and the capacity simulator's policy of it
(``capacity.policies``). No I/O here: the simulator imports it without the gateway's stack."""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from breakwater.config import GatewaySettings

SATURATED = 0.9  # share of the slots in use from which the workers' finishing rate is their capacity


class ModelLoad:
    """Arrival and service rates of one model, measured from its streams' counters (EWMA), and the
    number of workers that would serve the arrivals and clear the backlog within the horizon.

    A worker's capacity (jobs/s with its slots full) is the rate each running job finishes at
    (Little's law: finished per second / running) times the slots a worker would fill: what the
    workers run now plus the room they have, per worker. Measured at any load, it reads high while
    batches are small (steps are faster) and settles where the fleet runs; measured only while
    saturated, it latched the arrival rate of a fleet barely full and asked for ever more workers.

    Workers that fit their engine's step cost (``engines.stepcost``) report the jobs per second
    they would finish with their slots full (``rated``); the lower of that and Little's law is the
    capacity. Little's law alone reads high when a job's engine time grows with the batch: a long
    prompt's prefill is not shared by the sequences beside it, so a fuller worker finishes fewer
    jobs per running job than the one measured.

    The count it reports is the highest of the last ``autoscale_window_s``: its inputs move every
    second under bursty traffic, and a controller that reads the gauge every 15-30 s (an HPA
    through KEDA or a Prometheus adapter) would otherwise see whichever second it samples, mostly
    a quiet one, and never size for the bursts between its reads.
    """

    def __init__(self) -> None:
        self.arrival_rate = 0.0
        self.drain_rate = 0.0
        self.per_worker_rate = 0.0  # jobs/s one busy worker finishes
        self.waiting = 0
        self.in_flight = 0
        self.workers = 0
        self.capacity = 0
        self.rated = 0.0  # jobs/s a worker finishes with its slots full, by the workers' own fit
        self.saturated = False
        self._prev: tuple[float, int, int] | None = None
        self._now = 0.0
        self._recent: deque[tuple[float, int]] = deque()  # (observed at, instant count)

    def observe(
        self,
        now: float,
        added: int,
        done: int,
        waiting: int,
        in_flight: int,
        workers: int,
        capacity: int = 0,
        free: int | None = None,
        rated: float = 0.0,
    ) -> None:
        """``capacity``: the live workers' sequence slots together (0: unknown); ``free``: those
        they would fill now (default: capacity - in_flight; an engine short of KV cache has none);
        ``rated``: jobs/s one worker finishes with its slots full, from its step cost (0: unknown)."""
        self.waiting, self.in_flight, self.workers, self.capacity = waiting, in_flight, workers, capacity
        self.rated = rated
        self._now = now
        room = max(0, capacity - in_flight if free is None else free)
        # Jobs wait while the workers have (almost) no room: they are saturated. A job also waits a
        # moment before an idle worker claims it, which says nothing about their capacity.
        self.saturated = waiting > 0 and (capacity <= 0 or room <= (1 - SATURATED) * capacity)
        prev, self._prev = self._prev, (now, added, done)
        if prev is None or now <= prev[0] or added < prev[1] or done < prev[2]:
            return
        dt = now - prev[0]
        finished = (done - prev[2]) / dt
        self.arrival_rate = _ewma(self.arrival_rate, (added - prev[1]) / dt)
        self.drain_rate = _ewma(self.drain_rate, finished)
        if workers and in_flight >= workers:  # running enough to measure (a job per worker)
            slots = min(capacity, in_flight + room) / workers if capacity > 0 else in_flight / workers
            self.per_worker_rate = _ewma(self.per_worker_rate, finished / in_flight * slots)

    def desired_workers(self, settings: GatewaySettings) -> int:
        """The highest count asked for over the window (call it after every observation). The
        window keeps counts, not the settings that made them: one ``ModelLoad`` serves one set of
        settings (a second call within an observation replaces that observation's count)."""
        want = self._instant(settings)
        window = settings.autoscale_window_s
        if window <= 0:
            return want
        recent = self._recent
        if recent and recent[-1][0] == self._now:  # asked again before a new observation: replaced
            recent.pop()
        recent.append((self._now, want))
        while recent[0][0] < self._now - window:
            recent.popleft()
        return max(count for _, count in recent)

    def _instant(self, settings: GatewaySettings) -> int:
        if self.waiting == 0 and self.in_flight == 0 and self.arrival_rate < 0.01:
            return settings.autoscale_min_workers
        rate = self.per_worker_rate
        if self.rated > 0:
            rate = min(rate, self.rated) if rate > 0 else self.rated
        if rate <= 0:
            # Nothing measured yet: the workers whose slots (at the saturation share) hold what
            # runs now, and one more while they are saturated.
            want = self._by_slots(settings.autoscale_target_occupancy) + (1 if self.saturated else 0)
        else:
            demand = self.arrival_rate + self.waiting / settings.autoscale_horizon_s
            want = math.ceil(demand / (rate * settings.autoscale_target_occupancy))
            if self.per_worker_rate <= 0:  # rated, but the rates not measured yet (a first look)
                want = max(want, self._by_slots(settings.autoscale_target_occupancy))
        return max(settings.autoscale_min_workers, min(settings.autoscale_max_workers, max(1, want)))

    def _by_slots(self, target: float) -> int:
        if self.workers <= 0 or self.capacity <= 0:
            return self.workers
        per_worker = self.capacity / self.workers
        return math.ceil(self.in_flight / (min(SATURATED, target) * per_worker))


def _ewma(old: float, new: float, alpha: float = 0.3) -> float:
    return new if old == 0 else (1 - alpha) * old + alpha * new
