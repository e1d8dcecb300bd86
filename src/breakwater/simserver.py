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

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from breakwater.engines.base import EngineRequestError, GenerationRequest, SequenceDelta
from breakwater.engines.sim import SimEngine, count_tokens, embed
from breakwater.gateway.errors import APIError, JSONBody, install_error_handlers
from breakwater.gateway.middleware import RequestIdMiddleware
from breakwater.gateway.sse import DONE, sse_event
from breakwater.protocol.embeddings import EmbeddingRequest, embedding_response
from breakwater.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    text_chunk,
    text_response,
    tool_call_delta,
    usage_chunk,
)
from breakwater.sim_settings import SimServerSettings as SimServerSettings  # the command builds it


class SimDriver:
    """Runs the engine's step loop and routes deltas to per-request queues; waits for room like vLLM."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.queues: dict[str, asyncio.Queue[SequenceDelta]] = {}
        self._room = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.waiting = 0  # requests accepted but not yet running (vLLM's num_requests_waiting)
        self.peak_waiting = 0
        self.scrapes = {"whole": 0, "named": 0}  # metrics pages served, the whole one and by name

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
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        try:
            async with self._room:
                await self._room.wait_for(lambda: self.engine.free_slots() > 0)
        finally:
            self.waiting -= 1
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
    """The engine request; a chat ending in an assistant message with vLLM's ``continue_final_message``
    continues that message (the sim then produces exactly the rest of the undisturbed answer)."""
    seed = body.seed if body.seed is not None else uuid.uuid4().int & 0xFFFFFFFF
    limit = body.output_limit()
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        emitted = ""
        extra = body.model_extra or {}
        if extra.get("continue_final_message") and messages[-1]["role"] == "assistant":
            emitted = messages.pop()["content"]
        done = count_tokens(emitted)
        return GenerationRequest(
            rid,
            messages=messages,
            max_tokens=None if limit is None else limit + done,
            seed=seed,
            stop=body.stop_list(),
            ignore_eos=body.ignore_eos,
            emitted_text=emitted,
            emitted_tokens=done,
        )
    return GenerationRequest(
        rid,
        prompt=body.prompt_text(),
        max_tokens=limit,
        seed=seed,
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
    )


def _usage(gen: GenerationRequest, usage: dict[str, int] | None) -> dict[str, int] | None:
    """vLLM's accounting of a continuation: the continued text is prompt, only new tokens are completion."""
    if usage is None or not gen.emitted_tokens:
        return usage
    return {
        "prompt_tokens": usage["prompt_tokens"] + gen.emitted_tokens,
        "completion_tokens": usage["completion_tokens"] - gen.emitted_tokens,
    }


