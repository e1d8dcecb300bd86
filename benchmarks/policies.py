"""Autoscaling policies at equal SLO attainment (issue #18: the seed's "-28% cost per 1k tokens at
target QoS" and "optimal thresholds at 70% CPU, 85% GPU").

Each policy family is swept over its threshold in the simulator (``breakwater.capacity``) on each
trace; the cheapest setting that meets the TTFT objective for a share of requests (the target
attainment) is that family's best. The seed's HPA on utilisation at its own thresholds (70% / 85%)
is reported as it is, and the cost difference of the best policy against it is the -28% claim.

A warm-up (the first ``--warmup`` seconds of replay) is excluded from attainment and cost, so that
no policy is judged on the cold start every fleet has; every policy starts from the same fleet.

    .venv/bin/python benchmarks/policies.py     # ~5 minutes; writes its section of docs/evaluation.md

``--day`` runs the same comparison over a synthetic day instead (``bench.profiles.diurnal_day``: the
code trace replayed 2x faster, its 30 minutes repeated back to back for 24 hours and thinned to a
diurnal shape whose night runs at ``--trough`` of the peak), where an autoscaler has quiet hours to
save on; it writes a section of its own.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from breakwater.bench.profiles import Arrival, diurnal_day, trace
from breakwater.capacity.policies import Adaptive, Fixed, Hpa, HpaMechanics, KedaQueue, Policy
from breakwater.capacity.pricing import Pricing
from breakwater.capacity.service import CURVES
from breakwater.capacity.simulator import Result, Simulation
from breakwater.config import GatewaySettings
from common import write_section

ROOT = Path(__file__).resolve().parent.parent
EVALUATION = ROOT / "docs" / "evaluation.md"
TRACES = ROOT.parent / "shared" / "traces"
HPA_TARGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9)
KEDA_LAGS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
OCCUPANCIES = (0.3, 0.4, 0.5, 0.7, 0.9, 1.0)  # adaptive: autoscale_target_occupancy
MAX_REPLICAS = 64
FAMILIES = ("fixed", "hpa", "keda", "keda-zero", "keda-zero-lagonly", "adaptive")


@dataclass(frozen=True)
class Setup:
    trace: str
    time_scale: float
    warmup_s: float
    startup_s: float
    slo_ttft_s: float
    start_replicas: int
    trough: float | None = None  # a synthetic day (diurnal_day) at this night-to-peak ratio
    curve: str = "illustrative"  # a replica's service curve (capacity.service.CURVES)


@dataclass(frozen=True)
class Point:
    family: str
    setting: str
    attainment: float  # TTFT within the objective, of the requests after the warm-up
    ttft_p95_s: float
    replica_hours: float  # after the warm-up
    peak: int
    usd_per_1k: float


def _policy(family: str, value: float) -> Policy:
    mechanics = HpaMechanics(min_replicas=1, max_replicas=MAX_REPLICAS)
    if family == "fixed":
        return Fixed(int(value))
    if family == "hpa":
        return Hpa(value, mechanics)
    if family == "keda":
        return KedaQueue(value, mechanics=mechanics)
    if family.startswith("keda-zero"):  # minReplicaCount 0, KEDA's default cooldownPeriod (300 s)
        return KedaQueue(value, mechanics=mechanics, min_replicas=0, busy_active=family == "keda-zero")
    settings = GatewaySettings(
        autoscale_min_workers=1, autoscale_max_workers=MAX_REPLICAS, autoscale_target_occupancy=value
    )
    return Adaptive(settings, mechanics)


def _label(family: str, value: float) -> str:
    return {
        "fixed": f"{int(value)} replicas",
        "hpa": f"utilisation {value:.0%}",
        "keda": f"lag {value:g}/pod",
        "keda-zero": f"lag {value:g}/pod, min 0",
        "keda-zero-lagonly": f"lag {value:g}/pod, min 0, lag alone",
        "adaptive": f"occupancy {value:.0%}",
    }[family]


def _arrivals(setup: Setup) -> list[Arrival]:
    arrivals = trace(Path(setup.trace), time_scale=setup.time_scale)
    return arrivals if setup.trough is None else diurnal_day(arrivals, trough=setup.trough)


def simulate(setup: Setup, family: str, value: float) -> Result:
    """One family's setting on the setup's trace (a fixed fleet starts at its size)."""
    start = int(value) if family == "fixed" else setup.start_replicas
    return Simulation(
        CURVES[setup.curve],
        _arrivals(setup),
        _policy(family, value),
        replicas=start,
        startup_s=setup.startup_s,
    ).run()


def run(setup: Setup, family: str, value: float) -> Point:
    return _point(setup, family, value, simulate(setup, family, value))


def _point(setup: Setup, family: str, value: float, result: Result) -> Point:
    after = [r for r in result.requests if r.arrival_s >= setup.warmup_s]
    ttft = sorted(r.ttft_s if r.done_s >= 0 else math.inf for r in after)
    met = sum(t <= setup.slo_ttft_s for t in ttft) / max(1, len(ttft))
    samples = [s for s in result.samples if s.t >= setup.warmup_s]
    replica_s = sum(a.replicas * (b.t - a.t) for a, b in itertools.pairwise(samples))
    tokens = sum(r.output_tokens for r in after if r.done_s >= 0)
    prices = Pricing()
    usd = replica_s / 3600 * prices.gpu_hour["h100"]
    return Point(
        family,
        _label(family, value),
        met,
        ttft[int(0.95 * (len(ttft) - 1))] if ttft else math.nan,
        replica_s / 3600,
        max((s.replicas for s in samples), default=0),
        usd / tokens * 1000 if tokens else math.nan,
    )


def sweep(setup: Setup, pool: ProcessPoolExecutor) -> list[Point]:
    if setup.trough is None:
        jobs = [("hpa", v) for v in HPA_TARGETS] + [("keda", v) for v in KEDA_LAGS]
        jobs += [("keda-zero", v) for v in KEDA_LAGS] + [("keda-zero-lagonly", 5.0)]
        jobs += [("adaptive", v) for v in OCCUPANCIES]
        jobs += [("fixed", float(n)) for n in (2, 4, 6, 8, 10, 12, 16, 24, 32)]
    else:  # a day takes ~100x an hour's simulation: the thresholds that decided the hours
        jobs = [("hpa", v) for v in (0.6, 0.7, 0.8, 0.85, 0.9)] + [("keda", v) for v in (5.0, 20.0)]
        jobs += [("keda-zero", v) for v in (5.0, 20.0)] + [("keda-zero-lagonly", 5.0)]
        jobs += [("adaptive", v) for v in (0.3, 0.4, 0.5, 0.7, 1.0)]
        jobs += [("fixed", float(n)) for n in (3, 4, 5, 6, 8)]
    return list(pool.map(run, [setup] * len(jobs), [f for f, _ in jobs], [v for _, v in jobs]))


def best(points: list[Point], family: str, target: float) -> Point | None:
    meeting = [p for p in points if p.family == family and p.attainment >= target]
    return min(meeting, key=lambda p: p.usd_per_1k) if meeting else None


def section(name: str, setup: Setup, points: list[Point], targets: tuple[float, ...]) -> str:
    rows = ["| policy | setting | TTFT ≤ 1 s | TTFT p95 s | replica-hours | peak | $ per 1k output tokens |"]
    rows.append("|---|---|---|---|---|---|---|")
    for p in points:
        rows.append(
            f"| {p.family} | {p.setting} | {p.attainment:.1%} | {p.ttft_p95_s:.2f} | {p.replica_hours:.2f} | "
            f"{p.peak} | {p.usd_per_1k:.4f} |"
        )
    verdicts = []
    seed = {p.setting: p for p in points if p.family == "hpa"}
    for target in targets:
        cheapest = {f: best(points, f, target) for f in FAMILIES}
        met = {f: p for f, p in cheapest.items() if p is not None}
        line = [f"- **At {target:.0%} attainment**:"]
        for family, found in cheapest.items():
            line.append(f"{family} {'—' if found is None else f'{found.setting} ${found.usd_per_1k:.4f}'};")
        if met:
            winner = min(met.values(), key=lambda p: p.usd_per_1k)
            line.append(f"cheapest: **{winner.family} ({winner.setting})**.")
            for threshold in ("utilisation 70%", "utilisation 85%"):
                hpa = seed.get(threshold)
                if hpa is None:
                    continue
                if hpa.attainment >= target:
                    delta = winner.usd_per_1k / hpa.usd_per_1k - 1
                    line.append(f"Against the seed's HPA at {threshold[-3:]}: {delta:+.0%} per 1k tokens.")
                else:
                    line.append(f"The seed's HPA at {threshold[-3:]} misses it ({hpa.attainment:.1%}).")
        verdicts.append(" ".join(line))
    return "\n".join(
        [
            f"### {name}",
            "",
            f"`{Path(setup.trace).name}` replayed {setup.time_scale:g}x faster"
            + (
                ""
                if setup.trough is None
                else f", repeated for 24 hours and thinned to a day (night at {setup.trough:.0%} of the "
                "peak hour's rate, peak at 15:00)"
            )
            + f", warm-up {setup.warmup_s:g} s excluded, start-up {setup.startup_s:g} s, "
            f"every policy starting from {setup.start_replicas} replicas.",
            "",
            *rows,
            "",
            *verdicts,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--time-scale", type=float, default=None, help="default 4 (--day: 2)")
    parser.add_argument("--startup-s", type=float, default=60.0)
    parser.add_argument("--day", action="store_true", help="a synthetic day of the code trace instead")
    parser.add_argument("--trough", type=float, default=0.25, help="--day: the night's share of the peak")
    parser.add_argument(
        "--curve",
        choices=sorted(CURVES),
        default="illustrative",
        help="a replica's service curve; h100-llama3-8b: fitted from published vLLM numbers",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.time_scale is None:
        args.time_scale = 2.0 if args.day else 4.0
    began = time.monotonic()
    traces = {
        "Azure 2023 conversation": ("AzureLLMInferenceTrace_conv.csv", 8),
        "Azure 2023 code": ("AzureLLMInferenceTrace_code.csv", 4),
        "Mooncake conversation": ("mooncake_conversation_trace.jsonl", 8),
    }
    if args.day:
        traces = {"A day of Azure 2023 code": ("AzureLLMInferenceTrace_code.csv", 2)}
    targets = (0.80, 0.95, 0.99)
    parts = []
    with ProcessPoolExecutor(max_workers=2) as pool:
        for name, (file, start) in traces.items():
            setup = Setup(
                str(TRACES / file),
                args.time_scale,
                600 / args.time_scale,
                args.startup_s,
                1.0,
                start,
                args.trough if args.day else None,
                args.curve,
            )
            points = sweep(setup, pool)
            parts.append(section(name, setup, points, targets))
            print(parts[-1], flush=True)
    if args.no_write:
        return
    command = "python benchmarks/policies.py" + (f" --day --trough {args.trough:g}" if args.day else "")
    if args.time_scale != (2.0 if args.day else 4.0):
        command += f" --time-scale {args.time_scale:g}"
    if args.curve != "illustrative":
        command += f" --curve {args.curve}"
    curve = CURVES[args.curve]
    title = "A day: autoscaling policies" if args.day else "Autoscaling policies"
    if args.curve != "illustrative":
        title += f" on the {args.curve} curve"
    body = "\n\n".join(
        [
            f"## {title} at equal SLO attainment (issue #18)",
            f"`{command}`, {time.strftime('%Y-%m-%d')}, "
            f"{time.monotonic() - began:.0f} s. Simulator curve ({args.curve}): {curve.capacity} "
            f"sequences, steps of {curve.decode_base_s * 1000:g} ms + "
            f"{curve.decode_per_seq_s * 1000:g} ms per sequence + "
            f"{curve.prefill_s_per_token * 1000:g} ms per prompt token, at most "
            f"{curve.max_batched_tokens} prompt tokens joining a step; H100 prices; objective TTFT ≤ 1 s. "
            "Each family's thresholds are swept; the cheapest setting meeting the target is its best.",
            *parts,
        ]
    )
    marker = "policies-day" if args.day else "policies"
    write_section(marker if args.curve == "illustrative" else f"{marker}-{args.curve}", body, EVALUATION)


if __name__ == "__main__":
    main()
