"""Autoscaling policies as their controllers run them, for the simulator.

- :class:`Hpa`: the Kubernetes HorizontalPodAutoscaler's algorithm (``desired = ceil(current *
  metric / target)``, a 10% tolerance, a 300 s scale-down stabilisation window, the default
  scale-up limit of max(4 pods, 100%) per 15 s, a 15 s sync period), on a utilisation metric
  (the seed's "70% CPU / 85% GPU") or on an external metric with an average value per pod.
- :class:`KedaQueue`: KEDA's redis-streams scaler on queue lag (polled every 30 s), fed to an HPA.
- :class:`Adaptive`: Breakwater's ``breakwater_desired_workers`` (the gateway's EWMA of arrival and
  service rates plus the backlog over a horizon: the same code, ``gateway.autoscale.ModelLoad``),
  fed to an HPA as an external metric with a target of 1 per pod.
- :class:`Supervisor`: ``breakwater up --autoscale``'s local controller on the same signal, to
  check the simulator against a real run.
- :class:`Fixed`: a fleet of constant size (sized for the peak).

The same objects drive ``breakwater up --autoscale --autoscale-policy hpa:0.7`` (or ``keda:5``)
over real worker processes, observed from the gateway's and workers' metrics
(``stack.Stack``), which is how the simulator is checked against a real run of each policy.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

from breakwater.config import GatewaySettings
from breakwater.gateway.load import ModelLoad


@dataclass(frozen=True, slots=True)
class Observation:
    """What a controller can see at ``now``."""

    now: float
    replicas: int  # the Deployment's replica count (starting ones included)
    ready: int
    waiting: int  # jobs queued, not yet claimed
    running: int  # sequences on the replicas
    capacity: int  # sequence slots of the ready replicas
    utilisation: float  # busy fraction of the ready replicas since the previous observation
    arrived: int  # requests ever admitted
    done: int  # requests ever finished
    rated: float = 0.0  # jobs/s a ready replica finishes with its slots full, by its own step cost


class Policy(Protocol):
    name: str
    period_s: float  # how often the simulator calls it

    def desired(self, obs: Observation) -> int: ...


@dataclass
class HpaMechanics:
    """The HPA's replica calculation and behaviour (Kubernetes autoscaling/v2 defaults)."""

    min_replicas: int = 1
    max_replicas: int = 64
    tolerance: float = 0.1
    scale_down_window_s: float = 300.0
    scale_up_pods: int = 4  # per scale_up_period_s, or 100% of current, whichever is more
    scale_up_period_s: float = 15.0
    _history: deque[tuple[float, int]] = field(default_factory=deque)

    def forget(self) -> None:
        """Drop the stabilisation window's history (the HPA starts afresh)."""
        self._history.clear()

    def raw(self, current: int, ratio: float) -> int:
        """``ceil(current * ratio)``, unchanged within the tolerance (ratio = metric / target)."""
        if abs(ratio - 1.0) <= self.tolerance:
            return current
        return math.ceil(current * ratio)

    def decide(self, now: float, current: int, recommendation: int) -> int:
        """Stabilise (scale down only to the highest recommendation of the window), limit the
        scale-up rate, clamp to [min, max]."""
        if not self._history:  # started warm: the fleet has held its count for the whole window
            self._history.append((now, current))
        self._history.append((now, recommendation))
        while self._history and self._history[0][0] < now - self.scale_down_window_s:
            self._history.popleft()
        target = recommendation
        if target < current:
            target = min(current, max(r for _, r in self._history))
        if target > current:
            target = min(target, max(current * 2, current + self.scale_up_pods))
        return max(self.min_replicas, min(self.max_replicas, target))


@dataclass
class Hpa:
    """HPA on utilisation: ``target`` 0.7 (CPU) or 0.85 (GPU busy), the seed's thresholds."""

    target: float = 0.85
    mechanics: HpaMechanics = field(default_factory=HpaMechanics)
    period_s: float = 15.0
    name: str = "hpa-utilisation"

    def desired(self, obs: Observation) -> int:
        current = max(1, obs.replicas)
        if obs.ready == 0:  # no metric yet: the HPA keeps the count
            return self.mechanics.decide(obs.now, obs.replicas, obs.replicas)
        return self.mechanics.decide(
            obs.now, obs.replicas, self.mechanics.raw(current, obs.utilisation / self.target)
        )


def external_average(mechanics: HpaMechanics, current: int, total: float, per_pod: float) -> int:
    """The HPA's recommendation for an external metric with an ``AverageValue`` target."""
    if current == 0:
        return math.ceil(total / per_pod)
    return mechanics.raw(current, total / (per_pod * current))


