"""A measured service curve (issue #18: "per-replica service curves measured from the engines"): the
llamacpp engine's step time against batch size and prompt length, fitted to the simulator's model
(``capacity.ServiceCurve``: a fixed part per step, a part per running sequence, a part per prompt
token joining), so ``breakwater simulate`` and ``breakwater plan`` can run on what this machine's
engine does instead of the sim engine's illustrative defaults.

The engine is driven in-process (no gateway, no Redis): decode steps timed at each batch size once
every sequence is past its prompt, and first steps (the prompt's prefill) timed alone per length.

    .venv/bin/python benchmarks/curve.py     # ~1 minute; writes its section of docs/evaluation.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from pathlib import Path

import numpy as np

from breakwater.engines.base import GenerationRequest
from breakwater.engines.llamacpp import LlamaCppEngine
from breakwater.engines.models import DEFAULT_MODEL, bundled_gguf
from breakwater.engines.options import LlamaCppOptions
from common import write_section

ROOT = Path(__file__).resolve().parent.parent
EVALUATION = ROOT / "docs" / "evaluation.md"
WORDS = ["the", "sea", "is", "calm", "and", "the", "boats", "are", "out", "on", "the", "water"]


def prompt_of(engine: LlamaCppEngine, tokens: int) -> str:
    """Plain words, trimmed until the engine's tokenizer counts ``tokens`` (or just under)."""
    words = [WORDS[i % len(WORDS)] for i in range(tokens)]
    while len(engine.tokenize(" ".join(words), special=True)) > tokens:
        words.pop()
    return " ".join(words)


async def decode_step_s(engine: LlamaCppEngine, batch: int, steps: int) -> float:
    """Mean time of a decode step with ``batch`` sequences running (prompts already in)."""
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add(
            GenerationRequest(rid, prompt="The sea", temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
        )
    await engine.step()  # the prompts
    began = time.perf_counter()
    for _ in range(steps):
        await engine.step()
    spent = (time.perf_counter() - began) / steps
    for rid in ids:
        engine.cancel(rid)
    return spent


async def prefill_step_s(engine: LlamaCppEngine, tokens: int, repeats: int) -> float:
    """Median time of the first step of one sequence with a ``tokens``-token prompt."""
    times = []
    for r in range(repeats):
        rid = f"p{tokens}-{r}"
        engine.add(GenerationRequest(rid, prompt=prompt_of(engine, tokens), temperature=0.0, max_tokens=4))
        began = time.perf_counter()
        await engine.step()
        times.append(time.perf_counter() - began)
        engine.cancel(rid)
    return float(np.median(times))


async def measure(args: argparse.Namespace) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    engine = LlamaCppEngine(
        LlamaCppOptions(
            model="smollm2",
            model_path=str(bundled_gguf(DEFAULT_MODEL)),
            capacity=max(args.batches),
            context_length=1024,
            n_threads=args.threads,
            n_batch=max(args.prompts) + max(args.batches),
        )
    )
    await engine.start()
    try:
        await decode_step_s(engine, 1, 4)  # warm up
        decode = [(b, await decode_step_s(engine, b, args.steps)) for b in args.batches]
        prefill = [(p, await prefill_step_s(engine, p, 5)) for p in args.prompts]
    finally:
        await engine.close()
    return decode, prefill


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--prompts", default="32,128,256,512")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prompts = [int(p) for p in args.prompts.split(",")]
    decode, prefill = asyncio.run(measure(args))
    per_seq, base = np.polyfit([b for b, _ in decode], [t for _, t in decode], 1)
    one = decode[0][1] if decode[0][0] == 1 else base + per_seq
    per_token, _ = np.polyfit([p for p, _ in prefill], [t - one for _, t in prefill], 1)
    base, per_seq, per_token = max(base, 0.0), max(per_seq, 0.0), max(per_token, 0.0)
    rows = ["| step | measured ms | fitted ms |", "|---|---|---|"]
    for b, t in decode:
        rows.append(f"| decode, {b} running | {t * 1000:.1f} | {(base + per_seq * b) * 1000:.1f} |")
    for p, t in prefill:
        rows.append(
            f"| first step, {p}-token prompt | {t * 1000:.1f} | "
            f"{(base + per_seq + per_token * p) * 1000:.1f} |"
        )
    flags = (
        f"--capacity {max(args.batches)} --decode-base-ms {base * 1000:.2f} "
        f"--decode-per-seq-ms {per_seq * 1000:.3f} --prefill-ms-per-token {per_token * 1000:.4f}"
    )
    table = "\n".join(rows)
    print(table)
    print(flags)
    if args.no_write:
        return
    body = f"""## A measured service curve: llama.cpp on this CPU (issue #18)

`python benchmarks/curve.py`, {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads,
{time.strftime("%Y-%m-%d")}. The llamacpp engine with the bundled SmolLM2-135M (Q4_1), driven in-process:
decode steps at each batch size ({args.steps} steps each), first steps alone per prompt length
(median of 5), fitted to the simulator's step model: **{base * 1000:.2f} ms + {per_seq * 1000:.3f} ms per
running sequence + {per_token * 1000:.4f} ms per prompt token**.

{table}

For the simulator and the planner: `breakwater simulate ... {flags}` (and the same flags for
`breakwater plan`). A GPU's curve comes the same way from `vllm` steps on the GPU; none was
measured here (no accelerator was lent to this task).
"""
    write_section("curve", body, EVALUATION)


if __name__ == "__main__":
    main()
