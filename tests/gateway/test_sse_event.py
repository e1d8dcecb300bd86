"""SSE events stay one data line for every line reader, whatever text the model wrote."""

from __future__ import annotations

import orjson
import pytest

from breakwater.gateway.sse import ChoiceChunks, sse_event
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import completion_logprobs

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

    class Fails:
        @staticmethod
        def dumps(data: object) -> bytes:
            raise TypeError("cannot render")

    monkeypatch.setattr(sse, "orjson", Fails)  # both the first chunk's and a plain token's encoding
    with pytest.raises(TypeError):
        sse.token_event(render, event)
    monkeypatch.undo()
    assert (render.role_sent, render.offset) == (False, 0)
    assert sse.token_event(render, event) == expected


TEXTS = [
    "Hello",
    "",
    " ",
    'a "quoted" \\ back\\slash',
    "tab\tnew\nline\r",
    "\x00\x1f\x7f",
    "héllo wörld",
    "\u2019",
    "emoji \U0001f600",
    *(f"one{c}two" for c in BREAKERS),
    "\x00breakwater text",
]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("model", ["m", "modèle\u2028x"])
def test_a_plain_token_from_the_template_is_the_chunk_rendered_whole(chat: bool, model: str) -> None:
    """ChoiceChunks.token_sse cuts a plain token's event from a template made once per stream: every
    byte must be what rendering the chunk whole gives, and the completions text offset must move
    the same, for any text."""
    from breakwater.gateway.sse import ChoiceChunks
    from breakwater.protocol.events import TokenEvent

    fast = ChoiceChunks(rid="cmpl-1", model=model, created=1700000000, chat=chat, index=2)
    whole = ChoiceChunks(rid="cmpl-1", model=model, created=1700000000, chat=chat, index=2)
    for seq, text in enumerate(TEXTS * 2, start=1):
        event = TokenEvent(seq, "token", text, 1)
        assert fast.token_sse(event) == sse_event(whole.token(event), seq), text
        assert (fast.role_sent, fast.offset) == (whole.role_sent, whole.offset)
    lines = fast.token_sse(TokenEvent(99, "token", "a\u2028b", 1)).decode().splitlines()
    assert len(lines) == 3 and orjson.loads(lines[1][6:])["model"] == model


def _entry(token: str, raw: bytes) -> dict[str, object]:
    return {"token": token, "logprob": -0.5, "bytes": list(raw), "top_logprobs": []}


def test_completions_text_offsets_count_the_characters_a_tokens_bytes_complete() -> None:
    """A token holding part of a character (shown as U+FFFD) counted one character: the offsets ran
    past the text's end, and streamed ones went backwards at the next chunk."""
    a, first, second, b = (
        _entry("a", b"a"),
        _entry("\ufffd", "😀".encode()[:2]),
        _entry("\ufffd", "😀".encode()[2:]),
        _entry("b", b"b"),
    )
    whole = completion_logprobs([a, first, second, b], 0)["text_offset"]
    assert whole == [0, 1, 1, 2]  # "a😀b": the emoji starts at 1, "b" at 2
    render = ChoiceChunks(rid="cmpl-1", model="m", created=1, chat=False)
    streamed = []
    for seq, (text, entries) in enumerate((("a", [a]), ("😀b", [first, second, b])), 1):
        event = TokenEvent(seq=seq, kind="token", text=text, tokens=len(entries), logprobs=entries)
        chunk = render.token(event)
        streamed += chunk["choices"][0]["logprobs"]["text_offset"]
    assert streamed == whole
    # A character begun by one chunk's last token and ended by the next chunk's first one.
    begun, ended, x = _entry("a\ufffd", b"a\xe4"), _entry("\ufffd", b"\xb8\x96"), _entry("x", b"x")
    assert completion_logprobs([begun, ended, x], 0)["text_offset"] == [0, 1, 2]  # "a世x"
    render = ChoiceChunks(rid="cmpl-2", model="m", created=1, chat=False)
    streamed = []
    for seq, (text, entries) in enumerate((("a", [begun]), ("世x", [ended, x])), 1):
        event = TokenEvent(seq=seq, kind="token", text=text, tokens=len(entries), logprobs=entries)
        streamed += render.token(event)["choices"][0]["logprobs"]["text_offset"]
    assert streamed == [0, 1, 2]
