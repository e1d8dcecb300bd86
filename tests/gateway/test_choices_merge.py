"""The merged stream of an ``n > 1`` request (gateway.choices): event ids, and a resume whose
choices are replayed from their start (tool calls parsed from the whole answer)."""

from __future__ import annotations

import pytest

from breakwater.gateway.choices import Choice, ChoiceGroup, _Merged, is_seq, parse_positions
from breakwater.gateway.errors import APIError
from breakwater.protocol.events import TokenEvent


def _group(tool_format: str, after: list[int]) -> ChoiceGroup:
    choices = [Choice(i, f"chatcmpl-x-{i}", a) for i, a in enumerate(after)]
    return ChoiceGroup("chatcmpl-x", "m", True, 0, False, "", choices, tool_format=tool_format)


def test_a_replayed_event_never_lowers_a_choices_position() -> None:
    """Resumed at 5.5 with the model's own tool calls: both choices replay from their first event.
    Choice 0's replayed event 1 sends nothing and leaves the position at 5; choice 1's event 6 then
    goes out as 5.6 (not 1.6, which a later resume would take as 'choice 0 has only seen 1')."""
    merged = _Merged(_group("hermes", [5, 5]), fresh=False)
    merged.live = {0: merged.group.choices[0], 1: merged.group.choices[1]}
    assert merged.chunk(0, TokenEvent(seq=1, kind="token", text="old")) == b""
    sent = merged.chunk(1, TokenEvent(seq=6, kind="token", text="new"))
    assert sent.startswith(b"id: 5.6\n") and b'"content":"' in sent
    assert merged.positions == [5, 6]


@pytest.mark.parametrize("bad", ["\u00b2.0", "1", "1.2.3", "-1.0", "1.99999999999999999999", ""])
def test_a_malformed_position_is_a_400(bad: str) -> None:
    with pytest.raises(APIError) as err:
        parse_positions(bad, 2)
    assert err.value.status == 400 and err.value.param == "Last-Event-ID"


def test_positions_and_sequence_numbers() -> None:
    assert parse_positions("3.0", 2) == [3, 0]
    assert not is_seq("\u00b2") and not is_seq("") and is_seq("9223372036854775807")
    assert not is_seq("9223372036854775808")
