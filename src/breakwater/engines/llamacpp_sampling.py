"""The llama.cpp sampler chain of one sequence: OpenAI's sampling parameters as llama.cpp samplers.

In order: the logit biases (the client's ``logit_bias``; ``ignore_eos`` bans the end tokens), the
presence and frequency penalties over the tokens generated so far, the grammar of a structured
output, then greedy choice (temperature 0) or top-k, top-p, temperature and a seeded draw (seeded
anew for each position of the answer, :func:`reseed`). A continued answer's tokens are accepted by
the penalties and the grammar first, so both go on from where the answer was; each sampled token is
accepted by the whole chain (``llama_sampler_sample``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import llama_cpp

from breakwater.engines.base import EngineRequestError, GenerationRequest


@dataclass(frozen=True, slots=True)
class Vocab:
    """The model's vocabulary: its llama.cpp handle, size and end-of-generation tokens."""

    handle: Any
    size: int
    eog: list[int]


def sampler_chain(request: GenerationRequest, continued: list[int], vocab: Vocab, context_length: int) -> Any:
    """The chain for ``request``; raises :class:`EngineRequestError` for what cannot be sampled
    (before anything is allocated)."""
    if request.ignore_eos and request.output_format is not None:
        # A finished grammar allows only end-of-generation: the two cannot both hold.
        raise EngineRequestError(
            "ignore_eos cannot be combined with response_format or a forced tool call",
            code="unsupported_parameter",
        )
    unknown = [t for t in request.logit_bias or () if not 0 <= t < vocab.size]
    if unknown:
        raise EngineRequestError(
            f"`logit_bias` names token {unknown[0]}; this model has {vocab.size}", code="invalid_value"
        )
    grammar = None
    if request.output_format is not None:
        grammar = llama_cpp.llama_sampler_init_grammar(
            vocab.handle, request.output_format.grammar().encode(), b"root"
        )
        if not grammar:
            raise EngineRequestError(
                "llama.cpp could not parse the output grammar", code="invalid_response_format"
            )
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add  # the chain owns what is added to it
    bias = dict(request.logit_bias or {}) | ({t: -math.inf for t in vocab.eog} if request.ignore_eos else {})
    if bias:
        entries = [llama_cpp.llama_logit_bias(token, b) for token, b in bias.items()]
        biases = (llama_cpp.llama_logit_bias * len(entries))(*entries)  # copied by llama.cpp
        add(chain, llama_cpp.llama_sampler_init_logit_bias(vocab.size, len(entries), biases))
    # OpenAI's penalties count the answer's tokens, never the prompt's: the whole answer so far.
    for sampler in (
        _penalties(vocab.size, context_length, request.frequency_penalty, request.presence_penalty)
        if request.presence_penalty or request.frequency_penalty
        else None,
        grammar,
    ):
        if sampler is not None:
            add(chain, sampler)
            for token in continued:  # its state after the text already emitted
                llama_cpp.llama_sampler_accept(sampler, token)
    for sampler in _draw(request):
        add(chain, sampler)
    return chain


def _draw(request: GenerationRequest) -> list[Any]:
    """The samplers that pick the token: greedy at temperature 0, else a seeded draw."""
    if request.temperature <= 0.0:
        return [llama_cpp.llama_sampler_init_greedy()]
    out = []
    if request.top_k > 0:
        out.append(llama_cpp.llama_sampler_init_top_k(request.top_k))
    if request.top_p < 1.0:
        out.append(llama_cpp.llama_sampler_init_top_p(request.top_p, 1))
    out.append(llama_cpp.llama_sampler_init_temp(request.temperature))
    out.append(llama_cpp.llama_sampler_init_dist(position_seed(request.seed, 0)))
    return out


def reseed(chain: Any, request: GenerationRequest, position: int) -> None:
    """Before the answer's token at ``position`` (0: its first) is drawn: a draw seeded for that
    position alone. A continued answer (its worker crashed) draws each token as the first attempt
    would have; one seeded generator for the whole answer restarted from its seed, so the text
    after a crash differed from the answer the seed gives."""
    if request.temperature <= 0.0:
        return  # greedy: no draw
    last = llama_cpp.llama_sampler_chain_n(chain) - 1
    llama_cpp.llama_sampler_free(llama_cpp.llama_sampler_chain_remove(chain, last))
    llama_cpp.llama_sampler_chain_add(
        chain, llama_cpp.llama_sampler_init_dist(position_seed(request.seed, position))
    )


def position_seed(seed: int, position: int) -> int:
    """A 32-bit seed for the draw at ``position`` (splitmix64 of the request's seed and the
    position); never llama.cpp's "seed from the clock" value."""
    z = ((seed & 0xFFFFFFFFFFFFFFFF) * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    out = (z ^ (z >> 31)) & 0xFFFFFFFF
    return out if out != llama_cpp.LLAMA_DEFAULT_SEED else 0


def _penalties(n_vocab: int, last_n: int, frequency: float, presence: float) -> Any:
    """llama.cpp's penalties sampler over the last ``last_n`` tokens (no repetition penalty), as the
    bundled libllama takes it: ``(n_vocab, last_n, repeat, freq, present)``."""
    return llama_cpp.llama_sampler_init_penalties(n_vocab, last_n, 1.0, frequency, presence)
