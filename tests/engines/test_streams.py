"""A streaming engine's steps (engines/streams.py): a later token waits for the others' (a window, a
share of the sequences' own gap between tokens) so that many sequences share a write, unless every
streaming sequence has one waiting; a sequence's first delta is stepped at once (its client is
waiting for its first token)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from breakwater.engines import streams
from breakwater.engines.base import EngineInfo, GenerationRequest, SequenceDelta
from breakwater.engines.streams import Flight, Gaps, StreamingEngine


class Puppet(StreamingEngine):
    """Sequences that emit only what the test tells them to."""

    info = EngineInfo(model="puppet", engine="puppet", context_length=1024, capacity=8)

    async def _generate(self, flight: Flight) -> None:
        await asyncio.Event().wait()

    def free_slots(self) -> int:
        return 8

    def say(self, rid: str, text: str) -> None:
        self._emit(SequenceDelta(rid, text=text, tokens=1))


async def _settles(task: asyncio.Task[list[SequenceDelta]]) -> bool:
    for _ in range(5):  # a few turns of the loop: no timer can have fired (the windows are 60 s)
        await asyncio.sleep(0)
    return task.done()


async def _waits(engine: Puppet) -> None:
    """The next step does not come yet (the others' tokens are awaited); the try is given up."""
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    step.cancel()


def _said(deltas: list[SequenceDelta]) -> list[tuple[str, str]]:
    return [(d.request_id, d.text) for d in deltas]


@pytest.fixture
async def engine(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Puppet]:
    """a and b are streaming (their first tokens stepped), c has not emitted yet."""
    monkeypatch.setattr(streams, "STEP_MIN_S", 60.0)
    monkeypatch.setattr(streams, "STEP_MAX_S", 60.0)
    engine = Puppet()
    for rid in ("a", "b", "c"):
        engine.add(GenerationRequest(rid, prompt="p"))
    engine.say("a", "x")
    assert _said(await engine.step()) == [("a", "x")]  # a first token: at once
    engine.say("b", "x")
    assert _said(await engine.step()) == [("b", "x")]
    engine.say("a", "x")
    engine.say("b", "x")
    assert _said(await engine.step()) == [("a", "x"), ("b", "x")]  # a round: every one has a token
    yield engine
    await engine.close()


async def test_a_later_delta_waits_for_the_others(engine: Puppet) -> None:
    engine.say("a", "y")
    await _waits(engine)


async def test_the_step_comes_at_once_when_every_streaming_sequence_has_a_token(engine: Puppet) -> None:
    """A backend that steps its batch (vLLM) sends every sequence's token together: no waiting then."""
    engine.say("a", "y")
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    engine.say("b", "z")
    assert await _settles(step)
    assert _said(step.result()) == [("a", "y"), ("b", "z")]
    engine.say("a", "w")  # the next round waits again
    await _waits(engine)


async def test_a_sequence_that_ends_or_is_cancelled_is_not_waited_for(engine: Puppet) -> None:
    engine.say("a", "y")
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    engine._emit(SequenceDelta("b", finish_reason="stop"))
    assert await _settles(step)
    assert [(d.request_id, d.text, d.finish_reason) for d in step.result()] == [
        ("a", "y", None),
        ("b", "", "stop"),
    ]
    engine.add(GenerationRequest("d", prompt="p"))
    engine.say("d", "x")
    assert _said(await engine.step()) == [("d", "x")]
    engine.say("d", "x")
    engine.say("a", "x")
    assert _said(await engine.step()) == [("d", "x"), ("a", "x")]
    engine.say("a", "v")
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)  # d streams and has nothing waiting
    engine.cancel("d")
    assert await _settles(step)
    assert _said(step.result()) == [("a", "v")]


async def test_a_continuation_that_has_not_emitted_here_is_not_waited_for(engine: Puppet) -> None:
    """A resumed sequence still prefilling has no token coming soon: the others do not wait for it."""
    engine.add(GenerationRequest("d", prompt="p", emitted_text="ab", emitted_tokens=2))
    engine.say("a", "y")
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    engine.say("b", "z")
    assert await _settles(step)
    assert _said(step.result()) == [("a", "y"), ("b", "z")]
    engine.say("d", "e")  # once it has emitted, it is waited for like the others
    engine.say("a", "w")
    later = asyncio.create_task(engine.step())
    assert not await _settles(later)
    engine.say("b", "v")
    assert await _settles(later)
    assert _said(later.result()) == [("d", "e"), ("a", "w"), ("b", "v")]


