"""The supervisor's children (``breakwater up``): a process it starts, the backoff before it
starts one again that exited, and how an exit is told."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


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
