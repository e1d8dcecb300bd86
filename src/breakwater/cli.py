"""``breakwater`` command line: thin; parses flags, builds settings, calls into the packages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
import uvicorn
from rich.console import Console
from rich.markup import escape

from breakwater.cli_capacity import plan_fleet, simulate
from breakwater.cli_errors import run_cli
from breakwater.cli_probe import probe
from breakwater.cli_rollout import alias_app
from breakwater.cli_tenants import keys_app, tenants_app, usage
from breakwater.cli_tools import bench, cache_app, dlq_app, models_app
from breakwater.config import GatewaySettings, WorkerSettings

if TYPE_CHECKING:
    from breakwater.stack import Stack

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Breakwater: LLM serving that never drops a burst."
)
console = Console(stderr=True)


def _given(**kwargs: Any) -> dict[str, Any]:
    """Flags the user set; the rest come from BREAKWATER_* environment variables or defaults."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _key_values(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` flags to a dict; values are JSON when they parse (numbers, booleans, objects)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _interrupt(_sig: int, _frame: Any) -> None:
    from breakwater.stack import hurry

    for sig in (signal.SIGINT, signal.SIGTERM):  # a second one hurries the stop, never cuts it midway
        signal.signal(sig, lambda _sig, _frame: hurry())
    raise KeyboardInterrupt


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, first tell the app to drain (the gateway ends its streams, after
    ``stream_grace_s``, so clients resume elsewhere), then let uvicorn stop accepting and wait for
    connections to close."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        from breakwater import processes

        processes.forward_stop()  # gateway --workers N: the others drain at the same time
        state = getattr(self.config.app, "state", None)
        service = getattr(state, "service", None)
        if service is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon_threadsafe(service.begin_drain)
        embedded = getattr(state, "embedded", None)
        if embedded is not None:  # stops pulling now; its in-flight jobs finish within the grace
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon_threadsafe(embedded.drain)
        super().handle_exit(sig, frame)


