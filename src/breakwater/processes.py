"""``breakwater gateway --workers N``: N gateway processes on one port, one per core.

Each process binds its own listening socket with ``SO_REUSEPORT`` and the kernel spreads new
connections across them, so no process sits in front of the others. The gateway is stateless (every
request's state is in Redis), so any process can serve any request, stream or resume. The first
process starts the others and stops them when it stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys

SIBLING_ENV = "BREAKWATER_GATEWAY_SIBLING"
PR_SET_PDEATHSIG = 1


class Stopped(Exception):
    """SIGTERM/SIGINT, raised once uvicorn has drained and hands the signal back."""


def raise_stopped(_sig: int, _frame: object) -> None:
    raise Stopped


def catch_stop_signals() -> None:
    """uvicorn re-raises the stop signal after its own graceful shutdown; with the default handler
    that would kill this process before it stops its siblings."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, raise_stopped)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket other processes may bind to the same address too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


def is_sibling() -> bool:
    return os.environ.get(SIBLING_ENV) == "1"


_siblings: list[subprocess.Popen[bytes]] = []


def start_siblings(count: int, host: str, port: int, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """``count`` more gateway processes on ``host:port``; ``env``: the settings given as flags, so
    every process runs with the same ones."""
    argv = [sys.executable, "-m", "breakwater", "gateway", "--host", host, "--port", str(port)]
    child_env = {**os.environ, **env, SIBLING_ENV: "1"}
    parent = os.getpid()
    metrics_port = int(child_env.get("BREAKWATER_METRICS_PORT") or 0)
    procs = [
        subprocess.Popen(
            [*argv, "--workers", "1"],
            env={**child_env, **({"BREAKWATER_METRICS_PORT": str(metrics_port + i)} if metrics_port else {})},
            preexec_fn=lambda: _die_with(parent),
        )
        for i in range(1, count + 1)
    ]
    _siblings.extend(procs)
    return procs


def forward_stop() -> None:
    """The first process begins to drain: so do the others, at the same time (one drain, not two in
    a row, fits the pod's termination grace period)."""
    for proc in _siblings:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)


def stop_siblings(procs: list[subprocess.Popen[bytes]], grace_s: float = 30.0) -> None:
    """SIGTERM (each drains as it would alone), then wait; SIGKILL what outlives ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the wait short
        signal.signal(sig, signal.SIG_IGN)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with(parent: int) -> None:
    """Linux: the kernel sends SIGTERM to a sibling when the first process dies, even by SIGKILL
    (and if it died before this ran, the sibling exits at once)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(0)
