"""Preemption for fair share between tenants (``bind.lua``'s 'preempt' mode).

Without it a tenant that sends a little waits, under another tenant's flood, for the next slot to
free: up to a whole answer's time. With it, a full worker that hears a tenant join the queue asks
Redis for that tenant's job; Redis gives it only when a tenant that has received more service runs
at least two more sequences here than the newcomer does. The worker pauses that tenant's
newest sequence, starts the newcomer's in its slot, and continues the paused one (from the text it
had emitted, as a reclaimed job is continued) before it takes any new job: the paused client sees a
pause, never a lost or repeated token. This is vLLM's recompute preemption, decided by the virtual
token counters instead of arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable

from breakwater.broker import Broker
from breakwater.broker.errors import TRANSIENT
from breakwater.keys import LANES
from breakwater.worker.jobs import InFlight

log = logging.getLogger(__name__)

JOINS_BLOCK_MS = 1000


class Preemption:
    """A worker's paused sequences and its watch on tenants joining the queue."""

    def __init__(self, broker: Broker, queues: tuple[str, ...]) -> None:
        self.broker = broker
        self.queues = queues  # the model's job queues (its partitions)
        self.paused: list[InFlight] = []  # oldest first: continued in that order
        self.joined: set[tuple[str, str]] = set()  # (queue, lane) a tenant joined while the worker was full
        self.full = asyncio.Event()  # set by the pull loop while the engine has no room
        self._lane_of = {broker.keys.jobs(q, lane): lane for q in queues for lane in LANES}

    async def watch(self, wake: asyncio.Event) -> None:
        """While the worker is full, wait for tenants joining a lane's queue and wake the pull loop;
        one watch per partition (their joins streams live on different slots)."""
        await asyncio.gather(*(self._watch(queue, wake) for queue in self.queues))

    async def _watch(self, queue: str, wake: asyncio.Event) -> None:
        after = {lane: "$" for lane in LANES}
        while True:
            await self.full.wait()
            try:
                lanes = await self.broker.wait_joins(queue, after, JOINS_BLOCK_MS)
            except TRANSIENT as exc:
                log.warning("watching joins failed; retrying", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(1.0)
                continue
            if lanes and self.full.is_set():
                self.joined.update((queue, lane) for lane in lanes)
                wake.set()

    def lane(self, flight: InFlight) -> str:
        return self._lane_of.get(flight.job.stream, "")

    def running(self, flights: Iterable[InFlight], lane: str, constrained: bool) -> Counter[str]:
        """Sequences running (not paused) that may be paused, per tenant, in one lane: not one whose
        finish is being written or whose tools went to the engine; structured output only where the
        engine can continue it (``constrained``)."""
        return Counter(f.job.tenant for f in _pausable(flights, constrained) if self.lane(f) == lane)

    def victim(
        self, flights: Iterable[InFlight], tenant: str, lane: str, constrained: bool
    ) -> InFlight | None:
        """The newest pausable sequence of ``tenant`` in ``lane`` (it loses the least), else the
        newest pausable sequence at all (the engine must make room); None if there is none."""
        running = _pausable(flights, constrained)
        for flight in reversed(running):
            if flight.job.tenant == tenant and self.lane(flight) == lane:
                return flight
        return running[-1] if running else None


def _pausable(flights: Iterable[InFlight], constrained: bool) -> list[InFlight]:
    return [
        f
        for f in flights
        if not f.paused and not f.finishing and not f.tools and (constrained or not f.constrained)
    ]
