"""The fuzz oracle's own rules: what it changes in a generated body before sending it."""

from __future__ import annotations

from tests.fuzz.oracle import MAX_FUZZ_TOKENS, aimed_at_served_model
from tests.fuzz.wire import SERVED


def test_every_token_count_the_gateway_accepts_is_bounded() -> None:
    """2048.0 is a valid count (the gateway reads it as 2048): left as it was, a stream of 2048
    tokens outran the 1000 events the fuzz run reads of it (a clean-clone CI run failed so)."""
    body = aimed_at_served_model(
        {"model": "x", "max_tokens": 2**31, "max_completion_tokens": 2048.0, "ignore_eos": True}
    )
    assert body == {
        "model": SERVED,
        "max_tokens": MAX_FUZZ_TOKENS,
        "max_completion_tokens": MAX_FUZZ_TOKENS,
        "ignore_eos": True,
    }


def test_a_wrong_typed_count_keeps_its_mutation() -> None:
    assert aimed_at_served_model({"model": 3, "max_tokens": "many"}) == {"model": 3, "max_tokens": "many"}


def test_only_known_members_are_kept() -> None:
    body = aimed_at_served_model(
        {"model": "x", "extra": 1, "max_tokens": 4}, frozenset({"model", "max_tokens"})
    )
    assert body == {"model": SERVED, "max_tokens": 4}
