"""Many concurrent streams on one gateway process: completeness, inter-token latency, memory.

Sim workers emit one token per second per stream (a decode step of 1 s), so every stream is open for
``--tokens`` seconds; ``--streams`` of them are opened over ``--ramp-s`` and held together. The
gateway runs alone on CPU 1; Redis, the workers and this client share CPU 0. Reported: streams that
completed exactly (every seq once, in order, the right token count, ``[DONE]``), the inter-token
latency the client saw (p50/p99; 1000 ms is the engine's own step), the gateway's CPU and resident
memory per open stream, and then the memory of idle WebSocket connections.

``--gateway-processes 1,2`` runs it once per count (``gateway --workers N``, every process on CPU 1):
the processes' CPU per token and how the streams spread over them (SO_REUSEPORT) give the capacity
each count would have with a core per process, where this machine has no spare core to measure it.

``--core-each`` (a machine with a core for every process) gives every process a core of its own
instead: the clients first, then each gateway process, each Redis server, each worker.
``--step-ms`` shortens the engine's step (more tokens per second per stream), to load the gateway
past a core: the delivered rate (every token over the span from the first to the last, and in the
busiest second) then reads each count's capacity directly. For that the rest must keep up:
``--clients N`` reads the streams from N processes, ``--cluster N`` runs a Redis Cluster of N
primaries (sharded Pub/Sub) in place of the one Redis.

    python benchmarks/streams.py [--streams 10000] [--tokens 30] [--workers 4] [--websockets 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import multiprocessing
import os
import platform
import re
import resource
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import hiredis
import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakwater.redis_cluster import LocalCluster
from breakwater.redis_server import RedisServer, free_port
from common import pct, pin, spawn, stop, wait_models, write_section


@dataclass
class Stream:
    ok: bool = False
    seqs: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when the client read each event
    kernel_times: list[float] = field(default_factory=list)  # when its socket received it
    error: str = ""
    rid: str = ""  # the request's id, from its first chunk


def step_publish_ms(ports: list[int], q: float) -> float:
    """The workers' ``breakwater_engine_step_seconds`` (publishing one step's tokens, which the next
    step waits for) at quantile ``q``: the upper bound of its histogram bucket, in ms."""
    counts: dict[float, float] = {}
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for match in re.finditer(
            r'^breakwater_engine_step_seconds_bucket\{le="([^"]+)"[^}]*\} (\S+)$', text, re.M
        ):
            le = float(match.group(1))
            counts[le] = counts.get(le, 0.0) + float(match.group(2))
    bounds = sorted(counts)
    if not bounds or not counts[bounds[-1]]:
        return float("nan")
    want = q * counts[bounds[-1]]
    return next(b for b in bounds if counts[b] >= want) * 1000


def rss_kb(pids: list[int]) -> int:
    """The resident memory of ``pids`` together."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_pids(pid: int) -> list[int]:
    """The gateway process and the ones it started beside it (``gateway --workers N``)."""
    return [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]


def listening(pids: list[int], port: int) -> set[int]:
    """Those of ``pids`` that hold a socket listening on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    held = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    held.add(pid)
                    break
    return held


@dataclass(frozen=True)
class Cores:
    """Which CPUs each process runs on."""

    clients: list[set[int]]
    gateway: list[set[int]]  # one entry per gateway process; all processes share it when only one
    redis: list[set[int]]  # one per Redis server (a cluster's primaries)
    workers: list[set[int]]

    @classmethod
    def shared(cls, clients: int, processes: int, redis: int, workers: int) -> Cores:
        """Two cores: the gateway's processes on CPU 1, everything else on CPU 0."""
        return cls([{0}] * clients, [{1}], [{0}] * redis, [{0}] * workers)

    @classmethod
    def each(cls, clients: int, processes: int, redis: int, workers: int) -> Cores:
        """A core per process: the clients, the gateway's processes, Redis, the workers."""
        need = clients + processes + redis + workers
        if (os.cpu_count() or 1) < need:
            raise SystemExit(f"--core-each needs {need} cores; this machine has {os.cpu_count()}")
        cpus = iter(range(need))
        return cls(
            [{next(cpus)} for _ in range(clients)],
            [{next(cpus)} for _ in range(processes)],
            [{next(cpus)} for _ in range(redis)],
            [{next(cpus)} for _ in range(workers)],
        )

    def describe(self) -> str:
        if len(self.gateway) == 1 and self.redis[0] == self.clients[0]:
            return "gateway pinned to CPU 1, Redis + the sim workers + the client on CPU 0"
        return (
            f"a core for each process: {len(self.clients)} client process(es), every gateway process, "
            f"{len(self.redis)} Redis server(s) and every sim worker on its own"
        )


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Any:
    """Processes started inside inherit ``cpus``; this process's own affinity is restored after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def wait_listening(pid: int, processes: int, port: int, timeout_s: float = 60.0) -> list[int]:
    """The gateway's ``processes`` pids, once every one listens (SO_REUSEPORT spreads new
    connections only over those that do)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = gateway_pids(pid)
        if len(pids) == processes and len(listening(pids, port)) == processes:
            return pids
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(listening(pids, port))} of {processes} gateway processes listen")
        time.sleep(0.1)


