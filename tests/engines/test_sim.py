"""The sim engine: deterministic, continuable, batched; and the shared stop-string checker."""

from __future__ import annotations

import asyncio

import pytest

from breakwater.engines.base import EngineRequestError, GenerationRequest, SequenceDelta, StopChecker
from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine, count_tokens


async def _run(engine: SimEngine, rid: str) -> list[SequenceDelta]:
    out: list[SequenceDelta] = []
    while True:
        for delta in await engine.step():
            if delta.request_id == rid:
                out.append(delta)
                if delta.finished:
                    return out


async def test_same_seed_same_text_and_continuation_is_exact() -> None:
    full = await _run(
        _engine(GenerationRequest("a", prompt="hello there", seed=3, max_tokens=30, ignore_eos=True)), "a"
    )
    text = "".join(d.text for d in full)
    assert len(full) == 30 and full[-1].finish_reason == "length"
    again = await _run(
        _engine(GenerationRequest("a", prompt="hello there", seed=3, max_tokens=30, ignore_eos=True)), "a"
    )
    assert "".join(d.text for d in again) == text
    other = await _run(_engine(GenerationRequest("a", prompt="hello there", seed=4, max_tokens=30)), "a")
    assert "".join(d.text for d in other) != text
    # Continue after 12 tokens: exactly the rest, usage counts the whole completion.
    head = "".join(d.text for d in full[:12])
    cont = await _run(
        _engine(
            GenerationRequest(
                "a",
                prompt="hello there",
                seed=3,
                max_tokens=30,
                ignore_eos=True,
                emitted_text=head,
                emitted_tokens=12,
            )
        ),
        "a",
    )
    assert head + "".join(d.text for d in cont) == text
    assert cont[-1].usage == {"prompt_tokens": 2, "completion_tokens": 30}


async def test_greedy_text_does_not_depend_on_the_seed() -> None:
    """Temperature 0 is greedy in real engines, so the seed changes nothing: identical greedy
    requests (the worker gives each unseeded request its own seed) get the same answer."""

    async def text(seed: int, temperature: float) -> str:
        request = GenerationRequest("g", prompt="what is a queue", seed=seed, temperature=temperature)
        return "".join(d.text for d in await _run(_engine(request), "g"))

    greedy = {await text(seed, 0.0) for seed in range(20)}
    assert len(greedy) == 1 and next(iter(greedy))
    assert len({await text(seed, 0.7) for seed in range(20)}) > 10  # sampled: the seed decides


def _engine(
    *requests: GenerationRequest,
    capacity: int = 8,
    decode_base_ms: float = 0.0,
    decode_per_seq_ms: float = 0.0,
) -> SimEngine:
    """No step latency unless asked for."""
    options = SimOptions(
        capacity=capacity,
        context_length=64,
        decode_base_ms=decode_base_ms,
        decode_per_seq_ms=decode_per_seq_ms,
    )
    engine = SimEngine(options)
    for request in requests:
        engine.add(request)
    return engine


async def test_every_step_advances_all_running_sequences_and_cancel_frees_slot() -> None:
    engine = _engine(
        *(
            GenerationRequest(str(i), prompt=f"p{i}", seed=i, max_tokens=10, ignore_eos=True)
            for i in range(4)
        ),
        capacity=4,
    )
    assert engine.free_slots() == 0
    deltas = await engine.step()
    assert sorted(d.request_id for d in deltas) == ["0", "1", "2", "3"]
    engine.cancel("2")
    assert engine.free_slots() == 1
    deltas = await engine.step()
    assert sorted(d.request_id for d in deltas) == ["0", "1", "3"]


async def test_step_time_grows_with_batch() -> None:
    loop = asyncio.get_running_loop()
    one = _engine(
        GenerationRequest("a", prompt="x", seed=1, max_tokens=5), decode_base_ms=5, decode_per_seq_ms=5
    )
    t0 = loop.time()
    await one.step()
    single = loop.time() - t0
    many = _engine(
        *(GenerationRequest(str(i), prompt="x", seed=i, max_tokens=5) for i in range(8)),
        decode_base_ms=5,
        decode_per_seq_ms=5,
    )
    t0 = loop.time()
    await many.step()
    batched = loop.time() - t0
    assert single >= 0.010 and batched >= 0.045  # 5 + 5*1 ms vs 5 + 5*8 ms


async def test_a_sequence_added_during_a_step_joins_the_next_one() -> None:
    """A real engine schedules a step's batch before running it: a sequence that arrives meanwhile
    gets its first token from the next step, not from the one already running."""
    engine = _engine(GenerationRequest("a", prompt="x", seed=1, max_tokens=5), decode_base_ms=30)
    running = asyncio.create_task(engine.step())
    await asyncio.sleep(0)  # the step has begun: it is in its 30 ms sleep
    engine.add(GenerationRequest("b", prompt="y", seed=2, max_tokens=5))
    assert [d.request_id for d in await running] == ["a"]
    assert sorted(d.request_id for d in await engine.step()) == ["a", "b"]