@dataclass
class KedaQueue:
    """KEDA's redis-streams scaler on lag (waiting jobs): ``lag_per_pod`` per replica, the metric
    polled every ``polling_s``; the HPA it feeds syncs every ``period_s``.

    ``min_replicas`` 0 is a ScaledObject with ``minReplicaCount: 0``: KEDA itself takes the
    Deployment to zero once no poll has found a trigger active for ``cooldown_s`` (its
    ``cooldownPeriod``), and back to one at the first poll that does (the HPA is off at zero and
    keeps its minimum of one above it). A lag trigger is active while more than
    ``activation_lag`` jobs wait; with ``busy_active`` the ScaledObject also has a trigger on the
    workers' output (the shipped one's tokens/s, activation threshold 1), active while any job
    runs. Without it, jobs still running are not lag: a fleet that keeps up is taken to zero.
    Unlike KEDA, whose first poll finds no last-active time and may go to zero at once (its
    ``initialCooldownPeriod`` is 0 by default), this starts warm, as the other controllers do."""

    lag_per_pod: float = 5.0
    polling_s: float = 30.0
    mechanics: HpaMechanics = field(default_factory=HpaMechanics)
    period_s: float = 15.0
    name: str = "keda-queue"
    min_replicas: int = 1
    cooldown_s: float = 300.0
    activation_lag: float = 0.0
    busy_active: bool = True
    _polled: tuple[float, int, bool] = (-math.inf, 0, False)  # KEDA's last poll: when, lag, active
    _active_at: float | None = None  # the last poll that found it active (the first: started warm)
    _to_zero: bool = False

    def desired(self, obs: Observation) -> int:
        if obs.now - self._polled[0] >= self.polling_s:
            active = obs.waiting > self.activation_lag or (self.busy_active and obs.running > 0)
            self._polled = (obs.now, obs.waiting, active)
            if self._active_at is None or active:
                self._active_at = obs.now
            # KEDA decides the step to zero in its polling loop, once the cooldown has passed.
            self._to_zero = self.min_replicas == 0 and obs.now - self._active_at > self.cooldown_s
        if self.min_replicas == 0:
            if obs.replicas == 0:
                return 1 if self._polled[2] else 0
            if self._to_zero:
                self.mechanics.forget()  # its HPA stops with the Deployment at zero
                return 0
        rec = external_average(self.mechanics, obs.replicas, self._polled[1], self.lag_per_pod)
        return self.mechanics.decide(obs.now, obs.replicas, rec)


@dataclass
class Adaptive:
    """Breakwater's own signal: the gateway's ``ModelLoad`` refreshed every second (as its signals
    loop does), ``breakwater_desired_workers`` read by the HPA (via KEDA's Prometheus trigger,
    target 1 per pod) every ``period_s``."""

    settings: GatewaySettings = field(default_factory=GatewaySettings)
    mechanics: HpaMechanics = field(default_factory=HpaMechanics)
    period_s: float = 1.0
    hpa_period_s: float = 15.0
    name: str = "adaptive"
    reads_rated: ClassVar[bool] = True  # the replicas fit and report their step cost (simulator)
    _load: ModelLoad = field(default_factory=ModelLoad)
    _last_sync: float = -math.inf
    _current: int = -1

    def desired(self, obs: Observation) -> int:
        self._load.observe(
            obs.now, obs.arrived, obs.done, obs.waiting, obs.running, obs.ready, obs.capacity, rated=obs.rated
        )
        gauge = self._load.desired_workers(self.settings)  # refreshed every second, as the gateway's
        if self._current < 0 or obs.now - self._last_sync >= self.hpa_period_s:
            self._last_sync = obs.now
            rec = external_average(self.mechanics, obs.replicas, gauge, 1.0)
            self._current = self.mechanics.decide(obs.now, obs.replicas, rec)
        return self._current


