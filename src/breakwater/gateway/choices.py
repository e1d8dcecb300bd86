"""``n > 1`` (or a text completion's list of prompts): one queued request per choice, merged into
one response.

The gateway admits a request's ``n`` choices as requests ``<rid>-0`` .. ``<rid>-<n-1>``, each with
the client's body, ``n = 1`` and its own seed (``seed + index`` when the client gave one), so every
guarantee of a single request (queueing and fair share, reclaim and continuation, fencing, cancel,
resume) holds per choice without the worker knowing. The response interleaves them by ``index``.
An SSE event's id is the position of every choice (``s0.s1.…``): ``Last-Event-ID`` gives it back
to resume them all. The group has no record of its own; each choice's record says how many there
are (``RequestSpec.choices``). A text completion with a list of prompts has ``n`` choices for each,
in OpenAI's order: choice ``i * n + j`` is prompt ``i``'s ``j``-th, with prompt ``i`` and the seed of
choice ``j`` (``RequestSpec.prompts`` says how many prompts)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from breakwater.broker.errors import TRANSIENT
from breakwater.broker.fanin import GatewayDraining
from breakwater.broker.record import Status
from breakwater.gateway import groups
from breakwater.gateway.admission import client_key, new_rid
from breakwater.gateway.autotools import ToolChunks
from breakwater.gateway.errors import APIError
from breakwater.gateway.following import RequestEnded, Submission
from breakwater.gateway.sse import DONE, KEEPALIVE, ChoiceChunks, collect_response, error_chunk, sse_event
from breakwater.gateway.streaming import LastChunk, joined
from breakwater.protocol.events import TokenEvent
from breakwater.protocol.openai import (
    INT64,
    MAX_GROUP,
    MAX_SEQ,
    ChatCompletionRequest,
    CompletionRequest,
    usage_body,
    usage_chunk,
)
from breakwater.protocol.toolformats import single_call, tags_of
from breakwater.stopping import stop_loops
from breakwater.tenancy import Principal

if TYPE_CHECKING:
    from breakwater.gateway.service import GatewayService

COALESCE_MAX = 64  # events per write at most
QUEUE_MAX = 64  # events buffered between the choices' readers and the response


def choice_rid(rid: str, index: int) -> str:
    return f"{rid}-{index}"


Sampled = ChatCompletionRequest | CompletionRequest


def choice_body(body: Sampled, index: int) -> Sampled:
    """The body of choice ``index``: one choice of one prompt, its own seed."""
    update: dict[str, Any] = {"n": 1}
    if isinstance(body, CompletionRequest) and not isinstance(body.prompt, str):
        prompt, index = divmod(index, body.n)
        update["prompt"] = body.prompt[prompt]
    seed = body.seed
    if seed is not None and index:
        seed = seed + index if seed + index < INT64 else seed - index
    return body.model_copy(update={**update, "seed": seed})


def prompt_count(body: Sampled) -> int:
    return len(body.prompts()) if isinstance(body, CompletionRequest) else 1


def choice_key(idempotency_key: str | None, index: int) -> str | None:
    return f"{idempotency_key}#{index}" if idempotency_key else None


@dataclass(slots=True)
class Choice:
    """One choice being followed (``sub``), or finished before a resume's position (``sub`` None)."""

    index: int
    rid: str
    after: int = 0
    sub: Submission | None = None
    usage: dict[str, int] | None = None


