"""The supervisor's children (``breakwater up``): a process it starts, the backoff before it
starts one again that exited, how an exit is told, and the embedded Redis watched the same way."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from breakwater.redis_server import RedisServer

READY_TIMEOUT_S = 120.0  # a restarted Redis answers PING once its AOF is read back


@dataclass
class Backoff:
    """Restart delays: ``initial_s`` doubling up to ``max_s``, starting over after a stable run."""

    initial_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.initial_s

    def delay(self, uptime_s: float) -> float:
        """The wait before restarting a process that ran ``uptime_s`` seconds before it exited."""
        if uptime_s >= self.stable_s:
            self.next_s = self.initial_s
        delay = self.next_s
        self.next_s = min(self.max_s, delay * 2)
        return delay


@dataclass
class Child:
    """A supervised process and what it takes to start it again."""

    name: str  # gateway | worker-N: the log file's name and the restart counter's label
    args: list[str]
    env: dict[str, str]
    log_path: Path
    backoff: Backoff
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while it waits out its backoff after exiting
    restarts: int = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "breakwater", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        self.restart_at = None
        return self.proc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def describe_exit(code: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL (exit code -9)``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
    return f"exit code {code}"


@dataclass
class RedisWatch:
    """The embedded Redis, started again from its AOF (the same data dir and socket) when it exits:
    meanwhile every request is a 503 ``redis_unavailable`` and the workers retry, so nothing that
    was admitted is lost."""

    server: RedisServer
    backoff: Backoff
    log: Callable[[str], None]
    started_at: float = field(default_factory=time.monotonic)
    restart_at: float | None = None
    restarts: int = 0

    def tick(self, now: float) -> bool:
        """Restarts it when its backoff is over; True when it was started again now."""
        proc = self.server.proc
        if proc is None:
            return False
        if self.restart_at is None:
            code = proc.poll()
            if code is None:
                return False
            delay = self.backoff.delay(now - self.started_at)
            self.restart_at = now + delay
            self.log(
                f"supervisor: redis (pid {proc.pid}) {describe_exit(code)}; requests get 503 until it is "
                f"back; restarting it from its AOF in {delay:g} s; log: {self.server.log_file}"
            )
            return False
        if now < self.restart_at:
            return False
        try:
            self.server.start(timeout_s=READY_TIMEOUT_S)
        except Exception as exc:  # its data dir, its port: tried again after the next backoff
            self.restart_at = None
            self.started_at = now
            self.log(f"supervisor: redis did not start again: {exc}")
            return False
        self.restarts += 1
        self.started_at, self.restart_at = time.monotonic(), None
        self.log(f"supervisor: redis restarted (pid {self.server.pid()}); restart {self.restarts}")
        return True
