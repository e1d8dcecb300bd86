"""A discrete-event simulation of a Breakwater fleet: requests arrive (a trace), wait in the queue,
and replicas pull them when they have room, as workers do; each replica runs engine steps of
continuous batching on its :class:`ServiceCurve`; a policy resizes the fleet, new replicas become
ready after ``startup_s`` (a model load), and removed ones drain (finish what they run, take
nothing new). Hours of trace take seconds.

``dispatch`` compares the pull with a router's push: ``"push-rr"`` (round robin) and
``"push-least"`` (fewest outstanding) hand each request to a ready replica as it arrives, into that
replica's own queue, as a router in front of engines does.

What it leaves out, on purpose: the gateway and Redis (their cost per request is measured, not
simulated: docs/benchmarks.md), network time, engine preemption, and failures.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from breakwater.bench.profiles import Arrival
from breakwater.capacity.policies import Observation, Policy
from breakwater.capacity.service import ServiceCurve
from breakwater.engines.stepcost import Rating


@dataclass(slots=True)
class Request:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    tokens: int = 0
    started_s: float = -1.0  # claimed by a replica
    first_token_s: float = -1.0
    done_s: float = -1.0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        return (self.done_s - self.first_token_s) / max(1, self.output_tokens - 1)


@dataclass(slots=True)
class Replica:
    ident: int
    ready_s: float
    running: list[Request] = field(default_factory=list)
    local: deque[Request] = field(default_factory=deque)  # pushed to it (dispatch "push-*")
    stepping: bool = False
    draining: bool = False
    busy_s: float = 0.0
    rating: Rating | None = None  # its fitted step cost, as a worker keeps it (policies that read it)
    rated: float | None = None  # what it reported at its last heartbeat
    rated_at: float = -math.inf


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    replicas: int
    ready: int
    waiting: int
    running: int


@dataclass
class Result:
    requests: list[Request]
    samples: list[Sample]
    replica_s: float  # provisioned replica-seconds (starting, ready and draining)
    busy_s: float  # replica-seconds spent in engine steps
    sequence_s: float  # running sequences x step time, summed: occupancy = this / (capacity x busy_s)
    end_s: float

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests if r.done_s >= 0)


ARRIVE, STEP, READY, TICK = range(4)
HEARTBEAT_S = 2.0  # how often a worker reports its rating (WorkerSettings.heartbeat_s)
DISPATCH = ("pull", "push-rr", "push-least")


class Simulation:
    def __init__(
        self,
        curve: ServiceCurve,
        arrivals: list[Arrival],
        policy: Policy,
        *,
        replicas: int = 1,
        startup_s: float = 60.0,
        sample_s: float = 5.0,
        dispatch: str = "pull",
    ) -> None:
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch {dispatch!r}: one of {', '.join(DISPATCH)}")
        self.dispatch = dispatch
        self._rr = itertools.count()
        self._sequence_s = 0.0
        self.curve = curve
        self.policy = policy
        self.startup_s = startup_s
        self.sample_s = sample_s
        self.requests = [Request(a.t, a.input_tokens, a.output_tokens) for a in arrivals]
        self.queue: deque[Request] = deque()
        self.replicas: list[Replica] = []
        self.samples: list[Sample] = []
        self._events: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self._ids = itertools.count()
        self._now = 0.0
        self._replica_s = 0.0
        self._busy_s = 0.0
        self._busy_seen = 0.0
        self._last_tick = 0.0
        self._arrived = self._done = 0
        self._waking = False
        # Replicas fit their step cost only for a policy that reads it (it costs a little per step).
        self._rates = bool(getattr(policy, "reads_rated", False))
        for request in self.requests:
            self._at(request.arrival_s, ARRIVE, request)
        for _ in range(replicas):
            self._add_replica(ready_s=0.0)
        self._at(0.0, TICK, None)

    def run(self, horizon_s: float = 86_400.0) -> Result:
        """Until every request is done, or ``horizon_s`` after the last arrival (a fleet too small
        to ever finish: the unfinished requests have ``done_s`` < 0)."""
        end = (self.requests[-1].arrival_s if self.requests else 0.0) + horizon_s
        while self._events and self._done < len(self.requests) and self._events[0][0] <= end:
            t, _, kind, payload = heapq.heappop(self._events)
            self._replica_s += len(self.replicas) * (t - self._now)
            self._now = t
            if kind == ARRIVE:
                assert isinstance(payload, Request)
                self._arrive(payload)
            elif kind == STEP:
                assert isinstance(payload, Replica)
                self._step_done(payload)
            elif kind == READY:
                self._waking = True
            else:
                self._tick()
            # Idle replicas pull once everything that happens at this instant has happened (a
            # worker's read takes what is queued by then, not one arrival of a simultaneous burst).
            if self._waking and (not self._events or self._events[0][0] > t):
                self._waking = False
                self._wake()
        return Result(self.requests, self.samples, self._replica_s, self._busy_s, self._sequence_s, self._now)

    def _arrive(self, request: Request) -> None:
        self._arrived += 1
        ready = [r for r in self.replicas if r.ready_s <= self._now and not r.draining]
        if self.dispatch == "pull" or not ready:  # no replica to push to yet: it waits for one
            self.queue.append(request)
            self._waking = True
            return
        if self.dispatch == "push-rr":
            replica = ready[next(self._rr) % len(ready)]
        else:
            replica = min(ready, key=lambda r: (len(r.running) + len(r.local), r.ident))
        replica.local.append(request)
        self._waking = True

    # -- events ---------------------------------------------------------------------------------
    def _at(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._order), kind, payload))

    def _wake(self) -> None:
        """Idle ready replicas pull (a worker blocked on the queue wakes at once)."""
        for replica in self.replicas:
            if not replica.stepping and not replica.draining and replica.ready_s <= self._now:
                self._start_step(replica)
            if not self.queue and self.dispatch == "pull":
                return

    def _start_step(self, replica: Replica) -> None:
        prefill = 0
        budget = self.curve.max_batched_tokens or None
        if not replica.draining:
            while (replica.local or self.queue) and len(replica.running) < self.curve.capacity:
                source = replica.local if replica.local else self.queue
                if budget is not None and prefill and prefill + source[0].input_tokens > budget:
                    break  # this step's prefill budget is spent: it joins the next one
                request = source.popleft()
                request.started_s = self._now
                prefill += request.input_tokens
                replica.running.append(request)
        if not replica.running:
            replica.stepping = False
            return
        duration = self.curve.step_s(len(replica.running), prefill)
        if replica.rating is not None:
            replica.rating.fit.add(duration, len(replica.running), prefill)
        replica.stepping = True
        replica.busy_s += duration
        self._busy_s += duration
        self._sequence_s += duration * len(replica.running)
        self._at(self._now + duration, STEP, replica)

    def _step_done(self, replica: Replica) -> None:
        still: list[Request] = []
        for request in replica.running:
            request.tokens += 1
            if request.tokens == 1:
                request.first_token_s = self._now
            if request.tokens >= request.output_tokens:
                request.done_s = self._now
                self._done += 1
                if replica.rating is not None:
                    replica.rating.finished(request.input_tokens, request.output_tokens)
            else:
                still.append(request)
        replica.running = still
        if replica.draining and not still:
            self.replicas.remove(replica)
            return
        self._start_step(replica)

    def _tick(self) -> None:
        now = self._now
        ready = [r for r in self.replicas if r.ready_s <= now and not r.draining]
        span = now - self._last_tick
        busy = self._busy_s - self._busy_seen
        utilisation = min(1.0, busy / (span * len(ready))) if span > 0 and ready else 0.0
        self._last_tick, self._busy_seen = now, self._busy_s
        counted = [r for r in self.replicas if not r.draining]
        obs = Observation(
            now=now,
            replicas=len(counted),
            ready=len(ready),
            waiting=len(self.queue) + sum(len(r.local) for r in self.replicas),  # pushed: waiting too
            running=sum(len(r.running) for r in self.replicas),
            capacity=len(ready) * self.curve.capacity,
            utilisation=utilisation,
            arrived=self._arrived,
            done=self._done,
            rated=self._rated(ready),
        )
        self._resize(self.policy.desired(obs))
        if not self.samples or now - self.samples[-1].t >= self.sample_s:
            self.samples.append(Sample(now, len(counted), len(ready), obs.waiting, obs.running))
        self._at(now + self.policy.period_s, TICK, None)

    def _rated(self, ready: list[Replica]) -> float:
        """The mean of the ready replicas' last reported ratings (0: none known), as the gateway
        aggregates the workers' heartbeats."""
        if not self._rates:
            return 0.0
        known = []
        for replica in ready:
            if replica.rating is not None and self._now - replica.rated_at >= HEARTBEAT_S:
                replica.rated, replica.rated_at = replica.rating.jobs_per_s(), self._now
            if replica.rated:
                known.append(replica.rated)
        return sum(known) / len(known) if known else 0.0

    def _resize(self, want: int) -> None:
        counted = [r for r in self.replicas if not r.draining]
        for _ in range(want - len(counted)):
            self._add_replica(ready_s=self._now + self.startup_s)
        # Scale down: replicas still starting go first (newest first), then the least busy drain.
        extra = len(counted) - want
        if extra <= 0:
            return
        victims = sorted(counted, key=lambda r: (r.ready_s <= self._now, len(r.running), -r.ident))[:extra]
        for replica in victims:
            replica.draining = True
            if replica.local:  # pushed, not started: back to the others
                self.queue.extendleft(reversed(replica.local))
                replica.local.clear()
                self._waking = True
            if not replica.running:
                self.replicas.remove(replica)

    def _add_replica(self, ready_s: float) -> None:
        rating = Rating(self.curve.capacity) if self._rates else None
        self.replicas.append(Replica(next(self._ids), ready_s, rating=rating))
        if ready_s > self._now:
            self._at(ready_s, READY, None)