def test_context_length_is_enforced() -> None:
    engine = SimEngine(SimOptions(context_length=8))
    with pytest.raises(EngineRequestError) as info:
        engine.add(GenerationRequest("a", prompt="one two three four five six seven eight nine", seed=1))
    assert info.value.code == "context_length_exceeded"
    assert count_tokens("one two  three\nfour") == 4


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "hit"),
    [
        (["hel", "lo wor", "ld"], ["wor"], "hello ", True),
        (["ab", "c", "d"], ["cx"], "abcd", False),
        (["x", "ST", "OP", "y"], ["STOP"], "x", True),
        (["a\n", "\nb"], ["\n\n"], "a", True),
        (["plain"], [], "plain", False),
    ],
)
def test_stop_checker_never_emits_stop_text(
    pieces: list[str], stops: list[str], emitted: str, hit: bool
) -> None:
    checker = StopChecker(stops)
    out = ""
    stopped = False
    for piece in pieces:
        text, stopped = checker.feed(piece)
        out += text
        if stopped:
            break
    if not stopped:
        out += checker.flush()
    assert out == emitted
    assert stopped is hit


def test_stop_checker_releases_text_by_whole_tokens() -> None:
    """A token part of whose text might begin a stop string is held whole: " city" with the stop
    "city of London" went out as " ", its logprobs entry (" city") with it, and "city" later with
    the next token's entry, so a streamed chunk's entries did not spell its text."""
    checker = StopChecker(["city of London"])
    steps = [checker.feed(piece) for piece in (" the", " city", " of", " Paris", ".")]
    assert steps == [(" the", False), ("", False), ("", False), (" city of Paris", False), (".", False)]
    checker = StopChecker(["city of London"])
    assert [checker.feed(p) for p in (" city", " of", " London", "!")][:3] == [
        ("", False),
        ("", False),
        (" ", True),  # the stop begins inside a token: the text before it, nothing after
    ]
    checker = StopChecker(["ab"])
    assert checker.feed("xa") == ("", False)  # a token ending in a stop's start is held whole
    assert checker.flush() == "xa"


def test_stop_checker_keeps_each_tokens_entry_with_its_text() -> None:
    """Entries go out with their tokens' text; on a stop, those of the tokens that wrote some of the
    text before it, not those wholly inside the stop string (the guide: a stop string's tokens
    have no entry)."""
    checker = StopChecker(["Light. Paris"])
    fed = [
        checker.feed_token(piece, piece.upper())
        for piece in (" the", " City", " of", " Light", ".", " Paris")
    ]
    assert fed[:3] == [(" the", False, [" THE"]), (" City", False, [" CITY"]), (" of", False, [" OF"])]
    assert fed[3:5] == [("", False, []), ("", False, [])]  # " Light" might begin the stop: held
    assert fed[5] == (" ", True, [" LIGHT"])  # " Light" wrote the " " before the stop; "." and " Paris" none
    checker = StopChecker(["zz"])
    assert checker.feed_token("az", 1) == ("", False, [])
    assert checker.feed_token("b", 2) == ("azb", False, [1, 2])
    assert checker.feed_token("z", 3) == ("", False, [])
    assert checker.flush_items() == ("z", [3])
    assert StopChecker([]).feed_token("x", None) == ("x", False, [])  # no entry asked
    checker = StopChecker(["世界"])  # a token of part of a character is held with the one it begins
    assert checker.feed_token("a", "A") == ("a", False, ["A"])
    assert checker.feed_token("", "E4 B8") == ("", False, [])
    assert checker.feed_token("世", "96") == ("", False, [])
    assert checker.feed_token("界", "界") == ("", True, [])  # none of the stop's tokens has an entry
    checker = StopChecker(["世界"])
    assert checker.feed_token("", "E4 B8") == ("", False, [])
    assert checker.feed_token("世", "96") == ("", False, [])
    assert checker.feed_token("x", "x") == ("世x", False, ["E4 B8", "96", "x"])


def test_a_prompt_with_max_tokens_over_the_context_is_refused_not_cut_short() -> None:
    """4 prompt tokens and 5 to generate do not fit 8: refused (it generated 4 and said "length"),
    as OpenAI and vLLM refuse it; 4 fit. A continuation was judged at its start."""
    engine = SimEngine(SimOptions(context_length=8))
    with pytest.raises(EngineRequestError) as info:
        engine.add(GenerationRequest("a", prompt="one two three four", seed=1, max_tokens=5))
    assert info.value.code == "context_length_exceeded" and "9 in all" in str(info.value)
    engine.add(GenerationRequest("b", prompt="one two three four", seed=1, max_tokens=4))
    engine.add(GenerationRequest("c", prompt="one two three four", seed=1, max_tokens=5, emitted_tokens=2))
