"""The SSE renderer's CPU per token: token events through ``gateway.sse.sse_chunks`` (a plain chat
choice, the reader's path when a token does not go to the client from the fan-in's callback), in
process time, best of several passes; with ``--baseline-src``, another checkout's the same way, the
two alternating in separate processes. Nothing else runs: no Redis, no sockets, so a difference of
tens of nanoseconds per token shows, which the whole-layer benchmark (peers.py, ±10% between runs)
cannot resolve.

    python benchmarks/sse_cost.py [--baseline-src DIR] [--tokens 200000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def measure(tokens: int, passes: int) -> float:
    """Nanoseconds of process time per token, the best of ``passes``."""
    from breakwater.gateway.sse import ChoiceChunks, sse_chunks
    from breakwater.protocol.events import TokenEvent

    async def events() -> AsyncGenerator[TokenEvent, None]:
        for seq in range(1, tokens + 1):
            yield TokenEvent(seq, "token", text=" word")
        yield TokenEvent(tokens + 1, "done", finish_reason="stop")

    async def one() -> float:
        render = ChoiceChunks(rid="chatcmpl-x", model="m", created=1, chat=True, resumed=True)
        chunks = sse_chunks(
            events(), render, rid="chatcmpl-x", model="m", created=1, chat=True, include_usage=False
        )
        start = time.process_time()
        async for _ in chunks:
            pass
        return (time.process_time() - start) / tokens * 1e9

    return min(asyncio.run(one()) for _ in range(passes))


def _child(src: Path, tokens: int, passes: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import sse_cost; "
    code += f"print(sse_cost.measure({tokens}, {passes}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--baseline-src", type=Path, help="another checkout (its root), run as 'before'")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    systems = [("this checkout", SRC)]
    if args.baseline_src is not None:
        systems.insert(0, ("before", args.baseline_src.resolve() / "src"))
    for round_ in range(args.rounds):
        order = systems if round_ % 2 == 0 else systems[::-1]
        for name, src in order:
            print(f"round {round_ + 1}: {name}: {_child(src, args.tokens, args.passes):.0f} ns per token")


if __name__ == "__main__":
    main()
