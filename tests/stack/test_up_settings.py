"""What ``breakwater up`` and the other commands are given from the environment, checked before
anything starts and said in a line: a bad value names its variable, keys need a pepper, a listener
others can reach needs keys; an unknown ``BREAKWATER_*`` variable is named in the log."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

from breakwater.config import GatewaySettings, WorkerSettings
from breakwater.redis_server import free_port
from breakwater.settings_check import gateway_problem, settings_error, unknown_variables
from breakwater.stack import Stack
from breakwater.stack_config import StackConfig

CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("BREAKWATER_")}


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "breakwater", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**CLEAN, "COLUMNS": "400", **env},
    )


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (("--host", "0.0.0.0"), {}, "BREAKWATER_AUTH=keys"),  # auth off, for anyone who can reach it
        ((), {"BREAKWATER_AUTH": "keys"}, "pepper"),
        ((), {"BREAKWATER_AUTH": "Keys"}, "BREAKWATER_AUTH: Input should be 'off' or 'keys' (got 'Keys')"),
        ((), {"BREAKWATER_METRICS_PORT": "99999"}, "BREAKWATER_METRICS_PORT"),
        (("--workers", "0"), {}, "--workers must be at least 1"),
        (("--redis-url", "redis://127.0.0.1:notaport/0"), {}, "--redis-url: not a Redis URL"),
        (
            (),
            {"BREAKWATER_AUTH": "keys", "BREAKWATER_AUTH_PEPPER_FILE": "/nonexistent/pepper"},
            "BREAKWATER_AUTH_PEPPER_FILE /nonexistent/pepper: No such file or directory",
        ),
    ],
)
def test_up_refuses_what_cannot_be_served_safely_before_starting_anything(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], said: str
) -> None:
    data = tmp_path / "data"
    done = _run("up", "--engine", "sim", "--port", str(free_port()), "--data-dir", str(data), *args, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert said in out and "Traceback" not in out, out
    assert not data.exists()  # no Redis, no logs: nothing was started


def test_a_bad_setting_of_any_command_is_one_line_naming_it() -> None:
    done = _run("gateway", "--port", str(free_port()), env={"BREAKWATER_LOG_JSON": "maybe"})
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "BREAKWATER_LOG_JSON:" in out and "Traceback" not in out and len(out.splitlines()) == 1, out


@pytest.mark.parametrize(
    "command", [("gateway", "--port", str(free_port())), ("worker", "--model", "sim"), ("keys", "list")]
)
@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("127.0.0.1:6379", "a Redis URL begins with one of redis://, rediss://, unix://"),
        ("redis://:hunter2@127.0.0.1:99999/0", "not a Redis URL"),
        (
            "redis://u:hunter2/x@127.0.0.1:6379/0",
            "not a Redis URL",
        ),  # a '/' in the password: quoted as a port
        ("redis+cluster://:hunter2@127.0.0.1:7000,127.0.0.1", "not a Redis URL"),
        ("redis+cluster://:hunter2/x@127.0.0.1:7000", "not a Redis URL"),
        # `keys` printed the settings' own error through rich: a MarkupError's traceback.
        ("redis://u:hunter2@127.0.0.1:6379/0?socket_timeout=abc", "not a Redis URL"),
    ],
)
def test_a_redis_url_that_cannot_be_used_is_one_line(command: tuple[str, ...], url: str, said: str) -> None:
    """It was the client's traceback from the gateway's startup (exit 3) or the worker's."""
    done = _run(*command, env={"BREAKWATER_REDIS_URL": url})
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert out.startswith("error: BREAKWATER_REDIS_URL: ") and said in out and len(out.splitlines()) == 1, out
    assert "hunter2" not in out and "Traceback" not in out, out


def test_a_valid_url_of_any_case_or_form_is_taken() -> None:
    for url in (
        "REDIS://127.0.0.1:6379/0",
        "Rediss://u:p%2Fq@example.com:6380/1",
        "unix:///tmp/redis.sock?db=2",
        "redis://[::1]:6379",
        "redis+cluster://a:7000,[::1]:7001",
    ):
        assert GatewaySettings(redis_url=url).redis_url == url


