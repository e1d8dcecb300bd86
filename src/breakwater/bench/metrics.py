"""Per-request records and their summary, with the definitions of ``vllm bench serve``.

- TTFT: request sent → first chunk carrying output text.
- ITL: time between consecutive text-carrying chunks of one request (all gaps of all requests).
- TPOT: per request, ``(e2e - ttft) / (output_tokens - 1)``, for requests with more than one token.
- E2E latency: request sent → last byte of the response.
- Throughput: completed requests, output tokens and total (prompt + output) tokens per second of
  the benchmark's duration (first send → last completion).
- Goodput: completed requests per second that met every SLO given (``ttft``, ``tpot``, ``e2e`` in ms).
- Cost per 1k tokens: ``(gpu_hourly * gpus + cpu_hourly * cpus) * duration_h / (tokens / 1000)``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


@dataclass(slots=True)
class RequestRecord:
    index: int
    scheduled_s: float  # when the profile said to send it (relative to the run's start)
    start_s: float = 0.0  # when it was sent
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)  # text chunk arrival times, relative to start_s
    headers_s: float | None = None  # when the request's headers started going out (after connecting)
    input_tokens_planned: int = 0
    output_tokens_planned: int = 0
    prompt_tokens: int = 0  # from the server's usage
    output_tokens: int = 0  # from the server's usage (chunks counted only when it sends none)
    status: int = 0
    error: str | None = None  # class: http_429, http_5xx, timeout, broken_stream, connect
    error_detail: str = ""  # what the server said (start of the body) or the exception, for diagnosis
    retry_after: float | None = None
    integrity_errors: int = 0  # missing or repeated SSE ids (Breakwater targets)
    request_id: str = ""
    cache: str = ""  # X-Breakwater-Cache: hit, miss or bypass ('' when the server says nothing)
    model: str = ""  # X-Breakwater-Model: the model or version that served it (an alias's choice)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def lag_s(self) -> float:
        return self.start_s - self.scheduled_s

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats_ms(name: str, values_s: list[float]) -> dict[str, float]:
    """``mean_/median_/std_/p<q>_<name>_ms``, as vLLM's result JSON names them."""
    vals = [v * 1000.0 for v in values_s]
    out = {
        f"mean_{name}_ms": sum(vals) / len(vals) if vals else math.nan,
        f"median_{name}_ms": percentile(vals, 50),
        f"std_{name}_ms": _std(vals),
    }
    for q in PERCENTILES:
        out[f"p{_q(q)}_{name}_ms"] = percentile(vals, q)
    return out


def tpot(record: RequestRecord) -> float | None:
    if not record.ok or record.ttft_s is None or record.e2e_s is None or record.output_tokens < 2:
        return None
    return (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)


def itls(record: RequestRecord) -> list[float]:
    return [b - a for a, b in zip(record.chunk_s, record.chunk_s[1:], strict=False)]


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO:
        """``ttft=500,tpot=50,e2e=10000`` (milliseconds)."""
        if not text:
            return cls()
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("ttft", "tpot", "e2e"):
                raise ValueError(f"bad SLO {part!r}: expected ttft=MS, tpot=MS or e2e=MS")
            values[f"{key.strip()}_ms"] = float(value)
        return cls(**values)

    def met(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        checks = (
            (self.ttft_ms, record.ttft_s),
            (self.tpot_ms, tpot(record)),
            (self.e2e_ms, record.e2e_s),
        )
        return all(limit is None or (value is not None and value * 1000 <= limit) for limit, value in checks)

    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))


@dataclass(frozen=True, slots=True)
class Cost:
    gpu_hourly: float = 0.0
    cpu_hourly: float = 0.0
    gpus: float = 0.0
    cpus: float = 0.0

    def per_1k(self, tokens: int, duration_s: float) -> float | None:
        hourly = self.gpu_hourly * self.gpus + self.cpu_hourly * self.cpus
        if hourly <= 0 or tokens <= 0:
            return None
        return hourly * duration_s / 3600.0 / (tokens / 1000.0)


def mean_replicas(timeseries: list[dict[str, float]]) -> float:
    """Mean of ``breakwater_workers`` over the scraped series (0 when the target exports none)."""
    values = [row["breakwater_workers"] for row in timeseries if "breakwater_workers" in row]
    return sum(values) / len(values) if values else 0.0


