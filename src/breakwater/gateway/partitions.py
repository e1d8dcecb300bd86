"""Which partition of a hot model's job queue a request joins (docs/architecture.md, "Hot models").

A model split into N partitions (``BREAKWATER_PARTITIONS=model=N``) has N job queues, each hashed to
a slot of its own, so that on a Redis Cluster its admissions, claims and acknowledgements spread over
N shards. A request joins the less loaded of two partitions picked at random ("power of two choices":
close to least-loaded without a global view), as judged by the queue lengths this gateway last saw:
every enqueue's reply carries its lane's length, and the signals loop reads them all every tick. A
full partition passes the request on to the next; the lane refuses it only when all are full.
A partition whose shard did not answer the last signals tick goes last until it answers again.
"""

from __future__ import annotations

import math
import random

from breakwater.config import CommonSettings
from breakwater.keys import queues


class Partitions:
    def __init__(self, settings: CommonSettings, max_queued: int) -> None:
        self.counts = settings.partition_counts()  # parsed once: read on every admission
        self.max_queued = max_queued  # per model and lane, shared out between its partitions
        self._waiting: dict[tuple[str, str], int] = {}
        self._unreachable: set[str] = set()
        self._random = random.Random()

    def queues(self, model: str) -> tuple[str, ...]:
        return queues(model, self.counts.get(model, 1))

    def limit(self, model: str) -> int:
        """Queued jobs each partition of ``model`` takes before it is full."""
        return math.ceil(self.max_queued / self.counts.get(model, 1))

    def order(self, model: str, lane: str) -> list[str]:
        """The queues to try for a request, in order: the less loaded of two random ones first."""
        names = self.queues(model)
        if len(names) == 1:
            return list(names)
        up = [q for q in names if q not in self._unreachable] or list(names)
        down = [q for q in names if q not in up]
        if len(up) == 1:
            return [*up, *down]
        first, second = self._random.sample(up, 2)
        if self.waiting(second, lane) < self.waiting(first, lane):
            first, second = second, first
        rest = [q for q in up if q not in (first, second)]
        self._random.shuffle(rest)
        return [first, second, *rest, *down]

    def waiting(self, queue: str, lane: str) -> int:
        return self._waiting.get((queue, lane), 0)

    def observe(self, queue: str, lane: str, waiting: int) -> None:
        """The latest length seen of a partition's lane (an enqueue's reply, a signals tick)."""
        self._waiting[(queue, lane)] = waiting
        self._unreachable.discard(queue)

    def unreachable(self, queue: str) -> None:
        """The signals tick could not read this partition: it goes last until it can."""
        self._unreachable.add(queue)
