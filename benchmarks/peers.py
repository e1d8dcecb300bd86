"""Breakwater beside its peers on the streaming path, in one run: one fake OpenAI backend served
directly, through nginx, vllm-router, litellm (when installed) and Breakwater (gateway + Redis + an
``openai`` worker). Backend and client share CPU 0, the system under test has CPU 1 to itself; per
system, token timing and rate: requests done, errors, TTFT added over direct, tokens per CPU-second.

    python benchmarks/peers.py [--rates 10,50,100,200] [--seconds 10] [--baseline-src DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_split
from breakwater.redis_server import RedisServer, free_port
from common import ROOT, pct, pin, stop, write_section
from load_client import RunResult, open_loop

CLIENT_CPU, SUT_CPU = 0, 1
MODEL = "fake"
SHAPES = {"itl10": 10.0, "bursty": 0.0}  # the backend's inter-token latency, ms
WARM_UP = {"model": MODEL, "prompt": "warm up", "max_tokens": 4, "stream": True}
NGINX = "/usr/sbin/nginx"
NGINX_CONF = """daemon off; worker_processes 1; {user}pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{ access_log {d}/access.log; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 1024; }}
    server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://backend; proxy_http_version 1.1;
        proxy_set_header Connection ""; proxy_buffering off; proxy_read_timeout 300s; }} }} }}
