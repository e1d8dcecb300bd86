"""Turning a request record into an engine request, and the worker's view of an in-flight job."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from breakwater.broker import Job, Lease, RequestRecord
from breakwater.engines.base import GenerationRequest


@dataclass(slots=True)
class InFlight:
    job: Job
    attempt: int
    model: str
    held_tokens: int = 0  # tokens generated whose text the engine holds back (stop-string prefix)
    suspect: bool = False  # its previous attempt made no progress: run alone until it does
    progressed: bool = False
    writes: int = 0  # appends sent by this attempt: numbers them so a retried one is applied once
    paused_at: int = -1  # preempted: the worker's step count then (-1: running in the engine)

    @property
    def paused(self) -> bool:
        return self.paused_at >= 0

    @property
    def lease(self) -> Lease:
        return Lease(self.job, self.attempt)

    def next_write(self) -> int:
        self.writes += 1
        return self.writes


def generation_request(rid: str, record: RequestRecord) -> GenerationRequest:
    """The engine request for a record; continuations carry the text and tokens already emitted."""
    spec = record.spec
    return GenerationRequest(
        request_id=rid,
        prompt=None if spec.messages is not None else spec.prompt or "",
        messages=spec.messages,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature if spec.temperature is not None else 1.0,
        top_p=spec.top_p if spec.top_p is not None else 1.0,
        top_k=spec.top_k or 0,
        seed=spec.seed if spec.seed is not None else zlib.crc32(rid.encode()),
        stop=spec.stop,
        ignore_eos=spec.ignore_eos,
        emitted_text=record.emitted,
        emitted_tokens=record.tokens,
    )
