"""Engines turn prompts into tokens behind one interface (:mod:`breakwater.engines.base`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from breakwater.engines.base import Engine

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"

ENGINES = ("sim", "llamacpp", "openai", "vllm")


def build_engine(name: str, **options: Any) -> Engine:
    """Build an engine by name; imports lazily so optional engines need not be installed."""
    capacity = options.get("capacity")
    context_length = options.get("context_length")
    if name == "sim":
        from breakwater.engines.sim import SimEngine, SimTiming

        timing = SimTiming(**{k: v for k, v in options.items() if k in SimTiming.__dataclass_fields__})
        return SimEngine(
            model=str(options.get("model") or "sim"),
            capacity=int(capacity or 32),
            context_length=int(context_length or 4096),
            timing=timing,
            hang_marker=options.get("sim_hang_marker"),
        )
    if name == "llamacpp":
        from breakwater.engines.llamacpp import LlamaCppEngine
        from breakwater.engines.models import DEFAULT_MODEL, bundled_gguf

        model_path = options.get("model_path")
        model = str(options.get("model") or (Path(model_path).stem if model_path else DEFAULT_MODEL))
        path = Path(model_path) if model_path else bundled_gguf(model)
        return LlamaCppEngine(
            path,
            model_name=model,
            capacity=int(capacity or 8),
            context_length=int(context_length or 2048),
            n_threads=options.get("n_threads"),
            n_batch=int(options.get("n_batch") or 256),
        )
    if name == "openai":
        from breakwater.engines.upstream import OpenAIUpstreamEngine

        url = options.get("upstream_url")
        if not url:
            raise ValueError("the openai engine needs --upstream-url (e.g. http://127.0.0.1:8001/v1)")
        return OpenAIUpstreamEngine(
            str(url),
            model_name=options.get("model"),
            upstream_model=options.get("upstream_model"),
            capacity=int(capacity or 64),
            context_length=int(context_length) if context_length else None,
            api_key=options.get("upstream_api_key"),
            metrics_url=options.get("upstream_metrics_url"),
            max_waiting=int(options.get("upstream_max_waiting") or 0),
            kv_high=float(options.get("upstream_kv_high") or 0.95),
            pull_burst=int(options.get("upstream_pull_burst") or 32),
            wait_ready_s=float(options.get("upstream_wait_s") or 600.0),
            read_timeout_s=float(options.get("upstream_read_timeout_s") or 120.0),
        )
    if name == "vllm":
        try:
            from breakwater.engines.vllm import VLLMEngine
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ValueError(f"the vllm engine needs vLLM: pip install 'breakwater[vllm]' ({exc})") from exc
        return VLLMEngine(
            model_name=str(options.get("model") or DEFAULT_MODEL_NAME),
            model_path=options.get("model_path"),
            capacity=int(capacity or 32),
            context_length=int(context_length or 2048),
            engine_args=options.get("vllm_args") or {},
        )
    raise ValueError(f"unknown engine {name!r} (available: {', '.join(ENGINES)})")
