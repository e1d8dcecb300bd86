"""The gateway's services, composed: models, admission, following, autoscale signals and drain.

Routes and the WebSocket endpoint call these; only they reach the broker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, TypeVar, cast

from pydantic import BaseModel

from breakwater.broker import Broker
from breakwater.broker.fanin import FanIn
from breakwater.config import GatewaySettings
from breakwater.gateway import choices
from breakwater.gateway.admission import Admitter, client_key
from breakwater.gateway.auth import Authenticator, check_model
from breakwater.gateway.autoscale import AutoscaleSignals
from breakwater.gateway.cache import DEFAULT_CONTROL, CacheControl
from breakwater.gateway.choices import ChoiceGroup
from breakwater.gateway.errors import APIError, unsupported
from breakwater.gateway.following import Submission
from breakwater.gateway.metrics import GatewayMetrics
from breakwater.gateway.models import ModelRegistry
from breakwater.gateway.requests import Requests
from breakwater.gateway.rollback import RollbackGuard
from breakwater.gateway.specs import Body
from breakwater.gateway.versions import VersionRouter
from breakwater.protocol.embeddings import EmbeddingRequest
from breakwater.protocol.openai import ChatCompletionRequest, CompletionRequest
from breakwater.tenancy import ANONYMOUS, Principal

log = logging.getLogger(__name__)
B = TypeVar("B", bound=ChatCompletionRequest | CompletionRequest | EmbeddingRequest)


class DrainingSocket(Protocol):
    """An open WebSocket, closed (1012) when the gateway drains (``gateway.ws``)."""

    async def drain(self, grace_s: float) -> None: ...


class GatewayService:
    def __init__(
        self,
        settings: GatewaySettings,
        broker: Broker,
        fanin: FanIn,
        metrics: GatewayMetrics,
        *,
        cache_index: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.fanin = fanin
        self.metrics = metrics
        self.registry = ModelRegistry(settings, broker)
        self.signals = AutoscaleSignals(settings, broker, self.registry, metrics)
        self.admitter = Admitter(
            settings, broker, fanin, self.registry, self.signals, metrics, cache_index=cache_index or broker
        )
        self.versions = VersionRouter(settings, broker.rollouts(), self.registry, metrics)
        self.guard = RollbackGuard(self.versions, broker.rollouts(), metrics)
        queues = self.signals.partitions.queues
        self.requests = Requests(settings, broker, fanin, metrics, self.guard.outcomes, queues=queues)
        store = broker.api_keys(settings.pepper()) if settings.auth == "keys" else None
        self.auth = Authenticator(settings, store, broker.ledger)
        self.draining = False
        self._grace: asyncio.TimerHandle | None = None  # ends the streams at stream_grace_s (drain)
        self.websockets: set[DrainingSocket] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def submit(
        self,
        body: Body,
        *,
        request_id: str,
        idempotency_key: str | None,
        principal: Principal = ANONYMOUS,
        subscribe: bool = True,
        auto_tools: bool = True,
        cache: CacheControl = DEFAULT_CONTROL,
        rid: str = "",
        response: str = "",
        digest_of: BaseModel | None = None,
    ) -> Submission:
        """Admit ``body`` (gateway.admission): as request ``rid`` (new when empty); ``response``: what
        a Responses API request keeps (protocol.responses.Stored); ``digest_of``: the body the client
        sent, when not ``body`` (its Idempotency-Key is bound to it)."""
        self._check(body, principal)
        if not isinstance(body, EmbeddingRequest) and body.choice_count() > 1:
            param = "n" if body.n > 1 else "prompt"
            raise APIError(
                400,
                f"`{param}` asking for several choices is served by the HTTP API (POST "
                "/v1/chat/completions or /v1/completions); here, send one request per choice",
                code="unsupported_parameter",
                param=param,
            )
        routed = await self.route(body, principal, idempotency_key)
        return await self.admitter.submit(
            routed,
            # The client's body: a replay matches it (not the model an alias routed it to).
            digest_of=digest_of or (body if routed is not body else None),
            request_id=request_id,
            idempotency_key=idempotency_key,
            principal=principal,
            subscribe=subscribe,
            auto_tools=auto_tools,
            cache=cache,
            rid=rid,
            response=response,
        )

    async def submit_choices(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        *,
        request_id: str,
        idempotency_key: str | None,
        principal: Principal = ANONYMOUS,
    ) -> ChoiceGroup:
        """A request with ``n > 1`` or several prompts: one queued request per choice (gateway.choices)."""
        self._check(body, principal)
        # Every choice on one version; a replay's, on the version its first choice ran on.
        routed = await self.route(body, principal, choices.choice_key(idempotency_key, 0))
        return await choices.admit(
            self,
            routed,
            request_id=request_id,
            idempotency_key=idempotency_key,
            principal=principal,
            client=body,
        )

    async def route(self, body: B, principal: Principal, idempotency_key: str | None) -> B:
        """``body`` for the version it runs on (gateway.versions): itself unless it names an alias.
        A replay (an Idempotency-Key bound to this body) goes where its request went, so that it
        finds that request instead of being judged against another version."""
        alias = await self.versions.alias(body.model)
        if alias is None:
            return body
        version = await self._replayed(body, principal, idempotency_key) if idempotency_key else None
        if version is None or version not in alias.versions:
            version = self.versions.pick(alias, principal, body.user)
        return cast(B, body.model_copy(update={"model": version}))

    async def _replayed(self, body: Body, principal: Principal, idempotency_key: str) -> str | None:
        """The version of the request this key (with this body) is bound to, if any."""
        idem = client_key(principal, idempotency_key, body)
        found = await self.broker.binding(idem.redis_key(self.broker.keys))
        if found is None or not idem.matches(binding := idem.parse(found)):
            return None
        record = await self.broker.get_record(binding.rid)
        return record.spec.model if record is not None else None

    def refuse_if_draining(self) -> None:
        """A new request or resume while draining: 503, to be retried on another gateway (during the
        stream grace too: only the streams open at SIGTERM run on)."""
        if self.draining:
            raise APIError(
                503,
                "this gateway is draining; retry",
                type="service_unavailable",
                code="draining",
                headers={"Retry-After": "1", "X-Breakwater-Reason": "draining"},
            )

    def _check(self, body: Body, principal: Principal) -> None:
        self.refuse_if_draining()
        name = body.unsupported_parameter()
        if name is not None:
            raise unsupported(name)
        check_model(principal, body.model)

    async def ready(self) -> str:
        """``ready``, or why not (``draining``, ``redis_unavailable``)."""
        if self.draining:
            return "draining"
        try:
            await self.broker.ping()
        except Exception:  # any failure to answer means not ready; the probe says so, nothing more
            return "redis_unavailable"
        return "ready"

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests (503), end SSE streams and close WebSockets with 1012 (after
        ``stream_grace_s``, or as soon as a socket follows no request) so clients resume on another
        gateway; generations keep running on the workers."""
        if self.draining:
            return
        self.draining = True
        grace_s = self.settings.stream_grace_s
        log.info(
            "draining",
            extra={
                "fields": {
                    "streams": self.fanin.active,
                    "websockets": len(self.websockets),
                    "stream_grace_s": grace_s,
                }
            },
        )
        if grace_s:  # streams that end meanwhile end as usual; uvicorn waits for them (cli._serve)
            self._grace = asyncio.get_running_loop().call_later(grace_s, self._end_streams)
        else:
            self.fanin.begin_drain()
        for conn in list(self.websockets):
            task = asyncio.create_task(conn.drain(grace_s))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def end_grace(self) -> None:
        """The app's shutdown: a stream grace still running has nothing left to end."""
        if self._grace is not None:
            self._grace.cancel()

    def _end_streams(self) -> None:
        if self.fanin.active:
            log.info("stream grace over; ending streams", extra={"fields": {"streams": self.fanin.active}})
        self.fanin.begin_drain()
