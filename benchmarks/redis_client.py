"""CPU per Redis operation on the token path, redis-py beside the raw connections that replaced it.

Measures, in this process only (``time.process_time``; Redis runs on the other core):
- one script call and its reply: redis-py's client vs :class:`breakwater.broker.wire.PipelinedRedis`;
- receiving Pub/Sub messages: redis-py's ``PubSub.get_message`` vs the gateway's :class:`Fanin`.
And, with both processes on one core as in ``peers.py``'s layer, the CPU of both ends per raw
round trip over TCP and over Redis's unix socket (what ``breakwater up``'s processes use).

    python benchmarks/redis_client.py [--calls 5000] [--messages 50000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakwater.broker.connection import connect
from breakwater.broker.fanin import Fanin
from breakwater.broker.wire import Endpoint, PipelinedRedis
from breakwater.keys import Keys
from breakwater.proc_cpu import tree_cpu_seconds
from breakwater.redis_server import RedisServer
from common import write_section

PAYLOAD = "t12 1  hello"


async def script_calls(url: str, calls: int) -> tuple[float, float]:
    """Microseconds of CPU per EVALSHA round trip: (redis-py, raw pipelined)."""
    redis = connect(url)
    raw = PipelinedRedis(redis)
    sha = await raw.execute("SCRIPT", "LOAD", "return ARGV[1]")
    out = []
    for via_raw in (False, True):
        for i in range(200 + calls):
            if i == 200:
                started = time.process_time()
            if via_raw:
                await raw.execute("EVALSHA", sha, 0, "x")
            else:
                await redis.evalsha(sha, 0, "x")
        out.append((time.process_time() - started) / calls * 1e6)
    await raw.aclose()
    await redis.aclose()
    return out[0], out[1]


async def round_trips(endpoint: Endpoint, redis_pid: int, calls: int) -> tuple[float, float]:
    """Microseconds of CPU per raw round trip (``HSET`` + reply): (this process, Redis)."""
    raw = PipelinedRedis(endpoint)
    for i in range(200):
        await raw.execute("HSET", "bench:h", "f", i)
    started, redis_started = time.process_time(), tree_cpu_seconds([redis_pid])[redis_pid]
    for i in range(calls):
        await raw.execute("HSET", "bench:h", "f", i)
    used = time.process_time() - started
    redis_used = tree_cpu_seconds([redis_pid])[redis_pid] - redis_started
    await raw.aclose()
    return used / calls * 1e6, redis_used / calls * 1e6


async def _publish(url: str, channel: str, count: int) -> None:
    publisher = connect(url)
    raw = PipelinedRedis(publisher)
    for _ in range(0, count, 500):
        await raw.pipeline([("PUBLISH", channel, PAYLOAD)] * 500)
    await raw.aclose()
    await publisher.aclose()


async def pubsub_redis_py(url: str, count: int) -> float:
    """Microseconds of CPU per message received with redis-py (publisher in another process)."""
    redis = connect(url)
    pubsub = redis.pubsub()
    await pubsub.subscribe("bench:ch")
    await pubsub.get_message(timeout=1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--publish", url, "bench:ch", str(count)
    )
    got, started = 0, 0.0
    while got < count:
        message = await pubsub.get_message(timeout=5.0)
        if message is None:
            break
        if message["type"] == "message":
            if got == 0:
                started = time.process_time()
            got += 1
    used = time.process_time() - started
    await proc.wait()
    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis-py 8
    await redis.aclose()
    return used / max(1, got - 1) * 1e6


async def pubsub_fanin(url: str, count: int) -> float:
    """Microseconds of CPU per message routed by the gateway's fan-in to a subscription."""
    redis = connect(url)
    fanin = Fanin(redis, Keys("bench"), buffer=count + 1)
    await fanin.start()
    sub = await fanin.subscribe("r")
    channel = Keys("bench").channel("r")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--publish", url, channel, str(count)
    )
    while not sub.events:
        await asyncio.sleep(0.0005)
    started = time.process_time()
    deadline = time.monotonic() + 60
    while len(sub.events) < count and time.monotonic() < deadline:
        await sub.wait(1.0)
        await asyncio.sleep(0)
    used = time.process_time() - started
    await proc.wait()
    got = len(sub.events)
    await fanin.close()
    await redis.aclose()
    return used / max(1, got - 1) * 1e6


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--publish":  # the publisher child
        uvloop.run(_publish(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--round-trips", type=int, default=40_000, help="per transport and turn")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bw-rc-")) / "redis", unix_socket=True)
    server.start()
    trips: dict[str, list[tuple[float, float]]] = {"TCP": [], "unix socket": []}
    try:
        assert server.proc is not None and server.socket_path is not None
        os.sched_setaffinity(server.proc.pid, {0})
        py_call, raw_call = uvloop.run(script_calls(server.url, args.calls))
        py_msg = uvloop.run(pubsub_redis_py(server.url, args.messages))
        raw_msg = uvloop.run(pubsub_fanin(server.url, args.messages))
        os.sched_setaffinity(server.proc.pid, {1})  # one core for both, as the layer in peers.py
        tcp, unix = Endpoint("127.0.0.1", server.port), Endpoint(path=str(server.socket_path))
        for order in ((("TCP", tcp), ("unix socket", unix)), (("unix socket", unix), ("TCP", tcp))):
            for name, endpoint in order:
                trips[name].append(uvloop.run(round_trips(endpoint, server.proc.pid, args.round_trips)))
    finally:
        server.stop()
    trip = {name: (sum(c for c, _ in t) / len(t), sum(r for _, r in t) / len(t)) for name, t in trips.items()}
    (tcp_c, tcp_r), (unix_c, unix_r) = trip["TCP"], trip["unix socket"]
    text = "\n".join(
        [
            f"{platform.machine()}, {os.cpu_count()} cores; this process on CPU 1, Redis on CPU 0; "
            "CPU time of this process only.",
            "",
            "| operation | redis-py | raw (`broker/wire.py`, `broker/fanin.py`) | ratio |",
            "|---|---|---|---|",
            f"| one script call (EVALSHA + reply) | {py_call:.0f} µs | {raw_call:.0f} µs "
            f"| {py_call / raw_call:.1f}x |",
            f"| one Pub/Sub message received | {py_msg:.1f} µs | {raw_msg:.1f} µs "
            f"| {py_msg / raw_msg:.1f}x |",
            "",
            "Both on CPU 1, CPU of both ends per raw round trip (`HSET` and its reply; "
            f"{args.round_trips} a turn, two turns each in alternating order, averaged):",
            "",
            "| transport | this process | Redis | both |",
            "|---|---|---|---|",
            f"| TCP (127.0.0.1) | {tcp_c:.1f} µs | {tcp_r:.1f} µs | {tcp_c + tcp_r:.1f} µs |",
            f"| unix socket | {unix_c:.1f} µs | {unix_r:.1f} µs | {unix_c + unix_r:.1f} µs "
            f"({(unix_c + unix_r) / (tcp_c + tcp_r):.2f}x) |",
            "",
            f"Command: `{' '.join(['python benchmarks/redis_client.py', *sys.argv[1:]])}`",
        ]
    )
    print(text)
    if not args.no_write:
        write_section("redis-client", text)


if __name__ == "__main__":
    main()
