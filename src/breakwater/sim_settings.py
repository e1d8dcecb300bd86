"""``breakwater sim-server``'s settings: the simulated engine served as an OpenAI-compatible upstream."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from breakwater.engines.options import SimOptions, UpstreamOptions


class SimServerSettings(BaseSettings):
    """``breakwater sim-server``: the sim engine's own defaults, except its size (below)."""

    model_config = SettingsConfigDict(env_prefix="BREAKWATER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8100
    model: str = SimOptions.model
    # It stands in for an upstream server: room for all an openai worker keeps in flight by default.
    capacity: int = UpstreamOptions.capacity
    context_length: int = SimOptions.context_length
    sim_prefill_ms_per_token: float = SimOptions.prefill_ms_per_token
    sim_decode_base_ms: float = SimOptions.decode_base_ms
    sim_decode_per_seq_ms: float = SimOptions.decode_per_seq_ms
    sim_jitter_frac: float = SimOptions.jitter_frac

    def sim_options(self) -> SimOptions:
        """The engine the server runs."""
        return SimOptions(
            model=self.model,
            capacity=self.capacity,
            context_length=self.context_length,
            prefill_ms_per_token=self.sim_prefill_ms_per_token,
            decode_base_ms=self.sim_decode_base_ms,
            decode_per_seq_ms=self.sim_decode_per_seq_ms,
            jitter_frac=self.sim_jitter_frac,
        )
