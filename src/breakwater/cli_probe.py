"""``breakwater probe``: black-box WebSocket and SSE sessions through the public endpoint, as metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer


def probe(
    url: Annotated[
        list[str], typer.Option(help="the public endpoint (repeat: where to resume when one fails)")
    ],
    model: Annotated[str, typer.Option(help="model to ask")],
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between sessions")] = 10.0,
    count: Annotated[int | None, typer.Option(min=1, help="stop after N rounds (default: run on)")] = None,
    transport: Annotated[
        list[str] | None, typer.Option(help="websocket | sse (repeatable; default both)")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=2, help="tokens per session")] = 16,
    drop_after: Annotated[
        int, typer.Option(min=0, help="drop the stream and resume after this many tokens (0: never)")
    ] = 8,
    ignore_eos: Annotated[bool, typer.Option(help="send ignore_eos so every session runs max_tokens")] = True,
    timeout: Annotated[float, typer.Option(min=1.0, help="seconds a session may take")] = 30.0,
    api_key_file: Annotated[
        Path | None, typer.Option(help="file holding the bearer key (a Kubernetes Secret volume)")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="BREAKWATER_PROBE_API_KEY", help="bearer key (prefer --api-key-file)")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="/metrics listener address")] = "127.0.0.1",
    metrics_port: Annotated[
        int, typer.Option(min=0, max=65535, help="/metrics port (0: no listener)")
    ] = 9400,
) -> None:
    """Probe a deployment's QoS from outside: every INTERVAL s a WebSocket and an SSE session each send
    a tiny request, drop the stream once and resume it, and check every token arrives exactly once.
    Exports breakwater_probe_* on /metrics and prints one JSON line per session."""
    from prometheus_client import start_http_server

    from breakwater.probe import TRANSPORTS, ProbeConfig, ProbeMetrics, Result, run

    transports = transport or list(TRANSPORTS)
    unknown = sorted(set(transports) - set(TRANSPORTS))
    if unknown:
        raise typer.BadParameter(f"unknown transport {', '.join(unknown)}", param_hint="--transport")
    if drop_after >= max_tokens:
        raise typer.BadParameter(
            "must be under --max-tokens (the drop is mid-stream)", param_hint="--drop-after"
        )
    key = api_key
    if api_key_file is not None:
        if api_key_file.exists():
            key = api_key_file.read_text().strip()
        else:  # an optional Secret not created: fine while the gateways have auth off
            print(f"no key file at {api_key_file}: probing without a key", file=sys.stderr)
    config = ProbeConfig(
        urls=url,
        model=model,
        api_key=key or None,
        transports=transports,
        max_tokens=max_tokens,
        drop_after=drop_after,
        ignore_eos=ignore_eos,
        timeout_s=timeout,
    )
    metrics = ProbeMetrics()
    if metrics_port:
        try:
            start_http_server(metrics_port, addr=metrics_host, registry=metrics.registry)
        except OSError as exc:  # taken, or an address not of this machine
            said = f"cannot listen on {metrics_host}:{metrics_port}: {exc.strerror or exc}"
            raise typer.BadParameter(said, param_hint="--metrics-port") from None
    failed = 0

    def report(result: Result) -> None:
        nonlocal failed
        failed += result.outcome == "failed"
        line = {
            "transport": result.transport,
            "outcome": result.outcome,
            "errors": result.errors,
            "tokens": result.tokens,
            "connect_ms": _ms(result.connect_s),
            "ttft_ms": _ms(result.ttft_s),
            "max_gap_ms": _ms(max(result.gaps_s, default=None)),
            "resume_gap_ms": [_ms(g) for g in result.resume_gaps_s],
            "detail": result.detail,
        }
        print(json.dumps(line), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(config, metrics, interval_s=interval, count=count, report=report))
    if count is not None and failed:
        print(f"{failed} session(s) failed", file=sys.stderr)
        raise typer.Exit(1)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
