"""A streaming engine's steps (engines/streams.py): at most one per STEP_MIN_S, so the tokens of many
sequences share a write, except that a sequence's first delta is stepped at once (its client is
waiting for its first token)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from breakwater.engines import streams
from breakwater.engines.base import EngineInfo, GenerationRequest, SequenceDelta
from breakwater.engines.streams import Flight, StreamingEngine


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
    for _ in range(5):  # a few turns of the loop: no timer can have fired (STEP_MIN_S is 60 s)
        await asyncio.sleep(0)
    return task.done()


@pytest.fixture
async def engine(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Puppet]:
    monkeypatch.setattr(streams, "STEP_MIN_S", 60.0)
    engine = Puppet()
    for rid in ("a", "b"):
        engine.add(GenerationRequest(rid, prompt="p"))
    engine.say("a", "x")
    assert [d.text for d in await engine.step()] == ["x"]  # after a quiet spell: at once
    yield engine
    await engine.close()


async def test_a_later_delta_waits_for_the_step_interval(engine: Puppet) -> None:
    engine.say("a", "y")
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    step.cancel()


async def test_a_first_delta_is_stepped_at_once_with_what_waits(engine: Puppet) -> None:
    engine.say("a", "y")
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    engine.say("b", "z")  # b's first token
    assert await _settles(step)
    assert [(d.request_id, d.text) for d in step.result()] == [("a", "y"), ("b", "z")]
    engine.say("b", "w")  # b's second: it waits again
    later = asyncio.create_task(engine.step())
    assert not await _settles(later)
    later.cancel()


async def test_a_continuation_and_a_textless_delta_wait_as_before(engine: Puppet) -> None:
    """A resumed sequence's client has had its first token; a delta without text (a tool parser
    holding it back) publishes nothing, so neither ends the wait (b's first text still does)."""
    engine.add(GenerationRequest("c", prompt="p", emitted_text="ab", emitted_tokens=2))
    engine.say("c", "d")
    engine._emit(SequenceDelta("b", text="", tokens=1))
    step = asyncio.create_task(engine.step())
    assert not await _settles(step)
    engine.say("b", "z")
    assert await _settles(step)
    assert [(d.request_id, d.text) for d in step.result()] == [("c", "d"), ("b", "z")]
