"""A resuming streaming client and the books of a chaos run.

Each request is a streaming completion of the sim model with a known seed, so its undisturbed text
is known. The client behaves as a production client should: it submits with an ``Idempotency-Key``
(a retried submission never enqueues twice), retries 503s and refused connections on another
gateway, and when a stream breaks it resumes from the last ``id`` it saw (``Last-Event-ID``) on the
next gateway. Every received ``(seq, text)`` is kept, so gaps and duplicates are visible.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.helpers import expected_sim

RESULTS = Path(__file__).resolve().parents[2] / "results" / "chaos"


@dataclass
class Outcome:
    index: int
    final: str = "lost"  # done | error | rejected | lost
    rid: str = ""
    events: list[tuple[int, str]] = field(default_factory=list)  # (seq, text) of token events, as received
    token_times: list[float] = field(default_factory=list)
    error: dict[str, Any] | None = None
    last_seq: int = 0  # the last event id received: where a resume starts
    resumes: int = 0
    submits: int = 0
    statuses: list[int] = field(default_factory=list)
    retry_after: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.events)

    @property
    def duplicates(self) -> int:
        seqs = [s for s, _ in self.events]
        return len(seqs) - len(set(seqs))

    @property
    def gaps(self) -> bool:
        seqs = [s for s, _ in self.events]
        return seqs != list(range(1, len(seqs) + 1))


@dataclass
class Spec:
    prompt: str
    seed: int
    max_tokens: int

    def body(self) -> dict[str, Any]:
        return {
            "model": "sim",
            "prompt": self.prompt,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }

    def expected(self) -> str:
        return expected_sim(prompt=self.prompt, seed=self.seed, max_tokens=self.max_tokens, ignore_eos=True)[
            0
        ]


class ResumingClient:
    def __init__(
        self, gateways: list[str], *, deadline_s: float = 90.0, read_timeout_s: float = 10.0
    ) -> None:
        self.gateways = gateways  # the list may change while running (restarts)
        self.deadline_s = deadline_s
        self._next = itertools.count()
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=read_timeout_s))

    def gateway(self) -> str:
        return self.gateways[next(self._next) % len(self.gateways)]

    async def close(self) -> None:
        await self.http.aclose()

    async def run(self, index: int, spec: Spec, key: str) -> Outcome:
        out = Outcome(index)
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline and out.final == "lost":
            url = self.gateway()
            try:
                if not out.rid:
                    out.submits += 1
                    request = self.http.stream(
                        "POST", f"{url}/v1/completions", json=spec.body(), headers={"Idempotency-Key": key}
                    )
                else:
                    out.resumes += 1
                    request = self.http.stream(
                        "GET",
                        f"{url}/v1/requests/{out.rid}/events",
                        headers={"Last-Event-ID": str(out.last_seq)},
                    )
                async with request as resp:
                    out.statuses.append(resp.status_code)
                    if resp.status_code == 429:
                        out.retry_after.append(float(resp.headers.get("retry-after", "nan")))
                        out.final = "rejected"
                        return out
                    if resp.status_code != 200:
                        await resp.aread()
                        if resp.status_code == 404 and out.rid:
                            return out  # the request is gone: counted as lost
                        await asyncio.sleep(float(resp.headers.get("retry-after", "0.2")) / 4)
                        continue
                    out.rid = out.rid or resp.headers["x-breakwater-request-id"]
                    await self._read(resp, out)
            except (httpx.HTTPError, OSError):
                await asyncio.sleep(0.1)  # the gateway went away: resume on the next one
        return out

    async def _read(self, resp: httpx.Response, out: Outcome) -> None:
        seq = out.last_seq
        async for line in resp.aiter_lines():
            if line.startswith("id: "):
                seq = int(line[4:])
            elif line == "data: [DONE]":
                out.final = "done"
                return
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])
                if "error" in data:
                    out.final, out.error = "error", data["error"]
                    return
                for choice in data.get("choices") or []:
                    if choice.get("text"):
                        out.events.append((seq, choice["text"]))
                        out.token_times.append(time.monotonic())
                out.last_seq = seq  # only once the event's data is in: a cut mid-event resumes before it


@dataclass
class Books:
    scenario: str
    submitted: int
    completed: int
    errored: int
    rejected: int
    lost: int
    wrong_text: int
    duplicated_tokens: int
    gaps: int
    recovery_s: float  # the longest pause any client saw between two tokens
    errors: dict[str, int]

    def balanced(self) -> bool:
        return self.submitted == self.completed + self.errored + self.rejected

    def save(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{self.scenario}.json").write_bytes(orjson.dumps(self.__dict__))


def books(scenario: str, specs: list[Spec], outcomes: list[Outcome]) -> Books:
    errors: dict[str, int] = {}
    wrong = 0
    for spec, out in zip(specs, outcomes, strict=True):
        if out.final == "error":
            code = str((out.error or {}).get("code"))
            errors[code] = errors.get(code, 0) + 1
        if out.final == "done" and out.text != spec.expected():
            wrong += 1
    pauses = [b - a for o in outcomes for a, b in itertools.pairwise(o.token_times)]
    result = Books(
        scenario=scenario,
        submitted=len(outcomes),
        completed=sum(o.final == "done" for o in outcomes),
        errored=sum(o.final == "error" for o in outcomes),
        rejected=sum(o.final == "rejected" for o in outcomes),
        lost=sum(o.final == "lost" for o in outcomes),
        wrong_text=wrong,
        duplicated_tokens=sum(o.duplicates for o in outcomes),
        gaps=sum(o.gaps for o in outcomes if o.final == "done"),
        recovery_s=round(max(pauses, default=0.0), 2),
        errors=errors,
    )
    result.save()
    return result


async def load(client: ResumingClient, specs: list[Spec], *, rate: float, tag: str) -> list[Outcome]:
    """Start one request every ``1/rate`` s (open loop) and wait for all of them."""
    tasks = []
    for i, spec in enumerate(specs):
        tasks.append(asyncio.create_task(client.run(i, spec, f"{tag}-{i}")))
        await asyncio.sleep(1.0 / rate)
    return list(await asyncio.gather(*tasks))


def make_specs(tag: str, n: int, max_tokens: int = 30) -> list[Spec]:
    return [Spec(f"chaos {tag} {i}", 1000 + i, max_tokens) for i in range(n)]
