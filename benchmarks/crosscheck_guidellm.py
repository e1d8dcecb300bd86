"""Cross-check ``breakwater bench`` against guidellm on the same ``sim-server``, same load.

guidellm needs torch and transformers, so it lives in its own environment:

    python3 -m venv .venv-guidellm && .venv-guidellm/bin/pip install guidellm
    python benchmarks/crosscheck_guidellm.py [--rate 5] [--duration 20] [--decode-ms 20]

Definitions differ by name: guidellm's ITL is ``(latency - TTFT) / (output tokens - 1)`` (what
vLLM and ``breakwater bench`` call TPOT), and guidellm's TPOT is ``latency / output tokens``.
The table compares like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from breakwater.bench import Profile, Target, run_profile, summarize
from breakwater.bench.metrics import stats_ms
from breakwater.engines.prepare import hf_dir
from breakwater.redis_server import free_port
from common import ROOT, spawn, stop, wait_models, write_section

GUIDELLM = ROOT / ".venv-guidellm" / "bin" / "guidellm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # not a multiple of the decode step: arrivals then meet the step clock at every phase
    parser.add_argument("--rate", type=float, default=4.7)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--decode-ms", type=float, default=20.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tokenizer = hf_dir("smollm2-135m-instruct")  # guidellm sizes its synthetic prompts with a tokenizer
    if not GUIDELLM.exists() or not tokenizer.exists():
        raise SystemExit("needs .venv-guidellm (see the docstring) and `breakwater models prepare`")
    tmp = Path(tempfile.mkdtemp(prefix="bw-guidellm-"))
    port = free_port()
    server = spawn(
        ["sim-server", "--port", str(port), "--sim-decode-base-ms", str(args.decode_ms)],
        {"BREAKWATER_LOG_LEVEL": "WARNING"},
        tmp / "sim.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_models(url, "sim", 30)
        out = tmp / "guidellm.json"
        subprocess.run(
            [
                str(GUIDELLM),
                "run",
                *("--backend", f"kind=openai_http,target={url}"),
                *("--profile", f"kind=constant,rate={args.rate}"),
                *("--constraint", f"kind=max_duration,seconds={args.duration}"),
                *("--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16"),
                *("--tokenizer", f"kind=hf_auto,model={tokenizer}"),
                *("--output", f"kind=json,path={out}"),
                "--disable-console-interactive",
            ],
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
        )
        metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]
        theirs = {
            "TTFT mean": metrics["time_to_first_token_ms"]["successful"]["mean"],
            "TTFT p50": metrics["time_to_first_token_ms"]["successful"]["median"],
            "TTFT p95": metrics["time_to_first_token_ms"]["successful"]["percentiles"]["p95"],
            "TTFT p99": metrics["time_to_first_token_ms"]["successful"]["percentiles"]["p99"],
            "TPOT mean (guidellm: ITL)": metrics["inter_token_latency_ms"]["successful"]["mean"],
            "TPOT p50 (guidellm: ITL)": metrics["inter_token_latency_ms"]["successful"]["median"],
            "E2E mean": metrics["request_latency"]["successful"]["mean"] * 1000,
        }
        target = Target(url, "sim", "chat", metrics_url="off")
        profile = Profile(
            "constant", rate=args.rate, duration_s=args.duration, input_tokens=32, output_tokens=16
        )
        result = asyncio.run(run_profile(target, profile))
        s = summarize(result.records, duration_s=result.duration_s)
        # guidellm starts its clock when the request's headers start going out, after the connection
        # is acquired; vLLM's (and our) TTFT starts before that. Compare from the same instant:
        from_headers = [r.ttft_s - (r.headers_s or 0.0) for r in result.records if r.ok and r.ttft_s]
        aligned = stats_ms("ttft", from_headers)
        ours = {
            "TTFT mean": aligned["mean_ttft_ms"],
            "TTFT p50": aligned["median_ttft_ms"],
            "TTFT p95": aligned["p95_ttft_ms"],
            "TTFT p99": aligned["p99_ttft_ms"],
            "TPOT mean (guidellm: ITL)": s["mean_tpot_ms"],
            "TPOT p50 (guidellm: ITL)": s["median_tpot_ms"],
            "E2E mean": s["mean_e2el_ms"],
        }
        ours_raw_ttft = s["mean_ttft_ms"]
    finally:
        stop([server])
    overhead_ms = ours_raw_ttft - ours["TTFT mean"]
    command = " ".join(["python benchmarks/crosscheck_guidellm.py", *sys.argv[1:]])
    lines = [
        "## Cross-check with guidellm (`benchmarks/crosscheck_guidellm.py`)",
        "",
        f"Command: `{command}`, {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. "
        f"guidellm 0.8 and `breakwater bench`, one after the other, against `breakwater sim-server` "
        f"({args.decode_ms:g} ms decode step), constant {args.rate:g} req/s for {args.duration:g} s, "
        "streaming chat, 32-token prompts, 16 output tokens. Same definitions compared: guidellm's ITL "
        "is vLLM's TPOT, and guidellm's TTFT starts when the request headers start going out (after a "
        "connection is acquired), so TTFT here is measured from that instant too (`headers_s` in "
        "requests.jsonl); `breakwater bench`'s own TTFT starts before connecting, as vLLM's does. "
        f"Mean connect-and-send overhead before the headers in this run: {overhead_ms:.2f} ms.",
        "",
        "| metric (ms) | guidellm | breakwater bench | ratio |",
        "|---|---|---|---|",
    ]
    for key, value in theirs.items():
        lines.append(f"| {key} | {value:.2f} | {ours[key]:.2f} | {ours[key] / value:.3f} |")
    if not args.no_write:
        write_section("guidellm", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