async def test_a_first_delta_is_stepped_at_once_and_alone(engine: Puppet) -> None:
    """Its write is small and the gateway meets it first; what waited goes on waiting."""
    engine.say("a", "y")
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    engine.say("c", "z")  # c's first token
    assert await _settles(step)
    assert _said(step.result()) == [("c", "z")]
    engine.say("c", "w")  # c's second: it waits with a's (b has nothing)
    later = asyncio.create_task(engine.step())
    assert not await _settles(later)
    engine.say("b", "v")  # now every streaming sequence has a token waiting
    assert await _settles(later)
    assert _said(later.result()) == [("a", "y"), ("c", "w"), ("b", "v")]


async def test_a_first_stepped_alone_has_had_its_turn(engine: Puppet) -> None:
    """A batch (vLLM's step) with one sequence's first token: once that is out alone, the rest of
    the batch goes as soon as every other streaming sequence has its token, not a window later."""
    engine.say("a", "y")
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    engine.say("c", "z")
    assert await _settles(step)
    assert _said(step.result()) == [("c", "z")]
    later = asyncio.create_task(engine.step())
    assert not await _settles(later)  # b's token has not come
    engine.say("b", "v")
    assert await _settles(later)
    assert _said(later.result()) == [("a", "y"), ("b", "v")]
    engine.say("a", "w")  # a new round: c is waited for again
    engine.say("b", "u")
    await _waits(engine)


async def test_a_first_deltas_later_text_goes_with_it(engine: Puppet) -> None:
    engine.say("c", "z")
    engine.say("c", "w")  # before the step ran
    assert _said(await engine.step()) == [("c", "zw")]
    engine.say("a", "y")
    await _waits(engine)  # c's token was not left counted as waiting


def _entry(token: str) -> dict[str, object]:
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}


async def test_the_deltas_a_step_merges_keep_every_tokens_logprobs(engine: Puppet) -> None:
    """A sequence whose tokens waited out a window is one delta: one logprobs entry per token, in
    order, a held (textless) token's too; another sequence's stay its own."""
    for rid, text in (("a", " of"), ("b", "x"), ("a", ""), ("a", " three")):
        engine._emit(SequenceDelta(rid, text=text, tokens=1, logprobs=[_entry(text or "<held>")]))
    deltas = await engine.step()  # every streaming sequence has a token waiting: at once
    assert [(d.request_id, d.text, d.tokens) for d in deltas] == [("a", " of three", 3), ("b", "x", 1)]
    assert [[e["token"] for e in d.logprobs or ()] for d in deltas] == [[" of", "<held>", " three"], ["x"]]


def _merged(*deltas: SequenceDelta) -> list[tuple[str, str, int, list[str], str | None]]:
    return [
        (d.request_id, d.text, d.tokens, [e["token"] for e in d.logprobs or ()], d.finish_reason or d.error)
        for d in streams.merge_deltas(list(deltas))
    ]


def test_tokens_without_text_after_the_text_stay_apart_from_it() -> None:
    """An entry goes with the text its token wrote: tokens with no text after a sequence's last text
    (an end-of-sequence token, a stop string's prefix held back) are a delta of their own behind it,
    with the finish if it came; before text, they go with it."""
    eos = SequenceDelta("a", tokens=1, logprobs=[_entry("<eos>")])
    finish = SequenceDelta("a", finish_reason="stop", usage={"completion_tokens": 3})
    assert _merged(SequenceDelta("a", text="Hi", tokens=1, logprobs=[_entry("Hi")]), eos, finish) == [
        ("a", "Hi", 1, ["Hi"], None),
        ("a", "", 1, ["<eos>"], "stop"),
    ]
    held = SequenceDelta("a", tokens=1, logprobs=[_entry("\n")])
    assert _merged(SequenceDelta("a", text="Hi", tokens=1, logprobs=[_entry("Hi")]), held) == [
        ("a", "Hi", 1, ["Hi"], None),
        ("a", "", 1, ["\n"], None),
    ]
    held = SequenceDelta("a", tokens=1, logprobs=[_entry("\n")])
    later = SequenceDelta("a", text="\nOk", tokens=1, logprobs=[_entry("Ok")])
    assert _merged(held, later) == [("a", "\nOk", 2, ["\n", "Ok"], None)]


def test_a_plain_finish_joins_the_text_and_an_error_stays_behind_it() -> None:
    """A finish without entries goes in the text's own write (one call for both); an error goes
    after the text, which is written first (an error's call writes no text)."""
    text = SequenceDelta("a", text="Hi", tokens=1)
    other = SequenceDelta("b", text="x", tokens=1)
    end = SequenceDelta("a", tokens=1, finish_reason="stop")
    assert _merged(text, other, end) == [("a", "Hi", 2, [], "stop"), ("b", "x", 1, [], None)]
    text = SequenceDelta("a", text="Hi", tokens=1)
    failed = SequenceDelta("a", error="upstream gone", error_code=None)
    assert _merged(text, failed) == [("a", "Hi", 1, [], None), ("a", "", 0, [], "upstream gone")]


