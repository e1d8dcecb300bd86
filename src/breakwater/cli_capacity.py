"""``breakwater simulate``: autoscaling policies side by side on a request trace (capacity package)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from breakwater.bench.profiles import trace
from breakwater.capacity.policies import Adaptive, Fixed, Hpa, HpaMechanics, KedaQueue, Policy
from breakwater.capacity.pricing import Pricing
from breakwater.capacity.report import summarize, table
from breakwater.capacity.service import ServiceCurve
from breakwater.capacity.simulator import Simulation
from breakwater.config import GatewaySettings

POLICIES = "hpa[:target] (utilisation, 0.85) | keda[:lag per pod] (5) | adaptive | fixed:N"


def parse_policy(spec: str, mechanics: HpaMechanics) -> Policy:
    """A policy from its command-line form; raises ``typer.BadParameter`` naming the bad one."""
    name, _, arg = spec.partition(":")
    try:
        if name == "hpa":
            return Hpa(float(arg or 0.85), mechanics, name=f"hpa-utilisation-{float(arg or 0.85):g}")
        if name == "keda":
            return KedaQueue(float(arg or 5.0), mechanics=mechanics, name=f"keda-lag-{float(arg or 5.0):g}")
        if name == "adaptive" and not arg:
            settings = GatewaySettings(
                autoscale_min_workers=mechanics.min_replicas, autoscale_max_workers=mechanics.max_replicas
            )
            return Adaptive(settings, mechanics)
        if name == "fixed" and int(arg) >= 1:
            return Fixed(int(arg), name=f"fixed-{int(arg)}")
    except ValueError:
        pass
    raise typer.BadParameter(f"`{spec}`: expected one of {POLICIES}", param_hint="--policy")


def simulate(
    trace_path: Annotated[
        Path, typer.Option("--trace", help="Azure CSV or Mooncake JSONL trace", exists=True)
    ],
    policy: Annotated[list[str], typer.Option(help=f"repeatable: {POLICIES}")],
    time_scale: Annotated[float, typer.Option(help="replay faster (> 1) or slower")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="seconds of trace to keep")] = None,
    capacity: Annotated[int, typer.Option(help="sequences per replica")] = 32,
    decode_base_ms: Annotated[float, typer.Option(help="engine step: fixed part")] = 20.0,
    decode_per_seq_ms: Annotated[float, typer.Option(help="engine step: per running sequence")] = 0.5,
    prefill_ms_per_token: Annotated[float, typer.Option(help="engine step: per prompt token joining")] = 0.05,
    replicas: Annotated[int, typer.Option(help="replicas at the start (a fixed fleet: all of it)")] = 1,
    min_replicas: Annotated[int, typer.Option()] = 1,
    max_replicas: Annotated[int, typer.Option()] = 64,
    startup_s: Annotated[float, typer.Option(help="a new replica's time to ready (model load)")] = 60.0,
    slo_ttft_s: Annotated[float, typer.Option(help="the TTFT objective attainment is counted against")] = 1.0,
    sku: Annotated[str, typer.Option(help="GPU priced per replica-hour")] = "h100",
    pricing: Annotated[Path | None, typer.Option(help="JSON overriding the default prices")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per policy")] = False,
) -> None:
    """Simulate a fleet under each policy on the same trace: TTFT, SLO attainment, replicas, cost."""
    arrivals = trace(trace_path, time_scale=time_scale, duration_s=duration)
    if not arrivals:
        raise typer.BadParameter("the trace has no requests in that window", param_hint="--trace")
    curve = ServiceCurve(
        capacity, decode_base_ms / 1000, decode_per_seq_ms / 1000, prefill_ms_per_token / 1000
    )
    prices = Pricing.load(pricing)
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
