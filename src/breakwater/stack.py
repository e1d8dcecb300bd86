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
    # --autoscale: follow the gateway's breakwater_desired_workers between these bounds
    autoscale: bool = False
    min_workers: int = 1
    max_workers: int = 4
    scale_interval_s: float = 2.0
    scale_down_delay_s: float = 10.0  # desired must stay below the current count this long


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.redis: RedisServer | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.retiring: list[subprocess.Popen[bytes]] = []  # scaled down: draining, then exiting
        self._env: dict[str, str] = {}
        self._spawned = 0
        self._last_scale = 0.0
        self._below_since: float | None = None
        self.names: dict[int, str] = {}  # worker pid -> its log name

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
            self._env = env
            logs = cfg.data_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            gw_env = {
                **env,
                "BREAKWATER_AUTOSCALE_MIN_WORKERS": str(cfg.min_workers),
                "BREAKWATER_AUTOSCALE_MAX_WORKERS": str(cfg.max_workers),
            }
            self.gateway = self._spawn(
                ["gateway", "--host", cfg.host, "--port", str(cfg.port)], gw_env, logs / "gateway.log"
            )
            for _ in range(cfg.workers):
                self._add_worker()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _add_worker(self) -> None:
        cfg = self.config
        n = self._spawned
        self._spawned += 1
        args = ["worker", "--engine", cfg.engine, "--model", cfg.model, "--worker-id", f"local-{n}"]
        log = cfg.data_dir / "logs" / f"worker-{n}.log"
        proc = self._spawn([*args, *cfg.worker_args], self._env, log)
        self.names[proc.pid] = f"worker-{n}"
        self.workers.append(proc)

    def desired_workers(self) -> int | None:
        """The gateway's ``breakwater_desired_workers`` for the model, or None if unavailable."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=2.0).text
        except httpx.HTTPError:
            return None
        prefix = f'breakwater_desired_workers{{model="{self.config.model}"}} '
        for line in text.splitlines():
            if line.startswith(prefix):
                return int(float(line[len(prefix) :]))
        return None

    def autoscale_tick(self) -> None:
        """Local elasticity with the gateway's policy: up at once, down after a stable spell (SIGTERM:
        the worker drains and releases what it cannot finish)."""
        cfg = self.config
        now = time.monotonic()
        self.retiring = [p for p in self.retiring if p.poll() is None]
        if now - self._last_scale < cfg.scale_interval_s:
            return
        self._last_scale = now
        desired = self.desired_workers()
        if desired is None:
            return
        desired = max(cfg.min_workers, min(cfg.max_workers, desired))
        if desired > len(self.workers):
            self._below_since = None
            for _ in range(desired - len(self.workers)):
                self._add_worker()
        elif desired < len(self.workers):
            self._below_since = self._below_since or now
            if now - self._below_since >= cfg.scale_down_delay_s:
                proc = self.workers.pop()
                proc.send_signal(signal.SIGTERM)
                self.retiring.append(proc)
                self._below_since = None
        else:
            self._below_since = None

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
        procs = [("gateway", self.gateway)] + [(self.names[p.pid], p) for p in self.workers]
        for name, proc in procs:
            if proc is not None and proc.poll() is not None:
                log = self.config.data_dir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise StackError(f"{name} exited with code {proc.returncode}; last log lines:\n{tail}")

    def stop(self) -> None:
        """Stop workers (drain), then the gateway, then Redis; by PID."""
        for proc in [*self.workers, *self.retiring, self.gateway]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, *self.retiring, self.gateway]:
            if proc is None:
                continue
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.redis is not None:
            self.redis.stop()
