"""A test's side of ``/v1/ws``: JSON messages in and out, and what one socket saw of each request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection

from tests.fuzz.wire import SERVED

Message = dict[str, Any]
TERMINAL = frozenset({"done", "error"})


async def receive(ws: ClientConnection, timeout_s: float = 10.0) -> Message:
    """The next message, which must be a JSON object."""
    message = orjson.loads(await asyncio.wait_for(ws.recv(), timeout_s))
    assert isinstance(message, dict), message
    return message


async def send(ws: ClientConnection, data: Mapping[str, Any]) -> None:
    await ws.send(orjson.dumps(data).decode())


def is_refusal(message: Message) -> bool:
    """An error about a message as a whole (invalid, refused at admission): it names no request."""
    return message["type"] == "error" and message.get("request_id") is None


@dataclass
class Ledger:
    """What one socket received: the requests created, the submissions refused, and each request's
    terminal events (``done`` or ``error``; exactly one per request is the contract)."""

    created: list[str] = field(default_factory=list)
    refusals: list[Message] = field(default_factory=list)
    terminals: dict[str, list[Message]] = field(default_factory=dict)
    max_in_flight: int = 0  # created and not yet ended, as the client saw it

    @property
    def answered(self) -> int:
        """Submissions answered: created or refused."""
        return len(self.created) + len(self.refusals)

    @property
    def in_flight(self) -> int:
        return len(self.created) - len(self.terminals)

    def record(self, message: Message) -> None:
        if message["type"] == "created":
            self.created.append(message["request_id"])
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        elif is_refusal(message):
            self.refusals.append(message)
        elif message["type"] in TERMINAL:
            self.terminals.setdefault(message["request_id"], []).append(message)

    def summary(self) -> str:
        return f"{len(self.created)} created, {len(self.refusals)} refused, {len(self.terminals)} ended"

    def ended(self, rid: str) -> bool:
        return rid in self.terminals


async def receive_until(
    ws: ClientConnection, ledger: Ledger, done: Callable[[Ledger], bool], timeout_s: float = 30.0
) -> list[Message]:
    """Receive into ``ledger`` until ``done(ledger)``; every message received, in order."""
    seen: list[Message] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not done(ledger):
                message = await receive(ws, timeout_s)
                ledger.record(message)
                seen.append(message)
    except TimeoutError:
        raise AssertionError(
            f"the socket did not get there in {timeout_s}s; last messages: {seen[-5:]}; {ledger.summary()}"
        ) from None
    return seen


async def complete(ws: ClientConnection, prompt: str, timeout_s: float = 30.0) -> tuple[str, list[Message]]:
    """Submit a short completion of the served model and receive until it ends: (its id, every
    message received meanwhile, other requests' included)."""
    await send(ws, {"model": SERVED, "prompt": prompt, "max_tokens": 3})
    seen: list[Message] = []
    rid: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive(ws, timeout_s)
                seen.append(message)
                assert not is_refusal(message), message
                if rid is None and message["type"] == "created":
                    rid = message["request_id"]
                elif rid is not None and message.get("request_id") == rid and message["type"] in TERMINAL:
                    assert message["type"] == "done", message
                    return rid, seen
    except TimeoutError:
        raise AssertionError(
            f"{prompt!r} did not end in {timeout_s}s; the last messages: {seen[-5:]}"
        ) from None
