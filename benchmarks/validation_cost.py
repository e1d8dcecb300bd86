"""What parsing and checking a request body costs the gateway: ``ChatCompletionRequest`` validation
(strict types, the messages' fields, tool results answering their calls) per request, in µs, for a
one-message chat and a 24-message agent conversation with tool calls. Each round runs this tree and,
with ``--baseline-src``, another checkout's ``src``, each in a fresh interpreter, alternated; the
best of ``--repeat`` timings of ``--number`` validations is kept.

    python benchmarks/validation_cost.py [--baseline-src DIR] [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"

MEASURE = r"""
import sys, timeit
sys.path.insert(0, sys.argv[1])
from breakwater.protocol.openai import ChatCompletionRequest
one = {"model": "m", "messages": [{"role": "user", "content": "Hello there, how are you?"}],
       "max_tokens": 64, "stream": True}
calls = {"role": "assistant", "content": None, "tool_calls": [
    {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in range(2)]}
turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"}, calls,
        {"role": "tool", "tool_call_id": "c0", "content": "21"},
        {"role": "tool", "tool_call_id": "c1", "content": "22"}, {"role": "user", "content": "and?"}]
agent = {"model": "m", "messages": turn * 4, "max_tokens": 64}
number, repeat = int(sys.argv[2]), int(sys.argv[3])
for body in (one, agent):
    run = lambda: ChatCompletionRequest.model_validate(body)
    best = min(timeit.repeat(run, number=number, repeat=repeat))
    print(f"{best / number * 1e6:.2f}", end=" ")
"""


def measure(src: Path, number: int, repeat: int) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), str(number), str(repeat)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [float(v) for v in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-src", type=Path, help="another checkout (its src/ is measured)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    trees = [("this tree", HERE)]
    if args.baseline_src is not None:
        trees.append(("baseline", args.baseline_src.resolve() / "src"))
    print("| round | tree | one-message chat µs | 24-message agent conversation µs |")
    print("|---|---|---|---|")
    for r in range(args.rounds):
        for name, src in trees if r % 2 == 0 else trees[::-1]:
            one, agent = measure(src, args.number, args.repeat)
            print(f"| {r + 1} | {name} | {one:.2f} | {agent:.2f} |")


if __name__ == "__main__":
    main()