async def test_a_continuation_and_a_textless_delta_wait_as_before(engine: Puppet) -> None:
    """A resumed sequence's client has had its first token; a delta without text (a tool parser
    holding it back) publishes nothing, so neither ends the wait (c's first text still does)."""
    engine.add(GenerationRequest("d", prompt="p", emitted_text="ab", emitted_tokens=2))
    engine.say("d", "e")
    engine._emit(SequenceDelta("c", text="", tokens=1))
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    engine.say("c", "z")
    assert await _settles(step)
    assert [(d.request_id, d.text, d.tokens) for d in step.result()] == [("c", "z", 2)]
    await _waits(engine)  # d's token waits for the others'


async def test_the_window_follows_the_sequences_gap_between_tokens(engine: Puppet) -> None:
    seen = engine.gaps.mean_s  # the fixture's round: a gap of well under 20 ms each
    assert 0.0 < seen < 0.02
    await asyncio.sleep(0.02)
    engine.say("a", "y")
    assert seen + (0.02 - seen) * streams.GAP_WEIGHT <= engine.gaps.mean_s < 0.02
    seen = engine.gaps.mean_s
    engine._emit(SequenceDelta("a", finish_reason="stop"))  # a final delta without text: not a gap
    engine._emit(SequenceDelta("b", text="", tokens=1))  # nor a textless one
    assert engine.gaps.mean_s == seen


async def test_a_first_token_is_not_a_gap() -> None:
    engine = Puppet()
    engine.add(GenerationRequest("a", prompt="p"))
    await asyncio.sleep(0.01)
    engine.say("a", "x")
    assert _said(await engine.step()) == [("a", "x")]
    assert engine.gaps.mean_s == 0.0
    await engine.close()


def test_the_window_is_a_share_of_the_mean_gap_within_bounds() -> None:
    gaps = Gaps()
    assert gaps.window_s == streams.STEP_MIN_S  # nothing seen yet
    gaps.add(0.010)
    assert gaps.mean_s == pytest.approx(0.010)  # the first gap is the mean
    assert gaps.window_s == pytest.approx(streams.GAP_SHARE * 0.010)
    gaps.add(0.020)  # a moving average: one gap moves it a little
    assert gaps.mean_s == pytest.approx(0.010 + 0.010 * streams.GAP_WEIGHT)
    for _ in range(1000):
        gaps.add(1.0)  # a slow model: never more than the longest window
    assert gaps.window_s == streams.STEP_MAX_S
    for _ in range(1000):
        gaps.add(0.0)  # a backend that sends bursts: the shortest window
    assert gaps.window_s == streams.STEP_MIN_S


def test_a_window_share_of_zero_steps_every_millisecond() -> None:
    """The setting for the least jitter (stream_window_share = 0): the shortest window always."""
    gaps = Gaps(0.0)
    for _ in range(100):
        gaps.add(0.030)
    assert gaps.window_s == streams.STEP_MIN_S


def test_a_stall_counts_as_a_bounded_gap() -> None:
    """One long gap (a stall, a retry's back-off) must not hold the window at its longest for the
    next hundreds of tokens: at 10 ms a token that would be a window as long as the gap itself."""
    gaps = Gaps()
    for _ in range(200):
        gaps.add(0.010)
    gaps.add(30.0)
    assert gaps.mean_s == pytest.approx(0.010 + (streams.GAP_MAX_S - 0.010) * streams.GAP_WEIGHT)
    assert gaps.window_s < 0.006


def test_a_flights_text_is_every_piece_in_order_across_its_joins() -> None:
    """The text grows by pieces (joined every JOIN_EVERY of them, not copied whole per token) and
    reads as their concatenation after a continuation's text, whenever it is read."""
    flight = Flight(GenerationRequest("r"), head="earlier ")
    expected = "earlier "
    for i in range(2 * streams.JOIN_EVERY + 3):
        piece = f"{i} é" if i % 7 else ""  # empty pieces (held tokens) and multi-byte text too
        flight.add_text(piece)
        expected += piece
        if i in (0, streams.JOIN_EVERY - 2, streams.JOIN_EVERY + 5):
            assert flight.text == expected  # read midway: the pieces after it still join in order
    assert len(flight.pieces) < streams.JOIN_EVERY  # joined as it went, not kept one per token
    assert flight.text == expected
    assert flight.pieces == []
