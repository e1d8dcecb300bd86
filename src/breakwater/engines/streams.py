"""Engines whose backend streams every request by itself (an HTTP upstream, vLLM's async engine).

The backend batches; here each admitted request is one asyncio task that pushes deltas, and
``step`` hands the worker everything produced since the last step, one merged delta per sequence.

Each step costs the worker, Redis and the gateways a round trip and a wakeup whatever it carries, so
a step gathers: a later token waits for the others' (at most a window, a share of the sequences' own
gap between tokens: it never waits into its successor's turn) unless every streaming sequence has one
waiting already (a backend that steps its batch, like vLLM, sends them together). A sequence's first
token never waits: its client is waiting for it (time to first token).
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from dataclasses import dataclass, field

from breakwater.engines.base import Engine, GenerationRequest, SequenceDelta
from breakwater.wakeup import Wakeup

log = logging.getLogger(__name__)
STEP_MIN_S = 0.001  # the shortest window, and the longest a token after a quiet spell waits for company
STEP_MAX_S = 0.010  # the longest window
GAP_SHARE = 0.5  # the window as a share of the sequences' gap between tokens (the default)
GAP_WEIGHT = 1 / 64  # of a new gap in the moving average
GAP_MAX_S = 0.040  # a longer gap (a stall, a retry) counts as this much
JOIN_EVERY = 256  # a flight's text pieces kept apart before they are joined (Flight.add_text)


class Gaps:
    """The sequences' gap between consecutive tokens (a moving average over all of them), and the
    window a step may wait for tokens to share it."""

    __slots__ = ("mean_s", "share")

    def __init__(self, share: float = GAP_SHARE) -> None:
        self.share = share
        self.mean_s = 0.0

    def add(self, gap_s: float) -> None:
        gap_s = min(gap_s, GAP_MAX_S)
        if self.mean_s:
            self.mean_s += (gap_s - self.mean_s) * GAP_WEIGHT
        else:
            self.mean_s = gap_s

    @property
    def window_s(self) -> float:
        return min(STEP_MAX_S, max(STEP_MIN_S, self.share * self.mean_s))


@dataclass(slots=True)
class Flight:
    """One admitted request; ``text``/``tokens`` include what a reclaimed job had already emitted.

    The text grows by :meth:`add_text`, which keeps the newest pieces in a list and joins them into
    ``head`` every ``JOIN_EVERY`` pieces: ``text += piece`` copied the whole text on every token (the
    string is an attribute, so CPython cannot grow it in place), ~6 us a token at 32,000 tokens."""

    request: GenerationRequest
    task: asyncio.Task[None] | None = None
    head: str = ""  # the text emitted so far, but for ``pieces``
    tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list)  # for engines that tokenize themselves
    text_at: float = 0.0  # when it last emitted text (loop time)
    pieces: list[str] = field(default_factory=list)  # the newest text, fewer than JOIN_EVERY pieces

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        self._fold()
        return self.head

    def add_text(self, piece: str) -> None:
        self.pieces.append(piece)
        if len(self.pieces) >= JOIN_EVERY:
            self._fold()

    def _fold(self) -> None:
        if self.pieces:
            self.head += "".join(self.pieces)
            self.pieces.clear()


class StreamingEngine(Engine):
    def __init__(self, window_share: float = GAP_SHARE) -> None:
        self._flights: dict[str, Flight] = {}
        self._deltas: list[SequenceDelta] = []
        self._ready = asyncio.Event()
        self._last_step = 0.0
        self._quiet: set[str] = set()  # sequences whose client waits for its first token
        self._streaming: set[str] = set()  # sequences that have emitted text in this worker
        self._firsts: set[str] = set()  # sequences whose first text is among the deltas not yet stepped
        self._waiting: set[str] = set()  # streaming sequences with text not yet stepped
        self._early: set[str] = set()  # first tokens stepped alone since the last step: their turn is over
        self._waiting_since = 0.0  # when the first of them came
        self.gaps = Gaps(window_share)
        self._pause = Wakeup()  # a step waiting for company

    @abstractmethod
    async def _generate(self, flight: Flight) -> None:
        """Stream one request, calling :meth:`_emit` for its deltas and once with its final delta."""

    def running(self) -> int:
        return len(self._flights)

    def new_flight(self, request: GenerationRequest) -> Flight:
        """Validate a request (raising :class:`EngineRequestError`) and make its flight."""
        return Flight(request, head=request.emitted_text, tokens=request.emitted_tokens)

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
        self._leave(request_id)
        self._firsts.discard(request_id)
        if flight is not None and flight.task is not None:
            flight.task.cancel()  # leaving the backend's stream aborts the request there
        self._deltas = [d for d in self._deltas if d.request_id != request_id]
        self._wake_if_all_waiting()

    async def step(self) -> list[SequenceDelta]:
        await self._ready.wait()
        loop = asyncio.get_running_loop()
        if self._firsts:
            return self._step_firsts()
        if not self._all_waiting():
            # Until the window since the last step has passed and the first waiting token has had
            # STEP_MIN_S for company, or every streaming sequence has a token waiting.
            until = max(self._last_step + self.gaps.window_s, self._waiting_since + STEP_MIN_S)
            if (wait := until - loop.time()) > 0:
                await self._pause.wait(wait)
            if self._firsts:  # one came meanwhile: it goes first
                return self._step_firsts()
        self._last_step = loop.time()
        self._ready.clear()
        self._waiting.clear()
        self._early.clear()
        deltas, self._deltas = self._deltas, []
        return merge_deltas(deltas)

    def _step_firsts(self) -> list[SequenceDelta]:
        """A step of first tokens alone: their write is small and the gateway meets them first;
        the other tokens keep waiting out their window."""
        firsts, self._firsts = self._firsts, set()
        self._waiting -= firsts  # a later token of theirs goes now too
        self._early |= firsts & self._streaming  # the others need not wait for them this round
        deltas = [d for d in self._deltas if d.request_id in firsts]
        self._deltas = [d for d in self._deltas if d.request_id not in firsts]
        if not self._deltas:
            self._ready.clear()
        return merge_deltas(deltas)

    def _all_waiting(self) -> bool:
        """Every sequence that has emitted here has a token waiting (one that has not yet, a new
        one or a continuation still prefilling, is not waited for)."""
        return len(self._waiting) + len(self._early) >= len(self._streaming)

    def _wake_if_all_waiting(self) -> None:
        if self._waiting and self._all_waiting():
            self._pause.wake()

    def _emit(self, delta: SequenceDelta) -> None:
        rid = delta.request_id
        flight = self._flights.get(rid)
        if flight is not None:
            self._deltas.append(delta)
            self._ready.set()
            if delta.text or delta.finished:
                now = asyncio.get_running_loop().time()
                self._streaming.add(rid)
                if rid in self._quiet:  # its first text: step now
                    self._quiet.discard(rid)
                    self._firsts.add(rid)
                    self._pause.wake()
                else:
                    if delta.text and flight.text_at:
                        self.gaps.add(now - flight.text_at)
                    if not self._waiting:
                        self._waiting_since = now
                    self._waiting.add(rid)
                    self._early.discard(rid)
                flight.text_at = now
        if delta.finished:  # its last deltas still go (with its first, if that is among them)
            self._flights.pop(rid, None)
            self._leave(rid)
        self._wake_if_all_waiting()

    def _leave(self, rid: str) -> None:
        """A sequence that ended or was cancelled: nobody waits for it any more."""
        self._quiet.discard(rid)
        self._streaming.discard(rid)
        self._waiting.discard(rid)
        self._early.discard(rid)

    async def close(self) -> None:
        for rid in list(self._flights):
            self.cancel(rid)


def merge_deltas(deltas: list[SequenceDelta]) -> list[SequenceDelta]:
    """One delta per sequence per step (in the order of their first text), its text, tokens and
    logprobs joined.

    Tokens without text after a sequence's last text (a stop string's prefix the engine holds back,
    an end-of-sequence token) stay a delta of their own behind it, as an error does: a logprobs entry
    goes with the text its token wrote, never with text written before it (the worker holds such
    tokens for the text that follows them, or drops their entries if the answer ends there); an
    error's text is written before it. A plain finish joins the text, in its one write.
    """
    heads: dict[str, SequenceDelta] = {}  # each sequence's text so far
    tails: dict[str, SequenceDelta] = {}  # and what came after its last text
    for delta in deltas:
        rid = delta.request_id
        if tails and (tail := tails.pop(rid, None)) is not None:  # it goes with whatever comes now
            _join(tail, delta)
            delta = tail
        if not delta.text:
            tails[rid] = delta
        elif (head := heads.get(rid)) is not None:
            _join(head, delta)
        else:
            heads[rid] = delta
    if not tails:  # the common case: every delta had text
        return list(heads.values())
    out: list[SequenceDelta] = []
    for rid, head in heads.items():
        tail = tails.pop(rid, None)
        if tail is not None and tail.finish_reason is not None and tail.error is None and not tail.logprobs:
            _join(head, tail)  # a plain finish (with tokens it counts) goes in the text's own write
            tail = None
        out += (head,) if tail is None else (head, tail)
    return out + list(tails.values())


def _join(into: SequenceDelta, delta: SequenceDelta) -> None:
    into.text += delta.text
    into.tokens += delta.tokens
    if delta.logprobs:
        into.logprobs = [*(into.logprobs or ()), *delta.logprobs]
    if delta.finished:
        into.finish_reason = delta.finish_reason
        into.usage = delta.usage
        into.error = delta.error
        into.error_code = delta.error_code
