"""The gateway's request service: admission, enqueue, and following a request's events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from breakwater.broker import Broker
from breakwater.config import GatewaySettings
from breakwater.gateway.errors import APIError
from breakwater.gateway.fanin import Fanin, Subscription
from breakwater.gateway.follow import RequestGone, follow_events
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.keys import LANES
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

# A lower bound on tokens from UTF-8 bytes: real tokenizers average 3-5 bytes per token, so a
# prompt refused by this estimate certainly cannot fit; the worker checks exactly.
BYTES_PER_TOKEN_BOUND = 6


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    context_length: int
    workers: int
    capacity: int
    active: int
    owned_by: str = "breakwater"
    kv_cache_usage: float | None = None

    @classmethod
    def without_workers(cls, name: str) -> ModelInfo:
        """A model no live worker serves (declared for scale to zero, or its last worker left)."""
        return cls(name, context_length=0, workers=0, capacity=0, active=0)


@dataclass(slots=True)
class Submission:
    """An admitted request whose live events are already subscribed to."""

    rid: str
    model: str
    chat: bool
    created: int
    include_usage: bool
    subscription: Subscription | None
    started: float = field(default_factory=time.perf_counter)
    duplicate: bool = False


class GatewayService:
    def __init__(
        self, settings: GatewaySettings, broker: Broker, fanin: Fanin, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.fanin = fanin
        self.metrics = metrics
        self.draining = False
        self._models: dict[str, ModelInfo] = {}
        self._models_at = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.websockets: set[Any] = set()
        self.drain_rate: dict[str, float] = {}  # jobs finished per second, per model (measured)
        self.load: dict[str, ModelLoad] = {}

    # -- models ----------------------------------------------------------------------------------
    async def models(self, fresh: bool = False) -> dict[str, ModelInfo]:
        """Models served by live workers, and declared ones (cached for ``model_cache_s``)."""
        if fresh or time.monotonic() - self._models_at > self.settings.model_cache_s:
            workers = await self.broker.live_workers()
            grouped: dict[str, list[dict[str, Any]]] = {}
            for info in workers.values():
                grouped.setdefault(str(info["model"]), []).append(info)
            models = {}
            for name, infos in grouped.items():
                kv = [float(i["kv_cache_usage"]) for i in infos if i.get("kv_cache_usage") is not None]
                models[name] = ModelInfo(
                    name=name,
                    context_length=min(int(i.get("context_length", 0)) for i in infos),
                    workers=len(infos),
                    capacity=sum(int(i.get("capacity", 0)) for i in infos),
                    active=sum(int(i.get("active", 0)) for i in infos),
                    kv_cache_usage=sum(kv) / len(kv) if kv else None,
                )
            for name in self.settings.declared_models:  # scale to zero: queue until a worker starts
                models.setdefault(name, ModelInfo.without_workers(name))
            self._models, self._models_at = models, time.monotonic()
        return self._models

    async def resolve_model(self, name: str) -> ModelInfo:
        models = await self.models()
        if name not in models:
            models = await self.models(fresh=True)
        if name not in models:
            raise APIError(
                404,
                f"The model `{name}` does not exist or has no live worker.",
                code="model_not_found",
                param="model",
            )
        return models[name]

    # -- admission -------------------------------------------------------------------------------
    async def submit(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        *,
        request_id: str,
        idempotency_key: str | None,
        subscribe: bool = True,
    ) -> Submission:
        if self.draining:
            raise APIError(
                503,
                "this gateway is draining; retry",
                type="service_unavailable",
                code="draining",
                headers={"Retry-After": "1", "X-Breakwater-Reason": "draining"},
            )
        chat = isinstance(body, ChatCompletionRequest)
        model = await self.resolve_model(body.model)
        prompt_text, record = self._record(body, request_id)
        self._check_context(prompt_text, body.output_limit(), model)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        record["created"] = str(created)
        if idempotency_key:
            existing = await self.broker.claim_idempotency_key(
                idempotency_key, rid, self.settings.idempotency_ttl_s
            )
            if existing is not None:
                return await self._existing(existing, subscribe)
        sub = await self.fanin.subscribe(rid) if subscribe else None
        try:
            result = await self.broker.enqueue(
                rid=rid,
                model=body.model,
                lane=body.lane,
                record=record,
                max_queued=self.settings.lane_max_queued,
                request_id=request_id,
                ttl_s=int(float(record["timeout_s"])) + self.settings.result_ttl_s,
            )
        except BaseException:
            await self._abandon(sub, idempotency_key, rid)
            raise
        if not result.accepted:
            await self._abandon(sub, idempotency_key, rid)
            self.metrics.rejections.labels(body.model, "queue_full").inc()
            retry_after = self._retry_after(result.waiting, model)
            raise APIError(
                429,
                f"the {body.lane} queue for `{body.model}` is full ({result.waiting} waiting); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(retry_after), "X-Breakwater-Reason": "queue_full"},
            )
        log.info("request queued", extra={"rid": rid, "fields": {"model": body.model, "lane": body.lane}})
        return Submission(rid, body.model, chat, created, body.include_usage(), sub)

    async def _existing(self, rid: str, subscribe: bool) -> Submission:
        record = await self.broker.get_request(rid)
        for _ in range(100):  # the first request may be between binding the key and enqueueing
            if record:
                break
            await asyncio.sleep(0.02)
            record = await self.broker.get_request(rid)
        if not record:
            raise APIError(
                409,
                "a request with this Idempotency-Key is not available (expired or refused); retry",
                code="idempotency_key_conflict",
                headers={"Retry-After": "1"},
            )
        await self.broker.attach(rid)
        sub = await self.fanin.subscribe(rid) if subscribe else None
        return Submission(
            rid,
            record.get("model", ""),
            record.get("kind") == "chat",
            int(record.get("created", "0")),
            record.get("include_usage") == "1",
            sub,
            duplicate=True,
        )

    async def _abandon(self, sub: Subscription | None, idempotency_key: str | None, rid: str) -> None:
        if sub is not None:
            await self.fanin.unsubscribe(sub)
        if idempotency_key:
            await self.broker.release_idempotency_key(idempotency_key, rid)

    def _record(
        self, body: ChatCompletionRequest | CompletionRequest, request_id: str
    ) -> tuple[str, dict[str, str]]:
        timeout_s = body.timeout if body.timeout is not None else self.settings.request_timeout_s
        record: dict[str, str] = {
            "model": body.model,
            "lane": body.lane,
            "status": "queued",
            "attempt": "0",
            "seq": "0",
            "tokens": "0",
            "emitted": "",
            "watchers": "1",
            "request_id": request_id,
            "created_ms": str(int(time.time() * 1000)),
            "deadline_ms": str(int((time.time() + timeout_s) * 1000)),
            "timeout_s": str(timeout_s),
            "include_usage": "1" if body.include_usage() else "0",
            "stop": orjson.dumps(body.stop_list()).decode(),
            "ignore_eos": "1" if body.ignore_eos else "0",
        }
        limit = body.output_limit()
        if limit is not None:
            record["max_tokens"] = str(limit)
        for name in ("temperature", "top_p", "seed"):
            value = getattr(body, name)
            if value is not None:
                record[name] = str(value)
        top_k = (body.model_extra or {}).get("top_k")
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0:
            record["top_k"] = str(top_k)
        if isinstance(body, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            record["kind"] = "chat"
            record["messages"] = orjson.dumps(messages).decode()
            return "\n".join(m["content"] for m in messages), record
        record["kind"] = "completion"
        record["prompt"] = body.prompt_text()
        return record["prompt"], record

    @staticmethod
    def _check_context(prompt_text: str, limit: int | None, model: ModelInfo) -> None:
        ctx = model.context_length
        if ctx <= 0:
            return
        lower_bound = math.ceil(len(prompt_text.encode()) / BYTES_PER_TOKEN_BOUND)
        wanted = lower_bound + (limit or 0)
        if (limit is not None and limit >= ctx) or wanted > ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens; the prompt (at least {lower_bound} "
                f"tokens) plus max_tokens ({limit or 0}) does not fit.",
                code="context_length_exceeded",
                param="messages",
            )

    def _retry_after(self, waiting: int, model: ModelInfo) -> int:
        return retry_after_s(waiting, self.drain_rate.get(model.name, 0.0), model.capacity)

    # -- drain -----------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests (503), end SSE streams and close WebSockets with 1012 so
        clients resume on another gateway; generations keep running on the workers."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "draining", extra={"fields": {"streams": self.fanin.active, "websockets": len(self.websockets)}}
        )
        self.fanin.begin_drain()
        for ws in list(self.websockets):
            task = asyncio.create_task(_close_ws(ws))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- following -------------------------------------------------------------------------------
    async def events(self, submission: Submission, after: int = 0) -> AsyncIterator[TokenEvent]:
        """The request's events after ``after``, with latency metrics; the caller detaches on exit."""
        self.metrics.active_streams.inc()
        first = after == 0
        last_t = submission.started
        first_t: float | None = None
        try:
            async for event in follow_events(
                self.broker,
                self.fanin,
                submission.rid,
                after,
                idle_poll_s=self.settings.idle_poll_s,
                subscription=submission.subscription,
            ):
                now = time.perf_counter()
                if event.kind == "token" and event.text:
                    if first:
                        self.metrics.ttft.labels(submission.model).observe(now - submission.started)
                        first, first_t = False, now
                    else:
                        self.metrics.itl.labels(submission.model).observe(now - last_t)
                    last_t = now
                if event.terminal:
                    self._record_final(submission, event, now, first_t)
                yield event
        except RequestGone:
            raise APIError(
                404, f"request `{submission.rid}` not found or expired", code="request_not_found"
            ) from None
        finally:
            self.metrics.active_streams.dec()
            if submission.subscription is not None:
                await self.fanin.unsubscribe(submission.subscription)

    def _record_final(
        self, submission: Submission, event: TokenEvent, now: float, first_t: float | None
    ) -> None:
        model = submission.model
        if event.kind == "done":
            status = "completed"
        else:
            status = "cancelled" if (event.error or {}).get("code") == "cancelled" else "error"
        self.metrics.requests.labels(model, status).inc()
        if submission.duplicate:
            return
        self.metrics.e2e.labels(model).observe(now - submission.started)
        if event.usage:
            self.metrics.tokens.labels(model, "in").inc(event.usage.get("prompt_tokens", 0))
            self.metrics.tokens.labels(model, "out").inc(event.usage.get("completion_tokens", 0))
            out = event.usage.get("completion_tokens", 0)
            if out > 1 and first_t is not None:
                self.metrics.tpot.labels(model).observe((now - first_t) / (out - 1))

    def detach_later(self, rid: str) -> None:
        """The client went away mid-stream: count it out; the worker cancels after the grace period."""
        task = asyncio.create_task(self._detach(rid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _detach(self, rid: str) -> None:
        try:
            await self.broker.detach(rid)
        except Exception:
            log.exception("detach failed", extra={"rid": rid})

    # -- background ------------------------------------------------------------------------------
    async def refresh_gauges(self) -> None:
        models = dict(await self.models(fresh=True))
        for gone in self.load.keys() - models.keys():  # its last worker left: report 0, not stale
            models[gone] = ModelInfo.without_workers(gone)
        for name, info in models.items():
            if name not in self.load:  # a new model: its counters start at 0, visible to rate()
                self.metrics.rejections.labels(name, "queue_full")
                if name in self.settings.declared_models:
                    # The consumer group exists before any worker does, so a stream-lag
                    # autoscaler (KEDA) can read the queue and wake the first one.
                    await self.broker.ensure_groups(name)
            self.metrics.workers.labels(name).set(info.workers)
            self.metrics.batch_occupancy.labels(name).set(info.active / info.capacity if info.capacity else 0)
            if info.kv_cache_usage is not None:
                self.metrics.kv_cache_usage.labels(name).set(info.kv_cache_usage)
            added = done = waiting_all = in_flight_all = 0
            for lane in LANES:
                waiting, in_flight = await self.broker.queue_depth(name, lane)
                self.metrics.queue_depth.labels(name, lane).set(waiting)
                self.metrics.in_flight.labels(name, lane).set(in_flight)
                lane_added, lane_done = await self.broker.jobs_counts(name, lane)
                added, done = added + lane_added, done + lane_done
                waiting_all, in_flight_all = waiting_all + waiting, in_flight_all + in_flight
            load = self.load.setdefault(name, ModelLoad())
            load.observe(time.monotonic(), added, done, waiting_all, in_flight_all, info.workers)
            self.drain_rate[name] = load.drain_rate
            self.metrics.drain_rate.labels(name).set(load.drain_rate)
            self.metrics.arrival_rate.labels(name).set(load.arrival_rate)
            self.metrics.desired_workers.labels(name).set(load.desired_workers(self.settings))


class ModelLoad:
    """Arrival and service rates of one model, measured from its streams' counters (EWMA), and the
    number of workers that would serve the arrivals and clear the backlog within the horizon."""

    def __init__(self) -> None:
        self.arrival_rate = 0.0
        self.drain_rate = 0.0
        self.per_worker_rate = 0.0  # jobs/s one busy worker finishes
        self.waiting = 0
        self.in_flight = 0
        self.workers = 0
        self._prev: tuple[float, int, int] | None = None

    def observe(self, now: float, added: int, done: int, waiting: int, in_flight: int, workers: int) -> None:
        self.waiting, self.in_flight, self.workers = waiting, in_flight, workers
        prev, self._prev = self._prev, (now, added, done)
        if prev is None or now <= prev[0] or added < prev[1] or done < prev[2]:
            return
        dt = now - prev[0]
        self.arrival_rate = _ewma(self.arrival_rate, (added - prev[1]) / dt)
        self.drain_rate = _ewma(self.drain_rate, (done - prev[2]) / dt)
        if workers and waiting:  # only a saturated worker shows what it can do
            self.per_worker_rate = _ewma(self.per_worker_rate, (done - prev[2]) / dt / workers)

    def desired_workers(self, settings: GatewaySettings) -> int:
        if self.waiting == 0 and self.in_flight == 0 and self.arrival_rate < 0.01:
            return settings.autoscale_min_workers
        if self.per_worker_rate <= 0:  # nothing measured yet: one more while there is a backlog
            want = self.workers + (1 if self.waiting else 0)
        else:
            demand = self.arrival_rate + self.waiting / settings.autoscale_horizon_s
            want = math.ceil(demand / self.per_worker_rate)
        return max(settings.autoscale_min_workers, min(settings.autoscale_max_workers, max(1, want)))


def _ewma(old: float, new: float, alpha: float = 0.3) -> float:
    return new if old == 0 else (1 - alpha) * old + alpha * new


def retry_after_s(waiting: int, drain_rate: float, capacity: int) -> int:
    """Seconds until ``waiting`` jobs ahead have drained at the measured rate (1..60). Before any rate
    is measured, assume each slot finishes about a job a second."""
    rate = drain_rate if drain_rate > 0 else max(1, capacity)
    return max(1, min(60, math.ceil(waiting / rate)))


async def _close_ws(ws: Any) -> None:
    with contextlib.suppress(Exception):  # already closed or broken: nothing to tell
        await ws.close(code=1012, reason="gateway restarting; resume on another gateway")
