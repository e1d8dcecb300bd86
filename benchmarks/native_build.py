"""llama.cpp compiled for this CPU (GGML_NATIVE=ON, what `make up` builds) against the portable build
(generic x86-64 flags, what pip builds by default and the Docker image ships), side by side.

Each build runs the llamacpp engine in its own process on the bundled model: N sequences decoding
64 tokens each (greedy, ``ignore_eos``), timed from the first step to the last; the section
``native-build`` of docs/benchmarks.md gets the table.

    # a native wheel beside the portable one in .venv:
    CMAKE_ARGS=-DGGML_NATIVE=ON pip wheel --no-deps --no-binary llama-cpp-python \\
        llama-cpp-python==<the .venv's version> -w /tmp/native
    pip install --no-deps --target /tmp/native-site /tmp/native/llama_cpp_python-*.whl
    python benchmarks/native_build.py --native-site /tmp/native-site [--streams 1,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section

MAX_TOKENS = 64


async def _measure(streams: int) -> dict[str, float]:
    import llama_cpp

    from breakwater.engines.base import GenerationRequest
    from breakwater.engines.llamacpp import LlamaCppEngine
    from breakwater.engines.options import LlamaCppOptions

    engine = LlamaCppEngine(LlamaCppOptions(capacity=max(8, streams)))
    await engine.start()
    try:
        for i in range(streams):
            engine.add(
                GenerationRequest(
                    f"r{i}",
                    prompt=f"Once upon a time, in story {i},",
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                    ignore_eos=True,
                )
            )
        done = tokens = 0
        started = time.perf_counter()
        while done < streams:
            for delta in await engine.step():
                tokens += delta.tokens
                done += delta.finished
        elapsed = time.perf_counter() - started
    finally:
        await engine.close()
    print(f"llama_cpp from {Path(llama_cpp.__file__).parent}", file=sys.stderr)
    return {"tokens_per_s": tokens / elapsed}


def _run(site: str | None, streams: int) -> dict[str, float]:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(streams)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = orjson.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--native-site", help="a folder holding the GGML_NATIVE build of llama_cpp")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(orjson.dumps(asyncio.run(_measure(args.child))).decode())
        return
    if not args.native_site:
        parser.error("--native-site is required (see the module docstring)")
    rows = []
    for streams in [int(s) for s in args.streams.split(",")]:
        best: dict[str, float] = {}
        for name, site in (("portable", None), ("native", args.native_site)):
            runs = [_run(site, streams)["tokens_per_s"] for _ in range(args.repeats)]
            best[name] = max(runs)
            print(f"{name:8s} streams={streams}: " + ", ".join(f"{r:.1f}" for r in runs), flush=True)
        ratio = best["native"] / best["portable"]
        rows.append(f"| {streams} | {best['portable']:.1f} | {best['native']:.1f} | {ratio:.2f}x |")
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    command = (
        f"python benchmarks/native_build.py --native-site /tmp/native-site --streams {args.streams} "
        f"--repeats {args.repeats}"
    )
    machine = f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {time.strftime('%Y-%m-%d')}"
    body = f"""## llama.cpp built for this CPU (`benchmarks/native_build.py`)

Command: `{command}` — {machine}. The llamacpp engine in process on SmolLM2-135M-Instruct Q4_1
(bundled), N sequences decoding {MAX_TOKENS} tokens each (greedy); best of {args.repeats} runs per
build. *portable*: llama-cpp-python built with its default generic x86-64 flags (what the Docker image
ships); *native*: the same version built with `GGML_NATIVE=ON` (what `make up` builds, for the CPU it
runs on).

| sequences | portable tok/s | native tok/s | native / portable |
|---|---|---|---|
""" + "\n".join(rows)
    write_section("native-build", body)
    print(body)


if __name__ == "__main__":
    main()
