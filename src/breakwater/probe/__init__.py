"""``breakwater probe``: black-box QoS probes through the public endpoint (the seed's "black-box probes
for WebSocket QoS"). Every ``interval`` seconds one WebSocket and one SSE session run side by side;
their outcomes, connect time, TTFT, inter-token and resume gaps are Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from breakwater.probe.metrics import ProbeMetrics
from breakwater.probe.session import Result
from breakwater.probe.sse import sse_session
from breakwater.probe.ws import websocket_session

log = logging.getLogger("breakwater.probe")
TRANSPORTS = ("websocket", "sse")


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    urls: Sequence[str]  # the public endpoint; more than one: where to go when one fails
    model: str
    api_key: str | None = None
    transports: Sequence[str] = TRANSPORTS
    max_tokens: int = 16
    drop_after: int = 8  # drop and resume after this many tokens (0: never)
    ignore_eos: bool = True  # so each session has max_tokens tokens and its drop happens
    timeout_s: float = 30.0
    prompt: str = "Breakwater probe: say anything."

    def body(self, stream: bool) -> dict[str, object]:
        body: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
        return body


async def probe_once(config: ProbeConfig, client: httpx.AsyncClient) -> list[Result]:
    """One session per transport, concurrently."""
    sessions = []
    for transport in config.transports:
        if transport == "websocket":
            sessions.append(
                websocket_session(
                    config.urls,
                    config.body(stream=False),
                    api_key=config.api_key,
                    drop_after=config.drop_after,
                    timeout_s=config.timeout_s,
                )
            )
        else:
            sessions.append(
                sse_session(
                    client,
                    config.urls,
                    config.body(stream=True),
                    drop_after=config.drop_after,
                    timeout_s=config.timeout_s,
                )
            )
    return list(await asyncio.gather(*sessions))


async def run(
    config: ProbeConfig,
    metrics: ProbeMetrics,
    *,
    interval_s: float,
    count: int | None = None,
    report: Callable[[Result], None] | None = None,
) -> None:
    """Probe every ``interval_s`` (``count`` rounds, or until cancelled)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(config.timeout_s, connect=10.0)
    async with httpx.AsyncClient(headers=headers, timeout=timeout) as client:
        done = 0
        while count is None or done < count:
            began = time.monotonic()
            for result in await probe_once(config, client):
                metrics.record(result)
                if report is not None:
                    report(result)
            done += 1
            if count is None or done < count:
                await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - began)))


__all__ = ["TRANSPORTS", "ProbeConfig", "ProbeMetrics", "Result", "probe_once", "run"]