SO_TIMESTAMPNS = 35  # Linux: each read's ancillary data carries the kernel's receive time
STAMP = struct.Struct("qq")  # struct timespec


def timed_read(sock: socket.socket, size: int) -> tuple[bytes, float]:
    """One ``recvmsg`` and the kernel's receive time of its data (``SO_TIMESTAMPNS`` set on
    ``sock``); raises ``BlockingIOError`` when there is nothing to read."""
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(STAMP.size))
    for _, kind, stamp in ancillary:
        if kind == SO_TIMESTAMPNS:
            sec, nsec = STAMP.unpack(stamp[: STAMP.size])
            return data, float(sec + nsec / 1e9)
    return data, float("nan")


class TimedReader:
    """Reads one stream's answer from a raw socket with ``recvmsg``: each read's events get two
    times, when the client read them and when the kernel received them (``SO_TIMESTAMPNS``, the
    latest data in the read). The client shares CPU 0 with Redis and the workers, whose bursts (a
    step's script, its publish) delay its reads by varying amounts: the kernel's times are the
    arrivals without that."""

    def __init__(self, sock: socket.socket, out: Stream) -> None:
        self.sock, self.out = sock, out
        self.loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[str] = self.loop.create_future()
        self.head, self.tail, self.done = b"", b"", False

    def end(self, why: str) -> None:
        if not self.ended.done():
            self.loop.remove_reader(self.sock.fileno())
            self.ended.set_result(why)

    def readable(self) -> None:
        while not self.ended.done():
            try:
                data, stamp = timed_read(self.sock, 1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                return self.end(type(exc).__name__)
            if not data:
                return self.end("" if self.done else "closed early")
            self.take(data, time.perf_counter(), stamp)

    def take(self, data: bytes, now: float, stamp: float) -> None:
        if len(self.head) < 12:
            self.head += data[:12]
            if len(self.head) >= 12 and not self.head.startswith(b"HTTP/1.1 200"):
                return self.end(f"HTTP {self.head[9:12].decode()}")
        buf, pos = self.tail + data, 0
        if not self.out.rid and (i := buf.find(b'"id":"')) >= 0 and (j := buf.find(b'"', i + 6)) >= 0:
            self.out.rid = buf[i + 6 : j].decode()
        while (i := buf.find(b"\nid: ", pos)) >= 0 and (j := buf.find(b"\n", i + 5)) >= 0:
            self.out.seqs.append(int(buf[i + 5 : j]))
            self.out.times.append(now)
            self.out.kernel_times.append(stamp)
            pos = j
        self.done = self.done or b"data: [DONE]" in buf
        if self.done:
            return self.end("")
        self.tail = buf[max(pos, len(buf) - 16) :]


class Observer:
    """A Pub/Sub subscriber to every request's channel, its reads timed by the kernel: when Redis sent
    each token out (``sent[(rid, seq)]``, realtime like ``SO_TIMESTAMPNS``). A token's client time less
    this is the gateway's share of its delay; the ITL of these times is the workers' and Redis's."""

    def __init__(self, url: str, prefix: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.address, self.prefix = (host, int(port.split("/")[0])), prefix
        self.sent: dict[tuple[str, int], float] = {}
        self.reader = hiredis.Reader()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        await loop.sock_connect(self.sock, self.address)
        await loop.sock_sendall(self.sock, b"PSUBSCRIBE %s:ch:*\r\n" % self.prefix.encode())
        loop.add_reader(self.sock.fileno(), self.readable)

    def stop(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def readable(self) -> None:
        while True:
            try:
                data, stamp = timed_read(self.sock, 1 << 18)
            except BlockingIOError:
                return
            if not data:
                return
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                if isinstance(reply, list) and reply[0] == b"pmessage" and reply[3][:1] == b"t":
                    channel, payload = reply[2], reply[3]
                    rid = channel[channel.index(b"{") + 1 : -1].decode()
                    self.sent[(rid, int(payload[1 : payload.index(b" ")]))] = stamp


async def one_stream(port: int, tokens: int, seed: int) -> Stream:
    """One stream, read by a :class:`TimedReader`; exact or not."""
    out = Stream()
    body = {"model": "sim", "prompt": "hold", "max_tokens": tokens, "stream": True, "ignore_eos": True}
    payload = orjson.dumps({**body, "seed": seed})
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    reader = TimedReader(sock, out)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        loop.add_reader(sock.fileno(), reader.readable)
        out.error = await reader.ended
    except OSError as exc:
        out.error = type(exc).__name__
    finally:
        reader.end("cancelled")
        sock.close()
    if out.error:
        return out
    seqs_exact = out.seqs == list(range(1, len(out.seqs) + 1))
    out.ok = reader.done and seqs_exact and len(out.seqs) == tokens + 1  # tokens, then the final chunk
    if not out.ok:
        out.error = f"done={reader.done} seqs={len(out.seqs)} in order={seqs_exact}"
    return out


async def open_streams(
    port: int, count: int, tokens: int, ramp_s: float, share: range, start: float
) -> list[Stream]:
    """Streams ``share`` of ``count``, stream i opened at ``start + ramp_s * i / count``
    (``time.perf_counter``, one clock for every process)."""
    # The client's own collector must not pause its reads (its full collections took 95-173 ms,
    # stalling every stream's timestamps at once): off while the streams are held (bounded memory).
    gc.collect()
    gc.freeze()
    gc.disable()
    tasks = []
    for i in share:
        delay = start + ramp_s * i / count - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_stream(port, tokens, i)))
    results = await asyncio.gather(*tasks)
    gc.enable()
    gc.unfreeze()
    return list(results)


def client_process(
    port: int, count: int, tokens: int, ramp_s: float, share: range, start: float, cpus: set[int], out: Any
) -> None:
    """One of ``--clients`` processes: its share of the streams, then (results, its CPU-seconds)."""
    os.sched_setaffinity(0, cpus)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpu = sum(os.times()[:2])
    results = run(open_streams(port, count, tokens, ramp_s, share, start))
    out.send((results, sum(os.times()[:2]) - cpu))
    out.close()


async def from_clients(
    port: int, count: int, tokens: int, ramp_s: float, cores: list[set[int]]
) -> tuple[list[Stream], float]:
    """The streams from ``len(cores)`` processes, stream i from process i mod N; their results in
    order and the CPU-seconds they used together."""
    spawn_ctx = multiprocessing.get_context("spawn")  # the child runs its own event loop
    start = time.perf_counter() + 3.0  # past every child's start
    pipes, procs = [], []
    for n, cpus in enumerate(cores):
        mine, theirs = spawn_ctx.Pipe(duplex=False)
        share = range(n, count, len(cores))
        proc = spawn_ctx.Process(
            target=client_process, args=(port, count, tokens, ramp_s, share, start, cpus, theirs)
        )
        proc.start()
        theirs.close()
        pipes.append(mine)
        procs.append(proc)
    loop = asyncio.get_running_loop()
    parts = [await loop.run_in_executor(None, pipe.recv) for pipe in pipes]
    for proc in procs:
        proc.join()
    results: list[Stream] = [Stream()] * count
    for n, (part, _) in enumerate(parts):
        results[n :: len(cores)] = part
    return results, sum(cpu for _, cpu in parts)


async def hold_streams(
    url: str,
    count: int,
    tokens: int,
    ramp_s: float,
    gw_pids: list[int],
    shared: dict[str, int],
    dump: str,
    observer: Observer | None,
    clients: list[set[int]],
    step_ms: float,
) -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1])
    base_rss = rss_kb(gw_pids)
    base_cpu = [cpu_s(pid) for pid in gw_pids]
    base_shared = {label: cpu_s(pid) for label, pid in shared.items()}
    base_client, t0 = sum(os.times()[:2]), time.perf_counter()
    # The last stream opens at ramp_s, the first ends after its tokens' steps.
    phases = (time.time() + ramp_s, time.time() + tokens * step_ms / 1000)
    peak = {"rss": base_rss}
    fds = [0] * len(gw_pids)  # the most descriptors each process held: how SO_REUSEPORT spread them

    async def sample() -> None:
        while True:
            peak["rss"] = max(peak["rss"], rss_kb(gw_pids))
            for n, pid in enumerate(gw_pids):
                fds[n] = max(fds[n], len(os.listdir(f"/proc/{pid}/fd")))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    if observer is not None:
        await observer.start()
    if len(clients) > 1:
        results, client_cpu = await from_clients(port, count, tokens, ramp_s, clients)
    else:
        results = await open_streams(port, count, tokens, ramp_s, range(count), time.perf_counter())
        client_cpu = sum(os.times()[:2]) - base_client
    if observer is not None:
        observer.stop()
    if dump:  # every stream's per-event times, for a closer look at the tail
        Path(dump).write_bytes(orjson.dumps([[r.times, r.kernel_times] for r in results]))
    sampler.cancel()
    wall = time.perf_counter() - t0
    cpu0 = {label: (cpu_s(pid) - base_shared[label]) / wall for label, pid in shared.items()}
    cpu0["client" if len(clients) == 1 else f"{len(clients)} clients"] = client_cpu / wall
    itl = [b - a for r in results for a, b in zip(r.times[:-2], r.times[1:-1], strict=True)]
    kernel = [b - a for r in results for a, b in zip(r.kernel_times[:-2], r.kernel_times[1:-1], strict=True)]
    split = observed(results, observer.sent, phases) if observer is not None else {}
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    total_tokens = sum(max(0, len(r.seqs) - 1) for r in results)
    arrivals = [t for r in results for t in r.kernel_times[:-1] if t == t]
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else 0.0
    each = [cpu_s(pid) - base for pid, base in zip(gw_pids, base_cpu, strict=True)]
    used = sum(each)
    return {
        "streams": count,
        "exact": sum(r.ok for r in results),
        "errors": float(len(results) - sum(r.ok for r in results)),
        "error_kinds": str(errors),
        **spread("itl", itl),
        **spread("kernel", kernel),
        "kb_per_stream": (peak["rss"] - base_rss) / count,
        "gw_cpu_s": used,
        "gw_busy": used / wall,
        "tokens_per_cpu_s": total_tokens / used if used else 0.0,
        # Every token over the span from the first to the last: the offered rate while the gateway
        # keeps up, its capacity once it does not.
        "delivered_tokens_s": total_tokens / span if span else 0.0,
        "peak_tokens_s": busiest_second(arrivals),
        # With a core per process, the load as spread here grows until the busiest saturates its core.
        "capacity_tokens_s": total_tokens / max(each) if used else 0.0,
        "gw_cpu_each": each,
        "gw_fds_each": fds,
        "cpu0": cpu0,
        **split,
    }


