"""One simulated run summed up: latency percentiles, SLO attainment, replicas and cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from breakwater.bench.metrics import percentile
from breakwater.capacity.pricing import Pricing, Usage, per_1k_tokens
from breakwater.capacity.simulator import Result


@dataclass(frozen=True)
class Summary:
    policy: str
    requests: int
    finished: int
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    tpot_p95_s: float
    slo_attainment: float  # finished within the TTFT SLO, of all requests
    replica_hours: float
    peak_replicas: int
    busy: float  # engine-busy share of the provisioned replica time
    usd_per_1k_tokens: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    policy: str, result: Result, *, slo_ttft_s: float, prices: Pricing, sku: str = "h100"
) -> Summary:
    done = [r for r in result.requests if r.done_s >= 0]
    ttft = [r.ttft_s for r in done]
    usage = Usage(output_tokens=result.output_tokens, gpu_s=result.replica_s, sku=sku)
    return Summary(
        policy=policy,
        requests=len(result.requests),
        finished=len(done),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        ttft_p99_s=percentile(ttft, 99),
        tpot_p95_s=percentile([r.tpot_s for r in done if r.output_tokens > 1], 95),
        slo_attainment=sum(t <= slo_ttft_s for t in ttft) / max(1, len(result.requests)),
        replica_hours=result.replica_s / 3600,
        peak_replicas=max((s.replicas for s in result.samples), default=0),
        busy=result.busy_s / result.replica_s if result.replica_s else 0.0,
        usd_per_1k_tokens=per_1k_tokens(usage, prices),
    )


def table(summaries: list[Summary], slo_ttft_s: float) -> str:
    lines = [
        f"| policy | TTFT p50 / p95 / p99 s | TTFT ≤ {slo_ttft_s:g} s | replica-hours | peak replicas "
        "| busy | $ per 1k output tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.policy} | {s.ttft_p50_s:.2f} / {s.ttft_p95_s:.2f} / {s.ttft_p99_s:.2f} | "
            f"{s.slo_attainment:.1%} | {s.replica_hours:.1f} | {s.peak_replicas} | {s.busy:.0%} | "
            f"{s.usd_per_1k_tokens:.4f} |"
        )
    return "\n".join(lines)
