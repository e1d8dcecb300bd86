"""Writes lost in a Redis failover, sent again (mixed into :class:`~breakwater.worker.worker.Worker`).

Replication is asynchronous: a primary that dies can take with it token writes it had already
acknowledged, and published, before its replica received them. The promoted replica's record then
says its last write is ``w`` while the attempt wrote more; the next append or the finish reports
it (``BEHIND - w``, see ``append.lua``). The worker keeps its last writes per sequence and sends
them again from ``w + 1``: each gets the seq it had, with the same text, so a client that saw it
skips it and one that did not receives it. A gap older than what is kept fails the request with a
clear error instead of a stream with a hole.
"""

from __future__ import annotations

import functools
import logging

from breakwater.broker import Append, Broker
from breakwater.broker.errors import until_redis
from breakwater.broker.types import BEHIND
from breakwater.worker.jobs import InFlight, refused_write

log = logging.getLogger("breakwater.worker.worker")


class RepairMixin:
    broker: Broker
    inflight: dict[str, InFlight]

    async def _drop(self, flight: InFlight, *, fenced: bool, why: str) -> None:
        raise NotImplementedError

    async def _repair(self, behind: list[tuple[InFlight, int]], ttl_s: int, rounds: int = 3) -> None:
        """Send again, in order, each sequence's writes after the record's last one (``last``)."""
        for _ in range(rounds):
            behind = await self._resend(behind, ttl_s)
            if not behind:
                return

    async def _resend(self, behind: list[tuple[InFlight, int]], ttl_s: int) -> list[tuple[InFlight, int]]:
        """One round of :meth:`_repair`; the sequences still behind (a resent write met a gap again:
        on a cluster, a retried batch can land out of order)."""
        resend: list[tuple[InFlight, Append]] = []
        for flight, last in behind:
            kept = [a for a in flight.sent if a.wseq > last]
            if kept and kept[0].wseq == last + 1:
                log.warning(
                    "writes lost in a failover; sending them again",
                    extra={"rid": flight.job.rid, "fields": {"from": last + 1, "to": kept[-1].wseq}},
                )
                resend += [(flight, a) for a in kept]
                continue
            log.error("writes lost beyond those kept; failing the request", extra={"rid": flight.job.rid})
            await self._lost(flight, ttl_s)
        if not resend:
            return []
        results = await until_redis(lambda: self.broker.append_step([a for _, a in resend]), "repair")
        again: dict[str, tuple[InFlight, int]] = {}
        for (flight, _), seq in zip(resend, results, strict=True):
            rid = flight.job.rid
            if seq <= BEHIND:
                again.setdefault(rid, (flight, BEHIND - seq))
            elif seq < 0:  # fenced off or ended meanwhile (_drop leaves a flight already gone alone)
                fenced, why = refused_write(seq, rid)
                await until_redis(functools.partial(self._drop, flight, fenced=fenced, why=why), "drop")
        inflight = self.inflight
        return [(flight, last) for flight, last in again.values() if inflight.get(flight.job.rid) is flight]

    async def _lost(self, flight: InFlight, ttl_s: int) -> None:
        """Fail a request whose lost writes cannot be sent again (a clear error, not a hole)."""
        fail = functools.partial(
            self.broker.fail,
            flight.job.rid,
            attempt=flight.attempt,
            code="tokens_lost",
            message="tokens were lost in a Redis failover; retry the request",
            ttl_s=ttl_s,
        )
        failed = await until_redis(fail, "fail")
        drop = functools.partial(self._drop, flight, fenced=failed == -1, why="tokens lost")
        await until_redis(drop, "drop")
