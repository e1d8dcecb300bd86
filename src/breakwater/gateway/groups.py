"""A request's choices (gateway.choices) against its limits, as one arrival: what the limits can
never admit together (a 400), one ``limits.lua`` call that takes their requests and tokens for all of
them before the first is queued, and the give-back of the shares no choice took over."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import anyio

from breakwater.broker import Broker
from breakwater.broker.errors import TRANSIENT
from breakwater.broker.idempotency import IdempotencyKey
from breakwater.gateway.errors import APIError
from breakwater.gateway.limits import limits_of, tokened
from breakwater.gateway.specs import Body, check_features, prompt_text, request_spec
from breakwater.tenancy import Principal
from breakwater.tenancy.limits import Limits

if TYPE_CHECKING:
    from breakwater.gateway.admission import Admitter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class GroupLimits:
    """The limits a group's choices took as one arrival (``admit_group``): ``shares``, each
    choice's tokens reserved and held by its rid, until that choice's admission takes its share
    over (just before it is queued: from there its own paths give it back); what is left is given
    back (``give_back``)."""

    shares: dict[str, tuple[int, int]]
    headers: dict[str, str] = field(default_factory=dict)


def group_refusal(
    reserved: list[int], held: list[int], key: Limits, tenant: Limits, param: str = "n"
) -> APIError | None:
    """A 400 for a group of choices (``reserved``: each one's tokens against tokens per minute,
    ``held``: against the budgets, in admission order) larger than its key's or its tenant's limits
    allow at once, else None. The group is one arrival (``limits.lua``): more choices than the
    concurrency can never start; more than a minute's requests or tokens could start only from
    rest and then hold the key up for minutes (as a single request over its tokens per minute is
    refused: ``too_large``); as much held before the last choice as a budget, never (the budget
    admits a group only as it would choice by choice). ``param``: what made the choices many, ``n`` or
    a list of ``prompt``."""
    n = len(reserved)
    for limits, whose in ((key, "API key's"), (tenant, "tenant's")):
        if limits.max_concurrent and n > limits.max_concurrent:
            return _too_many(n, f"the {whose} limit of {limits.max_concurrent} concurrent requests", param)
        if limits.rpm and n > limits.rpm:
            return _too_many(n, f"the {whose} {limits.rpm} requests per minute", param)
        if limits.tpm and sum(reserved) > limits.tpm:
            return _too_many(
                n, f"the {whose} {limits.tpm} tokens per minute, for their {sum(reserved)} tokens", param
            )
        for budget, per in ((limits.budget_day, "day"), (limits.budget_month, "month")):
            if budget and sum(held[:-1]) >= budget:
                return _too_many(
                    n, f"the {whose} budget of {budget} tokens a {per}, for their {sum(held)} held", param
                )
    return None


def _too_many(choices: int, bound: str, param: str) -> APIError:
    return APIError(
        400,
        f"This request's {choices} choices (n for each prompt, each a request, admitted together) "
        f"are more than {bound} can admit at once; ask for fewer.",
        code="too_many_choices",
        param=param,
    )


async def admit_group(
    admitter: Admitter,
    bodies: Sequence[Body],
    rids: Sequence[str],
    principal: Principal,
    prompts: int,
    replay: IdempotencyKey | None,
) -> GroupLimits | None:
    """A group's choices (a body each, in admission order, to be requests ``rids``), before any is
    queued: each one's context and token reservation as its admission will judge them, what the
    limits can never admit together (a 400: ``group_refusal``), then the limits taken for all of
    them as one arrival (or a 429). None when there are no limits to take, and for a replay of a
    group admitted already (its first choice's Idempotency-Key bound): a replay is not a new
    request, and each choice's admission judges it as alone."""
    if replay is not None and await admitter.broker.binding(replay.redis_key(admitter.broker.keys)):
        return None
    limits, shared = limits_of(principal.key), principal.tenant_limits
    model = await admitter.registry.resolve(bodies[0].model)
    specs = []
    for body in bodies:
        spec = request_spec(
            body,
            request_id="",
            default_timeout_s=admitter.settings.request_timeout_s,
            principal=principal,
            choices=len(bodies),
            prompts=prompts,
            model=model,
        )
        check_features(spec, model)
        prompt = prompt_text(spec)
        admitter.check_context(prompt, spec.max_tokens, model, spec.kind)
        if tokened(limits, shared):
            spec = admitter.reserved(spec, prompt, model, (limits, shared))
        specs.append(spec)
    reserved, held = [s.reserved_tokens for s in specs], [s.held_tokens for s in specs]
    refused = group_refusal(reserved, held, limits, shared, "n" if len(bodies) > prompts else "prompt")
    if refused is not None:
        raise refused
    if not (limits.any or shared.any):
        return None
    group = GroupLimits({rid: (s.reserved_tokens, s.held_tokens) for rid, s in zip(rids, specs, strict=True)})
    arrival = replace(specs[0], reserved_tokens=sum(reserved), held_tokens=sum(held))
    try:
        group.headers = await admitter.take_limits(principal, limits, rids, arrival, sum(held[:-1]))
    except APIError:
        raise  # refused: nothing taken
    except BaseException:  # taken or not (cancelled, Redis away): no place is left taken
        await release(admitter.broker, principal, rids)
        raise
    return group


async def give_back(admitter: Admitter, group: GroupLimits, principal: Principal) -> None:
    """The limits a group took for the choices whose admission never took them over (not queued,
    or found answered): their places in the concurrency limits and their budget holds; what they
    took of the rates stays taken, as a request's does when its lane refuses it. Best effort, as
    for a request never queued (``Admitter._unhold_unqueued``), and done whole even when cancelled."""
    rids, held = list(group.shares), sum(h for _, h in group.shares.values())
    group.shares.clear()
    if not rids:
        return
    with anyio.CancelScope(shield=True):
        await release(admitter.broker, principal, rids)
        try:
            if held:
                await admitter.broker.ledger.unhold(principal.tenant, principal.limit_id, held)
        except TRANSIENT as exc:
            log.warning("a group's budget hold not given back", extra={"fields": {"error": repr(exc)}})


async def release(broker: Broker, principal: Principal, rids: Sequence[str]) -> None:
    """Free the places of requests ``rids`` in the concurrency limits (never cancelled midway)."""
    if not (principal.tenant_limits.max_concurrent or limits_of(principal.key).max_concurrent):
        return
    with anyio.CancelScope(shield=True):
        try:
            await broker.ledger.release(principal.tenant, principal.limit_id, *rids)
        except TRANSIENT as exc:
            log.warning("places not given back", extra={"fields": {"error": repr(exc)}})
