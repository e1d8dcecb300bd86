"""The ``sim`` engine: deterministic text with a continuous-batching timing model.

Token ``i`` of a sequence is a pure function of (seed, prompt, i), so the same seed and prompt give
the same text, and a continuation that knows how many tokens were emitted produces exactly the rest.
At ``temperature`` 0 the seed plays no part, as in real engines (greedy decoding samples nothing):
identical greedy requests get identical answers.
The step time grows with the batch, like a real continuous-batching server.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

from breakwater.engines.base import (
    EMBEDDINGS,
    Engine,
    EngineInfo,
    EngineRequestError,
    GenerationRequest,
    SequenceDelta,
    StopChecker,
    check_fits,
)
from breakwater.engines.options import SimOptions
from breakwater.protocol.embeddings import normalised, pack

EMBEDDING_DIM = 64

VOCAB: tuple[str, ...] = tuple(
    [
        "the",
        "a",
        "of",
        "to",
        "and",
        "in",
        "is",
        "that",
        "for",
        "it",
        "as",
        "with",
        "on",
        "be",
        "by",
        "this",
        "are",
        "at",
        "from",
        "or",
        "an",
        "have",
        "not",
        "queue",
        "token",
        "stream",
        "worker",
        "gateway",
        "model",
        "batch",
        "redis",
        "river",
        "harbor",
        "wave",
        "tide",
        "stone",
        "light",
        "signal",
        "cloud",
        "engine",
        "request",
        "answer",
        "latency",
        "burst",
        "steady",
        "quiet",
        "swift",
        "bright",
        "north",
        "south",
        "under",
        "over",
        "before",
        "after",
        "always",
        "never",
        "many",
        "few",
        "small",
        "large",
        "early",
        "late",
        "open",
        "close",
    ]
)
_WORD = re.compile(r"\S+")
POISON_MARKER = "<<bw-poison>>"
# Fault injection for tests: a worker started with ``sim_hang_marker`` hangs forever in the step
# after a prompt containing it has produced a few tokens (a stuck decode; the process stays alive).
HANG_AFTER_TOKENS = 5


def render_chat(messages: list[dict[str, str]]) -> str:
    """The sim's chat template."""
    lines = [f"{m['role']}: {m.get('content', '')}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def count_tokens(text: str) -> int:
    """The sim's tokenizer: one token per whitespace-separated word."""
    return len(_WORD.findall(text))


def embed(text: str) -> list[float]:
    """The sim's embedding: hashed bag of lower-cased words, L2-normalised (shared words: closer)."""
    vector = [0.0] * EMBEDDING_DIM
    for word in _WORD.findall(text.lower()):
        h = _hash("embed", word.strip(".,;:!?\"'()"))
        vector[h % EMBEDDING_DIM] += 1.0 if h & (1 << 32) else -1.0
    return normalised(vector)


def _seed(request: GenerationRequest) -> int:
    """The seed the text depends on: none at temperature 0 (greedy), the request's otherwise."""
    return 0 if request.temperature == 0 else request.seed


def _hash(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(slots=True)
class _Sequence:
    request: GenerationRequest
    prompt: str
    prompt_tokens: int
    limit: int
    index: int
    stop: StopChecker
    prefilled: bool = False
    completion_tokens: int = field(default=0)


class SimEngine(Engine):
    """Deterministic engine for tests and platform benchmarks."""

    features = frozenset({EMBEDDINGS})
    overlaps_publish = True

    def __init__(self, options: SimOptions | None = None) -> None:
        self.options = opts = options or SimOptions()
        self.info = EngineInfo(
            model=opts.model,
            engine="sim",
            context_length=opts.context_length,
            capacity=opts.capacity,
            embedding_dim=EMBEDDING_DIM,
        )
        self._seqs: dict[str, _Sequence] = {}
        self._embedded: list[SequenceDelta] = []  # embedding answers, returned by the next step
        self._work = asyncio.Event()
        self._rng = random.Random(0)
        self.hang_marker = opts.hang_marker
        self._last_step: tuple[int, int] | None = None

    def free_slots(self) -> int:
        return max(0, self.info.capacity - len(self._seqs))

    def running(self) -> int:
        return len(self._seqs)

    def last_step(self) -> tuple[int, int] | None:
        return self._last_step

    def prompt_of(self, request: GenerationRequest) -> str:
        if request.messages is not None:
            return render_chat(request.messages)
        return request.prompt or ""

    def add(self, request: GenerationRequest) -> None:
        if request.embed_inputs is not None:
            usage = {
                "prompt_tokens": sum(count_tokens(t) for t in request.embed_inputs),
                "completion_tokens": 0,
            }
            text = pack([embed(t) for t in request.embed_inputs])
            self._embedded.append(
                SequenceDelta(request.request_id, text=text, finish_reason="stop", usage=usage)
            )
            self._work.set()
            return
        rate = self.options.error_rate
        if rate and _hash("fail", request.request_id) / 2**64 < rate:
            raise EngineRequestError(
                "sim: injected failure (sim_error_rate)", code="engine_error", error_type="server_error"
            )
        prompt = self.prompt_of(request)
        prompt_tokens = count_tokens(prompt)
        check_fits(prompt_tokens, request, self.info.context_length)
        room = self.info.context_length - prompt_tokens
        natural = room if request.ignore_eos else 8 + _hash(_seed(request), prompt, "len") % 57
        limit = min(natural, room if request.max_tokens is None else min(request.max_tokens, room))
        self._seqs[request.request_id] = _Sequence(
            request=request,
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            limit=limit,
            index=request.emitted_tokens,
            stop=StopChecker(request.stop),
            completion_tokens=request.emitted_tokens,
        )
        self._work.set()

    def cancel(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)
        self._embedded = [d for d in self._embedded if d.request_id != request_id]
        if not self._seqs and not self._embedded:
            self._work.clear()

    def token_text(self, seq: _Sequence, index: int) -> str:
        word = VOCAB[_hash(_seed(seq.request), seq.prompt, index) % len(VOCAB)]
        return word if index == 0 else " " + word

    async def step(self) -> list[SequenceDelta]:
        while not self._seqs and not self._embedded:
            self._work.clear()
            await self._work.wait()
        if self._embedded:  # answered at once: an embedding is one forward pass, no decode steps
            done, self._embedded = self._embedded, []
            self._last_step = None
            await asyncio.sleep(0)
            return done
        if self.hang_marker and any(
            self.hang_marker in s.prompt and s.index >= HANG_AFTER_TOKENS for s in self._seqs.values()
        ):
            await asyncio.Event().wait()  # never set: the step never returns
        # This step is the sequences here now; one added while it runs joins the next (as in a
        # real engine, which schedules a step's batch before running it).
        batch = list(self._seqs.items())
        joining = [s for _, s in batch if not s.prefilled]
        cost = self.options
        prefill = sum(s.prompt_tokens for s in joining)
        self._last_step = (len(batch), prefill)
        delay_ms = prefill * cost.prefill_ms_per_token
        delay_ms += cost.decode_base_ms + cost.decode_per_seq_ms * len(batch)
        if cost.jitter_frac:
            delay_ms *= 1.0 + self._rng.uniform(-cost.jitter_frac, cost.jitter_frac)
        await asyncio.sleep(delay_ms / 1000.0)
        deltas: list[SequenceDelta] = []
        for rid, seq in batch:
            if self._seqs.get(rid) is not seq:  # cancelled while we slept
                continue
            seq.prefilled = True
            deltas.append(self._advance(seq))
        for delta in deltas:
            if delta.finished:
                self._seqs.pop(delta.request_id, None)
        return deltas

    def _advance(self, seq: _Sequence) -> SequenceDelta:
        rid = seq.request.request_id
        if POISON_MARKER in seq.prompt:
            raise RuntimeError(f"sim engine crashed on poison request {rid}")
        if seq.index >= seq.limit:
            return self._finish(seq, seq.stop.flush(), 0, "length" if seq.index >= self._cap(seq) else "stop")
        text, stopped = seq.stop.feed(self.token_text(seq, seq.index))
        seq.index += 1
        seq.completion_tokens += 1
        if stopped:
            return self._finish(seq, text, 1, "stop")
        if seq.index >= seq.limit:
            reason = "length" if seq.index >= self._cap(seq) else "stop"
            return self._finish(seq, text + seq.stop.flush(), 1, reason)
        return SequenceDelta(request_id=rid, text=text, tokens=1)

    def _cap(self, seq: _Sequence) -> int:
        room = self.info.context_length - seq.prompt_tokens
        return room if seq.request.max_tokens is None else min(seq.request.max_tokens, room)

    def _finish(self, seq: _Sequence, text: str, tokens: int, reason: str) -> SequenceDelta:
        usage = {"prompt_tokens": seq.prompt_tokens, "completion_tokens": seq.completion_tokens}
        return SequenceDelta(
            request_id=seq.request.request_id, text=text, tokens=tokens, finish_reason=reason, usage=usage
        )

    def stats(self) -> dict[str, Any]:
        return {"running": len(self._seqs), "capacity": self.info.capacity}