def busiest_second(times: list[float]) -> float:
    """The most of ``times`` in one second (whole seconds from the first): a saturated gateway's
    delivery rate, which the ramp's edges do not dilute."""
    if not times:
        return 0.0
    first = min(times)
    counts: dict[int, int] = {}
    for t in times:
        counts[int(t - first)] = counts.get(int(t - first), 0) + 1
    return float(max(counts.values()))


def observed(
    results: list[Stream], sent: dict[tuple[str, int], float], phases: tuple[float, float]
) -> dict[str, float]:
    """Each token's delay split at Redis's send: the gateway's share (Redis sent it to the gateway,
    and to the observer, until the client's kernel had it) and the ITL as Redis sent the tokens.
    What the gateway added is also split by phase (``phases``: the realtime the last stream opens
    and the first ends): opening (the gateway admitting new requests between deliveries), held
    (every stream open, none opening or ending) and ending."""
    gateway, before, added, matched = [], [], [], 0
    by_phase: tuple[list[float], list[float], list[float]] = ([], [], [])
    for r in results:
        times = [sent.get((r.rid, seq)) for seq in r.seqs[:-1]]
        delays = [None if t is None else k - t for t, k in zip(times, r.kernel_times, strict=False)]
        gateway += [d for d in delays if d is not None]
        matched += sum(d is not None for d in delays)
        before += [b - a for a, b in itertools.pairwise(times) if a is not None and b is not None]
        # What the gateway added to each ITL: how much later than the one before it this token
        # left the gateway, relative to when Redis sent it.
        pairs = [
            (b - a, t)
            for a, b, t in zip(delays, delays[1:], times[1:], strict=False)
            if a is not None and b is not None and t is not None
        ]
        added += [d for d, _ in pairs]
        for d, t in pairs:
            by_phase[(t >= phases[0]) + (t >= phases[1])].append(d)
    return {
        "observed": float(matched),
        **spread("gateway", gateway),
        **spread("added_itl", added),
        **spread("added_itl_opening", by_phase[0]),
        **spread("added_itl_held", by_phase[1]),
        **spread("added_itl_ending", by_phase[2]),
        **spread("sent_itl", before),
    }


