"""The ``openai`` engine's view of its upstream's load: the metrics page read line by line (the
same sums as prometheus_client's parser), and asked for by name where the server can answer so
(vLLM's ``/metrics/``), the whole page only where it cannot (no redirect followed to it); a URL
given is used as given, redirects and all."""

from __future__ import annotations

import asyncio
import math
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from breakwater.engines.options import UpstreamOptions
from breakwater.engines.upstream import OpenAIUpstreamEngine
from breakwater.engines.upstream_load import NAMES, parse_load

# A page of the shapes a real one has: histograms and counters around the gauges, labels with
# spaces, braces, escaped quotes and commas in their values, two engines, a timestamp, and names
# that merely start like a wanted one.
PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a b"} 3.0
vllm:num_requests_running{engine="1",model_name="x}y"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="say \\"hi\\", {then} go"} 4.0 1700000000000
vllm:num_requests_waiting{engine="1",model_name="x}y"} 1.5
# HELP vllm:num_requests_waiting_by_reason Requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="a b"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="x}y"} 0.5
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="a b"} 0.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="a b"} 7.0
vllm:time_to_first_token_seconds_count{model_name="a b"} 7.0
vllm:time_to_first_token_seconds_sum{model_name="a b"} 0.7
"""


def reference(text: str) -> dict[str, float]:
    """prometheus_client's reading of the wanted samples, summed over label sets."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in NAMES:
                sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
    return sums


@pytest.mark.parametrize(
    ("page", "as_prometheus_client_reads_it", "sums", "load"),
    [
        pytest.param(
            PAGE,
            PAGE,
            {
                "vllm:num_requests_running": 5.0,
                "vllm:num_requests_waiting": 5.5,
                "vllm:kv_cache_usage_perc": 0.75,
            },
            (5.5, 5.0, 0.75),
            id="a-whole-page",
        ),
        pytest.param(
            "vllm:num_requests_waiting 2\r\nvllm:num_requests_running\t1\r\n"
            "vllm:gpu_cache_usage_perc 0.9\r\n",
            "vllm:num_requests_waiting 2\nvllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.9\n",
            {
                "vllm:num_requests_waiting": 2.0,
                "vllm:num_requests_running": 1.0,
                "vllm:gpu_cache_usage_perc": 0.9,
            },
            (2.0, 1.0, 0.9),
            id="unlabelled-crlf-and-the-older-kv-name",
        ),
    ],
)
def test_reads_what_prometheus_client_reads(
    page: str, as_prometheus_client_reads_it: str, sums: dict[str, float], load: tuple[float, float, float]
) -> None:
    assert reference(as_prometheus_client_reads_it) == sums
    read = parse_load(page)
    assert read is not None
    assert (read.waiting, read.running, read.kv_cache_usage) == load


def test_no_waiting_metric_is_no_load() -> None:
    assert parse_load("vllm:num_requests_running 3\nvllm:kv_cache_usage_perc 0.1\n") is None
    assert parse_load('vllm:num_requests_waiting_by_reason{reason="x"} 3\n') is None
    assert parse_load("") is None


def test_nan_and_infinities_are_summed_as_prometheus_client_reads_them() -> None:
    page = (
        'vllm:num_requests_waiting{a="1"} NaN\nvllm:num_requests_waiting{a="2"} 3\n'
        "vllm:num_requests_running +Inf\n"
    )
    assert math.isnan(reference(page)["vllm:num_requests_waiting"])
    load = parse_load(page)
    assert load is not None and math.isnan(load.waiting) and load.running == math.inf
    assert parse_load('vllm:num_requests_waiting{a="1"} oops\n') is None


def test_other_line_separators_inside_a_label_value() -> None:
    """Only "\\n" ends a line; the format leaves "\\x1c", "\\u2028" and the like unescaped in values."""
    page = 'vllm:num_requests_waiting{model_name="a\x1cb\u2028c\x0bd"} 7\nvllm:num_requests_running 1\n'
    assert reference(page)["vllm:num_requests_waiting"] == 7.0
    load = parse_load(page)
    assert load is not None and (load.waiting, load.running) == (7.0, 1.0)


MODELS = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 512}]})
GAUGES = b"vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0.0\n"


