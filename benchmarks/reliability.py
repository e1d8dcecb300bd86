"""Write the chaos suite's books (results/chaos/*.json, written by ``pytest tests/chaos``) into
docs/reliability.md.

    .venv/bin/pytest tests/chaos && python benchmarks/reliability.py
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, write_section

DOC = ROOT / "docs" / "reliability.md"
SCENARIOS = {
    "1-sigkill-workers": "SIGKILL the worker of a mid-stream request, 4 times (a supervisor restarts them)",
    "2-sigkill-gateway": "SIGKILL one of two gateways mid-stream; clients resume on the other",
    "3-redis-restart": "Redis crashes (SIGKILL) and restarts from its AOF (fsync always)",
    "4-redis-down-10s": "Redis crashes and stays down for 10 s, then restarts",
    "5-poison": (
        "one job crashes the engine on every attempt; counted: the 39 innocent jobs beside it "
        "(the poison job itself was dead-lettered with error `max_attempts_exceeded`)"
    ),
    "6-burst": "300 requests at once against a lane bound of 30 queued jobs (100 ms steps)",
    "7-rolling-restart": "SIGTERM every worker, then both gateways, one at a time, under load",
    "8-slow-client": "a client reads its stream one byte at a time while 40 others stream",
    "9-redis-full": "Redis at maxmemory with noeviction (OOM) for 3 s under load, then freed",
    "10-hung-engine-step": "one worker's engine step hangs (process alive); its jobs move on",
    "11-spot-preemption": "spot-style preemption: every 3 s half the workers get SIGTERM, SIGKILL 1 s later",
}


def main() -> None:
    folder = ROOT / "results" / "chaos"
    lines = [
        "## Chaos suite results",
        "",
        f"`.venv/bin/pytest tests/chaos && python benchmarks/reliability.py`, {platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Lost and duplicated must be 0; "
        "recovery = the longest pause any client saw between two tokens.",
        "",
        "| scenario | requests | completed | errors | rejected (429) | failed | lost | duplicated tokens "
        "| wrong text | recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, what in SCENARIOS.items():
        path = folder / f"{name}.json"
        if not path.exists():
            lines.append(f"| {name}: {what} | not run | | | | | | | | |")
            continue
        b = orjson.loads(path.read_bytes())
        errors = ", ".join(f"{k} x{v}" for k, v in b["errors"].items()) or "0"
        lines.append(
            f"| {name}: {what} | {b['submitted']} | {b['completed']} | {errors} | {b['rejected']} "
            f"| {b.get('failed', 0)} | {b['lost']} "
            f"| {b['duplicated_tokens']} | {b['wrong_text']} | {b['recovery_s']:.2f} s |"
        )
    write_section("chaos", "\n".join(lines), DOC)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
