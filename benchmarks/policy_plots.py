"""The plots behind the seed's claims (issue #18), from the simulator, on the same setups as the tables
of ``benchmarks/policies.py`` and ``benchmarks/occupancy.py``:

- ``policies-burst.png``: the bursty Azure 2023 code hour (4x, 60 s start-up) under each policy family
  at its seed or default setting, and the fixed fleet that meets 95%: arrivals, TTFT p95 and
  replicas over time;
- ``policies-cost.png``: cost per 1k output tokens of each family's cheapest setting meeting 80, 95
  and 99% TTFT <= 1 s, on the code hour and on the synthetic day;
- ``occupancy-ttft.png``: batch occupancy against TTFT p95, pull and push, rising load.

    .venv/bin/python benchmarks/policy_plots.py     # ~2 minutes; writes docs/evaluation/*.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import occupancy
import policies
from breakwater.bench.metrics import percentile
from breakwater.capacity.simulator import DISPATCH, Result

PLOTS = policies.ROOT / "docs" / "evaluation"
LABELS = {  # policies.FAMILIES, as the legend names them
    "fixed": "fixed fleet",
    "hpa": "HPA (utilisation)",
    "keda": "KEDA (queue lag)",
    "keda-zero": "KEDA to zero (lag or busy)",
    "keda-zero-lagonly": "KEDA to zero (lag alone)",
    "adaptive": "Breakwater adaptive",
}
TARGETS = (0.80, 0.95, 0.99)
WINDOW_S = 15.0


def code_hour() -> policies.Setup:
    return policies.Setup(str(policies.TRACES / "AzureLLMInferenceTrace_code.csv"), 4.0, 150.0, 60.0, 1.0, 4)


def code_day() -> policies.Setup:
    return policies.Setup(
        str(policies.TRACES / "AzureLLMInferenceTrace_code.csv"), 2.0, 300.0, 60.0, 1.0, 2, 0.25
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def burst_plot(setup: policies.Setup, runs: dict[str, Result], path: Path) -> None:
    plt = _pyplot()
    fig, (rate_ax, ttft_ax, rep_ax) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    any_run = next(iter(runs.values()))
    end = max(r.arrival_s for r in any_run.requests)
    edges = [i * WINDOW_S for i in range(int(end // WINDOW_S) + 1)]
    counts = [0] * len(edges)
    for r in any_run.requests:
        counts[min(len(edges) - 1, int(r.arrival_s // WINDOW_S))] += 1
    rate_ax.step(edges, [c / WINDOW_S for c in counts], where="post", color="grey")
    rate_ax.set_ylabel("arrivals/s")
    for label, result in runs.items():
        windows: list[list[float]] = [[] for _ in edges]
        for r in result.requests:
            ttft = r.ttft_s if r.done_s >= 0 else 600.0  # unfinished: drawn at the cap
            windows[min(len(edges) - 1, int(r.arrival_s // WINDOW_S))].append(ttft)
        p95 = [min(percentile(w, 95), 600.0) if w else math.nan for w in windows]
        ttft_ax.step(edges, p95, where="post", label=label)
        series = [(s.t, s.replicas) for s in result.samples if s.t <= end]
        rep_ax.step([t for t, _ in series], [n for _, n in series], where="post", label=label)
    ttft_ax.axhline(setup.slo_ttft_s, color="black", lw=0.8, ls=":")
    ttft_ax.set_yscale("log")
    ttft_ax.set_ylabel(f"TTFT p95 (s), {WINDOW_S:g} s windows")
    rep_ax.set_ylabel("replicas")
    rep_ax.set_xlabel("seconds of replay (the code hour at 4x; 60 s start-up)")
    rep_ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cost_plot(panels: dict[str, list[policies.Point]], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    width = 0.13
    for ax, (title, points) in zip(axes, panels.items(), strict=True):
        for i, family in enumerate(policies.FAMILIES):
            xs, ys = [], []
            for j, target in enumerate(TARGETS):
                best = policies.best(points, family, target)
                x = j + (i - (len(policies.FAMILIES) - 1) / 2) * width
                if best is None:
                    ax.text(x, 0, "x", ha="center", va="bottom", fontsize=9, color=f"C{i}")
                else:
                    xs.append(x)
                    ys.append(best.usd_per_1k)
            ax.bar(xs, ys, width, color=f"C{i}")
        ax.set_xticks(range(len(TARGETS)), [f"{t:.0%} TTFT ≤ 1 s" for t in TARGETS])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("$ per 1k output tokens (x: not reached)")
    handles = [Patch(color=f"C{i}", label=LABELS[f]) for i, f in enumerate(policies.FAMILIES)]
    axes[0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def occupancy_plot(rows: list[occupancy.Row], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for dispatch in DISPATCH:
        mine = [r for r in rows if r.dispatch == dispatch]
        ax.plot([r.occupancy * 100 for r in mine], [r.ttft_p95_s for r in mine], marker="o", label=dispatch)
    ax.axvline(85, color="black", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("batch occupancy (%): running sequences over slots while stepping")
    ax.set_ylabel("TTFT p95 (s)")
    ax.set_title(f"{occupancy.REPLICAS} replicas, Poisson arrivals at rising rates", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=PLOTS)
    args = parser.parse_args()
    began = time.monotonic()
    args.out.mkdir(exist_ok=True)
    hour, day = code_hour(), code_day()
    with ProcessPoolExecutor(max_workers=2) as pool:
        hour_points = policies.sweep(hour, pool)
        print(f"code hour swept, {time.monotonic() - began:.0f} s", flush=True)
        fixed = policies.best(hour_points, "fixed", 0.95)
        settings = {
            f"fixed, {fixed.setting} (cheapest at 95%)" if fixed else "fixed, 8 replicas": (
                "fixed",
                float(fixed.setting.split()[0]) if fixed else 8.0,
            ),
            "HPA, utilisation 70%": ("hpa", 0.7),
            "HPA, utilisation 85%": ("hpa", 0.85),
            "KEDA, lag 5/pod": ("keda", 5.0),
            "KEDA to zero, lag 5/pod (lag or busy)": ("keda-zero", 5.0),
            "Breakwater adaptive (default)": ("adaptive", 1.0),
        }
        results = list(
            pool.map(
                policies.simulate,
                [hour] * len(settings),
                [f for f, _ in settings.values()],
                [v for _, v in settings.values()],
            )
        )
        burst_plot(hour, dict(zip(settings, results, strict=True)), args.out / "policies-burst.png")
        day_points = policies.sweep(day, pool)
        print(f"day swept, {time.monotonic() - began:.0f} s", flush=True)
        cost_plot(
            {"Azure 2023 code, one hour at 4x": hour_points, "a synthetic day of it": day_points},
            args.out / "policies-cost.png",
        )
        jobs = [(d, r) for r in occupancy.RATES for d in DISPATCH]
        rows = list(pool.map(occupancy.run, [d for d, _ in jobs], [r for _, r in jobs], [900.0] * len(jobs)))
        occupancy_plot(rows, args.out / "occupancy-ttft.png")
    print(f"wrote {args.out}, {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
