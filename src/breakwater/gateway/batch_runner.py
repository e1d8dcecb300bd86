"""Running batches: every gateway process looks for batches nobody runs, and runs those whose lease
it takes, at most ``batch_concurrency`` of a batch's requests at a time, each one as a client's
non-streamed request on the ``batch`` lane (limits, fair share, metering, continuation after a
worker's crash), which may wait in the queue what is left of the batch's window unless its line
sets its own ``timeout``. Each answer is kept as it comes, once per line; a gateway that stops (or
dies) leaves its batches to another after ``batch_lease_s``, which answers the lines still open by
following the same requests again (each line's Idempotency-Key is the batch's and the line's)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import orjson

from breakwater.broker.batches import BatchStore, FileWriter
from breakwater.broker.errors import TRANSIENT
from breakwater.broker.idempotency import IdempotencyKey
from breakwater.gateway.errors import APIError
from breakwater.gateway.following import RedisAway
from breakwater.gateway.responses import responses_key, whole_response
from breakwater.gateway.routes import whole_answer
from breakwater.gateway.service import GatewayService
from breakwater.gateway.specs import default_timeout_var
from breakwater.logs import caller_var, request_id_var
from breakwater.protocol.batches import (
    BatchRecord,
    FileRecord,
    Line,
    LineBody,
    expired_line,
    output_line,
    parse_input,
)
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest
from breakwater.protocol.responses import ResponsesRequest
from breakwater.stopping import stop_loops
from breakwater.tenancy import Principal

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often a runner looks for batches, renews its leases and sees a cancel
ATTEMPTS = 3  # a line whose answer failed in the gateway itself (not the request's error) is tried again
BACKOFF_MAX_S = 30.0
BLOCK = 256  # answers read at a time while the files are written
RETRY_CODES = frozenset({"cancelled", "draining", "timeout", "worker_lost", "tokens_lost"})
CUT_SHORT_MAX = 5  # a line whose request is cut short (RETRY_CODES) this often fails with that error
# A batch gives its place here up to the others: while its lines are refused by its owner's limits
# for at least REST_S (it rests that long), and after SLICE_S of sending while more batches wait.
REST_S = 5.0
SLICE_S = 60.0
# What leaves a line's request to the detach grace (and to its deadline) instead of a cancel
UNCANCELLED: tuple[type[BaseException], ...] = (APIError, *TRANSIENT)
OWNERS_LIMITS = frozenset({"rate_limit_exceeded", "insufficient_quota"})  # its key's or tenant's 429s


class _Rest(Exception):
    """A line refused by its owner's limits for ``wait_s``: its batch rests meanwhile."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(wait_s)
        self.wait_s = wait_s


def _retry_after_s(exc: APIError, attempt: int, left_s: float) -> float | None:
    """How long to wait before sending a line again after ``exc`` (its ``attempt``-th failure), or
    None when it is not worth it: not a refusal for now (429, 503) nor a request cut short, cut
    short too often, or told to wait past the batch's window (``left_s``: a spent budget)."""
    if exc.status not in (429, 503) and (exc.code not in RETRY_CODES or attempt >= CUT_SHORT_MAX):
        return None
    try:
        wait_s = float(exc.headers.get("Retry-After", ""))
    except ValueError:
        wait_s = 2.0 ** min(attempt, 5)
    return None if wait_s >= left_s else min(wait_s, BACKOFF_MAX_S)


@dataclass(frozen=True, slots=True)
class OpenLine:
    """A line whose request is in flight: how to find it again (:meth:`BatchRunner._let_go`)."""

    index: int
    key: str  # its Idempotency-Key
    xrid: str  # its X-Request-ID, which its requests' records keep
    choices: int  # n (times its prompts): each choice is a request of its own

    def key_forms(self) -> list[str]:
        if self.choices > 1:
            return [f"{self.key}#{i}" for i in range(self.choices)]  # (choices.choice_key)
        return [self.key, responses_key(self.key)]  # a Responses line's


