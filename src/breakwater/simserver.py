"""``breakwater sim-server``: the sim engine behind a plain OpenAI-compatible server (no queue).

It is the "direct engine" baseline of the benchmarks: the same engine and timing model that a
Breakwater worker runs, served in-process without gateway, Redis or worker in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from breakwater.config import SimServerSettings
from breakwater.engines.base import EngineRequestError, GenerationRequest, SequenceDelta
from breakwater.engines.sim import SimEngine, SimTiming
from breakwater.gateway.errors import APIError, JSONBody, install_error_handlers
from breakwater.gateway.middleware import RequestIdMiddleware
from breakwater.gateway.sse import DONE, sse_event
from breakwater.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    text_chunk,
    text_response,
    usage_chunk,
)


class SimDriver:
    """Runs the engine's step loop and routes deltas to per-request queues; waits for room like vLLM."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.queues: dict[str, asyncio.Queue[SequenceDelta]] = {}
        self._room = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            deltas = await self.engine.step()
            freed = False
            for delta in deltas:
                queue = self.queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
                freed = freed or delta.finished
            if freed:
                async with self._room:
                    self._room.notify_all()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[SequenceDelta]:
        async with self._room:
            await self._room.wait_for(lambda: self.engine.free_slots() > 0)
        queue: asyncio.Queue[SequenceDelta] = asyncio.Queue()
        self.queues[request.request_id] = queue
        try:
            self.engine.add(request)
            while True:
                delta = await queue.get()
                yield delta
                if delta.finished:
                    return
        finally:
            self.queues.pop(request.request_id, None)
            self.engine.cancel(request.request_id)
            async with self._room:
                self._room.notify_all()


def _request(body: ChatCompletionRequest | CompletionRequest, rid: str) -> GenerationRequest:
    seed = body.seed if body.seed is not None else uuid.uuid4().int & 0xFFFFFFFF
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return GenerationRequest(
            rid, messages=messages, max_tokens=body.output_limit(), seed=seed, stop=body.stop_list()
        )
    return GenerationRequest(
        rid, prompt=body.prompt_text(), max_tokens=body.max_tokens, seed=seed, stop=body.stop_list()
    )


def build_sim_app(settings: SimServerSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timing = SimTiming(
            settings.sim_prefill_ms_per_token,
            settings.sim_decode_base_ms,
            settings.sim_decode_per_seq_ms,
            settings.sim_jitter_frac,
        )
        driver = SimDriver(SimEngine(settings.model, settings.capacity, settings.context_length, timing))
        await driver.start()
        app.state.driver = driver
        try:
            yield
        finally:
            await driver.close()

    app = FastAPI(title="Breakwater sim-server", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    async def serve(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
        if body.model != settings.model:
            raise APIError(404, f"The model `{body.model}` does not exist.", code="model_not_found")
        chat = isinstance(body, ChatCompletionRequest)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        driver: SimDriver = request.app.state.driver
        gen = _request(body, rid)
        try:
            driver.engine.add(gen)
            driver.engine.cancel(rid)
        except EngineRequestError as exc:
            raise APIError(400, str(exc), code=exc.code) from None
        if body.stream:
            return StreamingResponse(
                _stream(driver, gen, body, rid, created, chat), media_type="text/event-stream"
            )
        parts: list[str] = []
        final: SequenceDelta | None = None
        async for delta in driver.generate(gen):
            parts.append(delta.text)
            final = delta
        if final is None:
            raise APIError(500, "the engine produced no output", type="server_error")
        build = chat_response if chat else text_response
        return JSONBody(
            build(rid, body.model, created, "".join(parts), final.finish_reason or "stop", final.usage)
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await serve(body, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serve(body, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "breakwater-sim",
                    "max_model_len": settings.context_length,
                }
            ],
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _stream(
    driver: SimDriver,
    gen: GenerationRequest,
    body: ChatCompletionRequest | CompletionRequest,
    rid: str,
    created: int,
    chat: bool,
) -> AsyncIterator[bytes]:
    first = True
    async for delta in driver.generate(gen):
        if delta.text or (first and chat):
            if chat:
                content: dict[str, Any] = {"content": delta.text}
                if first:
                    content = {"role": "assistant", "content": delta.text}
                yield sse_event(chat_chunk(rid, body.model, created, content))
            else:
                yield sse_event(text_chunk(rid, body.model, created, delta.text))
            first = False
        if delta.finished:
            if chat:
                yield sse_event(chat_chunk(rid, body.model, created, {}, delta.finish_reason))
            else:
                yield sse_event(text_chunk(rid, body.model, created, "", delta.finish_reason))
            if body.include_usage():
                yield sse_event(usage_chunk(rid, body.model, created, chat, delta.usage))
    yield DONE