"""
VLLM_ROUTER_QUIET = " --prometheus-port {free} --log-level warning"
LITELLM_ENV = {"OPENAI_API_KEY": "fake"}
Proc = subprocess.Popen[bytes]


@dataclass
class Instance:
    """The processes of one started system, by label; each label's whole process tree is measured."""

    port: int
    procs: dict[str, Proc] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    redis: RedisServer | None = None

    def launch(self, label: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        cpu = CLIENT_CPU if label == "fake" else SUT_CPU  # the backend shares the client's core
        with open(log, "ab") as fh:
            self.procs[label] = subprocess.Popen(
                ["taskset", "-c", str(cpu), *argv],
                env={**os.environ, **(env or {})},
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.logs[label] = log

    def pids(self) -> dict[str, int]:
        pids = {label: p.pid for label, p in self.procs.items()}
        return pids | ({"redis": self.redis.proc.pid} if self.redis and self.redis.proc else {})

    def stop(self) -> None:
        stop(list(self.procs.values()))
        if self.redis is not None:
            self.redis.stop()

    def wait_ready(self, timeout_s: float = 90) -> None:
        """Until it lists the model (Breakwater: until a worker registered it); a dead process fails."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for label, p in self.procs.items():
                if p.poll() is not None:
                    tail = self.logs[label].read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"{label} exited with {p.returncode}:\n{tail}")
            try:
                data = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).json()["data"]
                if any(m.get("id") == MODEL for m in data):
                    return
            except (httpx.HTTPError, KeyError, ValueError, TypeError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"port {self.port} did not list {MODEL!r} within {timeout_s:g}s")


Starter = Callable[[int, Path], Instance]  # (backend port, temp dir) -> started instance


def start_nginx(backend: int, tmp: Path) -> Instance:
    d = Path(tempfile.mkdtemp(prefix="nginx-", dir=tmp))
    user = f"user {getpass.getuser()}; " if os.geteuid() == 0 else ""  # workers run as this user
    inst = Instance(free_port())
    (d / "nginx.conf").write_text(NGINX_CONF.format(user=user, d=d, backend=backend, port=inst.port))
    inst.launch(
        "nginx", [NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")], d / "out"
    )
    return inst


def start_exe(label: str, exe: str, flags: str, env: dict[str, str] | None = None) -> Starter:
    """A single-binary proxy; ``flags`` may use {backend}, {port} and {free} (another free port)."""

    def start(backend: int, tmp: Path) -> Instance:
        inst = Instance(free_port())
        argv = [exe, *flags.format(backend=backend, port=inst.port, free=free_port()).split()]
        inst.launch(label, argv, tmp / f"{label}-{inst.port}.log", env)
        return inst

    return start


def start_breakwater(src: Path | None, *, embedded: bool = False, tcp: bool = False) -> Starter:
    """Redis, a gateway and an ``openai`` worker; ``embedded``: the worker inside the gateway process
    (``gateway --embed-engine openai``). The processes reach Redis over its unix socket, as the
    embedded stack's do (``breakwater up``); ``tcp``: over TCP, as from another host."""

    def start(backend: int, tmp: Path) -> Instance:
        tag = uuid.uuid4().hex[:8]
        d = tmp / f"bw-{tag}"
        redis = RedisServer(d / "redis", unix_socket=not tcp)
        if not tcp and redis.socket_path is None:
            raise RuntimeError(f"the unix socket's path under {tmp} is too long; use a shorter TMPDIR")
        inst = Instance(free_port(), redis=redis)
        try:
            redis.start()
            assert redis.proc is not None
            pin(redis.proc.pid, {SUT_CPU})
        except BaseException:
            redis.stop()
            raise
        env = {
            "BREAKWATER_REDIS_URL": redis.url if tcp else redis.local_url,
            "BREAKWATER_KEY_PREFIX": f"peers-{tag}",
            "BREAKWATER_LOG_LEVEL": "WARNING",
            "BREAKWATER_LANE_MAX_QUEUED": "100000",
            "BREAKWATER_UPSTREAM_METRICS_URL": "off",
            "BREAKWATER_DRAIN_GRACE_S": "2",
        } | ({"PYTHONPATH": str(src / "src")} if src else {})
        bw = [sys.executable, "-m", "breakwater"]
        engine = ["--upstream-url", f"http://127.0.0.1:{backend}/v1", "--model", MODEL, "--capacity", "1024"]
        gateway = [*bw, "gateway", "--port", str(inst.port)]
        if embedded:
            gateway += ["--embed-engine", "openai", *engine]
        inst.launch("gateway", gateway, d / "gateway.log", env)
        if not embedded:
            worker = [*bw, "worker", "--engine", "openai", *engine, "--worker-id", f"peers-{tag}"]
            inst.launch("worker", worker, d / "worker.log", env)
        return inst

    return start


def find_exe(name: str) -> str | None:
    peers = ROOT / ".venv-peers" / "bin" / name
    return shutil.which(name) or (str(peers) if peers.exists() else None)


def cpu_ticks(root: int) -> int:
    """utime+stime+cutime+cstime over a process and its live descendants (reaped ones are in cutime)."""
    return sum(sum(int(x) for x in fields[11:15]) for fields in cpu_split.process_tree(root).values())


@dataclass
class Row:
    system: str
    rate: float
    result: RunResult
    wall_s: float
    cpu_s: dict[str, float]  # per process of the system under test
    client_core: float  # busy fraction of the client's core (client + backend)
    split: dict[str, dict[str, float]] | None = None  # with --perf: cpu_split.split of the core

    @property
    def ttft_ms(self) -> list[float]:
        return [o.ttft_s * 1000 for o in self.result.outcomes if o.ok]

    @property
    def itl_ms(self) -> list[float]:
        return [g * 1000 for o in self.result.outcomes if o.ok for g in o.gaps_s]

    @property
    def tokens(self) -> int:
        return sum(o.tokens for o in self.result.outcomes if o.ok)

    def rates(self) -> tuple[float, float]:
        """Realized arrivals/s and completions/s, each over its own span (equal while keeping up)."""
        sends = [o.sent for o in self.result.outcomes]
        dones = [o.done for o in self.result.outcomes if o.ok]
        offered = (len(sends) - 1) / (max(sends) - min(sends)) if len(sends) > 2 else self.rate
        return offered, (len(dones) - 1) / (max(dones) - min(dones)) if len(dones) > 2 else 0.0

    def held(self) -> bool:
        offered, done = self.rates()
        sent = len(self.result.outcomes) + self.result.unfinished
        return len(self.ttft_ms) >= 0.99 * sent and done >= 0.95 * offered


def _run(coro: Coroutine[Any, Any, RunResult]) -> RunResult:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def measure(name: str, inst: Instance, backend: Instance, rate: float, args: argparse.Namespace) -> Row:
    body = {"model": MODEL, "prompt": "compare the streaming path of the gateways", "stream": True}
    body |= {"max_tokens": args.max_tokens, "stream_options": {"include_usage": True}}
    pids = inst.pids()
    spies = profile(name, inst, rate, args)
    core = None
    if args.perf is not None and pids:
        core = cpu_split.CoreRecorder(
            SUT_CPU, args.perf / f"{_file(name)}-{args.shape}-{rate:g}.data", CLIENT_CPU
        )
    before = {label: cpu_ticks(pid) for label, pid in pids.items()}
    client0, fake0, t0 = sum(os.times()[:2]), cpu_ticks(backend.procs["fake"].pid), time.monotonic()
    try:
        result = _run(
            open_loop("127.0.0.1", inst.port, body, rate, args.seconds, args.drain_s, int(rate * 1000))
        )
    finally:
        for spy in spies:  # py-spy writes its samples when interrupted
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        if core is not None:
            core.stop()
    wall, tick = time.monotonic() - t0, os.sysconf("SC_CLK_TCK")
    client = sum(os.times()[:2]) - client0 + (cpu_ticks(backend.procs["fake"].pid) - fake0) / tick
    cpu = {label: (cpu_ticks(pid) - before[label]) / tick for label, pid in pids.items()}
    split = None
    if core is not None:
        split = cpu_split.split(core.out, {t: lb for lb, pid in pids.items() for t in cpu_split.threads(pid)})
    return Row(name, rate, result, wall, cpu, client / wall, split)


def _file(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def profile(name: str, inst: Instance, rate: float, args: argparse.Namespace) -> list[Proc]:
    """With ``--profile DIR``: ``py-spy`` on the system's Python processes while it is measured
    (raw stacks without idle waits, on the client's core), one file per process, shape and rate. A
    profiled run's numbers are not for comparing: py-spy's reads cost the profiled process."""
    if args.profile is None or not name.startswith("breakwater"):
        return []
    spies: list[Proc] = []
    for label, pid in inst.pids().items():
        if label == "redis":
            continue
        out = args.profile / f"{_file(name)}-{label}-{args.shape}-{rate:g}.txt"
        argv = ["taskset", "-c", str(CLIENT_CPU), "py-spy", "record", "--nonblocking", "-r", "200"]
        argv += ["-f", "raw", "-o", str(out), "--pid", str(pid)]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def run_system(
    name: str, start: Starter, per_rate: bool, backend: Instance, args: argparse.Namespace
) -> list[Row]:
    rows: list[Row] = []
    inst: Instance | None = None
    try:
        for rate in args.rates:
            if inst is None or per_rate:  # Breakwater: a fresh stack (Redis, key prefix) for every rate
                if inst is not None:
                    inst.stop()
                inst = start(backend.port, args.tmp)
                inst.wait_ready()
                warm = _run(open_loop("127.0.0.1", inst.port, WARM_UP, 20, 0.5, args.drain_s, seed=7))
                if warm.errors:
                    print(f"  {name}: warm-up errors {dict(warm.errors)}", flush=True)
            rows.append(row := measure(name, inst, backend, rate, args))
            print(
                f"  {name} @ {rate:g}/s: done/s {row.rates()[1]:.1f}, TTFT p50 {pct(row.ttft_ms, 50):.1f} ms,"
                f" errors {dict(row.result.errors)}, client core {100 * row.client_core:.0f}%",
                flush=True,
            )
            if row.result.unfinished:  # leftover streams must not run into the next rate
                inst.stop()
                inst = None
    except RuntimeError as exc:
        print(f"  {name}: {exc}; skipped", flush=True)
    finally:
        if inst is not None:
            inst.stop()
    return rows


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def table(rows: list[Row]) -> list[str]:
    direct = {r.rate: r for r in rows if r.system == "direct"}
    out = [
        "| system | offered req/s (realized) | done/s | errors | TTFT p50 / p99 ms | added p50 / p99 ms "
        "| ITL p50 / p99 ms | tokens per CPU-s (layer) | CPU % of core | tokens per CPU-s per process |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (offered, done), d = r.rates(), direct.get(r.rate)
        t50, t99 = pct(r.ttft_ms, 50), pct(r.ttft_ms, 99)
        added = (
            f"{t50 - pct(d.ttft_ms, 50):+.1f} / {t99 - pct(d.ttft_ms, 99):+.1f}" if d and r is not d else "—"
        )
        itl = f"{pct(r.itl_ms, 50):.1f} / {pct(r.itl_ms, 99):.1f}" if r.itl_ms else "—"
        errors = ", ".join(f"{k} x{v}" for k, v in r.result.errors.most_common()) or "0"
        cpu = sum(r.cpu_s.values())
        per = " · ".join(f"{k} {_k(r.tokens / v) if v else '—'}" for k, v in r.cpu_s.items()) or "—"
        share = f"{100 * cpu / r.wall_s:.0f}" if r.cpu_s else "—"
        out.append(
            f"| {r.system} | {r.rate:g} ({offered:.1f}) | {done:.1f} | {errors} | {t50:.1f} / {t99:.1f} "
            f"| {added} | {itl} | {_k(r.tokens / cpu) if cpu else '—'} | {share} | {per} |"
        )
    busiest = max((r.client_core for r in rows), default=0.0)
    return [*out, "", f"Client core (client + backend) at most {100 * busiest:.0f}% busy."]


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip().split("\n")[0] if done.returncode == 0 else ""


def versions(found: dict[str, str], baseline: Path | None) -> list[str]:
    describe = ["describe", "--always", "--dirty"]
    out = [
        f"Python {platform.python_version()}",
        "Breakwater " + _version(["git", "-C", str(ROOT), *describe]),
    ]
    if baseline:
        out.append("before: " + (_version(["git", "-C", str(baseline), *describe]) or str(baseline)))
    if "nginx" in found:
        out.append(_version([NGINX, "-v"]).removeprefix("nginx version: "))
    if "vllm-router" in found:  # it has no --version: ask the interpreter of its entry script
        python = Path(found["vllm-router"]).read_text(errors="replace").split("\n")[0].removeprefix("#!")
        code = "import importlib.metadata as m; print('vllm-router', m.version('vllm-router'))"
        out.append(_version([python, "-c", code]))
    if "litellm" in found:
        out.append("litellm " + _version([found["litellm"], "--version"]))
    return [v for v in out if v.strip()]


def systems(args: argparse.Namespace) -> tuple[dict[str, tuple[Starter, bool]], dict[str, str]]:
    exes = {"nginx": NGINX if os.path.exists(NGINX) else None}
    found = {n: e for n, e in (exes | {n: find_exe(n) for n in ("vllm-router", "litellm")}).items() if e}
    out: dict[str, tuple[Starter, bool]] = {"direct": (lambda backend, tmp: Instance(backend), False)}
    if "nginx" in found:
        out["nginx"] = (start_nginx, False)
    if router := found.get("vllm-router"):
        flags = "--worker-urls http://127.0.0.1:{backend} --host 127.0.0.1 --port {port} --policy round_robin"
        out["vllm-router"] = (start_exe("vllm-router", router, flags + VLLM_ROUTER_QUIET), False)
    if litellm := found.get("litellm"):
        flags = f"--model openai/{MODEL} --alias {MODEL} --api_base http://127.0.0.1:{{backend}}/v1"
        starter = start_exe("litellm", litellm, flags + " --host 127.0.0.1 --port {port}", LITELLM_ENV)
        out["litellm"] = (starter, False)
    tcp = args.redis_tcp
    out["breakwater"] = (start_breakwater(None, tcp=tcp), True)
    out["breakwater-tcp"] = (start_breakwater(None, tcp=True), True)
    out["breakwater-embedded"] = (start_breakwater(None, embedded=True, tcp=tcp), True)
    if args.baseline_src:
        out["breakwater (before)"] = (start_breakwater(args.baseline_src.resolve(), tcp=tcp), True)
        before = start_breakwater(args.baseline_src.resolve(), embedded=True, tcp=tcp)
        out["breakwater-embedded (before)"] = (before, True)
    # In the order given (the run's order can favour a system: swap two to check), direct first: the
    # reference for every added TTFT.
    wanted = ["direct", *args.systems.split(",")] if args.systems else list(out)
    return {n: out[n] for n in dict.fromkeys(wanted) if n in out}, found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="10,50,100,200")
    parser.add_argument("--seconds", type=float, default=10, help="of arrivals per rate")
    parser.add_argument("--drain-s", type=float, default=30, help="wait at most this long for in-flight ones")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument(
        "--systems", default="", help="comma-separated subset, run in this order (default: all found)"
    )
    parser.add_argument("--ttft-ms", type=float, default=50)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--baseline-src", type=Path, help="another checkout, run as 'breakwater (before)'")
    parser.add_argument(
        "--redis-tcp",
        action="store_true",
        help="every Breakwater system reaches Redis over TCP (default: its unix socket, as `breakwater up`; "
        "a checkout before 2026-12-05 needs TCP); the system breakwater-tcp always does",
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--profile", type=Path, help="py-spy Breakwater's processes into this folder")
    parser.add_argument(
        "--perf", type=Path, help="perf record the system's core into this folder; report the split"
    )
    args = parser.parse_args()
    for folder in (args.profile, args.perf):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    if args.perf is not None and not cpu_split.available():
        parser.error("--perf needs perf (Debian: linux-perf)")
    args.rates = [float(r) for r in args.rates.split(",")]
    if unknown := set(args.shapes.split(",")) - set(SHAPES):
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    if not {CLIENT_CPU, SUT_CPU} <= os.sched_getaffinity(0):
        sys.exit(f"needs CPUs {CLIENT_CPU} and {SUT_CPU}; this process may use {os.sched_getaffinity(0)}")
    os.sched_setaffinity(0, {CLIENT_CPU})
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks that stop processes
    chosen, found = systems(args)
    print("systems: " + ", ".join(chosen), flush=True)

    args.tmp = Path(tempfile.mkdtemp(prefix="bw-peers-"))
    results: dict[str, list[Row]] = {}
    try:
        run_shapes(chosen, args, results)
    except BaseException:
        print(f"logs kept in {args.tmp}", file=sys.stderr)
        raise
    shutil.rmtree(args.tmp, ignore_errors=True)
    report(results, found, args)


def run_shapes(
    chosen: dict[str, tuple[Starter, bool]], args: argparse.Namespace, results: dict[str, list[Row]]
) -> None:
    for shape in args.shapes.split(","):
        args.shape = shape
        print(f"shape {shape} (TTFT {args.ttft_ms:g} ms, ITL {SHAPES[shape]:g} ms)", flush=True)
        backend = Instance(free_port())
        fake = [sys.executable, str(Path(__file__).with_name("fake_openai.py")), "--port", str(backend.port)]
        fake += ["--model", MODEL, "--ttft-ms", str(args.ttft_ms), "--itl-ms", str(SHAPES[shape])]
        backend.launch("fake", fake, args.tmp / f"fake-{shape}.log")
        try:
            backend.wait_ready(30)
            results[shape] = [
                r for n, (s, per) in chosen.items() for r in run_system(n, s, per, backend, args)
            ]
        finally:
            backend.stop()


def report(results: dict[str, list[Row]], found: dict[str, str], args: argparse.Namespace) -> None:
    names = [ln for ln in Path("/proc/cpuinfo").read_text().split("\n") if ln.startswith("model name")]
    cpu = platform.processor() or (names[0].split(":", 1)[1].strip() if names else "?")
    lines = [
        "## Breakwater beside nginx and vllm-router (`benchmarks/peers.py`)",
        "",
        f"Command: `{' '.join(['python benchmarks/peers.py', *sys.argv[1:]])}` — {cpu}, {os.cpu_count()} "
        f"cores, {time.strftime('%Y-%m-%d')}. Versions: {'; '.join(versions(found, args.baseline_src))}.",
        "",
        f"Backend `benchmarks/fake_openai.py` ({args.max_tokens} tokens a request, the first after "
        f"{args.ttft_ms:g} ms; itl10: then one every 10 ms, bursty: all at once) and the open-loop client "
        f"(Poisson arrivals for {args.seconds:g} s a rate, then up to {args.drain_s:g} s for in-flight ones) "
        f"share CPU {CLIENT_CPU}; every process of the system under test is pinned to CPU {SUT_CPU}. Added "
        "TTFT: against direct at the same rate. ITL: the client's gaps between consecutive chunks with "
        "text, over all streams (— when every stream came in one chunk). CPU: utime+stime of each "
        "process tree over the window. Breakwater restarts (fresh Redis) before every rate; its processes "
        f"reach Redis over {'TCP' if args.redis_tcp else 'its unix socket (breakwater-tcp: over TCP)'}. "
        "Held: ≥ 99% completed without error and done/s ≥ 95% of the realized arrival rate.",
    ]
    for shape, rows in results.items():
        lines += ["", f"### {shape}", "", *table(rows)]
    lines += ["", "### Highest rate held (req/s)", "", "| system | " + " | ".join(results) + " |"]
    lines.append("|---|" + "---|" * len(results))
    for name in dict.fromkeys(r.system for rows in results.values() for r in rows):
        best = [
            max((r.rate for r in rows if r.system == name and r.held()), default=0)
            for rows in results.values()
        ]
        lines.append(f"| {name} | " + " | ".join(f"{b:g}" if b else "none" for b in best) + " |")
    if split := [
        (f"{r.system}, {shape} {r.rate:g}/s", r.split)
        for shape, rows in results.items()
        for r in rows
        if r.split
    ]:
        lines += ["", "### Where the system's core went (`--perf`: perf record, cpu-clock samples)", ""]
        lines += cpu_split.table(split)
    if not args.no_write:
        write_section("peers", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
