"""SSE events stay one data line for every line reader, whatever text the model wrote."""

from __future__ import annotations

import orjson
import pytest

from breakwater.gateway.sse import sse_event

# NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR: JSON may leave them raw; str.splitlines() breaks on them.
BREAKERS = ("\x85", "\u2028", "\u2029")


@pytest.mark.parametrize("char", BREAKERS)
def test_a_line_breaking_character_in_the_text_keeps_the_event_on_one_line(char: str) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": f"one{char}two \u2019 three"}}]}
    event = sse_event(chunk, 7)
    # httpx's aiter_lines() splits as str.splitlines() does: the id line, one data line, the blank.
    lines = event.decode().splitlines()
    assert len(lines) == 3 and lines[0] == "id: 7" and lines[2] == "", lines
    assert lines[1].startswith("data: ")
    assert orjson.loads(lines[1][6:]) == chunk  # the same text, escaped
    assert char.encode() not in event
    assert "\u2019".encode() in event  # other non-ASCII text stays as it is


def test_text_without_them_is_plain_json() -> None:
    chunk = {"choices": [{"delta": {"content": "héllo \u2019 wörld"}}]}
    assert sse_event(chunk) == b"data: " + orjson.dumps(chunk) + b"\n\n"


@pytest.mark.parametrize("chat", [True, False])
def test_a_token_that_fails_to_render_leaves_the_renderer_as_it_was(
    chat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token written from the fan-in's callback that fails to render goes to the stream's reader,
    which renders it again: it must get the same chunk (the role in the first, the text offset)."""
    from breakwater.gateway import sse
    from breakwater.protocol.events import TokenEvent

    render = sse.ChoiceChunks(rid="r", model="m", created=1, chat=chat)
    event = TokenEvent(1, "token", "Hello", 1)
    expected = sse.token_event(sse.ChoiceChunks(rid="r", model="m", created=1, chat=chat), event)

    def fails(data: object, seq: object = None) -> bytes:
        raise TypeError("cannot render")

    monkeypatch.setattr(sse, "sse_event", fails)
    with pytest.raises(TypeError):
        sse.token_event(render, event)
    monkeypatch.undo()
    assert (render.role_sent, render.offset) == (False, 0)
    assert sse.token_event(render, event) == expected
