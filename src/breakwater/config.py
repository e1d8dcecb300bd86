"""Typed settings, one object per process, from flags and ``BREAKWATER_*`` environment variables."""

from __future__ import annotations

import socket
import uuid
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from breakwater.engines.options import LlamaCppOptions, SimOptions, UpstreamOptions, VLLMOptions
from breakwater.hosts import allowed_names, normal_origin
from breakwater.secret import secret

MAX_PARTITIONS = 64
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BREAKWATER_", extra="ignore")

    redis_url: str = DEFAULT_REDIS_URL
    # ACL user and password (Kubernetes: from a Secret), kept out of the URL so logs never show them
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_password_file: str | None = Field(default=None, description="read the password from this file")
    redis_socket_timeout_s: float = Field(
        default=10.0, gt=0.0, description="fail a Redis command whose reply takes longer (half-open socket)"
    )
    redis_max_connections: int = Field(
        default=256, ge=2, description="connections in the Redis pool; when all are busy, commands wait"
    )
    key_prefix: str = Field(default="bw", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sharded_pubsub: bool = Field(
        default=True,
        description=(
            "on a Redis Cluster, token events go over sharded Pub/Sub (SPUBLISH/SSUBSCRIBE: each "
            "to its request's shard); false: classic Pub/Sub, every message to every node"
        ),
    )
    replica_ack: int = Field(
        default=0,
        ge=0,
        description=(
            "answer a client only once this many replicas acknowledged its request's admission "
            "(Redis WAIT): a primary's failover cannot lose an accepted request; 0: do not wait"
        ),
    )
    replica_ack_ms: int = Field(
        default=200, ge=1, description="how long admission waits for replicas (then 503, request cancelled)"
    )
    partitions: str = Field(
        default="",
        pattern=r"^\s*([^,=#{}\s]+=\d+\s*(,\s*[^,=#{}\s]+=\d+\s*)*)?$",
        description=(
            "hot models whose job queue is split into partitions, each on a slot (a Redis Cluster "
            "shard) of its own: model=N[,model=N...]; gateways and workers must agree"
        ),
    )
    cache_redis_url: str = Field(
        default="",
        description=(
            "the response cache's entries in this Redis (e.g. one with maxmemory and allkeys-lru) instead "
            "of the queue's; the same credentials settings apply; '': the queue's Redis"
        ),
    )
    log_level: str = "INFO"
    log_json: bool = True
    # API keys (`breakwater keys ...`) are stored as HMAC-SHA256(pepper, key): the pepper comes from a
    # Secret (file) so that a copy of Redis alone cannot be used to test guessed keys.
    auth_pepper: SecretStr | None = None
    auth_pepper_file: str | None = Field(default=None, description="read the API-key pepper from this file")
    # Per-tenant Prometheus series only for these tenants (the rest are "other"): bounded cardinality.
    metrics_tenants: str = Field(default="", description="comma-separated tenants with their own series")

    @field_validator("redis_url", "cache_redis_url")
    @classmethod
    def _redis_url_valid(cls, value: str) -> str:
        """A URL the Redis client can use, or the setting's one-line error (not a startup traceback)."""
        if value:
            from breakwater.broker.connection import url_problem  # the client's module imports this one

            if (problem := url_problem(value)) is not None:
                raise ValueError(problem)
        return value

    @field_validator("partitions")
    @classmethod
    def _partitions_valid(cls, value: str) -> str:
        names: set[str] = set()
        for item in filter(None, (i.strip() for i in value.split(","))):
            name, _, n = item.partition("=")
            if not 1 <= int(n) <= MAX_PARTITIONS:
                raise ValueError(f"`{item}`: between 1 and {MAX_PARTITIONS} partitions")
            if name in names:
                raise ValueError(f"`{name}` is listed twice")
            names.add(name)
        return value

    def partition_counts(self) -> dict[str, int]:
        """Model -> job-queue partitions, for the models split (``partitions``)."""
        pairs = (i.strip().partition("=") for i in self.partitions.split(",") if i.strip())
        return {name: int(n) for name, _, n in pairs}

    def partitions_of(self, model: str) -> int:
        """How many job-queue partitions ``model`` has (1: not partitioned)."""
        return self.partition_counts().get(model, 1)

    def cache_index(self) -> CommonSettings | None:
        """The settings of the cache's own Redis, if it has one."""
        return self.model_copy(update={"redis_url": self.cache_redis_url}) if self.cache_redis_url else None

    def tenant_label(self, tenant: str) -> str:
        listed = {t.strip() for t in self.metrics_tenants.split(",") if t.strip()}
        return tenant if tenant in listed else "other"

    def pepper(self) -> bytes:
        """The API-key pepper; raises ValueError (naming the setting) when none is configured or its
        file cannot be read."""
        try:
            value = secret(self.auth_pepper, self.auth_pepper_file) or ""
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"BREAKWATER_AUTH_PEPPER_FILE {self.auth_pepper_file}: {why}") from None
        if len(value) < 16:
            raise ValueError(
                "API keys need a pepper of at least 16 characters: set BREAKWATER_AUTH_PEPPER_FILE "
                "(a mounted Secret) or BREAKWATER_AUTH_PEPPER"
            )
        return value.encode()


