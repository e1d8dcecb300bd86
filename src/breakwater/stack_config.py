"""What ``breakwater up`` runs: its flags as one typed object, and the model its workers serve."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# On Ctrl-C or SIGTERM, ``up``'s gateway lets the requests it is answering run on this long (its
# stream_grace_s, as the Kubernetes manifests set it) unless BREAKWATER_STREAM_GRACE_S says otherwise.
UP_STREAM_GRACE_S = 15.0


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    engine: str = "sim"
    model: str | None = "sim"  # None: whatever the workers register (openai: the upstream's model)
    model_path: str | None = None
    upstream_url: str | None = None  # openai engine
    upstream_model: str | None = None
    upstream_metrics_url: str | None = None
    vllm_args: list[str] = field(default_factory=list)  # KEY=VALUE, passed on as --vllm-arg
    data_dir: Path = Path(".breakwater")
    redis_url: str | None = None
    redis_cluster: int = 0  # > 0: an embedded Redis Cluster of this many primaries (one replica each)
    appendfsync: str = "everysec"
    key_prefix: str = field(default_factory=lambda: os.environ.get("BREAKWATER_KEY_PREFIX") or "bw")
    worker_args: list[str] = field(default_factory=list)
    ready_timeout_s: float = 120.0
    supervisor_metrics_port: int = 0  # 0: any free port
    # restarts of a crashed gateway or worker
    restart_initial_s: float = 0.5
    restart_max_s: float = 30.0
    restart_stable_s: float = 60.0  # up this long: the next crash starts the backoff over
    # --autoscale: follow the gateway's breakwater_desired_workers between these bounds
    autoscale: bool = False
    min_workers: int = 1
    max_workers: int = 4
    scale_interval_s: float = 2.0
    scale_down_delay_s: float = 10.0  # desired must stay below the current count this long
    # or another controller's rules over the same processes (stack_policy): hpa:0.7, keda:5, ...
    autoscale_policy: str = "supervisor"
    autoscale_time_scale: float = 1.0  # the Kubernetes controllers' clocks run this much faster


def default_model(engine: str, model_path: str | None, upstream_model: str | None = None) -> str | None:
    """The model name workers register when ``--model`` is not given."""
    from breakwater.engines.models import DEFAULT_MODEL

    if engine == "openai":
        return upstream_model  # None: the upstream's first model, known once a worker has registered
    if model_path:
        return Path(model_path).stem
    if engine in ("llamacpp", "vllm"):
        return DEFAULT_MODEL
    return engine
