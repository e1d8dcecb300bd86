"""Result files: ``result.json`` (vLLM-style field names), ``requests.jsonl``, PNG plots, ``report.html``.

Plots need matplotlib (``pip install 'breakwater[bench]'``); without it the other files are written.
"""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from breakwater.bench.metrics import RequestRecord, itls, percentile
from breakwater.bench.runner import RunResult

PLOTS = ("latency_over_time.png", "throughput.png", "queue_depth.png", "ttft_cdf.png")


def per_second(result: RunResult) -> list[dict[str, float]]:
    """Client-side time series: sends, completions, output tokens and latency percentiles per second."""
    seconds = math.ceil(result.duration_s) + 1 if result.records else 0
    rows = [{"t": float(s), "sent": 0.0, "completed": 0.0, "output_tokens": 0.0} for s in range(seconds)]
    ttfts: list[list[float]] = [[] for _ in range(seconds)]
    for r in result.records:
        start = min(seconds - 1, int(r.start_s))
        rows[start]["sent"] += 1
        if r.ok and r.e2e_s is not None:
            end = min(seconds - 1, int(r.start_s + r.e2e_s))
            rows[end]["completed"] += 1
            if r.ttft_s is not None:
                ttfts[end].append(r.ttft_s * 1000)
        for c in r.chunk_s:  # tokens spread over the seconds they streamed in (one per chunk)
            rows[min(seconds - 1, int(r.start_s + c))]["output_tokens"] += 1
    for row, values in zip(rows, ttfts, strict=True):
        for q in (50, 99):
            row[f"p{q}_ttft_ms"] = percentile(values, q) if values else math.nan
    return rows


def failure_message(records: list[RequestRecord]) -> str:
    """Why a run completed nothing: the most common error and what the server said about it."""
    errors = Counter(r.error for r in records if r.error)
    if not errors:
        return f"none of the {len(records)} requests completed"
    error, count = errors.most_common(1)[0]
    example = next(r for r in records if r.error == error)
    status = f" (HTTP {example.status})" if example.status else ""
    detail = f": {example.error_detail}" if example.error_detail else ""
    return f"all {len(records)} requests failed; the most common error, on {count}: {error}{status}{detail}"


def write(result: RunResult, summary: dict[str, Any], config: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    client_series = per_second(result)
    doc = {
        **summary,
        "date": result.started_at,
        "config": config,
        "client_timeseries": client_series,
        "server_timeseries": result.timeseries,
    }
    files = [out / "result.json", out / "requests.jsonl"]
    files[0].write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    with files[1].open("wb") as fh:
        for record in result.records:
            fh.write(orjson.dumps(record.to_json()) + b"\n")
    files += _plots(result, client_series, out)
    html_path = out / "report.html"
    html_path.write_text(_html(summary, config, out, [p for p in files if p.suffix == ".png"]))
    files.append(html_path)
    return files


def _plots(result: RunResult, series: list[dict[str, float]], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = [out / name for name in PLOTS]
    t = [r["t"] for r in series]

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, [r["p50_ttft_ms"] for r in series], label="TTFT p50")
    ax.plot(t, [r["p99_ttft_ms"] for r in series], label="TTFT p99")
    ax.set(xlabel="time (s)", ylabel="ms", title="TTFT of requests completing each second")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, [r["output_tokens"] for r in series], label="output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(t, [r["sent"] for r in series], color="tab:orange", label="requests sent/s")
    ax.set(xlabel="time (s)", ylabel="tokens/s", title="Throughput")
    ax2.set_ylabel("requests/s")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    server = result.timeseries
    for key in ("breakwater_queue_depth", "breakwater_jobs_in_flight", "vllm:num_requests_waiting"):
        if any(key in row for row in server):
            ax.plot([row["t"] for row in server], [row.get(key, math.nan) for row in server], label=key)
    ax.set(xlabel="time (s)", ylabel="jobs", title="Queue depth (scraped from /metrics)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ttft = sorted(r.ttft_s * 1000 for r in result.records if r.ok and r.ttft_s is not None)
    ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))] if ttft else [])
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")
    fig.tight_layout()
    fig.savefig(paths[3], dpi=90)
    plt.close(fig)
    return paths


