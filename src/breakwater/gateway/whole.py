"""A non-streamed answer, waited for only while its client is there: when the client disconnects
first, the wait is cancelled (its caller then detaches the request, so it is cancelled after the
detach grace, as a stream whose client left is) and :class:`ClientDisconnect` raised. Without this a
whole answer nobody would read ran to its end, was metered in full and held its key's concurrency
slot all the while (and each of the SDK's retries after its own timeout made one more)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from breakwater.broker.fanin import GatewayDraining
from breakwater.gateway.errors import APIError
from breakwater.gateway.following import Submission
from breakwater.gateway.service import GatewayService
from breakwater.stopping import stop_loops

T = TypeVar("T")


async def unless_gone(receive: Receive | None, answer: Awaitable[T]) -> T:
    """``answer``, or :class:`ClientDisconnect` once the client behind ``receive`` (a request whose
    body has been read) disconnects; ``receive`` None: no client to watch (a batch's line)."""
    if receive is None:
        return await answer
    task = asyncio.ensure_future(answer)
    watcher = asyncio.ensure_future(_gone(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled (the server stops): so is the answer
        watcher.cancel()
        await stop_loops([task])
        raise
    watcher.cancel()
    if not task.done():  # the client left first
        await stop_loops([task])
        if task.cancelled():
            raise ClientDisconnect()
    return task.result()


async def _gone(receive: Receive) -> None:
    """Returns when the client disconnects; never, if its connection cannot say."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # no disconnect to see (e.g. a body limit refusing more body)
        await asyncio.get_running_loop().create_future()


async def answered(
    svc: GatewayService,
    sub: Submission,
    headers: dict[str, str],
    answer: Awaitable[dict[str, Any]],
    receive: Receive | None = None,
) -> dict[str, Any]:
    """A non-streamed answer to ``sub``. Without one (the gateway drains, the request ended in an
    error, the client behind ``receive`` left) the request is detached; its error names the request."""
    try:
        return await unless_gone(receive, answer)
    except GatewayDraining:
        svc.requests.detach_later(sub.rid, shared=sub.cached)
        raise restarting(sub.rid, headers) from None
    except APIError as exc:  # the request ended in an error (timeout, cancelled): name the request
        svc.requests.detach_later(sub.rid, shared=sub.cached)
        exc.headers = {**headers, **exc.headers}
        raise
    except BaseException:
        svc.requests.detach_later(sub.rid, shared=sub.cached)
        raise


def restarting(rid: str, headers: dict[str, str]) -> APIError:
    return APIError(
        503,
        f"this gateway is restarting; the request continues: GET /v1/requests/{rid}/events",
        type="service_unavailable",
        code="draining",
        headers={"Retry-After": "1", "X-Breakwater-Reason": "draining", **headers},
    )
