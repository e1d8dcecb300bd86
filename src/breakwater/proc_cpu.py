"""CPU seconds of the processes ``breakwater up`` started, read from ``/proc``, for its ``/metrics``.

A worker's engine may run in child processes of its own (vLLM's engine core), so each process is
counted with its descendants, running or exited. Where there is no ``/proc`` (not Linux) nothing is exported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of one process, or None if it is gone: user + system, its own and
    that of its children which exited and were waited for."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
    return int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICK  # utime stime cutime cstime


def tree_cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each of ``pids`` with all its descendants (those still running)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    totals: dict[int, float] = {}
    for root in pids:
        if root not in stats:
            continue
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            total += stats[pid][1]
            todo.extend(children.get(pid, ()))
        totals[root] = total
    return totals


class ProcessCPU(Collector):
    """``breakwater_process_tree_cpu_seconds_total{process, role, pid}`` for ``(name, role, pid)`` triples."""

    def __init__(self, processes: Callable[[], list[tuple[str, str, int]]]) -> None:
        self._processes = processes

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "breakwater_process_tree_cpu_seconds",
            "User + system CPU seconds of a process the supervisor started, with its children",
            labels=["process", "role", "pid"],
        )
        processes = self._processes()
        seconds = tree_cpu_seconds(pid for _, _, pid in processes)
        for name, role, pid in processes:
            if pid in seconds:
                family.add_metric([name, role, str(pid)], seconds[pid])
        yield family
