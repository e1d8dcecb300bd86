"""``breakwater simulate``: autoscaling policies side by side on a request trace (capacity package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from breakwater.capacity.policies import POLICY_SPECS, Fixed, HpaMechanics, Policy, policy_from_spec
from breakwater.capacity.pricing import Pricing
from breakwater.capacity.service import ServiceCurve

if TYPE_CHECKING:
    from breakwater.bench.profiles import Arrival

# The trace reader (the bench package), the simulator and the planner are imported by the commands
# that use them: every other command of the CLI starts without them.


def parse_policy(spec: str, mechanics: HpaMechanics) -> Policy:
    """A policy from its command-line form; raises ``typer.BadParameter`` naming the bad one."""
    try:
        return policy_from_spec(spec, mechanics)
    except ValueError:
        raise typer.BadParameter(f"`{spec}`: expected one of {POLICY_SPECS}", param_hint="--policy") from None


def read_trace(path: Path, time_scale: float = 1.0, duration_s: float | None = None) -> list[Arrival]:
    """A trace's requests (``duration_s`` of it, replayed ``time_scale`` faster); a file that is not
    one, or holds none, is a ``typer.BadParameter`` naming it."""
    from breakwater.bench.profiles import trace

    try:
        arrivals = trace(path, time_scale=time_scale, duration_s=duration_s)
    except (KeyError, TypeError, ValueError) as exc:  # a missing column or field, a bad value
        said = f"{path}: not an Azure CSV or Mooncake JSONL trace ({type(exc).__name__}: {exc})"
        raise typer.BadParameter(said, param_hint="--trace") from None
    except OSError as exc:
        raise typer.BadParameter(f"{path}: {exc.strerror or exc}", param_hint="--trace") from None
    if not arrivals:
        where = "in that window" if duration_s is not None else "in it"
        raise typer.BadParameter(f"{path}: no requests {where}", param_hint="--trace")
    return arrivals


def _curve_and_prices(
    capacity: int,
    decode_base_ms: float,
    decode_per_seq_ms: float,
    prefill_ms_per_token: float,
    max_batched_tokens: int,
    pricing: Path | None,
) -> tuple[ServiceCurve, Pricing]:
    """The service curve the options describe (milliseconds as seconds) and the prices; ValueError
    for either that cannot be."""
    seconds = (decode_base_ms / 1000, decode_per_seq_ms / 1000, prefill_ms_per_token / 1000)
    curve = ServiceCurve(capacity, *seconds, max_batched_tokens)
    return curve, Pricing.load(pricing)


def simulate(
    trace_path: Annotated[
        Path, typer.Option("--trace", help="Azure CSV or Mooncake JSONL trace", exists=True, dir_okay=False)
    ],
    policy: Annotated[list[str], typer.Option(help=f"repeatable: {POLICY_SPECS}")],
    time_scale: Annotated[float, typer.Option(help="replay faster (> 1) or slower")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="seconds of trace to keep")] = None,
    capacity: Annotated[int, typer.Option(min=1, help="sequences per replica")] = 32,
    decode_base_ms: Annotated[float, typer.Option(min=0.0, help="engine step: fixed part")] = 20.0,
    decode_per_seq_ms: Annotated[
        float, typer.Option(min=0.0, help="engine step: per running sequence")
    ] = 0.5,
    prefill_ms_per_token: Annotated[
        float, typer.Option(min=0.0, help="engine step: per prompt token joining")
    ] = 0.05,
    max_batched_tokens: Annotated[
        int, typer.Option(min=0, help="prompt tokens that may join one step (vLLM: 8192); 0: no bound")
    ] = 0,
    replicas: Annotated[
        int, typer.Option(min=0, help="replicas at the start (a fixed fleet: all of it)")
    ] = 1,
    min_replicas: Annotated[int, typer.Option(min=0)] = 1,
    max_replicas: Annotated[int, typer.Option(min=1)] = 64,
    startup_s: Annotated[
        float, typer.Option(min=0.0, help="a new replica's time to ready (model load)")
    ] = 60.0,
    slo_ttft_s: Annotated[float, typer.Option(help="the TTFT objective attainment is counted against")] = 1.0,
    sku: Annotated[str, typer.Option(help="GPU priced per replica-hour")] = "h100",
    pricing: Annotated[
        Path | None, typer.Option(help="JSON overriding the default prices", exists=True, dir_okay=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per policy")] = False,
) -> None:
    """Simulate a fleet under each policy on the same trace: TTFT, SLO attainment, replicas, cost."""
    from breakwater.capacity.report import summarize, table
    from breakwater.capacity.simulator import Simulation

    if not time_scale > 0:
        raise typer.BadParameter(f"must be more than 0, got {time_scale:g}", param_hint="--time-scale")
    if min_replicas > max_replicas:
        raise typer.BadParameter(
            f"{min_replicas} is over --max-replicas {max_replicas}", param_hint="--min-replicas"
        )
    arrivals = read_trace(trace_path, time_scale=time_scale, duration_s=duration)
    try:
        curve, prices = _curve_and_prices(
            capacity, decode_base_ms, decode_per_seq_ms, prefill_ms_per_token, max_batched_tokens, pricing
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if sku not in prices.gpu_hour:
        raise typer.BadParameter(
            f"no price for `{sku}`: {', '.join(sorted(prices.gpu_hour))}", param_hint="--sku"
        )
    summaries = []
    for spec in policy:
        chosen = parse_policy(spec, HpaMechanics(min_replicas=min_replicas, max_replicas=max_replicas))
        start = chosen.replicas if isinstance(chosen, Fixed) else replicas  # a fixed fleet is there already
        result = Simulation(curve, arrivals, chosen, replicas=start, startup_s=startup_s).run()
        summaries.append(summarize(chosen.name, result, slo_ttft_s=slo_ttft_s, prices=prices, sku=sku))
    if as_json:
        for s in summaries:
            typer.echo(json.dumps(s.as_dict()))
    else:
        typer.echo(table(summaries, slo_ttft_s))


def plan_fleet(
    requests_per_day: Annotated[float, typer.Option(help="requests a day (e.g. 1e6 users x 10)")],
    trace_path: Annotated[
        Path,
        typer.Option(
            "--trace", help="its hour is the peak hour's shape and lengths", exists=True, dir_okay=False
        ),
    ],
    peak_to_average: Annotated[float, typer.Option(help="the peak hour's rate over the day's average")] = 2.0,
    slo_ttft_p95_s: Annotated[
        float, typer.Option("--slo-ttft-p95-s", help="TTFT objective at the peak")
    ] = 1.0,
    slo_tpot_p95_s: Annotated[
        float | None, typer.Option("--slo-tpot-p95-s", help="TPOT objective at the peak (optional)")
    ] = None,
    capacity: Annotated[int, typer.Option(help="sequences per replica")] = 32,
    decode_base_ms: Annotated[float, typer.Option(help="engine step: fixed part")] = 20.0,
    decode_per_seq_ms: Annotated[float, typer.Option(help="engine step: per running sequence")] = 0.5,
    prefill_ms_per_token: Annotated[float, typer.Option(help="engine step: per prompt token joining")] = 0.05,
    max_batched_tokens: Annotated[
        int, typer.Option(min=0, help="prompt tokens that may join one step (vLLM: 8192); 0: no bound")
    ] = 0,
    sku: Annotated[str, typer.Option(help="GPU priced per replica-hour")] = "h100",
    gpus_per_replica: Annotated[int, typer.Option(min=1)] = 1,
    pricing: Annotated[
        Path | None, typer.Option(help="JSON overriding the default prices", exists=True, dir_okay=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The replicas, gateway cores and Redis a traffic level needs at its peak, and the month's cost."""
    from breakwater.capacity.planner import Demand, plan

    arrivals = read_trace(trace_path)
    try:
        curve, prices = _curve_and_prices(
            capacity, decode_base_ms, decode_per_seq_ms, prefill_ms_per_token, max_batched_tokens, pricing
        )
        demand = Demand(requests_per_day, peak_to_average, slo_ttft_p95_s, tpot_p95_s=slo_tpot_p95_s)
        if sku not in prices.gpu_hour:
            raise ValueError(f"no price for `{sku}` (known: {', '.join(sorted(prices.gpu_hour))})")
        result = plan(demand, arrivals, curve, prices, sku=sku, gpus_per_replica=gpus_per_replica)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
        return
    typer.echo(
        "\n".join(
            [
                f"peak: {result.peak_rps:,.1f} req/s, {result.peak_tokens_per_s:,.0f} output tokens/s",
                f"replicas ({sku} x{gpus_per_replica}): {result.replicas_peak} at the peak "
                f"(TTFT p95 {result.ttft_p95_s:.2f} s, TPOT p95 {result.tpot_p95_s * 1000:.0f} ms), "
                f"{result.replicas_average} on average",
                f"gateway cores: {result.gateway_cores}; Redis primaries: {result.redis_primaries} "
                f"(+1 replica each), {result.redis_gb:.1f} GB",
                f"per month: GPU ${result.gpu_monthly_usd:,.0f}, "
                f"gateways ${result.gateway_monthly_usd:,.0f}, Redis ${result.redis_monthly_usd:,.0f}; "
                f"total ${result.monthly_usd:,.0f}, "
                f"${result.usd_per_1k_tokens:.4f} per 1k output tokens",
            ]
        )
    )
