"""``/v1/embeddings`` in-process with the sim engine and the official ``openai`` client: shapes,
order, base64, ``dimensions``, refusals; the job goes through the same queue and is metered."""

from __future__ import annotations

import base64
import math
from array import array
from collections.abc import AsyncIterator

import httpx2
import openai
import pytest

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import EMBEDDING_DIM, SimEngine
from breakwater.redis_server import RedisServer
from tests.inproc import InProc, inproc_gateway


@pytest.fixture
async def client(gw: InProc) -> AsyncIterator[openai.AsyncOpenAI]:
    # The openai SDK brings its own httpx (httpx2): its ASGI transport drives the app in-process.
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw.app), base_url="http://gw")
    async with openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0) as c:
        yield c


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_one_input_and_a_list_keep_their_order(client: openai.AsyncOpenAI, gw: InProc) -> None:
    one = await client.embeddings.create(model="sim", input="the quick brown fox")
    assert one.object == "list" and one.model == "sim" and len(one.data) == 1
    vector = one.data[0].embedding
    assert len(vector) == EMBEDDING_DIM and math.isclose(_dot(vector, vector), 1.0, rel_tol=1e-5)
    assert one.usage.prompt_tokens == one.usage.total_tokens == 4
    texts = ["the quick brown fox", "a quick brown fox jumps", "quarterly revenue grew eight percent"]
    many = await client.embeddings.create(model="sim", input=texts)
    assert [d.index for d in many.data] == [0, 1, 2]
    assert many.data[0].embedding == pytest.approx(vector)  # the same text, the same vector
    fox, jumps, revenue = (d.embedding for d in many.data)
    assert _dot(fox, jumps) > _dot(fox, revenue)  # similar texts are closer
    assert many.usage.prompt_tokens == 4 + 5 + 5
    models = (await gw.http.get("/v1/models")).json()["data"]
    assert "embeddings" in models[0]["features"]


async def test_base64_and_dimensions(client: openai.AsyncOpenAI, gw: InProc) -> None:
    text = "the quick brown fox"
    floats = (await client.embeddings.create(model="sim", input=text)).data[0].embedding
    raw = (
        await gw.http.post(
            "/v1/embeddings", json={"model": "sim", "input": text, "encoding_format": "base64"}
        )
    ).json()
    decoded = array("f", base64.b64decode(raw["data"][0]["embedding"])).tolist()
    assert decoded == pytest.approx(floats)
    short = (await client.embeddings.create(model="sim", input=text, dimensions=16)).data[0].embedding
    assert len(short) == 16 and math.isclose(_dot(short, short), 1.0, rel_tol=1e-5)
    norm = math.sqrt(_dot(floats[:16], floats[:16]))
    assert short == pytest.approx([x / norm for x in floats[:16]])  # the first 16, renormalised


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [1, 2, 3]}, "input"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": EMBEDDING_DIM + 1}, "dimensions"),
        ({"input": "x", "truncate": True}, "truncate"),
        ({"input": "x", "store": True}, "store"),  # nothing stored to retrieve later: refused
        ({"input": "x", "service_tier": "flex"}, "service_tier"),
    ],
)
async def test_bad_requests_are_named(gw: InProc, body: dict[str, object], param: str) -> None:
    resp = await gw.http.post("/v1/embeddings", json={"model": "sim", **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


class _TextOnly(SimEngine):
    features = frozenset()


async def test_a_model_whose_engine_cannot_embed_is_refused(redis_server: RedisServer, prefix: str) -> None:
    async with inproc_gateway(redis_server.url, prefix) as gw:
        await gw.add_worker(_TextOnly(SimOptions(decode_base_ms=1, decode_per_seq_ms=0)))
        resp = await gw.http.post("/v1/embeddings", json={"model": "sim", "input": "x"})
        assert resp.status_code == 400
        assert (resp.json()["error"]["code"], resp.json()["error"]["param"]) == ("unsupported_model", "model")
        broker = gw.broker()
        try:
            keys = [k async for k in broker.redis.scan_iter(match=f"{prefix}:req:*")]
        finally:
            await broker.aclose()
        assert keys == []  # refused before queueing


async def test_more_dimensions_than_the_model_has_are_refused_before_anything_runs(
    client: openai.AsyncOpenAI, gw: InProc
) -> None:
    """The live workers say their embeddings' width (`embedding_dim`): a request for more is refused
    at admission, so nothing is queued, computed or metered for it."""
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="sim", input="x", dimensions=EMBEDDING_DIM + 1)
    assert isinstance(info.value.body, dict)
    assert (info.value.body["param"], info.value.body["code"]) == ("dimensions", "invalid_value")
    assert str(EMBEDDING_DIM) in info.value.body["message"]
    broker = gw.broker()
    try:
        assert [k async for k in broker.redis.scan_iter(match=f"{gw.prefix}:req:*")] == []
    finally:
        await broker.aclose()
    # The width itself is served.
    whole = await client.embeddings.create(model="sim", input="x", dimensions=EMBEDDING_DIM)
    assert len(whole.data[0].embedding) == EMBEDDING_DIM
