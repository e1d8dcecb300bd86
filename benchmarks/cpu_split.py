"""Where one core's CPU time went, by process and by kind of code, from ``perf record`` on that core.

perf's ``cpu-clock`` samples land only on a thread that is running, so with several processes on one
core (peers.py's system under test) each sample is CPU that process spent. py-spy, which reads a
process from outside, is biased toward system calls on this machine (docs/benchmarks.md, session 28)
and on a shared core also counts a process while it waits for the core.

Kinds of code, by the shared object a sample's instruction is in: the Python interpreter (bytecode,
objects, memory), compiled extensions (uvloop, orjson, hiredis, ...), libc, the kernel (system calls,
TCP, scheduling), a memory allocator, and the rest (a server's own binary: Redis, nginx).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

KINDS = (
    ("interpreter", ("libpython", "python3")),
    ("extensions", (".cpython-",)),
    ("libc", ("libc.so", "libm.so", "ld-linux", "[vdso]")),
    ("allocator", ("libjemalloc",)),
    ("kernel", ("[kernel",)),
)
OWN = "own binary"


def available() -> bool:
    return shutil.which("perf") is not None


def kind(dso: str) -> str:
    return next((k for k, marks in KINDS if any(m in dso for m in marks)), OWN)


def process_tree(root: int) -> dict[int, list[str]]:
    """The ``/proc/<pid>/stat`` fields after the name (state, ppid, ...) of ``root`` and of every live
    process below it, by pid."""
    stats: dict[int, list[str]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, f in stats.items() if int(f[1]) == parent and pid not in tree]
        tree.update(kids)
        frontier += kids
    return {pid: stats[pid] for pid in tree if pid in stats}


def threads(root: int) -> set[int]:
    """The thread ids of ``root`` and of every live process below it."""
    out: set[int] = set()
    for pid in process_tree(root):
        try:
            out.update(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return out


class CoreRecorder:
    """``perf record`` of every thread on ``cpu`` while it runs (perf itself on ``perf_cpu``)."""

    def __init__(self, cpu: int, out: Path, perf_cpu: int, hz: int = 999) -> None:
        self.out = out
        argv = ["taskset", "-c", str(perf_cpu), "perf", "record", "-q", "-C", str(cpu)]
        argv += ["-e", "cpu-clock", "-F", str(hz), "-o", str(out)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # perf writes its data when interrupted
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def split(data: Path, labels: dict[int, str]) -> dict[str, dict[str, float]]:
    """Share of all samples (0..1) per label and kind of code; the idle core counts as ``idle``, a
    thread not in ``labels`` (a kernel thread, another process) as ``other``."""
    argv = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none"]
    report = subprocess.run(
        [*argv, "--sort", "pid,dso", "--field-separator", "\t"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for line in report.splitlines():
        parts = [part.strip() for part in line.split("\t")]
        if line.startswith("#") or len(parts) < 3 or not parts[0].endswith("%"):
            continue
        tid = int(parts[1].split(":", 1)[0])
        out["idle" if tid == 0 else labels.get(tid, "other")][kind(parts[2])] += (
            float(parts[0].rstrip("%")) / 100
        )
    return {label: dict(kinds) for label, kinds in out.items()}


def table(rows: list[tuple[str, dict[str, dict[str, float]]]]) -> list[str]:
    """Markdown: per run and process, its share of the core's busy samples, and how its own samples
    split by kind of code."""
    kinds = [k for k, _ in KINDS] + [OWN]
    out = [
        "| run | process | share of the busy core | " + " | ".join(kinds) + " |",
        "|---|---|---|" + "---|" * len(kinds),
    ]
    for run, shares in rows:
        busy = sum(sum(by_kind.values()) for label, by_kind in shares.items() if label != "idle") or 1.0
        for label, by_kind in sorted(shares.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(by_kind.values())
            if total < 0.005 * busy or label == "idle":
                continue
            cells = " | ".join(f"{100 * by_kind.get(k, 0) / total:.0f}%" for k in kinds)
            out.append(f"| {run} | {label} | {100 * total / busy:.1f}% | {cells} |")
    return out
