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
SPECIAL_TOKENS = 4  # a tokenizer's own around one input (BOS, EOS), at most
TEMPLATE_TOKENS = 32  # a chat template's own per message, and once for its preamble, at most


def limits_of(key: ApiKey | None) -> Limits:
    if key is None:
        return Limits()
    return Limits(key.rpm, key.tpm, key.max_concurrent, key.budget_day, key.budget_month)


def reserve(spec: RequestSpec, prompt: str) -> int:
    """Tokens held against tokens-per-minute at admission: the prompt's estimate plus the output limit."""
    output = spec.max_tokens if spec.max_tokens is not None else DEFAULT_OUTPUT_RESERVE
    return math.ceil(len(prompt.encode()) / BYTES_PER_TOKEN) + output


def hold(spec: RequestSpec, prompt: str, context: int, prompt_floor: int, known: bool = True) -> int:
    """Tokens held against the token budgets until the request is metered: the most it can use, so
    that a budget is passed by one request at most. Its prompt can be as many tokens as it has bytes
    (``most_prompt_tokens``), its output ``max_tokens``, the two together no more than the model's
    ``context`` where it is the model's own (``known``: a worker said it; else it is the gateway's
    bound, which the model's may pass); without ``max_tokens`` its output may run to the context
    (``prompt_floor``: the fewest tokens the prompt can be)."""
    most = most_prompt_tokens(spec, prompt)
    if spec.kind == "embedding":
        return most
    if spec.max_tokens is None:
        output = max(DEFAULT_OUTPUT_RESERVE, context - prompt_floor)
        return math.ceil(len(prompt.encode()) / BYTES_PER_TOKEN) + output
    if not known:
        return most + spec.max_tokens
    return min(most + spec.max_tokens, context)  # admission refused max_tokens >= context


def most_prompt_tokens(spec: RequestSpec, prompt: str) -> int:
    """The most tokens ``prompt`` can be: one per byte (a byte-level BPE's or a byte-fallback
    tokenizer's token is never less than one), plus the special tokens around each input and a chat
    template's own (role markers per message, its preamble)."""
    if spec.messages is not None:
        return len(prompt.encode()) + TEMPLATE_TOKENS * (len(spec.messages) + 1)
    return len(prompt.encode()) + SPECIAL_TOKENS * len(spec.inputs or [prompt])


def too_large(tokens: int, limits: Limits) -> APIError:
    return APIError(
        400,
        f"This request needs about {tokens} tokens (prompt estimate plus max_tokens), more than this "
        f"API key's limit of {limits.tpm} tokens per minute; lower max_tokens or shorten the prompt.",
        code="request_exceeds_token_limit",
        param="max_tokens",
    )


def tokened(key: Limits, tenant: Limits) -> bool:
    """Whether a request reserves and holds tokens at admission: its key has a tokens-per-minute
    limit or a budget, or its tenant has any limit."""
    return bool(key.tpm or key.budget_day or key.budget_month or tenant.any)


def rate_headers(
    limits: Limits, decision: Decision, tenant_limits: Limits | None = None, tenants_first: bool = False
) -> dict[str, str]:
    """The key's own limits; where the key has none, its tenant's (``tenants_first``: the other way
    round, for a refusal by the tenant's limits, whose headers then say why)."""
    headers: dict[str, str] = {}
    windows = [(limits, decision.key)]
    if tenant_limits is not None and decision.tenant is not None:
        windows.append((tenant_limits, decision.tenant))
    if tenants_first:
        windows.reverse()
    for lim, window in reversed(windows):  # the first's override the others'
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
    tenants = False
    if reason != decision.reason and tenant_limits is not None:
        whose, lim, tenants = "this API key's tenant (all its keys)", tenant_limits, True
    headers = {
        "Retry-After": str(math.ceil(wait_ms / 1000)),
        "retry-after-ms": str(wait_ms),
        "X-Breakwater-Reason": f"rate_limit_{decision.reason}",
        **rate_headers(limits, decision, tenant_limits, tenants_first=tenants),
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