def summarize(
    records: list[RequestRecord], *, duration_s: float, slo: SLO | None = None, cost: Cost | None = None
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    errors = Counter(r.error for r in records if r.error)
    retry_after = [r.retry_after for r in records if r.retry_after is not None]
    duration = max(duration_s, 1e-9)
    summary: dict[str, Any] = {
        "duration": duration_s,
        "num_prompts": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(errors),
        "rate_limited": errors.get("http_429", 0),
        "retry_after_s": {"min": min(retry_after), "max": max(retry_after)} if retry_after else None,
        "integrity_errors": sum(r.integrity_errors for r in records),
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
        "max_send_lag_ms": max((r.lag_s * 1000 for r in records), default=0.0),
        "p50_send_lag_ms": percentile([r.lag_s * 1000 for r in records], 50),
        "p99_send_lag_ms": percentile([r.lag_s * 1000 for r in records], 99),
    }
    summary.update(stats_ms("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]))
    summary.update(stats_ms("tpot", [t for r in ok if (t := tpot(r)) is not None]))
    summary.update(stats_ms("itl", [gap for r in ok for gap in itls(r)]))
    summary.update(stats_ms("e2el", [r.e2e_s for r in ok if r.e2e_s is not None]))
    summary.update(_cache_stats(ok))
    if len(versions := by_model(records, slo)) > 1:
        summary["by_model"] = versions
    if slo is not None and slo.given():
        summary["request_goodput"] = sum(1 for r in records if slo.met(r)) / duration
        summary["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms}
    if cost is not None:
        summary["cost_per_1k_output_tokens"] = cost.per_1k(output, duration_s)
        summary["cost_per_1k_total_tokens"] = cost.per_1k(prompt + output, duration_s)
        summary["cost_model"] = asdict(cost)
    return summary


def by_model(records: list[RequestRecord], slo: SLO | None = None) -> dict[str, dict[str, Any]]:
    """Versions side by side (an alias's split, A vs B): per model that served requests, its share,
    error rate, TTFT and TPOT, output length and SLO attainment. Requests refused before admission
    name no model and are left out."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        if r.model:
            groups.setdefault(r.model, []).append(r)
    total = sum(len(g) for g in groups.values())
    out: dict[str, dict[str, Any]] = {}
    for model, group in sorted(groups.items()):
        ok = [r for r in group if r.ok]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpots = [t for r in ok if (t := tpot(r)) is not None]
        out[model] = {
            "requests": len(group),
            "share": len(group) / total,
            "completed": len(ok),
            "error_rate": 1 - len(ok) / len(group),
            "mean_output_tokens": sum(r.output_tokens for r in ok) / len(ok) if ok else math.nan,
            "median_ttft_ms": percentile([t * 1000 for t in ttft], 50),
            "p95_ttft_ms": percentile([t * 1000 for t in ttft], 95),
            "median_tpot_ms": percentile([t * 1000 for t in tpots], 50),
            "p95_tpot_ms": percentile([t * 1000 for t in tpots], 95),
        }
        if slo is not None and slo.given():
            out[model]["slo_attainment"] = sum(1 for r in group if slo.met(r)) / len(group)
    return out


def _cache_stats(ok: list[RequestRecord]) -> dict[str, Any]:
    """The response cache's share of the answers and what it did to first-token latency."""
    told = [r for r in ok if r.cache]
    if not told:
        return {}
    hits = [r for r in told if r.cache == "hit"]
    out: dict[str, Any] = {
        "cache_hit_ratio": len(hits) / len(told),
        "cache_hit_output_tokens": sum(r.output_tokens for r in hits),
    }
    out.update(stats_ms("ttft_hit", [r.ttft_s for r in hits if r.ttft_s is not None]))
    out.update(stats_ms("ttft_miss", [r.ttft_s for r in told if r.cache != "hit" and r.ttft_s is not None]))
    return out


def _std(vals: list[float]) -> float:
    if len(vals) < 2:
        return 0.0 if vals else math.nan
    mean = sum(vals) / len(vals)
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))


def _q(q: float) -> str:
    return str(int(q)) if q == int(q) else str(q)