def _html(summary: dict[str, Any], config: dict[str, Any], out: Path, pngs: list[Path]) -> str:
    def rows(d: dict[str, Any]) -> str:
        return "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items()
        )

    images = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in pngs
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Breakwater bench report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}img{display:block;margin:1em 0}</style>"
        f"</head><body><h1>Breakwater bench report</h1><h2>Configuration</h2><table>{rows(config)}</table>"
        f"<h2>Results</h2><table>{rows(summary)}</table>"
        f"<h2>Plots</h2>{images or '<p>(matplotlib not installed)</p>'}"
        f"<p>Files in {html.escape(str(out))}: result.json, requests.jsonl.</p></body></html>"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers for the terminal summary."""
    keys = [
        ("completed / sent", f"{summary['completed']} / {summary['num_prompts']}"),
        ("errors", str(summary["errors"] or "none")),
        ("duration (s)", _fmt(summary["duration"])),
        ("request throughput (req/s)", _fmt(summary["request_throughput"])),
        ("output throughput (tok/s)", _fmt(summary["output_throughput"])),
        ("total throughput (tok/s)", _fmt(summary["total_token_throughput"])),
    ]
    for name in ("ttft", "tpot", "itl", "e2el"):
        keys.append(
            (
                f"{name.upper()} ms mean / p50 / p99",
                " / ".join(_fmt(summary[f"{k}_{name}_ms"]) for k in ("mean", "median", "p99")),
            )
        )
    if "request_goodput" in summary:
        keys.append(("goodput (req/s)", _fmt(summary["request_goodput"])))
    if "cache_hit_ratio" in summary:  # the server's response cache answered some (X-Breakwater-Cache)
        keys.append(("cache hit ratio", _fmt(summary["cache_hit_ratio"])))
        for kind, plural in (("hit", "hits"), ("miss", "misses")):
            keys.append(
                (
                    f"TTFT ms p50 / p99, cache {plural}",
                    " / ".join(_fmt(summary[f"{k}_ttft_{kind}_ms"]) for k in ("median", "p99")),
                )
            )
    for model, v in (summary.get("by_model") or {}).items():  # versions side by side (A vs B)
        keys.append(
            (
                f"{model}: share / errors / TTFT p50, p95 / TPOT p50, p95 ms / output tokens",
                f"{v['share']:.1%} / {v['error_rate']:.1%} / {_fmt(v['median_ttft_ms'])}, "
                f"{_fmt(v['p95_ttft_ms'])} / {_fmt(v['median_tpot_ms'])}, {_fmt(v['p95_tpot_ms'])} / "
                f"{_fmt(v['mean_output_tokens'])}",
            )
        )
    if summary.get("cost_per_1k_output_tokens") is not None:
        keys.append(("cost / 1k output tokens", _fmt(summary["cost_per_1k_output_tokens"])))
        keys.append(("cost / 1k total tokens", _fmt(summary["cost_per_1k_total_tokens"])))
    if (measured := summary.get("measured_cost")) is not None:
        keys.extend(_measured_rows(measured))
    keys.append(
        (
            "send lag p99 / max (ms)",
            f"{_fmt(summary['p99_send_lag_ms'])} / {_fmt(summary['max_send_lag_ms'])}",
        )
    )
    keys.append(("stream integrity errors", str(summary["integrity_errors"])))
    return keys


def _measured_rows(measured: dict[str, Any]) -> list[tuple[str, str]]:
    """The seed's cost model as measured: per 1k output tokens, its parts, and what was used."""
    usage, parts = measured["usage"], measured["cost_usd"]
    share = measured["share"] or {}
    cpu = usage["cpu_s"]
    busy = [r["busy_share"] for r in usage["replicas"] if r.get("busy_share") is not None]
    rows = [
        (f"measured cost / 1k output tokens ({measured['sku']})", _fmt(measured["per_1k_output_tokens"])),
        (
            "  share: accel. / gateway / worker / Redis mem / ops",
            " / ".join(
                f"{share.get(k, 0.0):.1%}" for k in ("gpu", "gateway", "worker", "redis_memory", "redis_ops")
            ),
        ),
        ("  run cost (USD)", _fmt(parts["total"])),
        (
            "  CPU s: gateway / worker / redis",
            " / ".join(_fmt(cpu.get(k, 0.0)) for k in ("gateway", "worker", "redis")),
        ),
        (
            "  Redis commands / mean memory (MB)",
            f"{usage['redis_commands']} / {usage['redis_memory_gb'] * 1e3:.1f}",
        ),
    ]
    if busy:
        rows.append(("  engine busy share per replica", " / ".join(f"{b:.0%}" for b in busy)))
    return rows


__all__ = ["PLOTS", "RequestRecord", "itls", "per_second", "table_rows", "write"]
