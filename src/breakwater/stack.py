"""The local supervisor behind ``breakwater up``: embedded Redis (AOF), one gateway, N workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from breakwater.redis_server import RedisServer, port_in_use


class StackError(RuntimeError):
    """The stack could not start; the message says why and what to do."""


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    engine: str = "sim"
    model: str = "sim"
    data_dir: Path = Path(".breakwater")
    redis_url: str | None = None
    appendfsync: str = "everysec"
    key_prefix: str = "bw"
    worker_args: list[str] = field(default_factory=list)
    ready_timeout_s: float = 120.0


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.redis: RedisServer | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self) -> None:
        cfg = self.config
        if port_in_use(cfg.host, cfg.port):
            raise StackError(f"port {cfg.port} on {cfg.host} is already in use; pick another with --port")
        try:
            redis_url = cfg.redis_url or self._start_redis()
            env = {**os.environ, "BREAKWATER_REDIS_URL": redis_url, "BREAKWATER_KEY_PREFIX": cfg.key_prefix}
            logs = cfg.data_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            self.gateway = self._spawn(
                ["gateway", "--host", cfg.host, "--port", str(cfg.port)], env, logs / "gateway.log"
            )
            for i in range(cfg.workers):
                args = ["worker", "--engine", cfg.engine, "--model", cfg.model, "--worker-id", f"local-{i}"]
                self.workers.append(self._spawn([*args, *cfg.worker_args], env, logs / f"worker-{i}.log"))
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _start_redis(self) -> str:
        self.redis = RedisServer(self.config.data_dir / "redis", appendfsync=self.config.appendfsync)
        try:
            self.redis.start()
        except Exception as exc:
            raise StackError(f"could not start the embedded Redis: {exc}") from None
        return self.redis.url

    @staticmethod
    def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the child
        return subprocess.Popen(
            [sys.executable, "-m", "breakwater", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            self.check_children()
            try:
                models = httpx.get(f"{self.url}/v1/models", timeout=2.0).json()
                if any(m["id"] == self.config.model for m in models.get("data", [])):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise StackError(
            f"the stack was not ready within {self.config.ready_timeout_s:.0f}s; "
            f"see the logs in {self.config.data_dir / 'logs'}"
        )

    def check_children(self) -> None:
        """Raise if the gateway or a worker exited."""
        procs = [("gateway", self.gateway)] + [(f"worker-{i}", p) for i, p in enumerate(self.workers)]
        for name, proc in procs:
            if proc is not None and proc.poll() is not None:
                log = self.config.data_dir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise StackError(f"{name} exited with code {proc.returncode}; last log lines:\n{tail}")

    def stop(self) -> None:
        """Stop workers (drain), then the gateway, then Redis; by PID."""
        for proc in [*self.workers, self.gateway]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.gateway]:
            if proc is None:
                continue
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.redis is not None:
            self.redis.stop()
