"""Send a schedule of requests to any OpenAI-compatible server and record every chunk's time.

Open loop: one scheduler task sleeps until each arrival time and starts the request in its own task,
so a slow server never slows the arrivals (``lag`` = how late a request left, reported). Closed
loop (``concurrency``): N senders, each sending its next request when the previous one ends. While
running, the target's ``/metrics`` is scraped once a second into a time series.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from breakwater.bench.discovery import snippet
from breakwater.bench.metrics import RequestRecord
from breakwater.bench.profiles import Arrival
from breakwater.bench.ws import WSPool
from breakwater.engines.sim import VOCAB  # plain words, mostly one token each
from breakwater.protocol.sse_lines import sse_lines

# Gauges (summed over labels) and counters (as per-second rates) kept from the target's /metrics.
SCRAPED_GAUGES = (
    "breakwater_queue_depth",
    "breakwater_workers",
    "breakwater_jobs_in_flight",
    "breakwater_active_streams",
    "breakwater_batch_occupancy",
    "breakwater_kv_cache_usage",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
)
SCRAPED_COUNTERS = ("process_cpu_seconds", "breakwater_tokens")


def synth_prompt(tokens: int, index: int) -> str:
    """About ``tokens`` tokens of plain words (one token each for common tokenizers); the server's
    usage reports the exact count."""
    return " ".join(VOCAB[(index + k) % len(VOCAB)] for k in range(max(1, tokens)))


@dataclass(slots=True)
class Target:
    url: str  # server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str
    endpoint: str = "chat"  # chat | completions
    stream: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    metrics_url: str | None = None  # default: {url}/metrics; "off" to skip

    ws_connections: int = 8  # ws:// targets: requests share this many sockets

    @property
    def websocket(self) -> bool:
        return self.url.startswith(("ws://", "wss://"))

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1").removesuffix("/v1/ws")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError("endpoint must be chat or completions")

    def body(self, arrival: Arrival, index: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": arrival.output_tokens,
            "stream": self.stream,
        }
        if arrival.prompt_id >= 0:  # repeats: requests with one id are identical, others never
            prompt = f"q{arrival.prompt_id}: " + synth_prompt(arrival.input_tokens, arrival.prompt_id)
            body["temperature"] = 0
        else:
            prompt = synth_prompt(arrival.input_tokens, index)
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            return f"{self.url}/v1/chat/completions", body
        body["prompt"] = prompt
        return f"{self.url}/v1/completions", body


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    timeseries: list[dict[str, float]]
    started_at: float  # unix time


class Runner:
    def __init__(self, target: Target, *, max_connections: int = 10_000) -> None:
        self.target = target
        self.ws: WSPool | None = WSPool(target.url, target.ws_connections) if target.websocket else None
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(target.timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def start(self) -> None:
        if self.ws is not None:
            await self.ws.start()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.client.aclose()

    async def open_loop(self, arrivals: list[Arrival]) -> RunResult:
        loop = asyncio.get_running_loop()
        records = [
            RequestRecord(i, a.t, input_tokens_planned=a.input_tokens, output_tokens_planned=a.output_tokens)
            for i, a in enumerate(arrivals)
        ]
        started_at = time.time()
        t0 = loop.time()
        scraper = self._start_scraper(t0)
        tasks: list[asyncio.Task[None]] = []
        try:
            for record, arrival in zip(records, arrivals, strict=True):
                await _until(loop, t0 + arrival.t)
                tasks.append(asyncio.create_task(self._one(record, arrival, t0)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            timeseries = await self._stop_scraper(scraper)
        return RunResult(records, _duration(records), timeseries, started_at)

    async def closed_loop(
        self,
        arrivals: Iterator[Arrival],
        *,
        concurrency: int,
        num_requests: int | None,
        duration_s: float | None,
    ) -> RunResult:
        loop = asyncio.get_running_loop()
        records: list[RequestRecord] = []
        started_at = time.time()
        t0 = loop.time()
        deadline = t0 + duration_s if duration_s else math.inf
        scraper = self._start_scraper(t0)

        async def sender() -> None:
            while loop.time() < deadline and (num_requests is None or len(records) < num_requests):
                arrival = next(arrivals)
                record = RequestRecord(
                    len(records),
                    loop.time() - t0,
                    input_tokens_planned=arrival.input_tokens,
                    output_tokens_planned=arrival.output_tokens,
                )
                records.append(record)
                await self._one(record, arrival, t0)

        try:
            await asyncio.gather(*(sender() for _ in range(concurrency)))
        finally:
            timeseries = await self._stop_scraper(scraper)
        return RunResult(records, _duration(records), timeseries, started_at)

    # -- one request -------------------------------------------------------------------------------
    async def _one(self, record: RequestRecord, arrival: Arrival, t0: float) -> None:
        loop = asyncio.get_running_loop()
        url, body = self.target.body(arrival, record.index)
        sent = loop.time()
        record.start_s = sent - t0
        try:
            if self.ws is not None:
                async with asyncio.timeout(self.target.timeout_s):
                    await self._websocket(record, body, sent)
            elif self.target.stream:
                await self._stream(record, url, body, sent)
            else:
                await self._plain(record, url, body, sent)
        except (httpx.TimeoutException, TimeoutError) as exc:
            record.error, record.error_detail = "timeout", _describe(exc)
        except httpx.ConnectError as exc:
            record.error, record.error_detail = "connect", _describe(exc)
        except (httpx.HTTPError, orjson.JSONDecodeError, KeyError, IndexError) as exc:
            record.error, record.error_detail = "broken_stream", _describe(exc)
        if record.error is None and record.e2e_s is None:
            record.e2e_s = loop.time() - sent

    async def _stream(self, record: RequestRecord, url: str, body: dict[str, Any], sent: float) -> None:
        loop = asyncio.get_running_loop()
        last_id = 0
        done = False

        async def trace(event: str, _info: dict[str, Any]) -> None:
            if record.headers_s is None and event.endswith(".send_request_headers.started"):
                record.headers_s = loop.time() - sent

        async with self.client.stream(
            "POST", url, content=orjson.dumps(body), headers=_JSON, extensions={"trace": trace}
        ) as resp:
            record.status = resp.status_code
            record.request_id = resp.headers.get("x-breakwater-request-id", "")
            record.cache = resp.headers.get("x-breakwater-cache", "")
            record.model = resp.headers.get("x-breakwater-model", "")
            if resp.status_code != 200:
                await resp.aread()
                _http_error(record, resp)
                return
            async for line in sse_lines(resp):
                if line.startswith("id:"):
                    # Breakwater numbers events 1..N; one event may span chunks (done + usage share an id)
                    seq = int(line[3:].strip())
                    record.integrity_errors += seq not in (last_id, last_id + 1)
                    last_id = seq
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    if not _take_chunk(record, orjson.loads(data), loop.time() - sent):
                        return
        record.e2e_s = loop.time() - sent
        if not done:
            record.error = "broken_stream"
        if not record.output_tokens:
            record.output_tokens = len(record.chunk_s)

    async def _websocket(self, record: RequestRecord, body: dict[str, Any], sent: float) -> None:
        assert self.ws is not None
        loop = asyncio.get_running_loop()
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        queue = await self.ws.submit(body)
        last_id = 0
        while True:
            msg = await queue.get()
            kind = msg.get("type")
            if kind == "created":
                record.status, record.request_id = 200, str(msg["request_id"])
                record.cache = str(msg.get("cache", ""))
                record.model = str(msg.get("model", ""))
            elif kind == "token":
                seq = int(msg["seq"])
                record.integrity_errors += seq != last_id + 1
                last_id = seq
                now = loop.time() - sent
                if record.ttft_s is None:
                    record.ttft_s = now
                record.chunk_s.append(now)
            elif kind == "done":
                usage = msg.get("usage") or {}
                record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                record.output_tokens = int(usage.get("completion_tokens") or len(record.chunk_s))
                record.e2e_s = loop.time() - sent
                return
            elif kind == "error":
                record.status = int(msg.get("status") or 500)
                record.error = f"http_{record.status}" if msg.get("request_id") is None else "stream_error"
                record.error_detail = orjson.dumps(msg).decode()[:ERROR_DETAIL_CHARS]
                return
            else:
                record.error = "broken_stream"
                return

    async def _plain(self, record: RequestRecord, url: str, body: dict[str, Any], sent: float) -> None:
        loop = asyncio.get_running_loop()
        resp = await self.client.post(url, content=orjson.dumps(body), headers=_JSON)
        record.status = resp.status_code
        record.e2e_s = loop.time() - sent
        record.request_id = resp.headers.get("x-breakwater-request-id", "")
        record.cache = resp.headers.get("x-breakwater-cache", "")
        record.model = resp.headers.get("x-breakwater-model", "")
        if resp.status_code != 200:
            _http_error(record, resp)
            return
        data = resp.json()
        usage = data.get("usage") or {}
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        record.ttft_s = record.e2e_s  # without streaming the first token arrives with the last
        record.chunk_s = [record.e2e_s]

    # -- metrics scraping ----------------------------------------------------------------------------
    def _start_scraper(self, t0: float) -> asyncio.Task[list[dict[str, float]]] | None:
        if self.target.metrics_url == "off":
            return None
        root = self.target.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        return asyncio.create_task(self._scrape(t0, self.target.metrics_url or f"{root}/metrics"))

    async def _stop_scraper(
        self, task: asyncio.Task[list[dict[str, float]]] | None
    ) -> list[dict[str, float]]:
        if task is None:
            return []
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await task
        return []

    async def _scrape(self, t0: float, url: str) -> list[dict[str, float]]:
        loop = asyncio.get_running_loop()
        series: list[dict[str, float]] = []
        previous: dict[str, float] = {}
        prev_t = 0.0
        try:
            while True:
                t = loop.time() - t0
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    resp = await self.client.get(url, timeout=5.0)
                    if resp.status_code == 200:
                        row, counters = parse_metrics(resp.text)
                        row["t"] = round(t, 3)
                        for name, value in counters.items():
                            if name in previous and t > prev_t:
                                row[f"{name}_per_s"] = (value - previous[name]) / (t - prev_t)
                        previous, prev_t = counters, t
                        series.append(row)
                await asyncio.sleep(max(0.0, 1.0 - (loop.time() - t0 - t)))
        except asyncio.CancelledError:
            return series


async def _until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """Sleep until ``when`` (loop time) to well under a millisecond: timer sleep for all but the last
    2 ms (timers fire up to ~1 ms late), then yield to other tasks until the moment comes."""
    delay = when - loop.time()
    if delay > 0.002:
        await asyncio.sleep(delay - 0.002)
    while loop.time() < when:
        await asyncio.sleep(0)


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """Sums of the scraped gauges and counters in a Prometheus text page."""
    gauges: dict[str, float] = {}
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in SCRAPED_GAUGES:
            gauges[family.name] = sum(s.value for s in family.samples)
        elif family.name in SCRAPED_COUNTERS:
            counters[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return gauges, counters


_JSON = {"Content-Type": "application/json"}
ERROR_DETAIL_CHARS = 300


def _take_chunk(record: RequestRecord, chunk: dict[str, Any], now: float) -> bool:
    """Record one SSE chunk; False when it is an error event (the stream is over)."""
    if "error" in chunk:
        record.error = "stream_error"
        record.error_detail = orjson.dumps(chunk["error"]).decode()[:ERROR_DETAIL_CHARS]
        return False
    if chunk.get("usage"):
        record.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
        record.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
    if _chunk_text(chunk):
        if record.ttft_s is None:
            record.ttft_s = now
        record.chunk_s.append(now)
    return True


def _chunk_text(chunk: dict[str, Any]) -> str:
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        if text:
            return str(text)
    return ""


def _http_error(record: RequestRecord, resp: httpx.Response) -> None:
    """Classify a non-200 answer (its body must have been read)."""
    record.error = f"http_{resp.status_code}"
    record.error_detail = snippet(resp.text, ERROR_DETAIL_CHARS)
    retry = resp.headers.get("retry-after")
    if retry is not None:
        with contextlib.suppress(ValueError):
            record.retry_after = float(retry)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_DETAIL_CHARS] if str(exc) else type(exc).__name__


def _duration(records: list[RequestRecord]) -> float:
    if not records:
        return 0.0
    first = min(r.start_s for r in records)
    last = max(r.start_s + (r.e2e_s or 0.0) for r in records)
    return last - first