def _serve(asgi_app: Any, host: str, port: int, sock: Any = None, stream_grace_s: float = 0.0) -> None:
    from breakwater.gateway.httpguard import GuardedHttpTools
    from breakwater.gateway.uvicorn_ws import GatewayWebSocket
    from breakwater.gateway.ws import MAX_MESSAGE_BYTES

    config = uvicorn.Config(
        asgi_app,
        host=host,
        port=port,
        loop="uvloop",
        http=GuardedHttpTools,  # httptools with limits on request heads (size, time)
        ws=GatewayWebSocket,
        # A larger WebSocket message closes the socket with 1009 before it is buffered (the
        # default would read 16 MiB first); the gateway's own bound is the same 1 MiB.
        ws_max_size=MAX_MESSAGE_BYTES,
        log_config=None,
        access_log=False,
        # Open streams end at the gateway's stream grace (GatewaySettings.stream_grace_s); the
        # connections' own closing after that is what these 5 s are for.
        timeout_graceful_shutdown=math.ceil(stream_grace_s) + 5,
        # Longer than a load balancer's idle timeout (60 s on the common ones), as nginx's 75 s: a
        # server that closes an idle keep-alive connection first races the next request on it.
        timeout_keep_alive=75,
        backlog=4096,
    )
    server = _DrainingServer(config)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except SystemExit as exc:
        raise typer.Exit(int(exc.code or 1)) from None
    if not server.started:
        console.print(f"[red]could not listen on {escape(host)}:{port} (port taken?)[/red]")
        raise typer.Exit(1)


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL")] = None,
    lane_max_queued: Annotated[int | None, typer.Option(help="queued jobs per lane before 429")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="gateway processes on this port (SO_REUSEPORT), e.g. one per core")
    ] = 1,
    embed_engine: Annotated[
        str | None,
        typer.Option(help="openai | sim: a worker inside each gateway process (its settings: as a worker's)"),
    ] = None,
    upstream_url: Annotated[
        str | None, typer.Option(help="--embed-engine openai: upstream base URL (…/v1)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="--embed-engine: the model it serves")] = None,
    capacity: Annotated[int | None, typer.Option(help="--embed-engine: max concurrent sequences")] = None,
) -> None:
    """Run the OpenAI-compatible gateway (HTTP/SSE and WebSocket)."""
    from breakwater import processes
    from breakwater.gateway.app import build_app
    from breakwater.gateway.embedded import EMBEDDABLE
    from breakwater.logs import setup_logging
    from breakwater.settings_check import gateway_problem

    if embed_engine not in (None, "", *EMBEDDABLE):
        console.print(f"[red]--embed-engine {escape(embed_engine)}: one of {', '.join(EMBEDDABLE)}[/red]")
        raise typer.Exit(2)
    given = _given(
        host=host, port=port, redis_url=redis_url, lane_max_queued=lane_max_queued, embed_engine=embed_engine
    )
    # The embedded worker reads its settings from the environment (and so do sibling processes).
    os.environ.update(
        {
            f"BREAKWATER_{k.upper()}": str(v)
            for k, v in _given(upstream_url=upstream_url, model=model, capacity=capacity).items()
        }
    )
    settings = GatewaySettings(**given)
    setup_logging("gateway", settings.log_level, settings.log_json)
    if (problem := gateway_problem(settings)) is not None:  # here: in the app's startup, a traceback
        console.print(f"[red]{escape(problem)}[/red]")
        raise typer.Exit(2)
    if workers == 1 and not processes.is_sibling():
        _serve(build_app(settings), settings.host, settings.port, stream_grace_s=settings.stream_grace_s)
        return
    try:
        sock = processes.reuseport_socket(settings.host, settings.port)
    except OSError as exc:
        console.print(f"[red]could not listen on {settings.host}:{settings.port}: {escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    processes.catch_stop_signals()
    flags = {f"BREAKWATER_{k.upper()}": str(v) for k, v in given.items()}
    siblings = processes.start_siblings(workers - 1, settings.host, settings.port, flags)
    try:
        _serve(build_app(settings), settings.host, settings.port, sock, settings.stream_grace_s)
    except processes.Stopped:
        pass
    finally:
        processes.stop_siblings(siblings, grace_s=max(30.0, settings.stream_grace_s + 10))


@app.command()
def worker(
    engine: Annotated[str | None, typer.Option(help="sim | llamacpp | openai | vllm")] = None,
    model: Annotated[
        str | None, typer.Option(help="model name (llamacpp: smollm2-135m-instruct | gemma3-270m)")
    ] = None,
    model_path: Annotated[
        str | None, typer.Option(help="llamacpp: a GGUF file; vllm: a transformers folder")
    ] = None,
    upstream_url: Annotated[str | None, typer.Option(help="openai: upstream base URL (…/v1)")] = None,
    upstream_model: Annotated[str | None, typer.Option(help="openai: model id at the upstream")] = None,
    upstream_metrics_url: Annotated[
        str | None,
        typer.Option(
            help="openai: vLLM-style metrics URL (default: /metrics/ by name, else /metrics; 'off')"
        ),
    ] = None,
    vllm_arg: Annotated[
        list[str] | None,
        typer.Option(help="vllm: KEY=VALUE engine arg (JSON value), e.g. tensor_parallel_size=2"),
    ] = None,
    n_threads: Annotated[
        int | None, typer.Option(help=WorkerSettings.model_fields["n_threads"].description)
    ] = None,
    model_version: Annotated[
        str | None, typer.Option(help=WorkerSettings.model_fields["model_version"].description)
    ] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL")] = None,
    worker_id: Annotated[str | None, typer.Option(help="consumer name (default: host-random)")] = None,
    capacity: Annotated[
        int | None, typer.Option(help=WorkerSettings.model_fields["capacity"].description)
    ] = None,
    context_length: Annotated[
        int | None, typer.Option(help=WorkerSettings.model_fields["context_length"].description)
    ] = None,
    heartbeat_s: Annotated[float | None, typer.Option(help="heartbeat period")] = None,
    drain_grace_s: Annotated[float | None, typer.Option("--grace", help="SIGTERM drain grace")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="/healthz, /readyz and /metrics port (0: off)")
    ] = None,
    sim_decode_base_ms: Annotated[
        float | None, typer.Option(help=WorkerSettings.model_fields["sim_decode_base_ms"].description)
    ] = None,
    sim_decode_per_seq_ms: Annotated[
        float | None, typer.Option(help=WorkerSettings.model_fields["sim_decode_per_seq_ms"].description)
    ] = None,
    sim_prefill_ms_per_token: Annotated[
        float | None, typer.Option(help=WorkerSettings.model_fields["sim_prefill_ms_per_token"].description)
    ] = None,
    burst: Annotated[bool, typer.Option(help="exit when the queue is empty")] = False,
) -> None:
    """Run a worker: pull jobs while the engine has room, publish tokens."""
    from breakwater.logs import setup_logging

    settings = WorkerSettings(
        **_given(
            engine=engine,
            model=model,
            model_path=model_path,
            model_version=model_version,
            upstream_url=upstream_url,
            upstream_model=upstream_model,
            upstream_metrics_url=upstream_metrics_url,
            vllm_args=_key_values(vllm_arg) if vllm_arg else None,
            n_threads=n_threads,
            redis_url=redis_url,
            worker_id=worker_id,
            capacity=capacity,
            context_length=context_length,
            heartbeat_s=heartbeat_s,
            drain_grace_s=drain_grace_s,
            metrics_port=metrics_port,
            sim_decode_base_ms=sim_decode_base_ms,
            sim_decode_per_seq_ms=sim_decode_per_seq_ms,
            sim_prefill_ms_per_token=sim_prefill_ms_per_token,
        )
    )
    setup_logging("worker", settings.log_level, settings.log_json)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_run_worker(settings, burst))