def test_up_takes_no_notice_of_an_environments_redis_url_it_overrides(tmp_path: Path) -> None:
    """``up`` runs its own Redis (or --redis-url): a malformed BREAKWATER_REDIS_URL left in the
    environment stopped it, or was named instead of --redis-url."""
    env = {"BREAKWATER_REDIS_URL": "not a url"}
    args = ("up", "--engine", "sim", "--data-dir", str(tmp_path / "d"))
    done = _run(*args, "--port", str(free_port()), "--redis-url", "redis://x:notaport", env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "--redis-url: not a Redis URL" in out and "BREAKWATER_" not in out, out
    with socket.socket() as taken:  # refused by the check after the settings': they passed
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = _run(*args, "--port", str(taken.getsockname()[1]), env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "already in use" in out, out


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        # up polled port 0 for 120 s and said "not ready" (its gateway listened on a random port)
        (("--port", "0"), "Invalid value for '--port': Input should be greater than or equal to 1"),
        (
            ("--port", "99999"),
            "'--port': Input should be less than or equal to 65535",
        ),  # an OverflowError's traceback
        (("--supervisor-metrics-port", "70000"), "Invalid value for '--supervisor-metrics-port'"),
        (("--appendfsync", "never"), "'never' is not one of 'everysec', 'always', 'no'"),  # a ValueError's
    ],
)
def test_up_refuses_a_flag_it_cannot_use_before_starting_anything(
    tmp_path: Path, flags: tuple[str, ...], said: str
) -> None:
    data = tmp_path / "data"
    done = _run("up", "--engine", "sim", "--data-dir", str(data), *flags, env={})
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert said in " ".join(out.replace("│", " ").split()) and "Traceback" not in out, out
    assert not data.exists()


