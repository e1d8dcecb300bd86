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
    Supervisor,
    policy_from_spec,
)

STACK_POLICIES = (
    "supervisor (the gateway's breakwater_desired_workers) | hpa[:target] | keda[:lag per pod] | fixed:N"
)
BUSY = "breakwater_engine_busy_seconds"
TIMEOUT_S = 0.5  # a look must not stall the supervisor's loop, which also restarts crashed processes


def stack_policy(spec: str, min_workers: int, max_workers: int, time_scale: float) -> Policy | None:
    """The controller for ``--autoscale-policy``; None for the supervisor's own rules (the default).
    Raises ``ValueError`` for a spec it cannot run over local processes."""
    mechanics = HpaMechanics(min_replicas=min_workers, max_replicas=max_workers)
    policy = policy_from_spec(spec, mechanics, time_scale)
    if isinstance(policy, Supervisor):
        return None
    if not isinstance(policy, Hpa | KedaQueue | Fixed):  # adaptive is the supervisor's signal already
        raise ValueError(f"`{spec}`: expected one of {STACK_POLICIES}")
    if isinstance(policy, KedaQueue) and policy.min_replicas == 0:  # the simulator's only
        raise ValueError(
            f"`{spec}`: the local stack keeps one worker at least; expected one of {STACK_POLICIES}"
        )
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


def _scrape(url: str) -> str:
    """A /metrics text; an error status (a 404 with auth on, a 503) raises like a refused connection."""
    response = httpx.get(url, timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.text


class PolicyScaler:
    """Observes the stack for ``policy`` and answers the worker count it wants.

    The engines' busy share is the HPA's average over the workers it has metrics for: the busy
    seconds of every worker process since the previous look (retiring ones too, as the simulator
    counts a draining replica's steps) over the elapsed time times the serving workers that were
    read both times (a new one's first reading is its baseline; one that did not answer keeps its
    previous reading, so its busy time is counted at its next answer)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._busy: dict[str, tuple[float, float]] = {}  # worker -> (busy seconds, when read)
        self._last: float | None = None
        self.failing = False  # the gateway's /metrics did not answer at the last look

    def observe(
        self,
        now: float,
        gateway_url: str,
        model: str | None,
        replicas: int,
        serving: dict[str, int],
        retiring: dict[str, int],
    ) -> Observation | None:
        """What the controller sees now (``serving`` and ``retiring``: worker name -> metrics
        port); None while the gateway's /metrics does not answer."""
        try:
            ready, waiting, running = gateway_load(_scrape(f"{gateway_url}/metrics"), model)
        except (httpx.HTTPError, ValueError):
            self.failing = True
            return None
        self.failing = False
        busy_delta, measured = 0.0, 0
        known = {**serving, **retiring}
        for name, port in known.items():
            try:
                busy = busy_seconds(_scrape(f"http://127.0.0.1:{port}/metrics"))
            except (httpx.HTTPError, ValueError):
                continue  # starting, stalled or gone: its previous reading is kept
            previous = self._busy.get(name)
            self._busy[name] = (busy, now)
            if previous is None:
                continue  # the baseline of a new worker
            busy_delta += busy - previous[0] if busy >= previous[0] else busy  # restarted: from 0
            measured += name in serving
        for name in self._busy.keys() - known.keys():  # exited
            del self._busy[name]
        span = now - self._last if self._last is not None else 0.0
        self._last = now
        utilisation = min(1.0, busy_delta / (span * measured)) if span > 0 and measured else 0.0
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
