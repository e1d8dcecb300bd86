"""Engines whose backend streams every request by itself (an HTTP upstream, vLLM's async engine).

The backend batches; here each admitted request is one asyncio task that pushes deltas, and
``step`` hands the worker everything produced since the last step, one merged delta per sequence.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from dataclasses import dataclass, field

from breakwater.engines.base import Engine, GenerationRequest, SequenceDelta
from breakwater.wakeup import Wakeup

log = logging.getLogger(__name__)
STEP_MIN_S = 0.001


@dataclass(slots=True)
class Flight:
    """One admitted request; ``text``/``tokens`` include what a reclaimed job had already emitted."""

    request: GenerationRequest
    task: asyncio.Task[None] | None = None
    text: str = ""
    tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list)  # for engines that tokenize themselves


class StreamingEngine(Engine):
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._deltas: list[SequenceDelta] = []
        self._ready = asyncio.Event()
        self._last_step = 0.0
        self._quiet: set[str] = set()  # sequences that have not emitted yet in this worker
        self._first_waiting = False  # a first delta is among the deltas not yet stepped
        self._pause = Wakeup()  # a step waiting out STEP_MIN_S

    @abstractmethod
    async def _generate(self, flight: Flight) -> None:
        """Stream one request, calling :meth:`_emit` for its deltas and once with its final delta."""

    def running(self) -> int:
        return len(self._flights)

    def new_flight(self, request: GenerationRequest) -> Flight:
        """Validate a request (raising :class:`EngineRequestError`) and make its flight."""
        return Flight(request, text=request.emitted_text, tokens=request.emitted_tokens)

    def add(self, request: GenerationRequest) -> None:
        flight = self.new_flight(request)
        self._flights[request.request_id] = flight
        if not request.emitted_tokens:  # a continuation's client has had its first token
            self._quiet.add(request.request_id)
        flight.task = asyncio.create_task(self._guarded(flight), name=f"generate-{request.request_id}")

    async def _guarded(self, flight: Flight) -> None:
        rid = flight.request.request_id
        try:
            await self._generate(flight)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the backend failed this request: the client gets an error, not a hang
            log.exception("generation failed", extra={"rid": rid})
            self._emit(SequenceDelta(rid, error=f"{type(exc).__name__}: {exc}"))

    def cancel(self, request_id: str) -> None:
        flight = self._flights.pop(request_id, None)
        self._quiet.discard(request_id)
        if flight is not None and flight.task is not None:
            flight.task.cancel()  # leaving the backend's stream aborts the request there
        self._deltas = [d for d in self._deltas if d.request_id != request_id]

    async def step(self) -> list[SequenceDelta]:
        await self._ready.wait()
        # At most one step per STEP_MIN_S: under load, the tokens of many sequences go to Redis in one
        # round trip instead of one each; a token after a quiet spell is not delayed at all, and
        # neither is a sequence's first (its client waits for it: time to first token).
        loop = asyncio.get_running_loop()
        wait = self._last_step + STEP_MIN_S - loop.time()
        if wait > 0 and not self._first_waiting:
            await self._pause.wait(wait)
        self._first_waiting = False
        self._last_step = loop.time()
        self._ready.clear()
        deltas, self._deltas = self._deltas, []
        return merge_deltas(deltas)

    def _emit(self, delta: SequenceDelta) -> None:
        rid = delta.request_id
        if rid in self._flights:
            self._deltas.append(delta)
            self._ready.set()
            if rid in self._quiet and (delta.text or delta.finished):  # its first text: step now
                self._quiet.discard(rid)
                self._first_waiting = True
                self._pause.wake()
        if delta.finished:
            self._flights.pop(rid, None)
            self._quiet.discard(rid)

    async def close(self) -> None:
        for rid in list(self._flights):
            self.cancel(rid)


def merge_deltas(deltas: list[SequenceDelta]) -> list[SequenceDelta]:
    """One delta per sequence per step, in arrival order."""
    merged: dict[str, SequenceDelta] = {}
    for delta in deltas:
        prev = merged.get(delta.request_id)
        if prev is None or prev.finished:
            merged[delta.request_id] = delta
            continue
        prev.text += delta.text
        prev.tokens += delta.tokens
        prev.finish_reason = delta.finish_reason
        prev.usage = delta.usage
        prev.error = delta.error
        prev.error_code = delta.error_code
    return list(merged.values())
