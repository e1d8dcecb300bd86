"""Autoscaling signals: queue depth, arrival and service rates, desired workers (gauges per model)."""

from __future__ import annotations

import math
import time

from breakwater.broker import Broker
from breakwater.broker.errors import TRANSIENT
from breakwater.config import GatewaySettings
from breakwater.gateway.load import ModelLoad
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelInfo, ModelRegistry
from breakwater.gateway.partitions import Partitions
from breakwater.keys import LANES


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


def retry_after_s(waiting: int, drain_rate: float, capacity: int) -> int:
    """Seconds until ``waiting`` jobs ahead have drained at the measured rate (1..60). Before any rate
    is measured, assume each slot finishes about a job a second."""
    rate = drain_rate if drain_rate > 0 else max(1, capacity)
    return max(1, min(60, math.ceil(waiting / rate)))
