"""``breakwater up``: embedded Redis + gateway + worker, a working URL, clean stop, clear errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai

from breakwater.redis_server import free_port
from tests.helpers import wait_for


def _up(port: int, data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "breakwater", "up", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_the_readme_example_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = _up(port, tmp_path)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return bool(httpx.get(f"{url}/v1/models", timeout=1).json()["data"])
            except (httpx.HTTPError, KeyError, ValueError):
                return False

        wait_for(ready, 60, 0.2, "stack up")
        # The README's example, against the default engine (llamacpp) and bundled model.
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused") as client:
            resp = client.chat.completions.create(
                model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hello!"}]
            )
        assert resp.choices[0].message.content
        assert resp.usage is not None and resp.usage.completion_tokens > 0
        assert (tmp_path / "redis" / "appendonlydir").is_dir() or (
            tmp_path / "redis" / "appendonly.aof"
        ).exists()
        children = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        assert len(children) >= 3  # redis, gateway, worker
        # Its own readiness check may see the model a moment after this test did: Ctrl-C before
        # its banner stops a stack still starting (exit 130), which is not what this test stops.
        wait_for(lambda: any("Breakwater is up" in line for line in lines), 30, 0.05, "up's banner")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/v1" in out
    assert "curl" in out
    assert not [pid for pid in children if _pid_alive(pid)], "children left running"


def test_up_reports_a_taken_port_clearly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _up(port, tmp_path)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"port {port}" in out and "already in use" in out
    assert "Traceback" not in out
