"""``breakwater probe`` against the local stack: WebSocket and SSE sessions through two gateways, each
dropped once and resumed; a gateway SIGKILLed mid-stream is reported (the broken stream, the session
recovered on the other gateway, later sessions' refused connections) and no token is lost or repeated."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from breakwater.redis_server import RedisServer, free_port
from tests.helpers import StackProcs, metric_samples, wait_for

TOKENS = 20
TRANSPORTS = ("websocket", "sse")


def _sessions(log: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]


def _count(url: str, name: str, **labels: str) -> float:
    return sum(metric_samples(url, name, **labels))


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def _waited(
    predicate: Callable[[], bool],
    timeout_s: float,
    interval_s: float,
    what: str,
    log: Path,
    procs: StackProcs,
) -> None:
    """``wait_for``, with the probe's own report (its sessions, their errors) and the end of each
    worker's log when the wait fails."""
    try:
        wait_for(predicate, timeout_s, interval_s, what)
    except AssertionError as exc:
        workers = "\n".join(
            f"worker {w.pid} ({'alive' if w.alive() else 'exited'}):\n{w.log()[-1500:]}"
            for w in procs.workers
        )
        raise AssertionError(f"{exc}; the probe printed:\n{_tail(log)}\n{workers}") from None


def _start_probe(command: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The probe with its /metrics on a free port, once that answers. A port found free can be
    taken (by any process's outgoing connection) before the probe binds it: then another one."""
    for _ in range(3):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log, "wb") as out:
            probe = subprocess.Popen(
                [*command, "--metrics-port", str(port)], stdout=out, stderr=subprocess.STDOUT
            )

        def listening(probe: subprocess.Popen[bytes] = probe, url: str = url) -> bool:
            if probe.poll() is not None:
                return True
            try:
                resp = httpx.get(f"{url}/metrics", timeout=1)
            except httpx.HTTPError:
                return False
            # (Another server on the port: wait for the probe to exit.)
            return resp.status_code == 200 and "breakwater_probe_sessions_total" in resp.text

        wait_for(listening, 30, 0.05, "the probe's /metrics")
        if probe.poll() is None:
            return probe, url
        if "Address already in use" not in _tail(log):
            raise AssertionError(f"the probe exited: {_tail(log)}")
    raise AssertionError("no free port for the probe's /metrics in 3 tries")


def test_probe_reports_a_gateway_killed_mid_stream(redis_server: RedisServer, log_dir: Path) -> None:
    procs = StackProcs(redis_server.url, f"p{uuid.uuid4().hex[:10]}", log_dir)
    probe: subprocess.Popen[bytes] | None = None
    log = log_dir / f"probe-{uuid.uuid4().hex[:8]}.log"
    try:
        first, second = procs.add_gateway(), procs.add_gateway()
        procs.add_worker(sim_decode_base_ms=100, heartbeat_s=0.5)  # 20 tokens: about 2 s a session
        procs.wait_workers(first)
        base = [
            sys.executable,
            "-m",
            "breakwater",
            "probe",
            "--url",
            first,
            "--url",
            second,
            "--model",
            "sim",
        ]
        base += ["--max-tokens", str(TOKENS), "--timeout", "30"]
        # One round as a cron job would run it: each session drops its stream after 5 tokens and
        # resumes it; all tokens once, exit 0.
        once = subprocess.run(
            [*base, "--count", "1", "--drop-after", "5", "--metrics-port", "0"],
            capture_output=True,
            timeout=60,
        )
        assert once.returncode == 0, once.stdout + once.stderr
        rounds = [orjson.loads(line) for line in once.stdout.splitlines()]
        assert sorted(r["transport"] for r in rounds) == sorted(TRANSPORTS)
        for r in rounds:
            assert (r["outcome"], r["errors"], r["tokens"], len(r["resume_gap_ms"])) == (
                "success",
                [],
                TOKENS,
                1,
            )
        # Then probing on, without planned drops, while the first gateway is killed mid-stream.
        probe, probe_url = _start_probe([*base, "--interval", "0.2", "--drop-after", "0"], log)

        def healthy() -> bool:
            assert probe is not None and probe.poll() is None, "the probe exited"
            try:
                return all(
                    _count(probe_url, "breakwater_probe_sessions_total", transport=t, outcome="success") >= 1
                    for t in TRANSPORTS
                )
            except httpx.HTTPError:  # its /metrics is not listening yet
                return False

        _waited(healthy, 30, 0.1, "a successful session on each transport", log, procs)
        # Both sessions streaming from the first gateway.
        _waited(
            lambda: _count(first, "breakwater_active_streams") == 2,
            20,
            0.02,
            "two probe streams on it",
            log,
            procs,
        )
        procs.gateways[0][0].kill()

        def reported() -> bool:
            broken = [s for s in _sessions(log) if "stream_broken" in s["errors"]]
            refused = [s for s in _sessions(log) if s["errors"] and set(s["errors"]) == {"connect"}]
            return {s["transport"] for s in broken} == set(TRANSPORTS) and {
                s["transport"] for s in refused
            } == set(TRANSPORTS)

        _waited(
            reported, 30, 0.2, "the broken sessions and later ones refused by the dead gateway", log, procs
        )
    finally:
        if probe is not None:
            probe.terminate()
            probe.wait(10)
        procs.stop()
    sessions = _sessions(log)
    assert sessions and all(s["outcome"] != "failed" for s in sessions), sessions
    # Every session got its tokens exactly once (the probe checks each sequence number).
    assert all(s["tokens"] == TOKENS for s in sessions), sessions
    for transport in TRANSPORTS:
        broken = [s for s in sessions if s["transport"] == transport and "stream_broken" in s["errors"]]
        assert len(broken) == 1 and broken[0]["outcome"] == "recovered", broken
        # (A resume gap is counted unless the gateway died before the first token.)
        assert len(broken[0]["resume_gap_ms"]) <= 1
        clean = [s for s in sessions if s["transport"] == transport and not s["errors"]]
        assert clean and all(s["outcome"] == "success" and s["resume_gap_ms"] == [] for s in clean)
