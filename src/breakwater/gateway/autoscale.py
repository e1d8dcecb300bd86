"""Autoscaling signals: queue depth, arrival and service rates, desired workers (gauges per model)."""

from __future__ import annotations

import math
import time
from collections import deque

from breakwater.broker import Broker
from breakwater.broker.errors import TRANSIENT
from breakwater.config import GatewaySettings
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelInfo, ModelRegistry
from breakwater.gateway.partitions import Partitions
from breakwater.keys import LANES

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


class AutoscaleSignals:
    """Refreshes the per-model gauges every tick and keeps the measured drain rates (Retry-After).
    A partitioned model's figures are the sums over its partitions."""

    def __init__(
        self, settings: GatewaySettings, broker: Broker, registry: ModelRegistry, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.registry = registry
        self._tenant_labels: dict[tuple[str, str], set[str]] = {}
        self.metrics = metrics
        self.load: dict[str, ModelLoad] = {}
        self.partitions = Partitions(settings, settings.lane_max_queued)

    def drain_rate(self, model: str) -> float:
        load = self.load.get(model)
        return load.drain_rate if load else 0.0

    async def refresh(self) -> None:
        models = dict(await self.registry.models(fresh=True))
        for gone in self.load.keys() - models.keys():  # its last worker left: report 0, not stale
            models[gone] = ModelInfo.without_workers(gone)
        for name, info in models.items():
            await self._refresh_model(name, info)

    async def _refresh_tenants(self, model: str, lane: str) -> None:
        """Waiting requests per tenant (listed tenants by name, the rest summed as ``other``)."""
        per_label: dict[str, int] = dict.fromkeys(self._tenant_labels.get((model, lane), ()), 0)
        names = self.partitions.queues(model)
        for queue in names:
            try:
                backlog = await self.broker.tenant_backlog(queue, lane)
            except TRANSIENT:
                if len(names) == 1:
                    raise
                continue  # its shard is down (queue_depth marked it): the others still count
            for tenant, waiting in backlog.items():
                label = self.settings.tenant_label(tenant)
                per_label[label] = per_label.get(label, 0) + waiting
        for label, waiting in per_label.items():
            self.metrics.tenant_queue_depth.labels(model, lane, label).set(waiting)
        self._tenant_labels[(model, lane)] = set(per_label)

    async def _refresh_model(self, name: str, info: ModelInfo) -> None:
        m = self.metrics
        if name not in self.load:  # a new model: its counters start at 0, visible to rate()
            m.rejections.labels(name, "queue_full")
            if name in self.settings.declared_models:
                # The consumer group exists before any worker does, so a stream-lag
                # autoscaler (KEDA) can read the queue and wake the first one.
                for queue in self.partitions.queues(name):
                    await self.broker.ensure_groups(queue)
        m.workers.labels(name).set(info.workers)
        m.batch_occupancy.labels(name).set(info.active / info.capacity if info.capacity else 0)
        if info.kv_cache_usage is not None:
            m.kv_cache_usage.labels(name).set(info.kv_cache_usage)
        added = done = waiting_all = in_flight_all = 0
        for lane in LANES:
            waiting = in_flight = 0
            names = self.partitions.queues(name)
            for queue in names:
                try:
                    part_waiting, part_in_flight = await self.broker.queue_depth(queue, lane)
                    lane_added, lane_done = await self.broker.jobs_counts(queue, lane)
                except TRANSIENT:
                    if len(names) == 1:
                        raise
                    self.partitions.unreachable(queue)  # its shard is down: the others still count
                    continue
                self.partitions.observe(queue, lane, part_waiting)
                if len(names) > 1:  # a partition's own series only for a partitioned model
                    m.partition_queue_depth.labels(name, queue, lane).set(part_waiting)
                added, done = added + lane_added, done + lane_done
                waiting, in_flight = waiting + part_waiting, in_flight + part_in_flight
            m.queue_depth.labels(name, lane).set(waiting)
            m.in_flight.labels(name, lane).set(in_flight)
            await self._refresh_tenants(name, lane)
            waiting_all, in_flight_all = waiting_all + waiting, in_flight_all + in_flight
        load = self.load.setdefault(name, ModelLoad())
        load.observe(
            time.monotonic(),
            added,
            done,
            waiting_all,
            in_flight_all,
            info.workers,
            info.capacity,
            info.free,
            info.rated,
        )
        m.drain_rate.labels(name).set(load.drain_rate)
        m.arrival_rate.labels(name).set(load.arrival_rate)
        m.desired_workers.labels(name).set(load.desired_workers(self.settings))


def _ewma(old: float, new: float, alpha: float = 0.3) -> float:
    return new if old == 0 else (1 - alpha) * old + alpha * new


def retry_after_s(waiting: int, drain_rate: float, capacity: int) -> int:
    """Seconds until ``waiting`` jobs ahead have drained at the measured rate (1..60). Before any rate
    is measured, assume each slot finishes about a job a second."""
    rate = drain_rate if drain_rate > 0 else max(1, capacity)
    return max(1, min(60, math.ceil(waiting / rate)))