@dataclass(slots=True)
class ChoiceGroup:
    rid: str
    model: str
    chat: bool
    created: int
    include_usage: bool
    tool: str
    choices: list[Choice]
    headers: dict[str, str] = field(default_factory=dict)
    tool_format: str = ""
    logprobs: bool = False
    prompts: int = 1  # a text completion's prompts, each with len(choices) // prompts choices

    @classmethod
    def of(cls, rid: str, choices: list[Choice], prompts: int = 1) -> ChoiceGroup:
        first = next((c.sub for c in choices if c.sub is not None), None)
        if first is None:
            raise APIError(
                400, f"request `{rid}` is finished: every choice was delivered", param="Last-Event-ID"
            )
        return cls(
            rid,
            first.model,
            first.chat,
            first.created,
            first.include_usage,
            first.tool,
            choices,
            tool_format=first.tool_format,
            logprobs=first.logprobs,
            prompts=prompts,
        )

    def usage(self, usages: list[dict[str, int] | None]) -> dict[str, int]:
        """OpenAI's usage of the response: each prompt once, the completions summed."""
        return merged_usage(usages, len(self.choices) // self.prompts)


def is_seq(text: str) -> bool:
    """An SSE event id that is a sequence number (ASCII digits, within int64)."""
    return text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= MAX_SEQ


def parse_positions(last_event_id: str, n: int) -> list[int]:
    """A group's ``Last-Event-ID``: one seq per choice, dot-separated."""
    parts = last_event_id.split(".")
    if len(parts) != n or not all(is_seq(p) for p in parts):
        raise APIError(
            400,
            f"Last-Event-ID must be {n} sequence numbers separated by dots (one per choice)",
            param="Last-Event-ID",
        )
    return [int(p) for p in parts]


async def admit(
    svc: GatewayService,
    body: Sampled,
    *,
    request_id: str,
    idempotency_key: str | None,
    principal: Principal,
    client: Sampled | None = None,
) -> ChoiceGroup:
    """Queue every choice of ``body`` or none: a refusal (429, 400) takes back the ones queued.
    ``client``: the body as the client sent it, when ``body`` names the version an alias chose."""
    n, prompts = body.choice_count(), prompt_count(body)
    rid = new_rid("chat" if isinstance(body, ChatCompletionRequest) else "completion")
    first = choice_key(idempotency_key, 0)
    replay = client_key(principal, first, client or body) if first else None
    bodies = [choice_body(body, index) for index in range(n)]
    # Before any choice is queued: each one's context, and the limits for all of them as one arrival.
    rids = [choice_rid(rid, index) for index in range(n)]
    taken = await groups.admit_group(svc.admitter, bodies, rids, principal, prompts, replay)
    group = taken
    admitted: list[Submission] = []
    try:
        for index in range(n):
            sub = await svc.admitter.submit(
                bodies[index],
                request_id=request_id,
                # Each choice's key is bound to the client's whole body (n included), so a replay
                # with another body (another n) is refused, never half matched.
                idempotency_key=choice_key(idempotency_key, index),
                digest_of=client or body,
                principal=principal,
                rid=choice_rid(rid, index),
                choices=n,
                prompts=prompts,
                group=group,
            )
            admitted.append(sub)
            if index == 0 and sub.duplicate:  # an Idempotency-Key replay: the group it made first
                rid, group = group_of(sub.rid), None  # its choices were admitted by their limits then
                if taken is not None:
                    await groups.give_back(svc.admitter, taken, principal)
    except BaseException:
        for index, sub in enumerate(admitted):
            with contextlib.suppress(*TRANSIENT):
                if sub.duplicate:  # the original's choice: leave it running, only stop following it
                    await _let_go(svc, sub)
                else:
                    await svc.admitter.withdraw(
                        sub, choice_key(idempotency_key, index), client or body, principal
                    )
        raise
    finally:
        if taken is not None:  # what the choices not queued here took: given back
            await groups.give_back(svc.admitter, taken, principal)
    choices = [Choice(i, sub.rid, 0, sub) for i, sub in enumerate(admitted)]
    result = ChoiceGroup.of(rid, choices, prompts)
    result.headers = admitted[-1].headers | (group.headers if group is not None else {})
    return result


def group_of(first_choice: str) -> str:
    """The group a replayed first choice belongs to (its rid is ``<group>-0``)."""
    group, _, index = first_choice.rpartition("-")
    if index != "0" or "-" not in group:
        raise APIError(
            422,
            "This Idempotency-Key was already used with a different request; use a new key.",
            code="idempotency_key_reuse",
            param="Idempotency-Key",
        )
    return group


async def resume(
    svc: GatewayService, rid: str, n: int, principal: Principal, positions: list[int]
) -> ChoiceGroup:
    """Follow a group again from ``positions``; a choice whose last event was delivered is done.
    :class:`RequestEnded` when every choice's was (only ``[DONE]`` may have been lost), or one
    choice's error was: the response had failed with it (its last event), and nothing follows."""
    choices: list[Choice] = []
    prompts, answered, failed = 1, True, False
    try:
        for index, after in enumerate(positions[:n]):
            child = choice_rid(rid, index)
            record = await svc.requests.record(child, principal)
            prompts = record.spec.prompts
            if record.status.terminal and record.seq <= after:
                choices.append(Choice(index, child, after, None, record.usage))
                answered = answered and record.status is Status.DONE
                failed = failed or record.status is not Status.DONE
            else:
                choices.append(Choice(index, child, after, await svc.requests.resume(child, principal)))
        if failed or all(c.sub is None for c in choices):
            raise RequestEnded(rid, done=answered)
        return ChoiceGroup.of(rid, choices, prompts)
    except BaseException:
        for choice in choices:
            if choice.sub is not None:
                await _let_go(svc, choice.sub)
        raise


async def _let_go(svc: GatewayService, sub: Submission) -> None:
    if sub.subscription is not None:
        await svc.fanin.unsubscribe(sub.subscription)
    svc.requests.detach_later(sub.rid)


def merged_usage(usages: list[dict[str, int] | None], per_prompt: int) -> dict[str, int]:
    """OpenAI's usage of a group's response: each prompt once (the choices of a prompt, ``per_prompt``
    of them, come together), the completions summed."""
    prompt = 0
    for at in range(0, len(usages), per_prompt):
        prompt += next((u.get("prompt_tokens", 0) for u in usages[at : at + per_prompt] if u), 0)
    completion = sum(u.get("completion_tokens", 0) for u in usages if u)
    return {"prompt_tokens": prompt, "completion_tokens": completion}


class _Merged:
    """The state of a group's stream: each choice's position, renderer and usage."""

    def __init__(self, group: ChoiceGroup, fresh: bool) -> None:
        self.group = group
        self.positions = [c.after for c in group.choices]
        self.usages = [c.usage for c in group.choices]
        self.live = {c.index: c for c in group.choices if c.sub is not None}
        self.render = [_renderer(group, c, fresh) for c in group.choices]

    def heads(self) -> bytes:
        """Every chat choice's opening chunk, in index order, before any text: clients (the openai
        SDK's stream helpers) add a choice when its index first appears, so they must come in order."""
        if not self.group.chat:
            return b""
        return b"".join(sse_event(r.head(), self.event_id()) for r in self.render)

    def event_id(self) -> str:
        return ".".join(map(str, self.positions))

    def chunk(self, index: int, event: TokenEvent) -> bytes:
        # A replayed event (tool calls are parsed from the start) is at or before the position.
        self.positions[index] = max(self.positions[index], event.seq)
        if event.kind == "token":
            return b"".join(sse_event(c, self.event_id()) for c in self.render[index].chunks(event))
        del self.live[index]
        if event.kind == "done":
            self.usages[index] = event.usage
            return b"".join(sse_event(c, self.event_id()) for c in self.render[index].finals(event))
        return sse_event(error_chunk(event), self.event_id())

    def last(self) -> bytes:
        """The usage chunk (when asked) and ``[DONE]``."""
        if not self.group.include_usage:
            return DONE
        g = self.group
        body = usage_chunk(g.rid, g.model, g.created, g.chat, g.usage(self.usages))
        return sse_event(body, self.event_id()) + DONE


Item = tuple[int, TokenEvent | BaseException | None]


def _renderer(group: ChoiceGroup, choice: Choice, fresh: bool) -> ChoiceChunks | ToolChunks:
    if group.tool_format:  # replayed from its first event, the chunks through `after` not sent
        return ToolChunks(
            rid=group.rid,
            model=group.model,
            created=group.created,
            index=choice.index,
            resumed=not fresh,
            call_rid=choice.rid,
            skip_through=choice.after,
            single=single_call(group.tool_format),
            tags=tags_of(group.tool_format),
        )
    return ChoiceChunks(
        rid=group.rid,
        model=group.model,
        created=group.created,
        chat=group.chat,
        tool=group.tool,
        index=choice.index,
        resumed=not fresh,
        call_rid=choice.rid,
    )


async def stream(svc: GatewayService, group: ChoiceGroup, fresh: bool = True) -> AsyncIterator[bytes]:
    """The group's SSE stream: every choice's chunks as they come, each with the group's position.
    One failed choice fails the response: its error is the last event and the others are cancelled.
    ``fresh``: from the start (no ``Last-Event-ID``), so it opens with every choice's head chunk."""
    merged = _Merged(group, fresh)
    # A choice's keepalive goes out only when the whole response has been quiet that long.
    quiet_s, sent = svc.settings.sse_keepalive_s, time.monotonic()
    queue: asyncio.Queue[Item] = asyncio.Queue(QUEUE_MAX)
    tasks = [
        asyncio.create_task(
            _pump(
                c.index,
                svc.requests.events(c.sub, 0 if group.tool_format else c.after, keepalive=True),
                queue,
            )
        )
        for c in merged.live.values()
        if c.sub is not None
    ]
    out: list[bytes] = [merged.heads()] if fresh else []
    finished = False
    try:
        while merged.live:
            index, item = await queue.get()
            event = _unwrap(merged, index, item)
            if event is None:
                continue
            if event.kind != "idle" and (chunk := merged.chunk(index, event)):
                out.append(chunk)
            # Quiet since the last write (a choice's IDLE, each choice counting on its own; or a tool
            # call parsed whole): half the period, so that no choice's timing skips a comment.
            elif not out and quiet_s > 0 and time.monotonic() - sent >= quiet_s / 2:
                out.append(KEEPALIVE)
            if event.kind == "error":
                await _cancel(svc, [c.rid for c in merged.live.values()])
                merged.live.clear()
                break
            if out and (queue.empty() or len(out) >= COALESCE_MAX):
                yield b"".join(out)
                out.clear()
                sent = time.monotonic()
        else:
            out.append(LastChunk(merged.last()))
        finished = True
    except GatewayDraining:
        pass  # end without [DONE]: the client resumes on another gateway (Last-Event-ID)
    except APIError as exc:  # a reader failed (its request expired): the others are let go below
        out.append(sse_event(exc.body()))
    finally:
        # Cancelled again while one runs on (stopping.py): a reader left running would fill the
        # queue, wait on it forever and hold this response. Their cleanup does not wait on anything.
        await stop_loops(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        if not finished:
            for choice in merged.live.values():
                svc.requests.detach_later(choice.rid)
    if out:
        yield joined(out)


def _unwrap(merged: _Merged, index: int, item: TokenEvent | BaseException | None) -> TokenEvent | None:
    """A reader's event; its exception raised; None when it ended after its final event, or had
    delivered it before (a position at or past the choice's end: nothing more of it comes)."""
    if isinstance(item, RequestEnded):
        merged.live.pop(index, None)
        return None
    if isinstance(item, BaseException):
        raise item
    if item is None and index in merged.live:
        raise APIError(500, "a choice's stream ended without a final event", type="server_error")
    return item


async def _pump(
    index: int,
    events: AsyncIterator[TokenEvent],
    queue: asyncio.Queue[Item],
) -> None:
    try:
        async for event in events:
            await queue.put((index, event))
        await queue.put((index, None))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # the response says it (or ends for a resume); never lost here
        await queue.put((index, exc))
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def collect(svc: GatewayService, group: ChoiceGroup) -> dict[str, Any]:
    """The non-streaming response: every choice's answer with its index; usage as OpenAI sums it.
    A failed choice fails the response (the others are cancelled); the caller detaches on error."""
    tasks = [
        asyncio.create_task(
            collect_response(
                svc.requests.events(c.sub),
                rid=c.rid,
                model=group.model,
                created=group.created,
                chat=group.chat,
                tool=group.tool,
                tool_format=group.tool_format,
                logprobs=group.logprobs,
            )
        )
        for c in group.choices
        if c.sub is not None
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [(c, t) for c, t in zip(group.choices, tasks, strict=True) if not t.done()]
        await stop_loops([task for _, task in pending])  # again if one runs on (stopping.py)
        await asyncio.gather(*tasks, return_exceptions=True)
    failed = [e for t in tasks if not t.cancelled() and (e := t.exception()) is not None]
    if failed:  # one failed: the unfinished ones stop now (not after they have all run to the end)
        if not any(isinstance(e, GatewayDraining) for e in failed):
            await _cancel(svc, [c.rid for c, _ in pending])
        raise failed[0]
    results = [t.result() for t in tasks]
    choices = []
    for index, result in enumerate(results):
        choices.append({**result["choices"][0], "index": index})
    return {
        "id": group.rid,
        "object": "chat.completion" if group.chat else "text_completion",
        "created": group.created,
        "model": group.model,
        "choices": choices,
        "usage": usage_body(group.usage([r["usage"] for r in results])),
    }


async def _cancel(svc: GatewayService, rids: list[str]) -> None:
    for rid in rids:
        with contextlib.suppress(*TRANSIENT):
            reason = "another choice of the request failed"
            if await svc.broker.cancel(rid, svc.settings.result_ttl_s, reason) > 0:
                await svc.requests.withdraw(rid)


async def group_size(svc: GatewayService, rid: str, principal: Principal) -> int:
    """How many choices request ``rid`` has, when it is a group; 0 when it is not one."""
    try:
        record = await svc.requests.record(choice_rid(rid, 0), principal)
    except APIError:
        return 0
    return record.spec.choices if 1 < record.spec.choices <= MAX_GROUP else 0


def release_all(svc: GatewayService, group: ChoiceGroup) -> None:
    """The group's stream closed before it began: stop following every choice (requests.release_later)."""
    for choice in group.choices:
        if choice.sub is not None:
            svc.requests.release_later(choice.sub)


def detach_all(svc: GatewayService, group: ChoiceGroup) -> None:
    for choice in group.choices:
        if choice.sub is not None:
            svc.requests.detach_later(choice.rid)
