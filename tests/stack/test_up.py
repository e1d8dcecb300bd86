"""``breakwater up``: embedded Redis + gateway + worker, a working URL, clean stop, clear errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import orjson
import redis

from breakwater.redis_server import free_port
from tests.helpers import wait_for


def _up(port: int, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "breakwater", "up", "--port", str(port), "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "400", **(env or {})},
    )


def _read_lines(proc: subprocess.Popen[str]) -> tuple[list[str], threading.Thread]:
    """``up``'s output, as it comes, in a list a thread fills."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def _interrupt(proc: subprocess.Popen[str], reader: threading.Thread) -> None:
    """Ctrl-C, as a user stops it, and wait for it and its output."""
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_the_readme_example_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = _up(port, tmp_path)
    lines, reader = _read_lines(proc)
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
        # The banner's last line: a Ctrl-C sent after its first would be checked against half of it.
        wait_for(lambda: any("processes:" in line for line in lines), 30, 0.05, "up's banner")
    finally:
        _interrupt(proc, reader)
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


def test_up_with_keys_comes_up_and_serves_a_key_made_as_its_banner_says(tmp_path: Path) -> None:
    """With BREAKWATER_AUTH=keys the gateway answers /v1/models only with a key and has no public
    /metrics: up's own readiness check and autoscaling read the gateway's metrics listener, which
    up gives it (before, up waited for /v1/models until its timeout and gave up). Its banner says
    auth is on, where /metrics is, and how to make a key, which then works with the openai client."""
    port = free_port()
    pepper = tmp_path / "pepper"
    pepper.write_text("up-with-keys-pepper-0123456789abcdef")
    keyed = {"BREAKWATER_AUTH": "keys", "BREAKWATER_AUTH_PEPPER_FILE": str(pepper)}
    # The gateway's metrics port, set: the worker took it too (it read the same environment) and the
    # gateway failed to start.
    metrics_port = free_port()
    proc = _up(
        port,
        tmp_path / "data",
        "--engine",
        "sim",
        env={**keyed, "BREAKWATER_METRICS_PORT": str(metrics_port)},
    )
    lines, reader = _read_lines(proc)
    try:
        wait_for(lambda: any("processes:" in line for line in lines), 60, 0.1, "up's banner")
        out = "".join(lines)
        assert "auth: keys" in out and "Authorization: Bearer $KEY" in out, out
        metrics = re.search(r"metrics: (http://127\.0\.0\.1:(\d+)/metrics)", out)
        assert metrics is not None and int(metrics.group(2)) == metrics_port, out
        assert 'breakwater_workers{model="sim"} 1.0' in httpx.get(metrics.group(1)).text
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/metrics").status_code == 404
        assert httpx.get(f"{url}/v1/models").status_code == 401
        redis_url = re.search(r"BREAKWATER_REDIS_URL=(\S+) breakwater keys create", out)
        assert redis_url is not None, out
        # Its Redis has no password: it listens on its owner-only socket alone, in its owner's dir.
        with redis.Redis.from_url(redis_url.group(1)) as own:
            assert redis_url.group(1).startswith("unix://") and own.config_get("port") == {"port": "0"}
        assert (tmp_path / "data" / "redis").stat().st_mode & 0o077 == 0
        made = subprocess.run(
            [sys.executable, "-m", "breakwater", "keys", "create", "--tenant", "acme"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **keyed, "BREAKWATER_REDIS_URL": redis_url.group(1)},
            check=True,
        )
        key = orjson.loads(made.stdout)["key"]
        with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
            resp = client.completions.create(model="sim", prompt="hello", max_tokens=4)
        assert resp.choices[0].text and resp.usage is not None and resp.usage.completion_tokens == 4
    finally:
        _interrupt(proc, reader)
    assert proc.returncode == 0, "".join(lines)