class MetricsServer:
    """``/v1/models``, and the pages given (path -> status, header lines, body), whatever the query;
    records every request's target."""

    def __init__(self, pages: dict[str, tuple[int, bytes, bytes]]) -> None:
        self.pages = pages
        self.requests: list[str] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode()
                self.requests.append(target)
                status, headers, body = (200, b"", MODELS) if target == "/v1/models" else self._page(target)
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n".encode())
                writer.write(headers + b"\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def _page(self, target: str) -> tuple[int, bytes, bytes]:
        return self.pages.get(target.partition("?")[0], (404, b"", b"not found"))

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def started(url: str, **options: Any) -> OpenAIUpstreamEngine:
    engine = OpenAIUpstreamEngine(UpstreamOptions(**{"url": url, "capacity": 4, "scrape_s": 30.0, **options}))
    await engine.start()
    return engine


async def test_asks_for_the_load_metrics_by_name() -> None:
    """vLLM's shape: ``/metrics/`` answers the names asked for, ``/metrics`` the whole page."""
    pages = {"/metrics/": (200, b"", GAUGES), "/metrics": (200, b"", GAUGES + b"# and 57 KB more\n")}
    server = MetricsServer(pages)
    async with server as url:
        engine = await started(url)
        try:
            assert engine.load is not None and engine.load.waiting == 0.0
            assert engine.metrics_url is not None and engine.metrics_url.startswith(f"{url}/metrics/?")
        finally:
            await engine.close()
    metrics = [r for r in server.requests if r.startswith("/metrics")]
    assert len(metrics) == 1
    path, _, query = metrics[0].partition("?")
    assert path == "/metrics/"
    pairs = [unquote(part).split("=", 1) for part in query.split("&")]
    assert {key for key, _ in pairs} == {"name[]"}
    assert sorted(value for _, value in pairs) == sorted(NAMES)


@pytest.mark.parametrize("slash", [(404, b""), (307, b"Location: /metrics\r\n")], ids=["404", "redirect"])
async def test_falls_back_to_the_whole_page(slash: tuple[int, bytes]) -> None:
    """A server without ``/metrics/`` (404, or a redirect to ``/metrics``, as FastAPI's routing
    sends) is scraped at ``/metrics``, once a scrape: the redirect is not followed."""
    pages = {"/metrics/": (slash[0], slash[1], b""), "/metrics": (200, b"", GAUGES)}
    server = MetricsServer(pages)
    async with server as url:
        engine = await started(url)
        try:
            assert engine.metrics_url == f"{url}/metrics"
            assert engine.load is not None
        finally:
            await engine.close()
    metrics = [r.partition("?")[0] for r in server.requests if r.startswith("/metrics")]
    assert metrics == ["/metrics/", "/metrics"]


async def test_no_metrics_pulls_by_the_in_flight_count() -> None:
    server = MetricsServer({})
    async with server as url:
        engine = await started(url)
        try:
            assert (engine.metrics_url, engine.load) == (None, None)
        finally:
            await engine.close()
    assert [r.partition("?")[0] for r in server.requests if r.startswith("/metrics")] == [
        "/metrics/",
        "/metrics",
    ]


async def test_a_given_url_is_used_as_given() -> None:
    server = MetricsServer({"/load": (200, b"", GAUGES)})
    async with server as url:
        engine = await started(url, metrics_url=f"{url}/load")
        try:
            assert engine.metrics_url == f"{url}/load" and engine.load is not None
        finally:
            await engine.close()
    assert [r for r in server.requests if r != "/v1/models"] == ["/load"]


async def test_a_given_url_that_answers_later_is_scraped_then() -> None:
    """An explicit URL is kept when its first scrape fails (a sidecar still loading), and read as
    soon as it answers."""
    server = MetricsServer({"/load": (503, b"", b"loading")})
    async with server as url:
        engine = await started(url, metrics_url=f"{url}/load", scrape_s=0.05)
        try:
            assert engine.metrics_url == f"{url}/load" and engine.load is None
            server.pages["/load"] = (200, b"", GAUGES.replace(b"waiting 0", b"waiting 3"))
            deadline = asyncio.get_running_loop().time() + 10
            while engine.load is None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            assert engine.load is not None and engine.load.waiting == 3.0
        finally:
            await engine.close()


async def test_a_given_url_that_redirects_is_followed() -> None:
    server = MetricsServer({"/old": (307, b"Location: /new\r\n", b""), "/new": (200, b"", GAUGES)})
    async with server as url:
        engine = await started(url, metrics_url=f"{url}/old")
        try:
            assert engine.load is not None
        finally:
            await engine.close()
    assert [r for r in server.requests if r != "/v1/models"] == ["/old", "/new"]


async def test_off_never_scrapes() -> None:
    server = MetricsServer({"/metrics/": (200, b"", GAUGES), "/metrics": (200, b"", GAUGES)})
    async with server as url:
        engine = await started(url, metrics_url="off")
        try:
            assert engine.load is None
        finally:
            await engine.close()
    assert server.requests == ["/v1/models"]