@dataclass
class Supervisor:
    """``breakwater up --autoscale``: the gateway refreshes ``breakwater_desired_workers`` every
    second; the supervisor reads it every ``scale_interval_s``, adds workers at once up to it, and
    retires one (the newest) once it has stayed below the count for ``down_delay_s``
    (``stack.Stack.autoscale_tick``). The simulator's counterpart for validating against a real run."""

    settings: GatewaySettings = field(default_factory=GatewaySettings)
    scale_interval_s: float = 2.0
    down_delay_s: float = 10.0
    period_s: float = 1.0
    name: str = "supervisor"
    reads_rated: ClassVar[bool] = True
    _load: ModelLoad = field(default_factory=ModelLoad)
    _last_scale: float = -math.inf
    _below_since: float | None = None

    def desired(self, obs: Observation) -> int:
        self._load.observe(
            obs.now, obs.arrived, obs.done, obs.waiting, obs.running, obs.ready, obs.capacity, rated=obs.rated
        )
        want = self._load.desired_workers(self.settings)  # clamped to the gateway's min and max
        if obs.now - self._last_scale < self.scale_interval_s:
            return obs.replicas
        self._last_scale = obs.now
        if want > obs.replicas:
            self._below_since = None
            return want
        if want < obs.replicas:
            self._below_since = self._below_since if self._below_since is not None else obs.now
            if obs.now - self._below_since >= self.down_delay_s:
                self._below_since = None
                return obs.replicas - 1
            return obs.replicas
        self._below_since = None
        return obs.replicas


@dataclass
class Fixed:
    replicas: int
    period_s: float = 60.0
    name: str = "fixed"

    def desired(self, obs: Observation) -> int:
        return self.replicas


POLICY_SPECS = (
    "hpa[:target] (utilisation, 0.85) | keda[:lag per pod] (5) | keda-zero[:lag per pod] (5; "
    "minReplicaCount 0, cooldownPeriod 300 s, active while jobs wait or run) | keda-zero-lagonly[:lag "
    "per pod] (the same on lag alone) | adaptive | supervisor | fixed:N"
)


KEDA_NAMES = {"keda": "keda-lag", "keda-zero": "keda-zero-lag", "keda-zero-lagonly": "keda-zero-lagonly"}


def policy_from_spec(spec: str, mechanics: HpaMechanics, time_scale: float = 1.0) -> Policy:
    """A policy from its command-line form (``hpa:0.7``, ``keda:5``, ...); raises ``ValueError``.

    ``time_scale`` > 1 runs the Kubernetes controllers' clocks that much faster (sync and polling
    periods, stabilisation window, scale-up period), for a trace replayed that much faster; the
    supervisor of ``breakwater up`` keeps its own timing."""
    if not math.isfinite(time_scale) or time_scale <= 0:
        raise ValueError(f"time scale {time_scale:g}: must be a positive number")
    try:
        policy = _from_spec(spec, mechanics, time_scale)
    except ValueError:  # a number that is not one
        policy = None
    if policy is None:
        raise ValueError(f"`{spec}`: expected one of {POLICY_SPECS}")
    return policy


def _from_spec(spec: str, mechanics: HpaMechanics, time_scale: float) -> Policy | None:
    name, _, arg = spec.partition(":")
    k8s = replace(
        mechanics,
        scale_down_window_s=mechanics.scale_down_window_s / time_scale,
        scale_up_period_s=mechanics.scale_up_period_s / time_scale,
        _history=deque(),  # its own stabilisation window, not the one of ``mechanics``
    )
    if name == "hpa":
        target = float(arg or 0.85)
        if 0 < target <= 1:
            return Hpa(target, k8s, period_s=15.0 / time_scale, name=f"hpa-utilisation-{target:g}")
    elif name in KEDA_NAMES:  # keda-zero*: minReplicaCount 0; -lagonly: lag triggers alone
        lag = float(arg or 5.0)
        if lag > 0:
            zero = name != "keda"
            return KedaQueue(
                lag,
                30.0 / time_scale,
                replace(k8s, min_replicas=1) if zero else k8s,  # the HPA's minimum under KEDA at zero
                period_s=15.0 / time_scale,
                name=f"{KEDA_NAMES[name]}-{lag:g}",
                min_replicas=0 if zero else 1,
                cooldown_s=300.0 / time_scale,
                busy_active=name != "keda-zero-lagonly",
            )
    elif name == "adaptive" and not arg:
        return Adaptive(_bounds(mechanics), k8s, hpa_period_s=15.0 / time_scale)
    elif name == "supervisor" and not arg:  # breakwater up --autoscale
        return Supervisor(_bounds(mechanics))
    elif name == "fixed" and int(arg) >= 1:
        return Fixed(int(arg), name=f"fixed-{int(arg)}")
    return None


def _bounds(mechanics: HpaMechanics) -> GatewaySettings:
    """The gateway's settings for a signal bounded as the HPA is."""
    return GatewaySettings(
        autoscale_min_workers=mechanics.min_replicas, autoscale_max_workers=mechanics.max_replicas
    )