class _NotRedis(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # (the test's output stays clean)
        pass


@pytest.mark.parametrize("command", [("dlq", "list", "--model", "sim"), ("cache", "stats")])
def test_a_redis_url_of_a_server_that_is_not_redis_is_one_line(command: tuple[str, ...]) -> None:
    """An HTTP server at the Redis URL: redis-py's InvalidResponse was a traceback."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotRedis)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        done = _run(*command, env={"BREAKWATER_REDIS_URL": f"redis://127.0.0.1:{server.server_port}/0"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert out.startswith("error: the server at the Redis URL does not answer as Redis does"), out
    assert len(out.splitlines()) == 1 and "Traceback" not in out, out


@pytest.mark.parametrize(
    ("command", "env", "said"),
    [
        (("gateway",), {"BREAKWATER_AUTH": "keys"}, "pepper of at least 16 characters"),
        (("gateway",), {"BREAKWATER_AUTH": "keys", "BREAKWATER_AUTH_PEPPER": "SHORTpep"}, "at least 16"),
        (
            ("gateway",),
            {"BREAKWATER_AUTH": "keys", "BREAKWATER_AUTH_PEPPER_FILE": "/nonexistent/pepper"},
            "BREAKWATER_AUTH_PEPPER_FILE /nonexistent/pepper: No such file or directory",
        ),
        (
            ("keys", "list"),
            {"BREAKWATER_AUTH_PEPPER_FILE": "/nonexistent/pepper"},
            "BREAKWATER_AUTH_PEPPER_FILE /nonexistent/pepper: No such file or directory",
        ),
    ],
)
def test_a_pepper_that_cannot_be_used_is_one_line(
    command: tuple[str, ...], env: dict[str, str], said: str
) -> None:
    """A gateway printed its startup's traceback (exit 3); ``keys`` named no variable."""
    args = (*command, "--port", str(free_port())) if command == ("gateway",) else command
    done = _run(*args, env={"BREAKWATER_REDIS_URL": "redis://127.0.0.1:1/0", **env})
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert said in out and "Traceback" not in out and "SHORTpep" not in out, out


def test_a_gateway_others_can_reach_with_auth_off_by_default_is_refused() -> None:
    """``breakwater gateway --host 0.0.0.0`` (the image's command) served anyone, keys off, as ``up``
    refuses to; off on purpose (``BREAKWATER_AUTH=off``, behind one's own authentication) it serves."""
    done = _run("gateway", "--host", "0.0.0.0", "--port", str(free_port()), env={})
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, out
    assert "with auth off would serve anyone" in out and "BREAKWATER_AUTH=off" in out, out
    assert "Traceback" not in out
    assert gateway_problem(GatewaySettings(host="0.0.0.0")) is not None
    assert gateway_problem(GatewaySettings(host="0.0.0.0", auth="off")) is None  # said on purpose
    assert gateway_problem(GatewaySettings(host="127.0.0.1")) is None
    assert gateway_problem(GatewaySettings(host="::1")) is None


def test_a_secrets_value_is_never_shown_in_its_error() -> None:
    with pytest.raises(ValidationError) as info:
        GatewaySettings.model_validate({"auth_pepper_file": ["not", "a", "path"]})
    said = settings_error(info.value)
    assert said is not None and said.startswith("BREAKWATER_AUTH_PEPPER_FILE:") and "not" not in said
    with pytest.raises(ValidationError) as info:  # a URL may carry a password
        GatewaySettings.model_validate({"cache_redis_url": ["redis://:hunter2@cache:6379/0"]})
    said = settings_error(info.value)
    assert said is not None and said.startswith("BREAKWATER_CACHE_REDIS_URL:") and "hunter2" not in said


def test_unknown_variables_are_named_and_known_ones_are_not() -> None:
    environ = {
        "BREAKWATER_AUTHH": "keys",  # a typo
        "BREAKWATER_AUTH": "keys",
        "BREAKWATER_STREAM_WINDOW_SHARE": "0.5",  # a worker's
        "BREAKWATER_MODEL_CACHE": "/tmp/m",  # read straight from the environment
        "BREAKWATER_TEST_REDIS": "cluster",  # the test suite's
        "OTHER": "x",
    }
    assert unknown_variables(environ) == ["BREAKWATER_AUTHH"]


def test_the_stacks_key_prefix_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stacks sharing one Redis (``--redis-url``) keep apart by their prefix; ``up`` used ``bw``
    whatever BREAKWATER_KEY_PREFIX said, so the keys CLI (which reads it) wrote where no gateway read."""
    monkeypatch.setenv("BREAKWATER_KEY_PREFIX", "team1")
    assert StackConfig().key_prefix == "team1"
    monkeypatch.delenv("BREAKWATER_KEY_PREFIX")
    assert StackConfig().key_prefix == "bw"


def test_ups_gateway_has_a_stream_grace_unless_the_operator_chose_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping ``up`` cut every open stream (the gateway's grace was 0): 15 s now, as the Kubernetes
    manifests' gateways have, or what BREAKWATER_STREAM_GRACE_S says (0 included)."""
    for name in [k for k in os.environ if k.upper() == "BREAKWATER_STREAM_GRACE_S"]:
        monkeypatch.delenv(name)
    stack = Stack(StackConfig(port=free_port(), data_dir=tmp_path / "d"))
    stack.check()  # reads the settings; starts nothing
    assert stack.stream_grace_s == 15.0
    for given, grace in (("0", 0.0), ("3.5", 3.5)):
        monkeypatch.setenv("breakwater_stream_grace_s", given)  # any case, as the gateway reads it
        stack.check()
        assert stack.stream_grace_s == grace


def test_a_process_names_an_unknown_variable_in_its_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from breakwater.logs import setup_logging

    monkeypatch.setenv("BREAKWATER_AUTHH", "keys")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("gateway")
    finally:
        root.handlers[:], root.level = handlers, level
    said = capsys.readouterr().err
    assert "unknown setting ignored" in said and "BREAKWATER_AUTHH" in said, said


def test_a_check_of_several_settings_never_shows_their_values() -> None:
    """A whole-model check's input is every setting as given: its error says only its message."""
    with pytest.raises(ValidationError) as info:
        WorkerSettings.model_validate({"result_ttl_s": 5, "upstream_api_key": "sk-very-secret-value"})
    said = settings_error(info.value)
    assert said is not None and "result_ttl_s (5" in said and "sk-very" not in said, said


def test_a_variable_is_known_whatever_the_case_of_its_name() -> None:
    assert unknown_variables({"BREAKWATER_auth": "keys", "BREAKWATER_Authh": "x"}) == ["BREAKWATER_Authh"]
