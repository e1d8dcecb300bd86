"""The fuzz oracle's own rules: what it changes in a generated body before sending it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from breakwater.protocol.openai import ChatCompletionRequest
from tests.fuzz.oracle import MAX_FUZZ_TOKENS, aimed_at_served_model
from tests.fuzz.wire import SERVED

MESSAGES = [{"role": "user", "content": "hi"}]


def generated_tokens(body: dict[str, Any]) -> int | None:
    """The limit the gateway's own model reads from ``body`` (None: none, up to the context; 0: the
    body is refused, a string or a boolean where a number goes, and generates nothing)."""
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError:
        return 0
    return request.max_completion_tokens or request.max_tokens


@pytest.mark.parametrize(
    "members",
    [
        # A clean-clone CI run failed on the first: the gateway reads 2048.0 as 2048, and the
        # stream of 2048 tokens outran the events the fuzz run reads of it.
        {"max_completion_tokens": 2048.0, "ignore_eos": True},
        {"max_tokens": 2**31 - 1, "ignore_eos": True},
        {"max_tokens": 1e3, "ignore_eos": True},
        {"max_completion_tokens": "2048", "max_tokens": 4, "ignore_eos": True},
        {"max_tokens": " 2048.0 ", "ignore_eos": "true"},
        {"ignore_eos": 1},
        {"ignore_eos": "yes", "max_completion_tokens": None},
    ],
)
def test_every_count_the_gateway_accepts_is_bounded(members: dict[str, Any]) -> None:
    body = aimed_at_served_model({"model": "x", "messages": MESSAGES, **members})
    assert body["model"] == SERVED
    limit = generated_tokens(body)
    assert limit is not None and limit <= MAX_FUZZ_TOKENS, body


def test_a_count_keeps_its_json_type() -> None:
    body = aimed_at_served_model({"model": "x", "messages": MESSAGES, "max_tokens": "500"})
    assert body["max_tokens"] == str(MAX_FUZZ_TOKENS)


@pytest.mark.parametrize(
    "members",
    [
        {"max_tokens": 2048.5},
        {"max_tokens": "1e3"},
        {"max_tokens": "many"},
        {"max_completion_tokens": "many", "ignore_eos": True},
    ],
)
def test_a_count_the_gateway_refuses_keeps_its_mutation(members: dict[str, Any]) -> None:
    body = aimed_at_served_model({"model": "x", "messages": MESSAGES, **members})
    assert body == {"model": SERVED, "messages": MESSAGES, **members}
    with pytest.raises(ValidationError):  # the case stays one the gateway refuses
        ChatCompletionRequest.model_validate(body)


def test_only_known_members_are_kept() -> None:
    body = aimed_at_served_model(
        {"model": "x", "extra": 1, "max_tokens": 4}, frozenset({"model", "max_tokens"})
    )
    assert body == {"model": SERVED, "max_tokens": 4}