def _xrid(record: BatchRecord, line: Line) -> str:
    return f"{record.id}-{line.index}"


def _choices(body: LineBody) -> int:
    return body.choice_count() if isinstance(body, ChatCompletionRequest | CompletionRequest) else 1


def _line_key(record: BatchRecord, line: Line, attempt: int) -> str:
    """The Idempotency-Key of a line's ``attempt``-th request: a runner that takes the batch over
    follows the same request."""
    return f"batch:{record.id}:{line.index}:{attempt}"


def _succeeded(answer: dict[str, Any]) -> bool:
    response = answer.get("response")
    return response is not None and int(response["status_code"]) < 400


class BatchRunner:
    def __init__(self, svc: GatewayService, store: BatchStore, owner: str = "") -> None:
        self.svc = svc
        self.store = store
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self._running: dict[str, asyncio.Task[None]] = {}
        self._pokes: set[asyncio.Task[None]] = set()
        self._resting: dict[str, float] = {}  # batch -> until (monotonic): not taken up here before
        self._on = False

    def poke(self) -> None:
        """A batch was created here: look for it now rather than at the next tick."""
        if self._on and not self.svc.draining:
            # A context of its own: the batches it takes up are any tenant's, never the poking request's.
            task = asyncio.create_task(self._tick_quietly(), context=contextvars.Context())
            self._pokes.add(task)
            task.add_done_callback(self._pokes.discard)

    async def run(self) -> None:
        """Until cancelled (or the gateway drains): take up batches, renew their leases."""
        self._on = True
        try:
            while not self.svc.draining:
                await self._tick_quietly()
                await asyncio.sleep(POLL_S)
        finally:
            self._on = False
            await stop_loops(self._pokes)
            await self.stop()

    async def _tick_quietly(self) -> None:
        try:
            await self.tick()
        except Exception as exc:  # Redis away: keep what runs, look again next tick
            log.warning("batch runner tick failed", extra={"fields": {"error": str(exc)}})

    async def tick(self) -> None:
        """Take the free batches while fewer than ``batch_max_running`` run here (and, up to twice
        that, those with nothing left to send: cancelled or out of time, they only write their files),
        renew the leases of those running here (the check of what runs and the start of a run have no
        await between them: two ticks at once start a batch once, and never past the bound)."""
        most = self.svc.settings.batch_max_running
        ttl_ms = int(self.svc.settings.batch_lease_s * 1000)
        active = await self.store.active()
        random.shuffle(active)  # while full, no batch is passed over at every tick
        now = time.monotonic()
        self._resting = {b: until for b, until in self._resting.items() if until > now}
        for batch_id in active:
            if batch_id in self._resting and batch_id not in self._running:
                continue
            limit = most
            if batch_id not in self._running and len(self._running) >= most:
                if len(self._running) >= 2 * most or not await self._ending(batch_id):
                    continue  # full here: left to another gateway, or to a later tick
                limit = 2 * most
            held = await self.store.lease(batch_id, self.owner, ttl_ms)
            task = self._running.get(batch_id)
            if held and task is None and len(self._running) >= limit:
                await self.store.release(batch_id, self.owner)  # another tick filled the last place
            elif held and task is None:
                task = asyncio.create_task(self._drive(batch_id), name=f"batch {batch_id}")
                self._running[batch_id] = task
                task.add_done_callback(self._ended(batch_id))
                self.svc.metrics.batches_running.set(len(self._running))
            elif not held and task is not None:  # another gateway took it (this one stalled a lease)
                task.cancel()

    async def _ending(self, batch_id: str) -> bool:
        """Nothing left to send: cancelled (or finishing), past its window, or gone."""
        record = await self.store.get(batch_id)
        return record is None or record.status != "in_progress" or time.time() >= record.expires_at

    def _ended(self, batch_id: str) -> Callable[[asyncio.Task[None]], None]:
        def ended(task: asyncio.Task[None]) -> None:
            self._running.pop(batch_id, None)
            self.svc.metrics.batches_running.set(len(self._running))
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "batch run failed", extra={"fields": {"batch": batch_id}}, exc_info=task.exception()
                )

        return ended

    async def stop(self) -> None:
        """Stop running batches here and give their leases back, so another gateway goes on at once."""
        running = dict(self._running)
        await stop_loops(running.values())
        for batch_id in running:
            with contextlib.suppress(Exception):
                await self.store.release(batch_id, self.owner)

    async def _drive(self, batch_id: str) -> None:
        record = await self.store.get(batch_id)
        if record is None:
            await self.store.drop(batch_id)
            return
        data = await self.store.file_data(record.input_file_id)
        lines = (
            (await asyncio.to_thread(parse_input, data, record.endpoint)).lines if data is not None else []
        )
        if data is None and record.status == "in_progress":  # deleted under it (or evicted)
            record.errors = [{"code": "file_not_found", "message": "the input file is gone", "line": None}]
            await self.store.put(record, "errors")
            await self.store.move(batch_id, ("in_progress",), "finalizing", int(time.time()))
        elif record.status == "in_progress":
            rest_s = await self._answer_lines(record, lines)
            if rest_s is not None:  # its place given up: taken up again later (here or elsewhere)
                self._resting[batch_id] = time.monotonic() + rest_s
                await self.store.release(batch_id, self.owner)
                return
        await self._finish(batch_id, lines)

    async def _answer_lines(self, record: BatchRecord, lines: list[Line]) -> float | None:
        """Answer the lines without one, ``batch_concurrency`` at a time, until all are answered or
        the batch is cancelled or out of time (then the requests still open are let go). Its place
        given up (a line refused by its owner's limits, or its slice over while others wait): no new
        line is sent, those sent are answered, and the rest is for a later run; how long to rest."""
        done = await self.store.answered(record.id)
        todo = [line for line in lines if line.index not in done]
        todo.reverse()
        running: set[asyncio.Task[None]] = set()
        open_lines: dict[int, OpenLine] = {}  # line index -> its request in flight
        rest_s: float | None = None
        slice_end = time.monotonic() + SLICE_S
        try:
            while (todo and rest_s is None) or running:
                if not await self._goes_on(record):  # cancelled or out of time: to be finished now
                    await stop_loops(running)
                    await self._let_go(record, list(open_lines.values()))
                    return None
                if rest_s is None and todo and time.monotonic() >= slice_end:
                    slice_end = time.monotonic() + SLICE_S
                    full = len(self._running) >= self.svc.settings.batch_max_running
                    if full and len(await self.store.active()) > len(self._running):  # others wait
                        rest_s = 2 * POLL_S
                while todo and rest_s is None and len(running) < self.svc.settings.batch_concurrency:
                    running.add(asyncio.create_task(self._answer(record, todo.pop(), open_lines)))
                if not running:  # its slice ended with nothing in flight
                    break
                finished, running = await asyncio.wait(running, timeout=POLL_S, return_when="FIRST_COMPLETED")
                for task in finished:
                    try:
                        task.result()  # only Redis failing raises here: the run ends, the next tick retries
                    except _Rest as rest:
                        rest_s = max(rest_s or 0.0, rest.wait_s)
        finally:
            await stop_loops(running)  # their requests are detached: the workers cancel them
        return rest_s  # (a line given up is not answered: a later run sends it again)

    async def _goes_on(self, record: BatchRecord) -> bool:
        return time.time() < record.expires_at and await self.store.status(record.id) == "in_progress"

    async def _let_go(self, record: BatchRecord, open_lines: Collection[OpenLine]) -> None:
        """The requests of the lines still open when the batch was cancelled or its window closed,
        cancelled now: merely let go, one a worker took within the detach grace ran to its end and
        was billed for an answer the batch would never give. Each is found by its line's
        Idempotency-Key (as sent; ``responses\0`` before it for a Responses line; ``#i`` after it
        for choice i), and cancelled only if it is the line's own: the batch's tenant's, made for
        this line (its X-Request-ID), not one the response cache joined it to."""
        owner = Principal(record.tenant)  # (no key: the tenant is checked here, a revoked key or not)
        for line in open_lines:
            for form in line.key_forms():
                try:
                    rid = await self._own_request(record, line, form)
                    if rid:
                        await self.svc.requests.cancel(rid, owner)
                except UNCANCELLED as exc:  # gone, shared with other clients (409), Redis away
                    fields = {"batch": record.id, "line": line.index, "error": str(exc)}
                    log.warning("a batch line's request was not cancelled", extra={"fields": fields})

    async def _own_request(self, record: BatchRecord, line: OpenLine, key: str) -> str:
        broker = self.svc.broker
        idem = IdempotencyKey(record.tenant, key, "")
        bound = await broker.binding(idem.redis_key(broker.keys))
        if bound is None:
            return ""  # never admitted (or that form is not this line's)
        rid = idem.parse(bound).rid
        found = await broker.get_record(rid)
        spec = found.spec if found is not None else None
        mine = spec is not None and spec.tenant == record.tenant and spec.request_id == line.xrid
        return rid if mine else ""

    async def _answer(self, record: BatchRecord, line: Line, open_lines: dict[int, OpenLine]) -> None:
        """Send the line's request and keep its answer. Refused for now or cut short, it is sent
        again (a new attempt, its own Idempotency-Key) until the batch's window closes; a failure
        that is not the request's (a bug) three times, then the line fails with a 500."""
        attempt = bugs = 0
        while True:
            body = line.body.model_copy(update={"lane": "batch"})
            key = _line_key(record, line, attempt)
            open_lines[line.index] = OpenLine(line.index, key, _xrid(record, line), _choices(line.body))
            try:
                rid, status, answer = await self._send(record, line, body, key)
            except RedisAway:
                raise  # as TRANSIENT below: the next tick sends the line again under the same key
            except APIError as exc:
                attempt += 1
                wait_s = _retry_after_s(exc, attempt, record.expires_at - time.time())
                if wait_s is not None and exc.code in OWNERS_LIMITS and wait_s >= REST_S:
                    raise _Rest(wait_s) from None  # not holding a place other owners' batches need
                if wait_s is not None and await self._goes_on(record):
                    await asyncio.sleep(wait_s)
                    continue
                rid, status, answer = exc.headers.get("X-Breakwater-Request-Id", ""), exc.status, exc.body()
            except TRANSIENT:
                raise  # Redis away: this run ends, the next tick takes the batch up again
            except Exception:
                attempt, bugs = attempt + 1, bugs + 1
                log.exception("batch line failed", extra={"fields": {"batch": record.id, "line": line.index}})
                if bugs < ATTEMPTS:
                    await asyncio.sleep(min(2.0**bugs, BACKOFF_MAX_S))
                    continue
                failed = APIError(500, "the server failed to answer this request", type="server_error")
                rid, status, answer = "", 500, failed.body()
            await self._keep(record, line, rid, status, answer)
            del open_lines[line.index]
            return

    async def _send(
        self, record: BatchRecord, line: Line, body: LineBody, key: str
    ) -> tuple[str, int, dict[str, Any]]:
        """The line's request, answered whole: its id, status and body (an error raises)."""
        principal = await self._principal(record)
        xrid = _xrid(record, line)
        # Without a `timeout` of its own it may wait what is left of the batch's window (a day at most).
        window_s = max(1.0, record.expires_at - time.time())
        default_timeout_var.set(min(self.svc.settings.batch_timeout_s, window_s))
        request_id_var.set(xrid)  # the line's log lines: its id (as the worker's say) and its owner
        caller_var.set((principal.tenant, principal.key_id))
        if isinstance(body, ResponsesRequest):
            headers, result = await whole_response(self.svc, body, xrid, principal, key)
        else:
            headers, result = await whole_answer(self.svc, body, xrid, principal, key)
        return headers["X-Breakwater-Request-Id"], 200, result

    async def _keep(
        self, record: BatchRecord, line: Line, rid: str, status: int, answer: dict[str, Any]
    ) -> None:
        ok = status < 400
        if await self.store.answer(record.id, line.index, output_line(line, rid, status, answer), ok):
            self.svc.metrics.batch_lines.labels("ok" if ok else "failed").inc()

    async def _principal(self, record: BatchRecord) -> Principal:
        """The batch's owner as it stands now: the key that created it, or the key a rotation
        replaced it with once it ended; a key revoked since fails the lines still to run."""
        return await self.svc.auth.principal_of(record.key_id)

    async def _finish(self, batch_id: str, lines: list[Line]) -> None:
        """The batch's output and error files from its answers, its counts from them, and its last
        status: completed, cancelled (what was answered before), expired (the lines not answered
        in the error file) or failed (its input went missing). Done by the lease's holder only;
        done again whole by the next runner if this one stops half-way."""
        if not await self._holds(batch_id):
            return
        await self.store.move(batch_id, ("in_progress",), "finalizing", int(time.time()))
        record = await self.store.get(batch_id)
        if record is None:
            await self.store.drop(batch_id)
            return
        final = {"finalizing": "completed", "cancelling": "cancelled"}.get(record.status)
        answered = await self.store.answered(batch_id)
        if final == "completed" and record.errors:  # _drive found its input gone
            final = "failed"
        elif final == "completed" and any(line.index not in answered for line in lines):
            final = "expired"  # its window closed with lines unanswered
        if final is not None:
            await self._write_files(record, lines, expired=final == "expired")
            if not await self._holds(batch_id):  # another runner took it over meanwhile: its files
                return
            counts = ("completed", "failed", "input_tokens", "output_tokens")
            await self.store.put(record, "output_file_id", "error_file_id", *counts)
            await self.store.move(batch_id, (record.status,), final, int(time.time()))
        await self.store.close(record, self.svc.settings.files_ttl_s)

    async def _holds(self, batch_id: str) -> bool:
        return await self.store.lease(batch_id, self.owner, int(self.svc.settings.batch_lease_s * 1000))

    async def _write_files(self, record: BatchRecord, lines: list[Line], *, expired: bool) -> None:
        """Write the answers in input order, reading them BLOCK at a time; the counts from them."""
        indices = [line.index for line in lines] or sorted(await self.store.answered(record.id))
        by_index = {line.index: line for line in lines}
        good, bad = self._writer(record, "output"), self._writer(record, "error")
        record.completed = record.failed = record.input_tokens = record.output_tokens = 0
        for at in range(0, len(indices), BLOCK):
            block = indices[at : at + BLOCK]
            for index, answer in zip(block, await self.store.answers(record.id, block), strict=True):
                if answer is None:
                    if not expired or index not in by_index:
                        continue
                    answer = expired_line(by_index[index])
                    ok = False
                else:
                    parsed = orjson.loads(answer)
                    ok = _succeeded(parsed)
                    record.count(parsed)
                await (good if ok else bad).write(answer + b"\n")
                record.completed += ok
                record.failed += not ok
        for writer, name in ((good, "output_file_id"), (bad, "error_file_id")):
            if writer.size:
                setattr(record, name, (await writer.close()).id)

    def _writer(self, record: BatchRecord, kind: str) -> FileWriter:
        """The batch's ``kind`` file: its id is the batch's and the kind's, so a finish done again
        (its runner stopped half-way) writes the same file over, not another beside it."""
        now = int(time.time())
        ttl_s = self.svc.settings.files_ttl_s
        file_id = "file-" + hashlib.sha256(f"{record.id}:{kind}".encode()).hexdigest()[:24]
        file = FileRecord(
            file_id, record.tenant, f"{record.id}_{kind}.jsonl", "batch_output", 0, now, now + ttl_s
        )
        return self.store.writer(file, ttl_s)