def spread(name: str, seconds: list[float]) -> dict[str, float]:
    """``<name>_p50_ms``, ``<name>_p99_ms`` and ``<name>_max_ms`` of ``seconds``."""
    return {
        f"{name}_p50_ms": pct(seconds, 50) * 1000,
        f"{name}_p99_ms": pct(seconds, 99) * 1000,
        f"{name}_max_ms": max(seconds, default=0) * 1000,
    }


async def idle_websockets(url: str, count: int, gw_pids: list[int]) -> dict[str, float]:
    base = rss_kb(gw_pids)
    ws_url = url.replace("http://", "ws://") + "/v1/ws"
    connector = aiohttp.TCPConnector(limit=0)
    opened = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = []
        for _ in range(count):
            try:
                sockets.append(await session.ws_connect(ws_url, heartbeat=None))
                opened += 1
            except (aiohttp.ClientError, TimeoutError):
                break
        await asyncio.sleep(2)  # let the gateway settle before measuring
        held = rss_kb(gw_pids)
        alive = sum(not ws.closed for ws in sockets)
        for ws in sockets:
            await ws.close()
    return {
        "websockets": count,
        "opened": opened,
        "alive": alive,
        "kb_per_socket": (held - base) / max(1, opened),
    }


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def measure(args: argparse.Namespace, processes: int, first: bool) -> dict[str, Any]:
    """One run on a fresh stack: the gateway with ``processes`` processes, on the cores ``args``
    lays out. The idle WebSockets and ``--dump`` are the ``first`` run's only."""
    layout = Cores.each if args.core_each else Cores.shared
    cores = layout(args.clients, processes, max(1, args.cluster), args.workers)
    tmp = Path(tempfile.mkdtemp(prefix="bw-streams-"))
    redis: RedisServer | LocalCluster
    if args.cluster:
        redis = LocalCluster(tmp / "cluster", primaries=args.cluster, replicas=0)
        redis.start()
        servers = [node.proc.pid for node in redis.nodes if node.proc is not None]
    else:
        redis = RedisServer(tmp / "redis")
        redis.start()
        assert redis.proc is not None
        servers = [redis.proc.pid]
    for pid, cpus in zip(servers, cores.redis, strict=True):
        pin(pid, cpus)
    procs = []
    try:
        port = free_port()
        env = {
            "BREAKWATER_REDIS_URL": redis.url,
            "BREAKWATER_KEY_PREFIX": "streams",
            "BREAKWATER_LOG_LEVEL": "WARNING",
            "BREAKWATER_LANE_MAX_QUEUED": str(args.streams * 2),
            "BREAKWATER_SIM_DECODE_BASE_MS": str(args.step_ms),
            "BREAKWATER_SIM_DECODE_PER_SEQ_MS": "0",
            "BREAKWATER_SIM_PREFILL_MS_PER_TOKEN": "0",
            "BREAKWATER_SIM_JITTER_FRAC": "0",
        }
        # The gateway and the processes it starts inherit its cores; each is then held to its own.
        with pinned(set().union(*cores.gateway)):
            gw = spawn(["gateway", "--port", str(port), "--workers", str(processes)], env, tmp / "gw.log")
        procs.append(gw)
        capacity = str(-(-args.streams // args.workers) + 16)
        metrics = [free_port() for _ in range(args.workers)]
        for i in range(args.workers):
            with pinned(cores.workers[i]):
                worker = spawn(
                    ["worker", "--engine", "sim", "--model", "sim", "--capacity", capacity],
                    {**env, "BREAKWATER_WORKER_ID": f"w{i}", "BREAKWATER_METRICS_PORT": str(metrics[i])},
                    tmp / f"w{i}.log",
                )
            procs.append(worker)
        url = f"http://127.0.0.1:{port}"
        wait_models(url, "sim")
        gw_pids = wait_listening(gw.pid, processes, port)
        if len(cores.gateway) == len(gw_pids):
            for pid, cpus in zip(gw_pids, cores.gateway, strict=True):
                pin(pid, cpus)
        shared = {f"redis {i}" if args.cluster else "redis": pid for i, pid in enumerate(servers)}
        shared |= {f"worker {i}": w.pid for i, w in enumerate(procs[1:])}
        observer = Observer(redis.url, env["BREAKWATER_KEY_PREFIX"]) if args.observe else None
        dump = args.dump if first else ""
        os.sched_setaffinity(0, cores.clients[0])
        streams = run(
            hold_streams(
                url,
                args.streams,
                args.tokens,
                args.ramp_s,
                gw_pids,
                shared,
                dump,
                observer,
                cores.clients,
                args.step_ms,
            )
        )
        streams["processes"] = processes
        streams["layout"] = cores.describe()
        streams["publish"] = [step_publish_ms(metrics, q) for q in (0.5, 0.99)]
        websockets = args.websockets if first else 0
        streams["sockets"] = asyncio.run(idle_websockets(url, websockets, gw_pids)) if websockets else None
    finally:
        stop(procs)
        redis.stop()
    return streams


def report(runs: list[dict[str, Any]], workers: int, step_ms: float) -> list[str]:
    many = len(runs) > 1
    lines = [
        f"{platform.machine()}, {os.cpu_count()} cores; {runs[0]['layout']}; {workers} sim workers, "
        f"a decode step of {step_ms:g} ms (one token per stream per step).",
        "",
        "| gateway processes | streams | exact | errors "
        f"| ITL p50 / p99 / max (ms; the engine's step is {step_ms:g}) | gateway KB per stream "
        "| gateway tokens per CPU-s | CPU-s per process | tokens/s delivered: whole run · busiest second |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['processes']} | {r['streams']} | {r['exact']} | {r['errors']:.0f} {r['error_kinds']} | "
            f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} / {r['itl_max_ms']:.0f} | "
            f"{r['kb_per_stream']:.1f} | {r['tokens_per_cpu_s']:,.0f} | "
            + " · ".join(f"{c:.2f}" for c in r["gw_cpu_each"])
            + f" | {r['delivered_tokens_s']:,.0f} · {r['peak_tokens_s']:,.0f} |"
        )
    for r in runs:
        publish = r["publish"]
        lines += [
            "",
            (f"**{r['processes']} gateway process(es).** " if many else "")
            + f"The same events' ITL as the client's kernel received them (`SO_TIMESTAMPNS`; the client "
            f"read them later, by however long it waited for its core): p50 {r['kernel_p50_ms']:.0f}, "
            f"p99 {r['kernel_p99_ms']:.0f}, max {r['kernel_max_ms']:.0f} ms.",
            "",
            f"The workers took p50 <= {publish[0]:.0f} ms and p99 <= {publish[1]:.0f} ms (histogram bucket "
            "bounds) to publish a step's tokens, which the next step waits for: that much of each ITL is "
            "the workers' and Redis's, before the gateway has the tokens.",
            "",
            f"While the streams were held: the gateway's processes {100 * r['gw_busy']:.0f}% of a core; "
            + ", ".join(f"{label} {100 * share:.0f}%" for label, share in r["cpu0"].items())
            + f" (together {100 * sum(r['cpu0'].values()):.0f}% of a core). The most descriptors each "
            "gateway process held (its share of the connections): "
            + " · ".join(f"{n:,}" for n in r["gw_fds_each"])
            + ".",
        ]
        if "observed" in r:
            lines += [
                "",
                f"Split at Redis's send ({r['observed']:,.0f} tokens seen by a Pub/Sub observer, "
                "kernel-timed): from Redis's send to the client's kernel (the gateway's share) p50 "
                f"{r['gateway_p50_ms']:.1f}, p99 {r['gateway_p99_ms']:.1f}, max "
                f"{r['gateway_max_ms']:.0f} ms; what it added to each ITL (a token's delay less "
                f"the one before it) p50 {r['added_itl_p50_ms']:.1f}, p99 "
                f"{r['added_itl_p99_ms']:.1f} ms (p99 while streams were being opened "
                f"{r['added_itl_opening_p99_ms']:.1f}, while all were held and none opened or ended "
                f"{r['added_itl_held_p99_ms']:.1f}, while they ended {r['added_itl_ending_p99_ms']:.1f}); "
                "the ITL as Redis sent the tokens (the workers' and "
                f"Redis's) p50 {r['sent_itl_p50_ms']:.0f}, p99 {r['sent_itl_p99_ms']:.0f}, "
                f"max {r['sent_itl_max_ms']:.0f} ms.",
            ]
        if (sockets := r["sockets"]) is not None:
            lines += [
                "",
                f"Idle WebSockets: {sockets['opened']:.0f} of {sockets['websockets']:.0f} opened, "
                f"{sockets['alive']:.0f} still open after 2 s, "
                f"{sockets['kb_per_socket']:.1f} KB of gateway memory each.",
            ]
    if many:
        least = min(runs, key=lambda r: r["processes"])
        lines += [
            "",
            "With a core per gateway process (projected: each run's tokens over the CPU-seconds of its "
            "busiest process, the rate at which that process would saturate its core with the streams "
            "spread as they were): "
            + ", ".join(
                f"{r['processes']} process(es) {r['capacity_tokens_s']:,.0f} tokens/s "
                f"({r['capacity_tokens_s'] / least['capacity_tokens_s']:.2f}x {least['processes']})"
                for r in runs
            )
            + ".",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--ramp-s", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--websockets", type=int, default=10_000)
    parser.add_argument(
        "--gateway-processes", default="1", help="comma-separated counts, one run each (gateway --workers N)"
    )
    parser.add_argument(
        "--core-each", action="store_true", help="a core for every process (see above), not two shared"
    )
    parser.add_argument("--step-ms", type=float, default=1000.0, help="the sim engine's decode step")
    parser.add_argument("--clients", type=int, default=1, help="client processes reading the streams")
    parser.add_argument(
        "--cluster", type=int, default=0, help="a Redis Cluster of this many primaries (0: one Redis)"
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--dump", default="", help="write every stream's event times (JSON) here (the first run's)"
    )
    parser.add_argument(
        "--observe",
        action="store_true",
        help="also subscribe to every token channel, to split each token's delay at Redis's send "
        "(Redis then sends every token twice)",
    )
    args = parser.parse_args()
    if args.cluster and args.observe:
        parser.error("--observe subscribes on one Redis: not with --cluster")
    counts = [int(n) for n in args.gateway_processes.split(",")]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    os.sched_setaffinity(0, {0})
    runs = [measure(args, n, first=i == 0) for i, n in enumerate(counts)]
    cmd = "python benchmarks/streams.py " + " ".join(sys.argv[1:])
    text = "\n".join([*report(runs, args.workers, args.step_ms), "", f"Command: `{cmd.strip()}`"])
    print(text)
    if not args.no_write:
        write_section("streams", text)


if __name__ == "__main__":
    main()