class GatewaySettings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    auth: Literal["off", "keys"] = Field(
        default="off", description="keys: every /v1 request needs an API key (Authorization: Bearer)"
    )
    auth_cache_s: float = Field(
        default=1.0,
        ge=0.0,
        le=60.0,
        description="how long a gateway trusts a key it looked up (revocation delay)",
    )
    cors_allow_origins: str = Field(
        default="",
        description=(
            "origins whose web pages may call the API (comma-separated, e.g. https://app.example.com; "
            "* for any): CORS on HTTP, and the WebSocket's Origin check. Empty: none"
        ),
    )

    @field_validator("cors_allow_origins")
    @classmethod
    def _real_origins(cls, value: str) -> str:
        for origin in filter(None, (o.strip() for o in value.split(","))):
            if origin.lower() == "null":
                raise ValueError("`null` is the origin of any sandboxed page or file: list real origins")
            if origin != "*" and "://" not in origin:
                raise ValueError(f"`{origin}` is not an origin (scheme://host[:port])")
        return value

    allowed_hosts: str = Field(
        default="",
        description=(
            "host names the API answers to besides IP addresses and localhost (comma-separated; "
            ".example.com: the domain and its subdomains; *: any). Empty: only those on a loopback "
            "listener (a DNS-rebinding page is refused), any on another address"
        ),
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        allowed_names(value)
        return value

    stream_grace_s: float = Field(
        default=0.0,
        ge=0.0,
        le=3600.0,
        description=(
            "on SIGTERM, the requests the gateway is answering (SSE streams, and non-streaming ones) may "
            "run this long (a plain OpenAI client gets its whole answer); streams still open then end "
            "without [DONE] for their clients to resume elsewhere, non-streaming requests get 503 with "
            "their request id. New requests and resumes are refused at once; WebSockets close with 1012"
        ),
    )
    # /metrics on a port of its own (never routed by the Ingress); with --workers N, process i listens
    # on metrics_port + i. Without one, /metrics is on the public port only while auth is off.
    metrics_port: int = Field(default=0, ge=0, le=65535, description="/metrics listener; 0: none")
    metrics_host: str = Field(default="127.0.0.1", description="the /metrics listener's address")

    @model_validator(mode="after")
    def _embed_credentials_name_a_user(self) -> GatewaySettings:
        # A password file with no user would be ignored (the embedded worker would use the gateway's).
        if self.embed_redis_password_file and not self.embed_redis_username:
            raise ValueError("embed_redis_password_file needs embed_redis_username (the ACL user it is for)")
        return self

    @property
    def public_metrics(self) -> bool:
        return self.auth == "off" and self.metrics_port == 0

    lane_max_queued: int = Field(default=1000, ge=1, description="queued jobs per model and lane before 429")
    embed_engine: Literal["", "openai", "sim"] = Field(
        default="",
        description="run a worker with this engine inside each gateway process (its other settings "
        "from the environment, as a worker's); '': none",
    )
    embed_redis_username: str | None = Field(
        default=None,
        description="the embedded worker's Redis ACL user (one with the worker's commands, which the "
        "gateway's user lacks); unset: the gateway's credentials",
    )
    embed_redis_password_file: str | None = Field(
        default=None, description="read the embedded worker's Redis password from this file"
    )
    stream_buffer: int = Field(default=256, ge=8, description="per-stream live buffer before falling back")
    idle_poll_s: float = Field(
        default=5.0, gt=0.0, description="re-read the durable stream when no live event came (a safety net)"
    )
    sse_keepalive_s: float = Field(
        default=15.0,
        ge=0.0,
        description="an SSE comment on a stream that sent nothing this long, e.g. while queued, so an "
        "idle-timeout proxy keeps it (0: never)",
    )
    result_ttl_s: int = Field(default=3600, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0.0, description="default per-request deadline")
    batch_timeout_s: float = Field(
        default=86_400.0,
        gt=0.0,
        le=86_400.0,
        description="default deadline of a Batch API line's request (its batch's window)",
    )
    model_cache_s: float = Field(default=1.0, ge=0.0)
    alias_cache_s: float = Field(
        default=0.5,
        ge=0.0,
        description="read model aliases again after this long (a change reaches every gateway)",
    )
    model_grace_s: float = Field(
        default=120.0, ge=0.0, description="keep serving a model this long after its last worker was seen"
    )
    max_body_bytes: int = Field(default=4 << 20, ge=1024, description="larger request bodies get 413")
    # The Files and Batch APIs: files live in Redis (with its AOF), so their size is bounded.
    files_max_bytes: int = Field(default=32 << 20, ge=1024, description="larger uploads to /v1/files get 413")
    files_quota_bytes: int = Field(
        default=1 << 30,
        ge=1024,
        description="a tenant's files (uploads and batch outputs) in all, before 413",
    )
    files_ttl_s: int = Field(
        default=7 * 86_400, ge=60, description="files and finished batches are deleted after this long"
    )
    batch_runner: bool = Field(default=True, description="run batches (/v1/batches) in this gateway process")
    batch_concurrency: int = Field(
        default=16, ge=1, le=4096, description="requests of one batch queued or running at once"
    )
    batch_max_running: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="batches one gateway process runs at once (each holds its input's lines in memory)",
    )
    batch_lease_s: float = Field(
        default=10.0, ge=1.0, description="a batch whose gateway stopped is taken up by another after this"
    )
    # The response cache (gateway.cache): reproducible requests share one generation.
    cache: bool = Field(
        default=False,
        description=(
            "answer a reproducible request (temperature 0, a seed, embeddings) from an identical one "
            "that is running or finished: single-flight and exact-match cache"
        ),
    )
    cache_ttl_s: int = Field(
        default=3600,
        ge=1,
        description="how long an answer is reused (at most as long as its request's record: result_ttl_s)",
    )
    cache_shared_models: str = Field(
        default="",
        description="comma-separated models whose cached answers every tenant shares (default: per tenant)",
    )
    max_context_tokens: int = Field(
        default=131_072, ge=16, description="prompt bound while no worker has reported its context length"
    )
    # Models served even while no worker is live (scale to zero): requests queue until one starts.
    models: str = Field(default="", description="comma-separated model names always served")
    # breakwater_desired_workers: serve the arrival rate and clear the backlog within the horizon
    autoscale_min_workers: int = Field(default=1, ge=0)
    autoscale_max_workers: int = Field(default=16, ge=1)
    autoscale_horizon_s: float = Field(default=30.0, gt=0.0)
    # desired workers reports the highest count of this window, so that a controller reading it
    # every 15-30 s sees the bursts between its reads (0: the count of the moment)
    autoscale_window_s: float = Field(default=30.0, ge=0.0)
    # The share of a worker's slots that desired workers sizes for (like an HPA's target
    # utilisation): below 1 keeps batches smaller, which long prompts need for their TTFT.
    autoscale_target_occupancy: float = Field(default=1.0, gt=0.0, le=1.0)

    @property
    def cors_origins(self) -> list[str]:
        return [normal_origin(o) for o in self.cors_allow_origins.split(",") if o.strip()]

    @property
    def cache_shared(self) -> frozenset[str]:
        return frozenset(m.strip() for m in self.cache_shared_models.split(",") if m.strip())

    @property
    def declared_models(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


class WorkerSettings(CommonSettings):
    """A worker's settings. Engine knobs default to None, meaning the engine's own default, which its
    options type (:mod:`breakwater.engines.options`) defines; the descriptions quote it from there."""

    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    engine: str = "sim"
    model: str | None = Field(default=None, description="model name (default: the engine's default)")
    model_path: str | None = Field(default=None, description="llamacpp: any GGUF file")
    capacity: int | None = Field(
        default=None,
        ge=1,
        description=(
            f"max concurrent sequences (default: sim {SimOptions.capacity}, "
            f"llamacpp {LlamaCppOptions.capacity}, openai {UpstreamOptions.capacity} in flight, "
            f"vllm {VLLMOptions.capacity})"
        ),
    )
    context_length: int | None = Field(
        default=None,
        ge=16,
        description=(
            f"tokens per sequence (default: sim {SimOptions.context_length}, "
            f"llamacpp {LlamaCppOptions.context_length}, vllm {VLLMOptions.context_length}; "
            "openai: the upstream's max_model_len)"
        ),
    )
    n_threads: int | None = Field(default=None, ge=1, description="llamacpp threads (default: all cores)")
    n_batch: int | None = Field(
        default=None,
        ge=8,
        description=f"llamacpp tokens per decode step, the prefill chunk (default {LlamaCppOptions.n_batch})",
    )
    # openai (upstream) engine
    upstream_url: str | None = Field(default=None, description="OpenAI-compatible base URL, e.g. :8001/v1")
    upstream_model: str | None = Field(default=None, description="model id upstream (default: its first)")
    upstream_api_key: SecretStr | None = None
    upstream_api_key_file: str | None = Field(
        default=None, description="read the upstream's API key from this file (a mounted Secret; it wins)"
    )
    upstream_metrics_url: str | None = Field(
        default=None,
        description="vLLM-style metrics (default: the server's /metrics/ by name, else /metrics; 'off': no)",
    )
    upstream_max_waiting: int | None = Field(
        default=None,
        ge=0,
        description=f"pull only while upstream waiting <= this (default {UpstreamOptions.max_waiting})",
    )
    upstream_kv_high: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=f"pull only below this KV use (default {UpstreamOptions.kv_high})",
    )
    upstream_pull_burst: int | None = Field(
        default=None,
        ge=1,
        description=f"jobs sent per metrics scrape at most (default {UpstreamOptions.pull_burst})",
    )
    upstream_wait_s: float | None = Field(
        default=None,
        ge=0.0,
        description=f"wait this long for the upstream (default {UpstreamOptions.wait_s})",
    )
    upstream_read_timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "fail a stream whose upstream sends nothing for this long "
            f"(default {UpstreamOptions.read_timeout_s})"
        ),
    )
    stream_window_share: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=(
            "openai/vllm: how long a token may wait for other sequences' tokens to share its write, "
            f"as a share of their mean gap between tokens (1-10 ms; default {UpstreamOptions.window_share}; "
            "0: 1 ms, the least jitter and the most CPU per token)"
        ),
    )
    # vllm engine: AsyncEngineArgs fields passed through (tensor_parallel_size, quantization, ...)
    vllm_args: dict[str, Any] = Field(default_factory=dict)
    vllm_tool_parser: str | None = Field(
        default=None,
        description=(
            "vllm: vLLM's tool parser for `tool_choice: auto` (its --tool-call-parser: hermes, xlam, "
            "llama3_json, ...); the worker then passes tools through (tool format `openai`)"
        ),
    )
    vllm_chat_template: str | None = Field(
        default=None, description="vllm: a Jinja chat template file replacing the model's (--chat-template)"
    )
    heartbeat_s: float = Field(default=2.0, gt=0.0)
    lease_heartbeats: float = Field(default=3.0, ge=2.0, description="reclaim after this many missed beats")
    max_attempts: int = Field(default=3, ge=1)
    drain_grace_s: float = Field(default=30.0, ge=0.0)
    block_ms: int = Field(default=200, ge=1)
    result_ttl_s: int = Field(default=3600, ge=1)
    token_stream_maxlen: int = Field(default=100_000, ge=100)
    step_timeout_s: float = Field(
        default=60.0, gt=0.0, description="an engine step longer than this marks the worker hung"
    )
    detach_grace_s: float = Field(default=15.0, ge=0.0)
    preempt: bool = Field(
        default=True,
        description=(
            "a full worker pauses a sequence of a tenant running two or more here when a less-served "
            "tenant joins the queue, and continues it when a slot frees (fair share without waiting)"
        ),
    )
    tool_format: Literal["", "none", "smollm2", "hermes", "openai"] = Field(
        default="",
        description=(
            "the model's tool-call format, for `tool_choice: auto` (protocol/toolformats.py); '' : the "
            "engine's guess (a SmolLM2 GGUF: smollm2; the openai engine: openai, passed through), "
            "'none': no automatic tool calls"
        ),
    )
    model_version: str = Field(
        default="",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})?$",
        description=(
            "the version this worker serves: it registers `<model>@<version>` and pulls that queue "
            "(clients pin it, or reach it through an alias: `breakwater models alias set`)"
        ),
    )
    model_revision: str = Field(
        default="",
        max_length=128,
        description=(
            "a label for what this worker serves (weights, fine-tune, build): part of the response cache's "
            "key beside the engine's own fingerprint, so answers cached before a change are not reused"
        ),
    )
    hourly_cost_usd: float = Field(default=0.0, ge=0.0, description="this worker's price per hour (cost/1k)")
    metrics_port: int = Field(default=0, ge=0, description="/healthz, /readyz, /metrics; 0: no listener")
    metrics_host: str = Field(
        default="127.0.0.1", description="0.0.0.0 in a pod, so probes and Prometheus reach it"
    )
    # sim engine timing
    sim_prefill_ms_per_token: float | None = Field(
        default=None, description=f"sim: prefill cost per token (default {SimOptions.prefill_ms_per_token})"
    )
    sim_decode_base_ms: float | None = Field(
        default=None, description=f"sim: decode step base cost (default {SimOptions.decode_base_ms})"
    )
    sim_decode_per_seq_ms: float | None = Field(
        default=None, description=f"sim: decode cost per sequence (default {SimOptions.decode_per_seq_ms})"
    )
    sim_jitter_frac: float | None = Field(
        default=None,
        description=f"sim: step time jitter, +- this fraction (default {SimOptions.jitter_frac})",
    )
    sim_hang_marker: str | None = Field(default=None, description="tests: hang the step on this prompt text")
    sim_error_rate: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="tests: refuse this fraction of requests (by id) with an error",
    )

    @property
    def lease_s(self) -> float:
        return self.heartbeat_s * self.lease_heartbeats

    @model_validator(mode="after")
    def _results_outlive_leases(self) -> WorkerSettings:
        # A running request's keys are kept alive by the lease refresh at every beat: a shorter TTL
        # lets them expire between beats (its emitted text lost mid-answer, so no continuation).
        if self.result_ttl_s < 3 * self.lease_s:
            raise ValueError(
                f"result_ttl_s ({self.result_ttl_s}) must be at least 3 leases "
                f"(3 x heartbeat_s x lease_heartbeats = {3 * self.lease_s:g} s)"
            )
        return self
