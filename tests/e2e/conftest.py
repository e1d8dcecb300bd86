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


@pytest.fixture(scope="module")
def llama_stack(redis_server: RedisServer, log_dir: Path) -> Iterator[StackProcs]:
    """Gateway + two llamacpp workers with the bundled SmolLM2 (one module's own stack)."""
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
def client(llama_stack: StackProcs) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{llama_stack.gateways[0][1]}/v1", api_key="unused", max_retries=0) as c:
        yield c  # closed: an unclosed client's sockets warn when collected, failing a later test
