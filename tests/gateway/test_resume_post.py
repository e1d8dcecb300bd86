"""A streamed request sent again with its ``Idempotency-Key`` and the ``Last-Event-ID`` it got to
(how SSE clients of a POST, such as fetch-event-source, reconnect): its stream goes on after that
event, for one choice and for ``n > 1``; it replayed the whole stream, so the client showed the text
twice. Without the key there is nothing to resume: a 400, with nothing queued."""

from __future__ import annotations

from typing import Any

import orjson

from tests.gateway.test_resume_end import _events
from tests.inproc import InProc

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "tell me more"}], "max_tokens": 8}


async def _post(gw: InProc, body: dict[str, Any], headers: dict[str, str]) -> Any:
    return await gw.http.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)


async def test_a_stream_sent_again_with_its_key_and_last_event_id_goes_on_after_it(gw: InProc) -> None:
    first = await _post(gw, CHAT, {"Idempotency-Key": "k1"})
    assert first.status_code == 200
    events = _events(first.text)
    ids = [i for i, _ in events if i]
    assert len(ids) >= 4 and events[-1] == ("", "[DONE]")
    cut = ids[2]
    again = await _post(gw, CHAT, {"Idempotency-Key": "k1", "Last-Event-ID": cut})
    assert again.status_code == 200, again.text
    assert again.headers["x-breakwater-request-id"] == first.headers["x-breakwater-request-id"]
    assert _events(again.text) == events[events.index((cut, dict(events)[cut])) + 1 :]


async def test_n_choices_sent_again_with_their_key_and_last_event_id_go_on_after_it(gw: InProc) -> None:
    body = {**CHAT, "n": 2}
    first = await _post(gw, body, {"Idempotency-Key": "k2"})
    assert first.status_code == 200
    events = _events(first.text)
    at = 4  # past both opening chunks and some text
    cut = events[at - 1][0]
    assert "." in cut
    again = await _post(gw, body, {"Idempotency-Key": "k2", "Last-Event-ID": cut})
    assert again.status_code == 200, again.text
    assert again.headers["x-breakwater-request-id"] == first.headers["x-breakwater-request-id"]

    def text(stream: list[tuple[str, str]]) -> dict[int, str]:
        out: dict[int, str] = {}
        for _, data in stream:
            if data != "[DONE]":
                for choice in orjson.loads(data)["choices"]:
                    out[choice["index"]] = out.get(choice["index"], "") + (
                        choice["delta"].get("content") or ""
                    )
        return out

    whole, before, after = text(events), text(events[:at]), text(_events(again.text))
    assert set(whole) == {0, 1}
    assert {i: before.get(i, "") + after.get(i, "") for i in whole} == whole  # each token once


async def test_last_event_id_without_an_idempotency_key_is_400_and_queues_nothing(gw: InProc) -> None:
    broker = gw.app.state.service.broker
    before = await broker.jobs_counts("sim", "interactive")
    got = await _post(gw, CHAT, {"Last-Event-ID": "3"})
    assert got.status_code == 400
    error = got.json()["error"]
    assert (error["param"], error["type"]) == ("Last-Event-ID", "invalid_request_error")
    assert "Idempotency-Key" in error["message"]
    assert "x-breakwater-request-id" not in got.headers
    assert await broker.jobs_counts("sim", "interactive") == before  # (admitted, finished) ever


async def test_a_malformed_last_event_id_is_400_before_anything_is_queued(gw: InProc) -> None:
    for value, body in (("abc", CHAT), ("3", {**CHAT, "n": 2}), ("1.x", {**CHAT, "n": 2})):
        got = await _post(gw, body, {"Idempotency-Key": f"bad-{value}", "Last-Event-ID": value})
        assert got.status_code == 400, (value, got.text)
        assert got.json()["error"]["param"] == "Last-Event-ID"
        fresh = await _post(gw, body, {"Idempotency-Key": f"bad-{value}"})  # the key was not used
        assert fresh.status_code == 200 and _events(fresh.text)[0][0] in ("1", "0.0")


async def test_a_new_request_with_a_last_event_id_streams_from_its_start(gw: InProc) -> None:
    """The key was never used (or its request expired): a new request, whose events all are new."""
    got = await _post(gw, CHAT, {"Idempotency-Key": "k-new", "Last-Event-ID": "3"})
    assert got.status_code == 200
    assert next(i for i, _ in _events(got.text) if i) == "1"
