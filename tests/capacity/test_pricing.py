"""The cost model, checked against hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from breakwater.capacity.pricing import Pricing, Usage, cost, per_1k_tokens


def test_each_component_is_priced_from_its_own_rate() -> None:
    prices = Pricing(
        gpu_hour={"h100": 6.0},
        vcpu_hour=0.05,
        redis_gb_month=73.0,
        redis_million_ops=0.5,
        hours_per_month=730.0,
    )
    usage = Usage(
        output_tokens=2_000_000,
        gpu_s=2 * 3600,  # two GPU-hours
        sku="h100",
        gateway_cpu_s=3600,
        worker_cpu_s=1800,
        redis_ops=4_000_000,
        redis_gb=2.0,
        duration_s=3600,
    )
    c = cost(usage, prices)
    assert c.gpu == pytest.approx(12.0)
    assert c.gateway == pytest.approx(0.05) and c.worker == pytest.approx(0.025)
    assert c.redis_memory == pytest.approx(2.0 * 73.0 / 730.0)  # 2 GB for one hour of a 730-hour month
    assert c.redis_ops == pytest.approx(2.0)
    assert per_1k_tokens(usage, prices) == pytest.approx((12 + 0.075 + 0.2 + 2) / 2000)


def test_a_pricing_file_overrides_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"gpu_hour": {"mi300x": 4.5}, "vcpu_hour": 0.04}))
    prices = Pricing.load(path)
    assert prices.gpu_hour["mi300x"] == 4.5 and prices.gpu_hour["h100"] == Pricing().gpu_hour["h100"]
    assert prices.vcpu_hour == 0.04 and prices.redis_gb_month == Pricing().redis_gb_month
    path.write_text(json.dumps({"gpu_hours": {}}))
    with pytest.raises(ValueError, match="gpu_hours"):
        Pricing.load(path)
    with pytest.raises(ValueError, match="known"):
        cost(Usage(output_tokens=1, gpu_s=1, sku="tpu"), prices)