def build_sim_app(settings: SimServerSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        driver = SimDriver(SimEngine(settings.sim_options()))
        await driver.start()
        app.state.driver = driver
        try:
            yield
        finally:
            await driver.close()

    app = FastAPI(title="Breakwater sim-server", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(body, request, settings)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(body, request, settings)

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingRequest) -> Response:
        """The sim engine's embeddings (hashed bag of words), as an upstream's to pass through."""
        if body.model != settings.model:
            raise APIError(404, f"The model `{body.model}` does not exist.", code="model_not_found")
        texts = body.inputs()
        usage = {"prompt_tokens": sum(count_tokens(t) for t in texts)}
        return JSONBody(embedding_response(body.model, [embed(t) for t in texts], usage, "float", None))

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
    @app.get("/health")  # vLLM's path; load generators (guidellm) probe it
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """The load gauges vLLM exports, under vLLM's names, so upstream workers can pull by them."""
        driver: SimDriver = request.app.state.driver
        text = _metrics_text(driver, settings.model)
        driver.scrapes["whole"] += 1
        return Response(text, media_type="text/plain")

    @app.get("/metrics/")
    async def named_metrics(request: Request) -> Response:
        """As vLLM's ``/metrics/`` (prometheus_client's app): only the metrics asked for by
        ``name[]``, when asked."""
        driver: SimDriver = request.app.state.driver
        text = _metrics_text(driver, settings.model)
        names = set(request.query_params.getlist("name[]"))
        if names:
            text = "".join(_only(text.splitlines(keepends=True), names))
        driver.scrapes["named" if names else "whole"] += 1
        return Response(text, media_type="text/plain")

    return app


async def _serve(
    body: ChatCompletionRequest | CompletionRequest, request: Request, settings: SimServerSettings
) -> Response:
    if body.model != settings.model:
        raise APIError(404, f"The model `{body.model}` does not exist.", code="model_not_found")
    chat = isinstance(body, ChatCompletionRequest)
    # One choice of one prompt: the sim server answers no group (Breakwater's gateway splits one)
    asked = {"logprobs": body.logprobs_top() >= 0, "n": body.n > 1, "prompt": body.choice_count() > body.n}
    tool = _called(body) if isinstance(body, ChatCompletionRequest) else ""
    if isinstance(body, ChatCompletionRequest):
        asked["response_format"] = body.response_format not in (None, {"type": "text"})
    for name, wanted in asked.items():
        if wanted:  # the sim engine implements none of these: refused by name, never ignored
            raise APIError(
                400, f"`{name}` is not supported by the sim engine", code="unsupported_parameter", param=name
            )
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    driver: SimDriver = request.app.state.driver
    gen = _request(body, rid)
    try:
        driver.engine.add(gen)
        driver.engine.cancel(rid)
    except EngineRequestError as exc:
        raise APIError(400, str(exc), code=exc.code, param=exc.param) from None
    if body.stream:
        return StreamingResponse(
            _stream(driver, gen, body, rid, created, chat, tool), media_type="text/event-stream"
        )
    parts: list[str] = []
    final: SequenceDelta | None = None
    async for delta in driver.generate(gen):
        parts.append(delta.text)
        final = delta
    if final is None:
        raise APIError(500, "the engine produced no output", type="server_error")
    usage = _usage(gen, final.usage)
    reason = final.finish_reason or "stop"
    if tool:
        arguments = orjson.dumps({"text": "".join(parts)}).decode()
        return JSONBody(chat_response(rid, body.model, created, arguments, reason, usage, tool))
    build = chat_response if chat else text_response
    return JSONBody(build(rid, body.model, created, "".join(parts), reason, usage))


def _called(body: ChatCompletionRequest) -> str:
    """With tools (and a choice other than ``none``) the sim answers with a call: to the named
    function, else the first, its generated text as the arguments ``{"text": ...}`` (a stand-in
    for an upstream that calls tools, streamed in pieces as vLLM's are)."""
    tools, choice = body.tools, body.tool_choice
    if not tools or choice == "none" or not isinstance(tools, list):
        return ""
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"].get("name") or "")
    first = tools[0].get("function") if isinstance(tools[0], dict) else None
    return str(first.get("name") or "") if isinstance(first, dict) else ""


def _metrics_text(driver: SimDriver, model: str) -> str:
    running = driver.engine.running()
    label = f'{{model_name="{model}"}}'
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{label} {running}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{label} {driver.waiting}",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{label} {running / driver.engine.info.capacity}",
        "# HELP breakwater_sim_peak_requests_waiting Most requests ever waiting at once.",
        "# TYPE breakwater_sim_peak_requests_waiting gauge",
        f"breakwater_sim_peak_requests_waiting {driver.peak_waiting}",
        "# HELP breakwater_sim_whole_scrapes Requests for the whole metrics page, before this one.",
        "# TYPE breakwater_sim_whole_scrapes gauge",
        f"breakwater_sim_whole_scrapes {driver.scrapes['whole']}",
        "# HELP breakwater_sim_named_scrapes Requests for metrics by name, before this one.",
        "# TYPE breakwater_sim_named_scrapes gauge",
        f"breakwater_sim_named_scrapes {driver.scrapes['named']}",
    ]
    return "\n".join(lines) + "\n"


def _only(lines: list[str], names: set[str]) -> list[str]:
    """A page's lines about ``names``: their samples and their ``# TYPE``/``# HELP`` lines."""
    out = []
    for line in lines:
        words = line.split(maxsplit=3)
        name = words[2] if line.startswith("#") and len(words) > 2 else line.split("{")[0].split(" ")[0]
        if name in names:
            out.append(line)
    return out


async def _stream(
    driver: SimDriver,
    gen: GenerationRequest,
    body: ChatCompletionRequest | CompletionRequest,
    rid: str,
    created: int,
    chat: bool,
    tool: str = "",
) -> AsyncIterator[bytes]:
    if tool:
        async for chunk in _stream_call(driver, gen, body, rid, created, tool):
            yield chunk
        return
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
                yield sse_event(usage_chunk(rid, body.model, created, chat, _usage(gen, delta.usage)))
    yield DONE


async def _stream_call(
    driver: SimDriver,
    gen: GenerationRequest,
    body: ChatCompletionRequest | CompletionRequest,
    rid: str,
    created: int,
    tool: str,
) -> AsyncIterator[bytes]:
    """The answer as a call whose arguments arrive in pieces: ``{"text": "`` + each token escaped."""
    yield sse_event(chat_chunk(rid, body.model, created, tool_call_delta(rid, tool, '{"text": "', True)))
    async for delta in driver.generate(gen):
        if delta.text:
            piece = orjson.dumps(delta.text).decode()[1:-1]
            yield sse_event(chat_chunk(rid, body.model, created, tool_call_delta(rid, tool, piece, False)))
        if delta.finished:
            end = tool_call_delta(rid, tool, '"}', False)
            yield sse_event(chat_chunk(rid, body.model, created, end))
            reason = "tool_calls" if delta.finish_reason == "stop" else delta.finish_reason
            yield sse_event(chat_chunk(rid, body.model, created, {}, reason))
            if body.include_usage():
                yield sse_event(usage_chunk(rid, body.model, created, True, _usage(gen, delta.usage)))
    yield DONE
