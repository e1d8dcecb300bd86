"""Turning a request record into an engine request, and the worker's view of an in-flight job."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import orjson

from breakwater.broker import Job
from breakwater.engines.base import GenerationRequest


@dataclass(slots=True)
class InFlight:
    job: Job
    attempt: int
    model: str
    held_tokens: int = 0  # tokens generated whose text the engine holds back (stop-string prefix)
    suspect: bool = False  # its previous attempt made no progress: run alone until it does
    progressed: bool = False


def generation_request(rid: str, record: dict[str, str]) -> GenerationRequest:
    """The engine request for a record; continuations carry the text and tokens already emitted."""
    seed = int(record["seed"]) if record.get("seed") else zlib.crc32(rid.encode())
    messages = orjson.loads(record["messages"]) if record.get("kind") == "chat" else None
    return GenerationRequest(
        request_id=rid,
        prompt=None if messages is not None else record.get("prompt", ""),
        messages=messages,
        max_tokens=int(record["max_tokens"]) if record.get("max_tokens") else None,
        temperature=float(record.get("temperature") or 1.0),
        top_p=float(record.get("top_p") or 1.0),
        top_k=int(record.get("top_k") or 0),
        seed=seed,
        stop=list(orjson.loads(record.get("stop") or "[]")),
        ignore_eos=record.get("ignore_eos") == "1",
        emitted_text=record.get("emitted", ""),
        emitted_tokens=int(record.get("tokens") or 0),
    )
