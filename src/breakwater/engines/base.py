"""The engine interface (DESIGN §5): requests in, per-step deltas for all running sequences out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from breakwater.protocol.formats import OutputFormat

# What an engine can do beyond plain generation (Engine.features; the gateway refuses what a model's
# workers cannot do, naming the parameter).
RESPONSE_FORMAT = "response_format"  # constrained structured output (JSON object / JSON Schema)
LOGPROBS = "logprobs"  # per-token logprobs from the model's distribution (SequenceDelta.logprobs)
CONSTRAINED_CONTINUATION = "constrained_continuation"  # continue constrained output after a crash
GRAMMAR = "grammar"  # a GBNF grammar (OutputFormat.needs_grammar: a format with literal tags)
EMBEDDINGS = (
    "embeddings"  # /v1/embeddings: GenerationRequest.embed_inputs, answered with protocol.embeddings.pack
)
# The finish reasons of OpenAI's API (SequenceDelta.as_openai_finish).
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
PENALTIES = "penalties"  # OpenAI's presence_penalty and frequency_penalty, over the generated tokens
LOGIT_BIAS = "logit_bias"  # OpenAI's logit_bias: token id -> bias added to its logit


class EngineRequestError(ValueError):
    """A request this engine cannot run (prompt too long, no chat template, ...); never retried."""

    def __init__(
        self,
        message: str,
        code: str = "invalid_request",
        error_type: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.error_type = error_type
        self.param = param  # the request's field to change, where one is to blame


def check_fits(prompt_tokens: int, request: GenerationRequest, context: int) -> None:
    """The prompt, and with it ``max_tokens``, must fit the model's context: a 400
    ``context_length_exceeded`` otherwise, as from OpenAI and vLLM, not an answer cut short. A
    continuation (``emitted_tokens``) was judged at its start. A prompt of no tokens at all (an empty
    one, on a model that adds no BOS) is a 400 too, as from vLLM: llama.cpp cannot decode it (the
    worker failed, and again on each reclaim, until the job was dead-lettered)."""
    if prompt_tokens == 0 and not request.emitted_tokens:
        raise EngineRequestError(
            "The prompt is empty: it has no tokens for this model to continue.",
            code="empty_prompt",
            param="messages" if request.messages is not None else "prompt",
        )
    if prompt_tokens >= context:
        raise EngineRequestError(
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens}.",
            code="context_length_exceeded",
            param="messages" if request.messages is not None else "prompt",  # as the gateway's check
        )
    wanted = request.max_tokens
    if wanted is not None and not request.emitted_tokens and prompt_tokens + wanted > context:
        raise EngineRequestError(
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens} "
            f"and max_tokens asks for {wanted}, {prompt_tokens + wanted} in all: lower max_tokens or "
            "shorten the prompt.",
            code="context_length_exceeded",
            param="max_tokens",
        )


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model: str
    engine: str
    context_length: int
    capacity: int
    embedding_dim: int = 0  # the width of its embeddings, when it computes them and knows it (0: not)
    vocab_size: int = 0  # its tokenizer's vocabulary (logit_bias token ids are below it); 0: not known


@dataclass(slots=True)
class GenerationRequest:
    """One sequence to generate; ``emitted_*`` are non-empty when continuing a reclaimed job."""

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None  # a tool-call turn's `tool_calls`: JSON text
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    output_format: OutputFormat | None = None
    embed_inputs: list[str] | None = None  # an embedding request: no generation, one final delta
    logprobs: int | None = None  # report each token's logprob and this many most likely alternatives
    tools: dict[str, Any] | None = None  # passed to an upstream (tools, tool_choice, parallel_tool_calls)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    emitted_text: str = ""
    emitted_tokens: int = 0


@dataclass(slots=True)
class SequenceDelta:
    """What one engine step produced for one sequence; ``finish_reason`` set on its last delta."""

    request_id: str
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: str | None = None
    # An error the request itself caused (the client gets a 400); otherwise a server-side failure.
    error_code: str | None = None
    # Per generated token (``tokens`` of them, when asked): {token, logprob, bytes, top_logprobs}.
    logprobs: list[dict[str, Any]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def as_openai_finish(self) -> None:
        """The finish an OpenAI client knows (:data:`FINISH_REASONS`): an engine's own (vLLM's
        ``abort`` and ``error``: a failed generation; its ``repetition``, an upstream's other
        words) becomes an error or ``stop``, never a value strict clients reject."""
        reason = self.finish_reason
        if reason is None or reason in FINISH_REASONS:
            return
        if reason in ("error", "abort"):
            self.finish_reason = None
            self.error = self.error or f"the engine ended the answer with finish reason `{reason}`"
        else:
            self.finish_reason = "stop"


class Engine(ABC):
    """A continuous-batching engine. ``step`` runs one batch step over every running sequence."""

    info: EngineInfo
    features: frozenset[str] = frozenset()
    tool_format: str = ""  # the model's tool-call format (protocol.toolformats), when known
    # Whether the worker publishes a step's tokens while this engine runs its next step: an engine
    # that computes its batch keeps computing while Redis takes the last step's tokens. One that
    # streams from a backend gathers what has arrived instead; a step begun during a publish would
    # only gather less.
    overlaps_publish: bool = False
    # Whether a step that does not return for ``step_timeout_s`` means the engine is stuck (the
    # worker then hands its jobs over). Not for one whose sequences wait on a backend with a read
    # timeout of their own: there a long silence is the backend's prefill or queue, ended by it.
    watched_steps: bool = True

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model; called once before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and its threads."""

    def available(self) -> bool:
        """Whether the engine can serve now (an upstream engine whose backend cannot be reached says
        no): a worker then takes no job, not even by preempting one of its own."""
        return True

    @abstractmethod
    def free_slots(self) -> int:
        """How many more sequences the engine can run now (the worker pulls at most this many)."""

    @abstractmethod
    def running(self) -> int:
        """Sequences currently admitted (running or prefilling)."""

    @abstractmethod
    def add(self, request: GenerationRequest) -> None:
        """Admit a sequence; it joins the batch at the next step. Raises :class:`EngineRequestError`."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Drop a sequence; its slot is free before the next step. Unknown ids are ignored."""

    @abstractmethod
    async def step(self) -> list[SequenceDelta]:
        """Wait until there is work, run one step, return the deltas of every sequence that produced any."""

    def stats(self) -> dict[str, Any]:
        """Engine state for metrics (e.g. ``kv_cache_usage``)."""
        return {}

    def last_step(self) -> tuple[int, int] | None:
        """The sequences and the prompt tokens prefilled in the step just run, for an engine whose
        ``step`` is one batch step of the model: the worker fits its step cost from them
        (``engines.stepcost``). None for an engine whose steps it cannot see (an upstream)."""
        return None

    def fingerprint(self) -> str:
        """What makes this engine's answers what they are (weights, template, upstream): part of
        every response-cache key, so a new model version never gets an old version's answers."""
        return f"{self.info.engine}:{self.info.model}"


