"""The llama.cpp sampler chain of one sequence (engines.llamacpp_sampling) on made-up logits, no
model: logit_bias, the penalties (and a continued answer's tokens counted by them), ignore_eos."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import llama_cpp
import pytest

from breakwater.engines.base import EngineRequestError, GenerationRequest
from breakwater.engines.llamacpp_sampling import Vocab, sampler_chain

VOCAB = Vocab(handle=None, size=16, eog=[15])
LOGITS = {5: 10.0, 7: 9.0, 15: 11.0}  # the end token first, then 5, then 7; the rest at 0


@pytest.fixture
def chains() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for chain in made:
        llama_cpp.llama_sampler_free(chain)


def _pick(chains: list[Any], continued: list[int] | None = None, **asked: Any) -> int:
    """The token a greedy chain for ``asked`` picks from :data:`LOGITS` after ``continued``."""
    request = GenerationRequest("r", prompt="p", temperature=0.0, **asked)
    chain = sampler_chain(request, continued or [], VOCAB, context_length=64)
    chains.append(chain)
    data = (llama_cpp.llama_token_data * VOCAB.size)(
        *(llama_cpp.llama_token_data(t, LOGITS.get(t, 0.0), 0.0) for t in range(VOCAB.size))
    )
    candidates = llama_cpp.llama_token_data_array(data, VOCAB.size, -1, False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(candidates))
    return int(data[candidates.selected].id)


def test_logit_bias_moves_and_bans_tokens(chains: list[Any]) -> None:
    assert _pick(chains) == 15
    assert _pick(chains, logit_bias={7: 5.0}) == 7  # 9 + 5 over 11
    assert _pick(chains, logit_bias={15: -100.0, 5: -100.0}) == 7
    assert _pick(chains, ignore_eos=True) == 5  # the end token banned
    assert _pick(chains, ignore_eos=True, logit_bias={15: 100.0}) == 5  # the ban holds over a bias


def test_penalties_count_the_answers_tokens_including_a_continued_ones(chains: list[Any]) -> None:
    """A continued answer's tokens are the answer's: penalised as if it had generated them here."""
    banned = {15: -100.0}
    assert _pick(chains, logit_bias=banned, frequency_penalty=2.0) == 5  # nothing generated yet
    assert _pick(chains, [5], logit_bias=banned, frequency_penalty=2.0) == 7  # 10 - 2 < 9
    assert _pick(chains, [5], logit_bias=banned, presence_penalty=0.5) == 5  # 9.5 > 9
    assert _pick(chains, [5], logit_bias=banned, presence_penalty=1.5) == 7
    assert _pick(chains, [7, 7], logit_bias=banned, frequency_penalty=-1.0) == 7  # 9 + 2 > 10


def test_a_token_outside_the_vocabulary_is_refused(chains: list[Any]) -> None:
    with pytest.raises(EngineRequestError) as info:
        _pick(chains, logit_bias={16: 1.0})
    assert info.value.code == "invalid_value" and "16" in str(info.value)
