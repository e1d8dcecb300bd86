"""The merged stream of an ``n > 1`` request (gateway.choices): event ids, and a resume whose
choices are replayed from their start (tool calls parsed from the whole answer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from breakwater.config import GatewaySettings
from breakwater.gateway.choices import Choice, ChoiceGroup, _Merged, is_seq, parse_positions, stream
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


async def test_a_reader_that_runs_past_its_cancellation_does_not_hold_the_response() -> None:
    """The client leaves an ``n=2`` stream, and each choice's reader drops its first cancellation
    (Python 3.11's ``wait_for`` inside a Redis call: see ``breakwater.stopping``). Closing the stream
    still ends both readers (left running they would fill the queue and wait on it for ever, holding
    the response) and detaches both choices."""
    dropped: list[str] = []
    closed: list[str] = []
    detached: list[str] = []

    async def events(rid: str) -> AsyncIterator[TokenEvent]:
        seq, dropping = 0, True
        try:
            while True:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    if not dropping:
                        raise
                    dropping = False
                    dropped.append(rid)
                seq += 1
                yield TokenEvent(seq=seq, kind="token", text="x")
        finally:
            closed.append(rid)

    def detach_later(rid: str, *, shared: bool = False) -> None:
        detached.append(rid)

    requests = SimpleNamespace(events=lambda sub, after, **_: events(sub), detach_later=detach_later)
    rids = [f"chatcmpl-x-{i}" for i in range(2)]
    group = _group("", [0, 0])
    group.choices = [Choice(i, rid, 0, cast(Any, rid)) for i, rid in enumerate(rids)]
    response = cast(
        AsyncGenerator[bytes, None],
        stream(cast(Any, SimpleNamespace(requests=requests, settings=GatewaySettings())), group),
    )
    for _ in range(3):  # the heads, then the choices' tokens
        await asyncio.wait_for(anext(response), 5)
    await asyncio.wait_for(response.aclose(), 5)  # the client left
    assert sorted(closed) == rids and sorted(detached) == rids
    assert dropped  # the drop happened (or the test proves nothing)
