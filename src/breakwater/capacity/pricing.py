"""The seed's cost model: cost per 1k output tokens from GPU-seconds, gateway and worker
CPU-seconds, and Redis (memory and operations), each priced from a pricing file.

Defaults are approximate public on-demand list prices (USD, 2025; override any with a JSON file,
``breakwater simulate --pricing prices.json``): GPU-hours by SKU from AWS (p5 H100 per GPU, p4d
A100 40 GB per GPU, g6 L4, g5 A10G), a general-purpose vCPU-hour (m7i), Redis memory per GB-month
and operations per million as ElastiCache Serverless bills them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

GPU_HOUR = {"h100": 6.88, "a100": 4.10, "l4": 0.80, "a10g": 1.01, "cpu": 0.0}


@dataclass(frozen=True)
class Pricing:
    gpu_hour: dict[str, float] = field(default_factory=lambda: dict(GPU_HOUR))
    vcpu_hour: float = 0.0504
    redis_gb_month: float = 91.25  # $0.125 per GB-hour
    redis_million_ops: float = 0.0034  # per million ECPUs (about one per small command)
    hours_per_month: float = 730.0

    @classmethod
    def load(cls, path: Path | None) -> Pricing:
        """Defaults, with the keys a JSON file gives replaced (``gpu_hour`` merged by SKU)."""
        if path is None:
            return cls()
        try:
            given = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"pricing file {path}: {exc.strerror or exc}") from None
        except ValueError as exc:  # not JSON, or not UTF-8
            raise ValueError(f"pricing file {path}: not JSON ({exc})") from None
        if not isinstance(given, dict) or not isinstance(given.get("gpu_hour", {}), dict):
            raise ValueError(f'pricing file {path}: expected an object like {{"gpu_hour": {{"h100": 6.88}}}}')
        known = {f.name for f in fields(cls)}
        unknown = set(given) - known
        if unknown:
            raise ValueError(f"pricing file {path}: unknown pricing keys: {', '.join(sorted(unknown))}")
        base = cls()
        try:
            gpu = {**base.gpu_hour, **{k: float(v) for k, v in given.pop("gpu_hour", {}).items()}}
            return replace(base, gpu_hour=gpu, **{k: float(v) for k, v in given.items()})
        except (TypeError, ValueError):
            raise ValueError(f"pricing file {path}: every price is a number") from None


@dataclass(frozen=True)
class Usage:
    """What a run consumed."""

    output_tokens: int
    gpu_s: float  # provisioned accelerator-seconds (busy or idle: a replica is billed while it exists)
    sku: str = "h100"
    gateway_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0
    redis_ops: int = 0
    redis_gb: float = 0.0  # average memory held
    duration_s: float = 0.0


@dataclass(frozen=True)
class Cost:
    gpu: float
    gateway: float
    worker: float
    redis_memory: float
    redis_ops: float

    @property
    def total(self) -> float:
        return self.gpu + self.gateway + self.worker + self.redis_memory + self.redis_ops


def cost(usage: Usage, prices: Pricing) -> Cost:
    """The run's cost in USD, by component."""
    if usage.sku not in prices.gpu_hour:
        raise ValueError(f"no price for GPU `{usage.sku}` (known: {', '.join(sorted(prices.gpu_hour))})")
    month_s = prices.hours_per_month * 3600
    return Cost(
        gpu=usage.gpu_s / 3600 * prices.gpu_hour[usage.sku],
        gateway=usage.gateway_cpu_s / 3600 * prices.vcpu_hour,
        worker=usage.worker_cpu_s / 3600 * prices.vcpu_hour,
        redis_memory=usage.redis_gb * usage.duration_s / month_s * prices.redis_gb_month,
        redis_ops=usage.redis_ops / 1e6 * prices.redis_million_ops,
    )


def per_1k_tokens(usage: Usage, prices: Pricing) -> float:
    if usage.output_tokens <= 0:
        return float("nan")
    return cost(usage, prices).total / usage.output_tokens * 1000
