"""What the gateway answers, as strict OpenAI clients read it (in-process, the sim engine, the
official ``openai`` client): finish reasons OpenAI knows, logprobs lists where they were asked for,
``refusal`` on every message, ``models.retrieve``, and OpenAI's error shape for a bug. Also the
gateway's own surfaces: no schema pages with API keys, and a key cache that made-up keys cannot
empty."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from breakwater.config import GatewaySettings
from breakwater.engines.base import LOGPROBS, SequenceDelta
from breakwater.engines.sim import SimEngine
from breakwater.gateway import auth
from breakwater.gateway.app import build_app
from tests.helpers import expected_sim
from tests.inproc import InProc

HI: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client(gw: InProc) -> AsyncIterator[openai.AsyncOpenAI]:
    async with gw.sdk() as c:
        yield c


class FinishingSim(SimEngine):
    """Ends every answer with the finish reason ``reason``, as an engine of its own words would."""

    features = SimEngine.features | {LOGPROBS}  # (it reports none: an answer without entries)

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def _finish(self, seq: Any, text: str, tokens: int, reason: str) -> SequenceDelta:
        delta = super()._finish(seq, text, tokens, reason)
        delta.finish_reason = self.reason
        return delta


@pytest.mark.parametrize(("engine_says", "client_gets"), [("repetition", "stop"), ("length", "length")])
async def test_an_engines_own_finish_reason_reaches_clients_as_openais(
    gw_empty: InProc, engine_says: str, client_gets: str
) -> None:
    await gw_empty.add_worker(FinishingSim(engine_says))
    async with gw_empty.sdk() as c:
        whole = await c.chat.completions.create(model="sim", messages=HI, max_tokens=4, seed=1)
        stream = await c.chat.completions.create(model="sim", messages=HI, max_tokens=4, seed=1, stream=True)
        reasons = [chunk.choices[0].finish_reason async for chunk in stream if chunk.choices]
    assert whole.choices[0].finish_reason == client_gets
    assert [r for r in reasons if r] == [client_gets]


async def test_an_engine_that_ends_with_an_error_fails_the_answer(gw_empty: InProc) -> None:
    """vLLM's ``error`` finish is a failed generation, not a 200 with a normal end."""
    await gw_empty.add_worker(FinishingSim("error"))
    async with gw_empty.sdk() as c:
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model="sim", messages=HI, max_tokens=4, seed=1)
        assert "finish reason `error`" in str(info.value)
        stream = await c.chat.completions.create(model="sim", messages=HI, max_tokens=4, seed=1, stream=True)
        with pytest.raises(openai.APIError) as streamed:
            async for _ in stream:
                pass
        assert "finish reason `error`" in str(streamed.value)


async def test_logprobs_asked_for_are_a_list_even_without_entries(gw_empty: InProc) -> None:
    """An answer that writes no text (its first token began the stop string) has no entries:
    ``logprobs.content`` is ``[]``, as vLLM answers, not ``null``."""
    await gw_empty.add_worker(FinishingSim("stop"))
    first_word = expected_sim(messages=HI, seed=2, max_tokens=4)[0].split()[0]
    async with gw_empty.sdk() as c:
        resp = await c.chat.completions.create(
            model="sim", messages=HI, max_tokens=4, seed=2, logprobs=True, stop=[first_word]
        )
        text = await c.completions.create(
            model="sim", prompt="hi", max_tokens=4, seed=2, logprobs=1, stop=["a"]
        )
    assert resp.choices[0].message.content == ""
    assert resp.choices[0].logprobs is not None and resp.choices[0].logprobs.content == []
    assert text.choices[0].logprobs is not None and text.choices[0].logprobs.tokens is not None


async def test_every_message_says_it_refused_nothing(gw: InProc) -> None:
    resp = await gw.http.post("/v1/chat/completions", json={"model": "sim", "messages": HI, "max_tokens": 3})
    message = resp.json()["choices"][0]["message"]
    assert message["refusal"] is None and message["role"] == "assistant" and message["content"]


async def test_a_model_is_retrieved_by_its_id(client: openai.AsyncOpenAI) -> None:
    model = await client.models.retrieve("sim")
    assert (model.id, model.object) == ("sim", "model")
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("no-such-model")
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


async def test_a_route_that_does_not_exist_is_a_404_naming_it(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.get("/nothing/here", cast_to=httpx.Response)
    error = caught.value.body
    assert isinstance(error, dict) and error["message"] == "Invalid URL (GET /v1/nothing/here)"
    assert error["type"] == "invalid_request_error"


async def test_a_method_a_route_does_not_take_is_a_405_with_its_code(gw: InProc) -> None:
    resp = await gw.http.put("/v1/models", json={})
    assert resp.status_code == 405
    assert (resp.json()["error"]["code"], resp.json()["error"]["type"]) == (
        "method_not_allowed",
        "invalid_request_error",
    )


async def test_an_unexpected_error_is_a_500_in_openais_shape(
    gw: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gw.app.state.service, "submit", broken)
    transport = httpx.ASGITransport(app=gw.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        resp = await http.post(
            "/v1/chat/completions",
            json={"model": "sim", "messages": HI, "max_tokens": 3},
            headers={"X-Request-ID": "trace-me-500"},
        )
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "server_error" and "a bug" not in resp.text
    assert resp.headers["x-request-id"] == "trace-me-500"  # to find its traceback in the log


def test_no_schema_pages_on_a_listener_with_api_keys() -> None:
    paths = {getattr(r, "path", "") for r in build_app(GatewaySettings(auth="keys")).routes}
    assert not {"/docs", "/redoc", "/openapi.json"} & paths
    assert {"/docs", "/openapi.json"} <= {getattr(r, "path", "") for r in build_app(GatewaySettings()).routes}


async def test_made_up_keys_do_not_push_real_ones_out_of_the_key_cache() -> None:
    recent: auth._Recent[str, str | None] = auth._Recent(ttl_s=60)
    loads: list[str] = []

    async def load(key: str) -> str | None:
        loads.append(key)
        return "record" if key == "real" else None

    assert await recent.get("real", load) == "record"
    for i in range(auth.CACHE_MAX):  # a flood of keys that do not exist
        assert await recent.get(f"bogus-{i}", load) is None
    loads.clear()
    assert await recent.get("real", load) == "record" and loads == []  # still cached
    assert await recent.get(f"bogus-{auth.CACHE_MAX - 1}", load) is None and loads == []  # the newest too
    assert await recent.get("bogus-0", load) is None and loads == ["bogus-0"]  # the oldest went
