"""The ``openai`` engine: forward jobs to an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp).

The upstream does the batching; this engine keeps up to ``capacity`` requests in flight, one
streaming HTTP request each, and turns their chunks into :class:`SequenceDelta`s. When the upstream
exposes vLLM-style Prometheus metrics, the worker pulls only while the upstream has room (nothing
waiting inside it, KV cache below the high-water mark), so the backlog waits in Redis where it can
be reclaimed, moved and measured. A connection failure or 5xx mid-stream is retried, continuing from
the text already emitted; a 4xx is the request's own fault and ends it with a client error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from breakwater.engines.base import (
    EMBEDDINGS,
    LOGIT_BIAS,
    LOGPROBS,
    PENALTIES,
    RESPONSE_FORMAT,
    EngineInfo,
    GenerationRequest,
    SequenceDelta,
)
from breakwater.engines.options import UpstreamOptions
from breakwater.engines.streams import Flight, StreamingEngine
from breakwater.engines.upstream_chunks import ToolCallWriter, take_choice, upstream_message
from breakwater.engines.upstream_errors import (
    OVERLOADED,
    Attempts,
    UpstreamError,
    error_code,
    error_message,
    upstream_chunk,
)
from breakwater.engines.upstream_http import OnLines, UpstreamUnreachable
from breakwater.engines.upstream_load import UpstreamLoad, metrics_urls, parse_load
from breakwater.engines.upstream_pool import StreamClient
from breakwater.protocol.embeddings import pack
from breakwater.protocol.toolformats import PASS_THROUGH
from breakwater.stopping import stop_loop

log = logging.getLogger(__name__)


class OpenAIUpstreamEngine(StreamingEngine):
    # Passed through to the upstream.
    features = frozenset({RESPONSE_FORMAT, LOGPROBS, EMBEDDINGS, PENALTIES, LOGIT_BIAS})
    tool_format = PASS_THROUGH  # tools too: the upstream's calls come back as Hermes blocks
    watched_steps = False  # a silent upstream is ended by ``read_timeout_s`` (then retried)

    def __init__(self, options: UpstreamOptions) -> None:
        self.base_url = options.url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.upstream_model = options.upstream_model
        self.capacity = options.capacity
        self.requested_ctx = options.context_length
        self.api_key = options.api_key
        # None: try {server}/metrics and use it if it has vLLM's metrics; "off": never.
        self.metrics_url = options.metrics_url
        self.max_waiting = options.max_waiting
        self.kv_high = options.kv_high
        self.pull_burst = options.pull_burst
        self.scrape_s = options.scrape_s
        self.retries = options.retries
        self.wait_ready_s = options.wait_s
        # A stalled upstream (half-open socket, hung server) fails the read instead of hanging it.
        self.read_timeout_s = options.read_timeout_s
        self.info = EngineInfo(
            model=options.model or options.upstream_model or "upstream",
            engine="openai",
            context_length=options.context_length or 0,
            capacity=options.capacity,
        )
        super().__init__(options.window_share)
        self.load: UpstreamLoad | None = None
        self._sent_since_scrape = 0
        self._session: aiohttp.ClientSession | None = None
        self._client: StreamClient | None = None
        self._scraper: asyncio.Task[None] | None = None
        self._down: asyncio.Task[None] | None = None  # while the upstream cannot be reached: its probe
        self._redirects = True  # followed when scraping, except for the named page

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        # The answers' streams go through a lean client of our own (upstream_http: per token about
        # half of aiohttp's streaming read); the rest (models, metrics, embeddings) through aiohttp.
        self._client = StreamClient(
            self.base_url,
            headers,
            connect_timeout_s=10.0,
            read_timeout_s=self.read_timeout_s,
            max_idle=self.capacity + 4,
        )
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=self.read_timeout_s),
            connector=aiohttp.TCPConnector(limit=self.capacity + 4),
        )
        models = await self._wait_ready()
        chosen = self._choose_model(models)
        self.upstream_model = str(chosen["id"])
        ctx = self.requested_ctx or int(chosen.get("max_model_len") or 0)
        self.info = EngineInfo(
            model=self.info.model if self.info.model != "upstream" else self.upstream_model,
            engine="openai",
            context_length=ctx,
            capacity=self.capacity,
        )
        if self.metrics_url != "off":
            # A URL given is scraped even when it does not answer yet; else the first that has them.
            # The named page is not redirected to (a server that sends /metrics/ on to /metrics would
            # cost two requests a scrape, and /metrics is tried next anyway).
            url = self.metrics_url
            if url and not await self._scrape(url):
                log.warning("upstream metrics not answering yet", extra={"fields": {"metrics_url": url}})
            named, whole = metrics_urls(self.base_url.removesuffix("/v1"))
            if not url and await self._scrape(named, redirects=False):
                url, self._redirects = named, False
            elif not url and await self._scrape(whole):
                url = whole
            if url:
                self.metrics_url = url
                self._scraper = asyncio.create_task(self._scrape_loop(url), name="upstream-metrics")
                log.info("pulling by the upstream's load", extra={"fields": {"metrics_url": url}})
            else:
                log.info("upstream has no vLLM metrics; pulling by in-flight count only")

    async def close(self) -> None:
        await super().close()
        if self._scraper is not None:
            await stop_loop(self._scraper)
        if self._down is not None:
            await stop_loop(self._down)
        if self._client is not None:
            self._client.close()
        if self._session is not None:
            await self._session.close()

    async def _wait_ready(self) -> list[dict[str, Any]]:
        """The upstream's model list, waiting for it to come up (a sidecar loads its model first)."""
        deadline = time.monotonic() + self.wait_ready_s
        last = "no answer"
        while True:
            try:
                async with self._http().get(f"{self.base_url}/models", timeout=_within(10.0)) as response:
                    if response.status == 200:
                        data = orjson.loads(await response.read()).get("data") or []
                        if data:
                            return list(data)
                        last = "no models listed"
                    else:
                        last = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"upstream {self.base_url} not ready after {self.wait_ready_s}s: {last}")
            await asyncio.sleep(1.0)

    def _choose_model(self, models: list[dict[str, Any]]) -> dict[str, Any]:
        if self.upstream_model is None:
            return models[0]
        for entry in models:
            if entry.get("id") == self.upstream_model:
                return entry
        ids = ", ".join(str(m.get("id")) for m in models)
        raise RuntimeError(f"upstream serves {ids}, not {self.upstream_model!r}")

    def _streams(self) -> StreamClient:
        if self._client is None:
            raise RuntimeError("engine not started")
        return self._client

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("engine not started")
        return self._session

    # -- load from the upstream's metrics ----------------------------------------------------------
    async def _scrape(self, url: str, *, redirects: bool = True) -> bool:
        try:
            async with self._http().get(url, timeout=_within(5.0), allow_redirects=redirects) as response:
                if response.status != 200:
                    return False
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return False
        load = parse_load(text)
        if load is None:
            return False
        self.load = load
        self._sent_since_scrape = 0
        return True

    async def _scrape_loop(self, url: str) -> None:
        while True:
            await asyncio.sleep(self.scrape_s)
            if not await self._scrape(url, redirects=self._redirects) and self.load is not None:
                self.load = None  # stale numbers are worse than none: fall back to the in-flight cap
                log.warning("upstream metrics unavailable", extra={"fields": {"url": url}})

    # -- the engine interface --------------------------------------------------------------------
    def fingerprint(self) -> str:
        return f"upstream:{self.base_url}:{self.upstream_model}"

    def available(self) -> bool:
        return self._down is None

    def free_slots(self) -> int:
        if self._down is not None:  # its jobs would only wait here: they wait in the queue, for others
            return 0
        room = self.capacity - len(self._flights)
        load = self.load
        if load is None or room <= 0:
            return max(0, room)
        if load.waiting > self.max_waiting:
            return 0
        if load.kv_cache_usage is not None and load.kv_cache_usage >= self.kv_high:
            return 0
        # Jobs sent since the last scrape are not in its numbers yet: send a bounded burst per scrape.
        return max(0, min(room, self.pull_burst - self._sent_since_scrape))

    def add(self, request: GenerationRequest) -> None:
        super().add(request)
        self._sent_since_scrape += 1

    def stats(self) -> dict[str, Any]:
        load = self.load
        if load is None:
            return {}
        return {
            "kv_cache_usage": load.kv_cache_usage,
            "upstream_waiting": load.waiting,
            "upstream_running": load.running,
        }

    def _found_down(self) -> None:
        """A try could not reach the upstream: take no more jobs until a probe of it answers."""
        if self._down is None:
            self._down = asyncio.create_task(self._until_up(), name="upstream-down")

    async def _until_up(self) -> None:
        try:
            while True:
                with contextlib.suppress(RuntimeError):  # not up within wait_ready_s: probe on
                    await self._wait_ready()
                    return
                await asyncio.sleep(1.0)
        finally:
            self._down = None

    # -- one request -------------------------------------------------------------------------------
    async def _generate(self, flight: Flight) -> None:
        rid = flight.request.request_id
        attempts = Attempts(self.retries, self.wait_ready_s)
        while True:
            start_tokens = flight.tokens
            away = False  # down, or overloaded: waited for
            try:
                if flight.request.embed_inputs is not None:
                    await self._embed(flight)
                else:
                    await self._stream(flight, start_tokens)
                return
            except asyncio.CancelledError:
                raise
            except UpstreamError as exc:
                if not exc.retryable:  # the client's 400, unless the upstream refused Breakwater itself
                    code = None if exc.operators else error_code(str(exc))
                    self._emit(SequenceDelta(rid, error=str(exc), error_code=code))
                    return
                away, failure = exc.status in OVERLOADED, str(exc)
            except (aiohttp.ClientError, OSError, ValueError) as exc:  # OSError: refused, reset, timeout
                away = isinstance(exc, UpstreamUnreachable | aiohttp.ClientConnectorError)  # (embeddings)
                if away:
                    self._found_down()
                failure = f"{type(exc).__name__}: {exc}"
            if attempts.give_up(away):
                self._emit(SequenceDelta(rid, error=f"upstream failed: {failure}"))
                return
            if (flight.request.output_format is not None or flight.request.tools is not None) and flight.text:
                # The upstream cannot resume a constrained answer mid-way; never send unconstrained text.
                message = (
                    f"upstream failed after structured output had started ({failure}); retry the request"
                )
                self._emit(SequenceDelta(rid, error=message, error_code="continuation_unsupported"))
                return
            if attempts.first_wait():
                log.warning(
                    "upstream away (down or overloaded); waiting for it",
                    extra={"rid": rid, "fields": {"error": failure}},
                )
            elif not away:
                log.warning(
                    "upstream request failed; continuing from the emitted text",
                    extra={"rid": rid, "fields": {"error": failure, "emitted_tokens": flight.tokens}},
                )
            await asyncio.sleep(attempts.delay_s())

    def _body(self, flight: Flight) -> tuple[str, dict[str, Any]]:
        req = flight.request
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
        }
        if req.max_tokens is not None:
            body["max_tokens"] = max(1, req.max_tokens - flight.tokens)
        elif req.messages is None:  # no bound: said so, or the upstream's legacy default is 16 tokens
            body["max_tokens"] = None
        body.update(_sampling(req))
        if req.output_format is not None:
            body["response_format"] = req.output_format.openai()
        if req.logprobs is not None:
            chat_logprobs = {"logprobs": True, "top_logprobs": req.logprobs}
            body.update(chat_logprobs if req.messages is not None else {"logprobs": req.logprobs})
        if req.messages is None:
            body["prompt"] = (req.prompt or "") + flight.text
            return "/completions", body
        body["messages"] = [upstream_message(m) for m in req.messages]
        if req.tools is not None:
            body.update(req.tools)
        if flight.text:
            # Continue the partial answer instead of starting a new turn (vLLM's chat extension).
            body["messages"].append({"role": "assistant", "content": flight.text})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return "/chat/completions", body

    async def _embed(self, flight: Flight) -> None:
        """An embedding request: the upstream's ``/embeddings``, its vectors packed into one event
        (protocol.embeddings); an upstream that cannot embed answers 400, which reaches the client."""
        req = flight.request
        body = {"model": self.upstream_model, "input": req.embed_inputs, "encoding_format": "float"}
        async with self._http().post(self.base_url + "/embeddings", data=orjson.dumps(body)) as response:
            raw = await response.read()
            if response.status != 200:
                raise UpstreamError(error_message(raw, response.status), status=response.status)
        answer = orjson.loads(raw)
        vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
        if len(vectors) != len(req.embed_inputs or ()):
            raise UpstreamError("the upstream returned a different number of embeddings", status=502)
        usage = {
            "prompt_tokens": int((answer.get("usage") or {}).get("prompt_tokens") or 0),
            "completion_tokens": 0,
        }
        self._emit(SequenceDelta(req.request_id, text=pack(vectors), finish_reason="stop", usage=usage))

    async def _stream(self, flight: Flight, start_tokens: int) -> None:
        rid = flight.request.request_id
        path, body = self._body(flight)
        chat = path == "/chat/completions"
        finish: str | None = None
        usage: dict[str, Any] | None = None
        calls = ToolCallWriter() if flight.request.tools is not None else None
        want_logprobs = flight.request.logprobs is not None

        def read(lines: list[bytes]) -> bool:
            """The lines one network read completed: one delta for all of their text."""
            nonlocal finish, usage
            parts: list[str] = []
            logprobs: list[dict[str, Any]] | None = [] if want_logprobs else None
            texted = 0  # the logprobs entries up to the last text (the rest have none: held)
            done = False
            try:
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = upstream_chunk(data)
                    if chunk is None:
                        continue
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        wrote = len(parts)
                        finish = take_choice(choice, chat, parts, logprobs, calls) or finish
                        if logprobs is not None and len(parts) > wrote:
                            texted = len(logprobs)
            finally:  # a bad line later in the read: what came before it is emitted (it was received)
                if self._flights.get(rid) is flight:  # not once cancelled (its task not yet run)
                    self._emit_read(flight, parts, calls, logprobs, texted)
            return done

        status, raw = await self._post(rid, path, body, read, lambda: finish is not None)
        if status != 200:
            raise UpstreamError(error_message(raw, status), status=status)
        if finish is None:
            raise UpstreamError("the upstream stream ended without a finish_reason")
        self._emit(self._final(flight, start_tokens, finish, usage))

    async def _post(
        self, rid: str, path: str, body: dict[str, Any], read: OnLines, finished: Callable[[], bool]
    ) -> tuple[int, bytes]:
        """The upstream's answer to ``body``, its stream's lines handed to ``read``. A stream lost
        after its finish (before the usage chunk or ``[DONE]``) is whole: a retry would ask the model
        to write on past its end."""
        try:
            return await self._streams().post(path, orjson.dumps(body), read)
        except (aiohttp.ClientError, OSError, ValueError):
            if not finished():
                raise
            log.warning("upstream stream lost after its finish", extra={"rid": rid})
            return 200, b""

    def _emit_read(
        self,
        flight: Flight,
        parts: list[str],
        calls: ToolCallWriter | None,
        logprobs: list[dict[str, Any]] | None,
        texted: int,
    ) -> None:
        """One read's text as one delta, with the logprobs entries of its tokens (the first
        ``texted``); the entries after its last text, of tokens without text (an end-of-sequence
        token), as a delta of their own: held for the text after them, if any comes."""
        rid = flight.request.request_id
        if parts:
            text = "".join(parts)
            tokens = len(parts) - (calls.tags() if calls is not None else 0)
            flight.add_text(text)
            flight.tokens += tokens
            lps = logprobs[:texted] or None if logprobs is not None else None
            self._emit(SequenceDelta(rid, text=text, tokens=tokens, logprobs=lps))
        if logprobs and len(logprobs) > texted:
            self._emit(SequenceDelta(rid, logprobs=logprobs[texted:]))

    @staticmethod
    def _final(flight: Flight, start_tokens: int, finish: str, usage: dict[str, Any] | None) -> SequenceDelta:
        """The last delta: exact counts from the upstream's usage when it sends them."""
        rid = flight.request.request_id
        if not usage:
            return SequenceDelta(
                rid,
                finish_reason=finish,
                usage={"prompt_tokens": 0, "completion_tokens": flight.tokens},
            )
        exact = start_tokens + int(usage.get("completion_tokens") or 0)
        correction = max(0, exact - flight.tokens)
        # The upstream's count is the truth when it gives one: its chunks are not always one token
        # each (a tool call's first chunk, a closing piece), so counting chunks says more or less.
        total = exact if usage.get("completion_tokens") else max(exact, flight.tokens)
        # A continuation's prompt held the text emitted before it: that part is completion, not prompt.
        prompt = max(0, int(usage.get("prompt_tokens") or 0) - start_tokens)
        flight.tokens = total
        return SequenceDelta(
            rid,
            tokens=correction,
            finish_reason=finish,
            usage={"prompt_tokens": prompt, "completion_tokens": total},
        )


def _within(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def _sampling(req: GenerationRequest) -> dict[str, Any]:
    """The request's sampling parameters besides temperature, top_p and seed, as the upstream takes
    them; those at their defaults left out."""
    out: dict[str, Any] = {}
    if req.stop:
        out["stop"] = req.stop
    if req.top_k > 0:
        out["top_k"] = req.top_k  # vLLM, SGLang and llama.cpp accept these sampling extensions
    if req.ignore_eos:
        out["ignore_eos"] = True
    if req.presence_penalty:
        out["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty:
        out["frequency_penalty"] = req.frequency_penalty
    if req.logit_bias:
        out["logit_bias"] = {str(token): bias for token, bias in req.logit_bias.items()}
    return out
