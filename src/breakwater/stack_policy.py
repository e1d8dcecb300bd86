"""``breakwater up --autoscale --autoscale-policy hpa:0.7`` (or ``keda:5``): the simulator's own
controller objects (``capacity.policies``) driving real worker processes.

Each period the policy is shown what its Kubernetes counterpart would see: the workers registered
and the jobs waiting and running (the gateway's gauges), and, for the HPA, the engines' busy share
since the previous look (each worker's ``breakwater_engine_busy_seconds_total`` on its own metrics
port). Running the same objects here and in the simulator is what lets ``benchmarks/sim_validation.py``
check the simulator against a real run of each policy, not only of the supervisor's.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from breakwater.capacity.policies import (
    Fixed,
    Hpa,
    HpaMechanics,
    KedaQueue,
    Observation,
    Policy,
    policy_from_spec,
)

STACK_POLICIES = (
    "supervisor (the gateway's breakwater_desired_workers) | hpa[:target] | keda[:lag per pod] | fixed:N"
)
BUSY = "breakwater_engine_busy_seconds"


def stack_policy(spec: str, min_workers: int, max_workers: int, time_scale: float) -> Policy | None:
    """The controller for ``--autoscale-policy``; None for the supervisor's own rules (the default).
    Raises ``ValueError`` for a spec it cannot run over local processes."""
    if spec == "supervisor":
        return None
    mechanics = HpaMechanics(min_replicas=min_workers, max_replicas=max_workers)
    policy = policy_from_spec(spec, mechanics, time_scale)
    if not isinstance(policy, Hpa | KedaQueue | Fixed):  # adaptive is the supervisor's signal already
        raise ValueError(f"`{spec}`: expected one of {STACK_POLICIES}")
    return policy


def gateway_load(text: str, model: str | None) -> tuple[int, int, int]:
    """(workers registered, jobs waiting, jobs running) of ``model`` (None: every model) from the
    gateway's /metrics text."""
    totals = {"breakwater_workers": 0.0, "breakwater_queue_depth": 0.0, "breakwater_jobs_in_flight": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name not in totals:
            continue
        for sample in family.samples:
            if model is None or sample.labels.get("model") == model:
                totals[family.name] += sample.value
    return (
        int(totals["breakwater_workers"]),
        int(totals["breakwater_queue_depth"]),
        int(totals["breakwater_jobs_in_flight"]),
    )


def busy_seconds(text: str) -> float:
    """A worker's engine busy seconds from its /metrics text."""
    for family in text_string_to_metric_families(text):
        if family.name == BUSY:
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return 0.0


class PolicyScaler:
    """Observes the stack for ``policy`` and answers the worker count it wants."""

    def __init__(self, policy: Policy, model: str | None) -> None:
        self.policy = policy
        self.model = model
        self._busy: dict[str, float] = {}  # worker name -> busy seconds at the previous look
        self._last: float | None = None

    def observe(
        self, now: float, gateway_url: str, replicas: int, worker_ports: dict[str, int]
    ) -> Observation | None:
        """What the controller sees now; None while the gateway does not answer."""
        try:
            ready, waiting, running = gateway_load(
                httpx.get(f"{gateway_url}/metrics", timeout=2).text, self.model
            )
        except (httpx.HTTPError, ValueError):
            return None
        busy_delta = 0.0
        seen: dict[str, float] = {}
        for name, port in worker_ports.items():
            try:
                busy = busy_seconds(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text)
            except (httpx.HTTPError, ValueError):
                continue  # starting, or gone: it has no busy time to add
            seen[name] = busy
            busy_delta += max(0.0, busy - self._busy.get(name, busy))  # a restarted worker counts from 0
        span = now - self._last if self._last is not None else 0.0
        self._busy, self._last = seen, now
        utilisation = min(1.0, busy_delta / (span * ready)) if span > 0 and ready else 0.0
        return Observation(
            now=now,
            replicas=replicas,
            ready=ready,
            waiting=waiting,
            running=running,
            capacity=0,  # not read by these policies
            utilisation=utilisation,
            arrived=0,
            done=0,
        )

    def desired(self, obs: Observation) -> int:
        return self.policy.desired(obs)
