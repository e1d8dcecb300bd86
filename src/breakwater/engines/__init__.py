"""Engines turn prompts into tokens behind one interface (:mod:`breakwater.engines.base`)."""

from __future__ import annotations

from typing import Any

from breakwater.engines.base import Engine


def build_engine(name: str, **options: Any) -> Engine:
    """Build an engine by name; imports lazily so optional engines need not be installed."""
    if name == "sim":
        from breakwater.engines.sim import SimEngine, SimTiming

        timing = SimTiming(**{k: v for k, v in options.items() if k in SimTiming.__dataclass_fields__})
        return SimEngine(
            model=str(options.get("model") or "sim"),
            capacity=int(options.get("capacity") or 32),
            context_length=int(options.get("context_length") or 4096),
            timing=timing,
        )
    raise ValueError(f"unknown engine {name!r} (available: sim)")
