"""Turning a request record into an engine request, and the worker's view of an in-flight job."""

from __future__ import annotations

import logging
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from breakwater.broker import Append, Billing, Job, Lease, RequestRecord
from breakwater.broker.types import MISALIGNED
from breakwater.engines.base import (
    CONSTRAINED_CONTINUATION,
    EMBEDDINGS,
    GRAMMAR,
    LOGIT_BIAS,
    LOGPROBS,
    PENALTIES,
    RESPONSE_FORMAT,
    Engine,
    EngineRequestError,
    GenerationRequest,
)
from breakwater.protocol.formats import OutputFormat

log = logging.getLogger("breakwater.worker.worker")

KEEP_WRITES = 512  # per sequence: a failover loses at most the last ~second of writes


@dataclass(slots=True)
class InFlight:
    job: Job
    attempt: int
    model: str
    billing: Billing | None = None  # what metering it takes (None: settled from its record)
    held_tokens: int = 0  # tokens generated whose text the engine holds back (stop-string prefix)
    suspect: bool = False  # its previous attempt made no progress: run alone until it does
    progressed: bool = False
    writes: int = 0  # appends sent by this attempt: numbers them so a retried one is applied once
    position: int = 0  # the record's token count after this attempt's appends so far (Append.at)
    paused_at: int = -1  # preempted: continued once this many steps are published (-1: running)
    repairs: int = 0  # tries to send a paused sequence's lost writes again (PreemptingMixin._repaired)
    # Structured output or penalties: paused only where the engine continues it exactly.
    constrained: bool = False
    tools: bool = False  # its tools went to the engine, which cannot continue it: never paused
    finishing: bool = False  # its generation ended; its finish is being written (never paused)
    held_logprobs: list[dict[str, Any]] = field(default_factory=list)  # of the held tokens
    # Its last writes, sent again if a Redis failover loses them (worker/repair.py).
    sent: deque[Append] = field(default_factory=lambda: deque(maxlen=KEEP_WRITES))

    def logprobs_with(self, new: list[dict[str, Any]] | None) -> str:
        """The held tokens' logprobs and ``new`` as one JSON list ('' when none were asked for)."""
        if not self.held_logprobs and not new:
            return ""
        out = orjson.dumps([*self.held_logprobs, *(new or ())]).decode()
        self.held_logprobs = []
        return out

    @property
    def paused(self) -> bool:
        return self.paused_at >= 0

    @property
    def lease(self) -> Lease:
        return Lease(self.job, self.attempt)

    def next_write(self) -> int:
        self.writes += 1
        return self.writes


def refused_write(seq: int, rid: str) -> tuple[bool, str]:
    """A refused append's answer (``append.lua``): whether the request moved to another attempt (its
    job is not this worker's to settle) and why. Out of step with the record (logged as an error):
    the job is left to its lease, so a new attempt continues it from the record's text. No known
    way leads there (a paused sequence's lost writes are sent again before it continues:
    ``PreemptingMixin._repaired``); it guards against a stale step written out of place."""
    if seq == MISALIGNED:
        log.error("a write out of step with the request's record was refused", extra={"rid": rid})
        return True, "out of step with its record"
    return seq == -1, "fenced" if seq == -1 else "not running"


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
        output_format=OutputFormat.from_json(spec.response_format),
        embed_inputs=spec.inputs if spec.kind == "embedding" else None,
        logprobs=spec.logprobs if spec.logprobs >= 0 else None,
        tools=orjson.loads(spec.tools) if spec.tools else None,
        presence_penalty=spec.presence_penalty,
        frequency_penalty=spec.frequency_penalty,
        logit_bias={int(t): float(b) for t, b in orjson.loads(spec.logit_bias).items()}
        if spec.logit_bias
        else None,
        emitted_text=record.emitted,
        emitted_tokens=record.tokens,
    )


def refusal(engine: Engine, request: GenerationRequest) -> EngineRequestError | None:
    """Why ``engine`` must not run ``request``, if it must not: a feature it lacks, or constrained
    output it cannot continue (tokens already reached the client: restarting would repeat them, and
    continuing unconstrained could break the format)."""
    if request.embed_inputs is not None and EMBEDDINGS not in engine.features:
        return EngineRequestError(
            f"the {engine.info.engine} engine does not compute embeddings", code="unsupported_parameter"
        )
    if request.logprobs is not None and LOGPROBS not in engine.features:
        return EngineRequestError(
            f"`logprobs` is not supported by the {engine.info.engine} engine", code="unsupported_parameter"
        )
    unserved = _unserved_sampling(engine, request)
    if unserved:
        return EngineRequestError(
            f"`{unserved}` is not supported by the {engine.info.engine} engine", code="unsupported_parameter"
        )
    if request.tools is not None and request.emitted_tokens:
        return EngineRequestError(
            f"the worker running this request failed after {request.emitted_tokens} tokens of an "
            "answer that may call tools, which the upstream cannot continue; retry the request",
            code="continuation_unsupported",
            error_type="server_error",
        )
    if request.output_format is None:
        return None
    if RESPONSE_FORMAT not in engine.features:
        return EngineRequestError(
            f"`response_format` is not supported by the {engine.info.engine} engine",
            code="unsupported_parameter",
        )
    if request.output_format.needs_grammar and GRAMMAR not in engine.features:
        return EngineRequestError(
            f"the tool-call format is enforced by a grammar, which the {engine.info.engine} engine "
            "does not take",
            code="unsupported_parameter",
        )
    if request.emitted_tokens and CONSTRAINED_CONTINUATION not in engine.features:
        return EngineRequestError(
            f"the worker running this request failed after {request.emitted_tokens} tokens of "
            f"structured output, and the {engine.info.engine} engine cannot continue constrained "
            "output; retry the request",
            code="continuation_unsupported",
            error_type="server_error",
        )
    return None


def error_type(code: str | None) -> str:
    """OpenAI's error ``type`` for an engine's error code: the request's fault unless it names a
    server-side limit (no code: a server failure)."""
    if code is None or code == "continuation_unsupported":
        return "server_error"
    return "invalid_request_error"


def _unserved_sampling(engine: Engine, request: GenerationRequest) -> str:
    """A sampling parameter the request sets that ``engine`` does not implement ('' when none)."""
    if request.logit_bias and LOGIT_BIAS not in engine.features:
        return "logit_bias"
    if PENALTIES not in engine.features:
        if request.presence_penalty:
            return "presence_penalty"
        if request.frequency_penalty:
            return "frequency_penalty"
    return ""