class StopChecker:
    """Applies stop strings to streamed text: never emits a stop string or text past it.

    Text that could be the beginning of a stop string is held back until it is decided, by whole
    tokens: a token any of whose text is held is held whole, with its item (its logprobs entry), so
    what a step emits is whole tokens' text and their entries; on a stop, the entries of the tokens
    that wrote some of the text before it (not those wholly inside the stop string).
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held: list[tuple[str, Any]] = []  # each token held back: its text and item, oldest first

    def feed(self, text: str) -> tuple[str, bool]:
        """Add one token's text; returns (text safe to emit, whether a stop string was hit)."""
        out, stopped, _ = self.feed_token(text)
        return out, stopped

    def feed_token(self, text: str, item: Any = None) -> tuple[str, bool, list[Any]]:
        """:meth:`feed`, and the items (not None) of the tokens whose text it emits."""
        if not self._stops:
            return text, False, [] if item is None else [item]
        self._held.append((text, item))
        buf = "".join(t for t, _ in self._held)
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            hit, start, items = min(hits), 0, []
            for piece, held in self._held:  # the tokens whose text begins before the stop string
                if start >= hit:
                    break
                if held is not None:
                    items.append(held)
                start += len(piece)
            self._held = []
            return buf[:hit], True, items
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        first, size = len(self._held), 0  # the oldest token the held text begins in
        while size < hold:
            first -= 1
            size += len(self._held[first][0])
        while first and not self._held[first - 1][0]:  # part of a character: it may begin a stop too
            first -= 1
        out, self._held = self._held[:first], self._held[first:]
        return "".join(t for t, _ in out), False, [i for _, i in out if i is not None]

    def flush(self) -> str:
        """Release held-back text at the end of generation."""
        return self.flush_items()[0]

    def flush_items(self) -> tuple[str, list[Any]]:
        """:meth:`flush`, and the items (not None) of the tokens it releases."""
        out, self._held = self._held, []
        return "".join(t for t, _ in out), [i for _, i in out if i is not None]
