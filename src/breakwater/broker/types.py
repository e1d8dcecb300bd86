"""What the broker's operations take and return: admission outcomes, claimed jobs, start results,
token appends and leases."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from breakwater.broker.record import RequestRecord


class Admission(enum.Enum):
    QUEUED = "queued"
    LANE_FULL = "lane_full"
    ALREADY_QUEUED = "already_queued"  # a retried enqueue whose first reply was lost


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    admission: Admission
    rid: str
    waiting: int  # in the lane it joined; refused: in every lane (partition) tried
    queue: str = ""  # the queue (partition) that took it

    @property
    def accepted(self) -> bool:
        return self.admission is not Admission.LANE_FULL


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed queue entry; ``xrid`` is the client's X-Request-ID (for logs)."""

    stream: str
    entry_id: str
    rid: str  # '' when no request was waiting for the entry: it is only acknowledged
    xrid: str
    tenant: str = ""
    cost: float = 0.0  # estimated tokens charged to the tenant's virtual counter when bound
    weight: float = 1.0
    # Fenced in the same call that bound it (``bind_start.lua``, single Redis): the worker runs it
    # without calling ``start.lua`` again. Not part of the job's identity.
    started: StartResult | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Fence:
    """What fencing a claimed job's attempt takes (``start.lua``): when a claim may fence the first
    request it binds in the same round trip (:meth:`Broker.claim`)."""

    worker_id: str
    max_attempts: int
    result_ttl_s: int
    alone: bool  # the worker runs nothing else: it may take a suspect
    detach_grace_s: float | None = None  # a request nobody followed for longer is not run


class StartOutcome(enum.Enum):
    RUN = "run"
    MISSING = "missing"  # the record expired
    TERMINAL = "terminal"  # finished or cancelled meanwhile
    EXPIRED = "expired"  # its deadline passed while it waited
    DETACHED = "detached"  # nobody followed it for longer than the detach grace: cancel, not run
    POISON = "poison"  # too many attempts without progress: dead-letter it
    SUSPECT = "suspect"  # its last attempt made no progress: run it alone


@dataclass(frozen=True, slots=True)
class StartResult:
    """Outcome of :meth:`Broker.start_job`; ``record`` is set when it is :attr:`StartOutcome.RUN`."""

    outcome: StartOutcome
    attempt: int
    record: RequestRecord | None = None


#: ``append.lua``/``finish.lua`` answer ``BEHIND - w`` when the record's last write is ``w``, short
#: of what the attempt wrote: a failover lost writes, which the worker sends again.
BEHIND = -1000
#: ``append.lua``'s answer to a write that does not start where the record's text ends.
MISALIGNED = -3
#: ``finish.lua``'s answer when the request had ended already (it writes nothing).
ENDED = -2
#: ``finish.lua``'s answer when asked to end a request only if it is queued past its deadline, and it
#: is not (it started, or its deadline has not passed on Redis's clock).
NOT_DUE = -4


@dataclass(frozen=True, slots=True)
class Append:
    """One sequence's delta in a step, fenced by ``attempt``; ``wseq`` numbers the attempt's writes
    so that a retried write is applied once; ``at`` is where it starts (the record's token count
    before it), so that a write out of step with the record's text is refused (``MISALIGNED``)."""

    rid: str
    attempt: int
    wseq: int
    text: str
    tokens: int
    logprobs: str = ""  # the tokens' logprobs as JSON, when the request asked for them
    at: int = -1  # -1: not checked


@dataclass(frozen=True, slots=True)
class Lease:
    """An in-flight job and the attempt that runs it."""

    job: Job
    attempt: int
