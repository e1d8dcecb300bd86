"""Engines turn prompts into tokens behind one interface (:mod:`breakwater.engines.base`)."""

from __future__ import annotations

from breakwater.engines.base import Engine
from breakwater.engines.options import (
    ENGINES,
    EngineOptions,
    LlamaCppOptions,
    SimOptions,
    UpstreamOptions,
    VLLMOptions,
    options_from_settings,
)

__all__ = [
    "ENGINES",
    "EngineOptions",
    "LlamaCppOptions",
    "SimOptions",
    "UpstreamOptions",
    "VLLMOptions",
    "build_engine",
    "options_from_settings",
]


def build_engine(options: EngineOptions) -> Engine:
    """The engine the options are for; imports lazily so optional engines need not be installed."""
    if isinstance(options, SimOptions):
        from breakwater.engines.sim import SimEngine

        return SimEngine(options)
    if isinstance(options, LlamaCppOptions):
        from breakwater.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(options)
    if isinstance(options, UpstreamOptions):
        from breakwater.engines.upstream import OpenAIUpstreamEngine

        return OpenAIUpstreamEngine(options)
    try:
        from breakwater.engines.vllm import VLLMEngine
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ValueError(f"the vllm engine needs vLLM: pip install 'breakwater[vllm]' ({exc})") from exc
    return VLLMEngine(options)