async def _run_worker(settings: WorkerSettings, burst: bool) -> None:
    from breakwater.broker import Broker
    from breakwater.engines import build_engine, options_from_settings
    from breakwater.worker import Worker
    from breakwater.worker.http import WorkerHTTP

    http = WorkerHTTP(settings.metrics_host, settings.metrics_port) if settings.metrics_port else None
    if http is not None:  # up before the model loads, so probes can tell loading from dead
        await http.start()
    engine = build_engine(options_from_settings(settings))
    await engine.start()
    broker = Broker.connect(settings, token_stream_maxlen=settings.token_stream_maxlen)
    worker = Worker(settings, engine, broker)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.drain)
    try:
        if http is not None:
            http.worker = worker
        await worker.run(burst=burst)
    finally:
        await engine.close()
        await broker.aclose()
        if http is not None:
            await http.close()
        # The last line a worker logs: a process that logged "stopped" but not this hung in cleanup.
        logging.getLogger("breakwater.worker").info("closed")


@app.command("sim-server")
def sim_server(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option()] = None,
    capacity: Annotated[int | None, typer.Option()] = None,
    sim_decode_base_ms: Annotated[float | None, typer.Option()] = None,
    sim_decode_per_seq_ms: Annotated[float | None, typer.Option()] = None,
    sim_prefill_ms_per_token: Annotated[float | None, typer.Option()] = None,
) -> None:
    """Serve the sim engine directly over the OpenAI API (the benchmarks' baseline)."""
    from breakwater.logs import setup_logging
    from breakwater.simserver import SimServerSettings, build_sim_app

    settings = SimServerSettings(
        **_given(
            host=host,
            port=port,
            model=model,
            capacity=capacity,
            sim_decode_base_ms=sim_decode_base_ms,
            sim_decode_per_seq_ms=sim_decode_per_seq_ms,
            sim_prefill_ms_per_token=sim_prefill_ms_per_token,
        )
    )
    setup_logging("sim-server")
    _serve(build_sim_app(settings), settings.host, settings.port)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="gateway bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="gateway port")] = 8000,
    workers: Annotated[int, typer.Option(help="worker processes")] = 1,
    engine: Annotated[str, typer.Option(help="workers' engine: llamacpp | sim | openai | vllm")] = "llamacpp",
    model: Annotated[
        str | None, typer.Option(help="model to serve (openai: default the upstream's first)")
    ] = None,
    model_path: Annotated[
        str | None, typer.Option(help="llamacpp: a GGUF file; vllm: a transformers folder")
    ] = None,
    upstream_url: Annotated[str | None, typer.Option(help="openai: the upstream's base URL (…/v1)")] = None,
    upstream_model: Annotated[str | None, typer.Option(help="openai: model id at the upstream")] = None,
    upstream_metrics_url: Annotated[
        str | None,
        typer.Option(
            help="openai: vLLM-style metrics URL (default: /metrics/ by name, else /metrics; 'off')"
        ),
    ] = None,
    vllm_arg: Annotated[
        list[str] | None, typer.Option(help="vllm: KEY=VALUE engine arg (JSON value), repeatable")
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Redis AOF and logs")] = Path(".breakwater"),
    redis_url: Annotated[str | None, typer.Option(help="use this Redis instead of an embedded one")] = None,
    redis_cluster: Annotated[
        int, typer.Option(help="an embedded Redis Cluster of N primaries, one replica each (starts empty)")
    ] = 0,
    appendfsync: Annotated[Literal["everysec", "always", "no"], typer.Option(help="AOF fsync")] = "everysec",
    supervisor_metrics_port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="the supervisor's restart counters on 127.0.0.1 (0: any free port)"
        ),
    ] = 0,
    autoscale: Annotated[
        bool, typer.Option(help="scale workers on the gateway's breakwater_desired_workers")
    ] = False,
    min_workers: Annotated[int, typer.Option(help="--autoscale: fewest workers")] = 1,
    max_workers: Annotated[int, typer.Option(help="--autoscale: most workers")] = 4,
    scale_down_delay: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="--autoscale (supervisor): seconds the desired count stays lower before a worker goes",
        ),
    ] = 10.0,
    autoscale_policy: Annotated[
        str,
        typer.Option(
            help="--autoscale: supervisor (the gateway's breakwater_desired_workers), or a Kubernetes "
            "controller's rules over the same processes: hpa[:target engine-busy share], "
            "keda[:lag per pod], fixed:N"
        ),
    ] = "supervisor",
    autoscale_time_scale: Annotated[
        float,
        typer.Option(help="--autoscale-policy hpa/keda: run their periods and windows this much faster"),
    ] = 1.0,
) -> None:
    """Run the whole stack on this machine: embedded Redis (AOF), a gateway and workers, restarting
    a gateway or worker that crashes."""
    from breakwater.stack import Stack, StackError
    from breakwater.stack_config import StackConfig, default_model

    stack = Stack(
        StackConfig(
            host=host,
            port=port,
            workers=workers,
            engine=engine,
            model=model or default_model(engine, model_path, upstream_model),
            model_path=model_path,
            upstream_url=upstream_url,
            upstream_model=upstream_model,
            upstream_metrics_url=upstream_metrics_url,
            vllm_args=vllm_arg or [],
            data_dir=data_dir,
            redis_url=redis_url,
            redis_cluster=redis_cluster,
            appendfsync=appendfsync,
            supervisor_metrics_port=supervisor_metrics_port,
            autoscale=autoscale,
            min_workers=min_workers,
            max_workers=max_workers,
            scale_down_delay_s=scale_down_delay,
            autoscale_policy=autoscale_policy,
            autoscale_time_scale=autoscale_time_scale,
        ),
        log=lambda message: console.print(message, markup=False, highlight=False, soft_wrap=True),
    )
    # Ctrl-C and SIGTERM both stop the stack cleanly, even where SIGINT arrives ignored (background jobs).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        stack.check()  # before Redis starts: a missing engine or flag is reported at once
        serving = f"model [bold]{stack.config.model}[/bold]" if stack.config.model else "the upstream's model"
        console.print(f"starting Redis, gateway and {workers} {engine} worker(s) for {serving}…")
        stack.start()
    except StackError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        stack.stop()
        raise typer.Exit(130) from None
    try:
        _print_up(stack, data_dir)  # up: Ctrl-C from here on stops it as any time after
        while True:
            stack.supervise()
            if autoscale:
                stack.autoscale_tick()
            time.sleep(0.25)
    except KeyboardInterrupt:
        grace = stack.stream_grace_s
        console.print(
            "stopping…"
            + (f" (requests under way may run on for up to {grace:g} s)" if grace else "")
            + "; Ctrl-C again stops at once"
        )
    finally:
        stack.stop()


