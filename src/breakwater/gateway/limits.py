"""A key's limits at admission: what a request reserves, the 429 when it is over, and OpenAI's
``x-ratelimit-*`` headers (the ``openai`` SDK waits ``retry-after-ms`` before it retries a 429)."""

from __future__ import annotations

import math

from breakwater.broker import RequestSpec
from breakwater.broker.ledger import Decision
from breakwater.gateway.errors import APIError
from breakwater.tenancy import ApiKey
from breakwater.tenancy.limits import Limits

BYTES_PER_TOKEN = 4  # the usual average; the real count replaces the estimate when the request ends
DEFAULT_OUTPUT_RESERVE = 256  # reserved when a request sets no max_tokens; reconciled at the end


def limits_of(key: ApiKey | None) -> Limits:
    if key is None:
        return Limits()
    return Limits(key.rpm, key.tpm, key.max_concurrent, key.budget_day, key.budget_month)


def reserve(spec: RequestSpec, prompt: str) -> int:
    """Tokens held against tokens-per-minute at admission: the prompt's estimate plus the output limit."""
    output = spec.max_tokens if spec.max_tokens is not None else DEFAULT_OUTPUT_RESERVE
    return math.ceil(len(prompt.encode()) / BYTES_PER_TOKEN) + output


def hold(spec: RequestSpec, prompt: str, context: int, prompt_floor: int) -> int:
    """Tokens held against the token budgets until the request is metered: what it reserves, but
    without ``max_tokens`` its output may run to the model's context (``prompt_floor``: the fewest
    tokens the prompt can be), so that much is held: a budget is passed by one request at most."""
    if spec.max_tokens is not None or spec.kind == "embedding":
        return reserve(spec, prompt)
    output = max(DEFAULT_OUTPUT_RESERVE, context - prompt_floor)
    return math.ceil(len(prompt.encode()) / BYTES_PER_TOKEN) + output


def too_large(tokens: int, limits: Limits) -> APIError:
    return APIError(
        400,
        f"This request needs about {tokens} tokens (prompt estimate plus max_tokens), more than this "
        f"API key's limit of {limits.tpm} tokens per minute; lower max_tokens or shorten the prompt.",
        code="request_exceeds_token_limit",
        param="max_tokens",
    )


BURST_MS = 1200  # limits.lua's: a limit lets a request start while its TAT is at most this far ahead
# What admitting one choice of a group takes at most, generously (a few round trips): the time that
# passes while a group is admitted lowers its limits' TATs by as much.
CHOICE_MS = 10.0


def group_refusal(choices: int, key: Limits, tenant: Limits) -> APIError | None:
    """A 400 for a request of ``choices`` choices (each a request, admitted all or none, each by
    its own ``limits.lua`` call) that its key's or its tenant's concurrency or requests per minute
    can never admit together, else None: a 429 would be retried for nothing."""
    for limits, whose in ((key, "API key's"), (tenant, "tenant's")):
        if limits.max_concurrent and choices > limits.max_concurrent:
            return _too_many(choices, f"the {whose} limit of {limits.max_concurrent} concurrent requests")
        if limits.rpm and _never_starts((choices - 1) * 60_000 / limits.rpm, choices):
            return _too_many(choices, f"the {whose} {limits.rpm} requests per minute")
    return None


def group_token_refusal(reserved: list[int], held: list[int], key: Limits, tenant: Limits) -> APIError | None:
    """The same for the choices' token reservations (``reserved``: tokens per minute) and budget
    holds (``held``: daily and monthly budgets), in admission order: the last choice is admitted
    only after all the others took theirs."""
    n = len(reserved)
    for limits, whose in ((key, "API key's"), (tenant, "tenant's")):
        if limits.tpm and _never_starts(sum(reserved[:-1]) * 60_000 / limits.tpm, n):
            return _too_many(
                n, f"the {whose} {limits.tpm} tokens per minute, for their {sum(reserved)} tokens"
            )
        for budget, per in ((limits.budget_day, "day"), (limits.budget_month, "month")):
            if budget and sum(held[:-1]) >= budget:
                return _too_many(
                    n, f"the {whose} budget of {budget} tokens a {per}, for their {sum(held)} held"
                )
    return None


def _never_starts(ahead_ms: float, choices: int) -> bool:
    """Whether a group's last choice finds its limit's TAT ``ahead_ms`` ahead (from rest) too far
    ahead for the burst, even after the time admitting the others takes."""
    return ahead_ms - BURST_MS > (choices - 1) * CHOICE_MS


def _too_many(choices: int, bound: str) -> APIError:
    return APIError(
        400,
        f"This request's {choices} choices (n for each prompt, each a request, admitted together) "
        f"are more than {bound} can ever admit at once; ask for fewer.",
        code="too_many_choices",
        param="n",
    )


def rate_headers(limits: Limits, decision: Decision, tenant_limits: Limits | None = None) -> dict[str, str]:
    """The key's own limits; where the key has none, its tenant's."""
    headers: dict[str, str] = {}
    windows = [(limits, decision.key)]
    if tenant_limits is not None and decision.tenant is not None:
        windows.append((tenant_limits, decision.tenant))
    for lim, window in reversed(windows):  # the key's override the tenant's
        if lim.rpm:
            headers["x-ratelimit-limit-requests"] = str(lim.rpm)
            headers["x-ratelimit-remaining-requests"] = str(window.requests_remaining)
            headers["x-ratelimit-reset-requests"] = duration(window.requests_reset_ms)
        if lim.tpm:
            headers["x-ratelimit-limit-tokens"] = str(lim.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(window.tokens_remaining)
            headers["x-ratelimit-reset-tokens"] = duration(window.tokens_reset_ms)
    return headers


def refusal(limits: Limits, decision: Decision, tenant_limits: Limits | None = None) -> APIError:
    wait_ms = max(1, decision.retry_after_ms)
    reason = decision.reason.removeprefix("tenant_")
    whose, lim = "this API key", limits
    if reason != decision.reason and tenant_limits is not None:
        whose, lim = "this API key's tenant (all its keys)", tenant_limits
    headers = {
        "Retry-After": str(math.ceil(wait_ms / 1000)),
        "retry-after-ms": str(wait_ms),
        "X-Breakwater-Reason": f"rate_limit_{decision.reason}",
        **rate_headers(limits, decision, tenant_limits),
    }
    if reason in ("budget_day", "budget_month"):
        daily = reason == "budget_day"
        budget = lim.budget_day if daily else lim.budget_month
        return APIError(
            429,
            f"The {'daily' if daily else 'monthly'} budget of {budget} tokens of {whose} is used up; it "
            f"renews at the start of the next UTC {'day' if daily else 'month'} (in {duration(wait_ms)}).",
            type="insufficient_quota",
            code="insufficient_quota",
            headers={**headers, "X-Breakwater-Reason": decision.reason},
        )
    what = {
        "requests": f"{lim.rpm} requests per minute",
        "tokens": f"{lim.tpm} tokens per minute",
        "concurrency": f"{lim.max_concurrent} requests at once",
    }[reason]
    return APIError(
        429,
        f"Rate limit reached for {whose}: {what}. Try again in {duration(wait_ms)}.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers=headers,
    )


def duration(ms: int) -> str:
    """OpenAI's format for reset times: ``20ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    minutes, seconds = divmod(ms / 1000, 60)
    if minutes:
        return f"{int(minutes)}m{seconds:.0f}s"
    return f"{seconds:.3g}s"
