"""Fixtures shared by the end-to-end modules that run the bundled model."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs

LLAMA_MODEL = "smollm2-135m-instruct"


def _llama_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """Gateway + two llamacpp workers with the bundled SmolLM2."""
    procs = StackProcs(redis_server.url, f"l{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway()
        for _ in range(2):
            procs.add_worker(
                model=LLAMA_MODEL,
                engine="llamacpp",
                n_threads=1,
                capacity=4,
                context_length=1024,
                heartbeat_s=0.3,
            )
        procs.wait_workers(url, LLAMA_MODEL, count=2)
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def llama_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """One module's own llamacpp stack."""
    yield from _llama_stack(redis_server, log_dir)


@pytest.fixture(scope="session")
def shared_llama_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackProcs]:
    """One llamacpp stack for the modules that override ``llama_stack`` with it (structured outputs,
    the Responses API's tools): started once per session (~20 s each on a 2-core machine). Its users
    may SIGKILL one worker (a continuation test), never both: one is always left."""
    yield from _llama_stack(redis_server, tmp_path_factory.mktemp("llama-shared"))


@pytest.fixture(scope="module")
def client(llama_stack: StackProcs) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{llama_stack.gateways[0][1]}/v1", api_key="unused", max_retries=0) as c:
        yield c  # closed: an unclosed client's sockets warn when collected, failing a later test