def _print_up(stack: Stack, data_dir: Path) -> None:
    """The banner, written at once: a Ctrl-C while it prints cannot leave half of it."""
    url, model = stack.url, stack.config.model
    keyed = stack.auth != "off"
    prefix = stack.config.key_prefix
    env = f"BREAKWATER_REDIS_URL={stack.redis_url}" + (
        f" BREAKWATER_KEY_PREFIX={prefix}" if prefix != "bw" else ""
    )
    auth = (
        f"  auth: [green]{stack.auth}[/green] (KEY from `{env} breakwater keys create --tenant NAME`, "
        "with the same BREAKWATER_AUTH_PEPPER_FILE)"
        if keyed
        else f"  auth: [yellow]off[/yellow] (this stack listens on {stack.config.host}, this machine, only; "
        "a shared deployment sets BREAKWATER_AUTH=keys and creates keys with `breakwater keys create`)"
    )
    pids = ", ".join(f"{name} {pid}" for name, pid in stack.processes().items())
    console.print(
        f"\n[green]Breakwater is up.[/green] Point an OpenAI client at [bold]{url}/v1[/bold]\n\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        + ('    -H "Authorization: Bearer $KEY" \\\n' if keyed else "")
        + f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n\n'
        f"{auth}\n"
        f"  metrics: {stack.gateway_admin}/metrics   logs: {data_dir / 'logs'}   stop: Ctrl-C\n"
        f"  supervisor metrics (restarts): {stack.metrics_url}\n"
        f"  processes: {pids}\n",
        soft_wrap=True,  # not cut at the terminal's width: the curl command is copied whole
    )


app.command()(bench)
app.add_typer(models_app, name="models")
models_app.add_typer(alias_app, name="alias")
app.add_typer(dlq_app, name="dlq")
app.add_typer(cache_app, name="cache")
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")
app.command()(usage)
app.command()(simulate)
app.command("plan")(plan_fleet)
app.command()(probe)


def main() -> None:
    """The CLI; a bad setting or a Redis it cannot use is said in a line, not a traceback."""
    run_cli(app, console)
