"""``breakwater keys`` (create, list, show, revoke and rotate API keys) and ``breakwater usage``
(metered usage of any tenant); JSON (or CSV) on stdout, for scripts.

The secret of a key is printed once, by ``create`` and ``rotate``; Redis holds only its peppered hash,
so the commands need the same pepper as the gateways (``BREAKWATER_AUTH_PEPPER_FILE``)."""

from __future__ import annotations

import csv
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import date
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from breakwater.cli_tools import emit_json, with_broker
from breakwater.keys import LANES

console = Console(stderr=True)
keys_app = typer.Typer(no_args_is_help=True, help="API keys (auth=keys): create, list, show, revoke, rotate.")
T = TypeVar("T")
_DURATION = re.compile(r"^(\d+)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LONGEST_S = 36500 * 86400  # 100 years: a key (or a grace) longer is a typo


def _with_store(fn: Callable[[Any], Awaitable[T]]) -> T:
    from pydantic import ValidationError

    from breakwater.config import CommonSettings

    try:
        pepper = CommonSettings().pepper()
    except ValidationError:
        raise  # said by the CLI's main in a line per setting, a secret's value left out
    except (ValueError, OSError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    return with_broker(lambda broker: fn(broker.api_keys(pepper)))


def _seconds(value: str, least: int = 0, hint: str | None = None) -> int:
    """A duration (``90s``, ``30m``, ``12h``, ``30d``) of ``least`` seconds to 100 years."""
    match = _DURATION.match(value)
    if match is None:
        raise typer.BadParameter("a duration such as 90s, 30m, 12h or 30d", param_hint=hint)
    seconds = int(match.group(1)) * _SECONDS[match.group(2)]
    if not least <= seconds <= LONGEST_S:
        raise typer.BadParameter(f"from {least}s to {LONGEST_S // 86400}d, not {value}", param_hint=hint)
    return seconds


def _not_found(key_id: str) -> typer.Exit:
    console.print(f"[red]no live key {escape(key_id)}[/red]")
    return typer.Exit(1)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant that owns the key's requests and usage")],
    name: Annotated[str, typer.Option(help="a label for people")] = "",
    models: Annotated[str, typer.Option(help="comma-separated models it may use (default: all)")] = "",
    rpm: Annotated[int, typer.Option(min=0, help="requests per minute (0: no limit)")] = 0,
    tpm: Annotated[int, typer.Option(min=0, help="tokens per minute (0: no limit)")] = 0,
    max_concurrent: Annotated[int, typer.Option(min=0, help="requests at once (0: no limit)")] = 0,
    budget_day: Annotated[int, typer.Option(min=0, help="tokens per UTC day (0: no budget)")] = 0,
    budget_month: Annotated[int, typer.Option(min=0, help="tokens per UTC month (0: no budget)")] = 0,
    lane: Annotated[str | None, typer.Option(help=f"force this lane ({', '.join(LANES)})")] = None,
    weight: Annotated[float, typer.Option(min=0.01, max=1000.0, help="fair-share weight")] = 1.0,
    expires_in: Annotated[str | None, typer.Option(help="e.g. 30d (default: never)")] = None,
    cache: Annotated[
        bool, typer.Option(help="its requests may use the gateway's response cache (where it is on)")
    ] = True,
) -> None:
    """Create a key; prints it once, with its settings, as JSON."""
    from breakwater.tenancy import ApiKey

    _check_tenant(tenant, "--tenant")
    if lane is not None and lane not in LANES:
        raise typer.BadParameter(f"one of {', '.join(LANES)}", param_hint="--lane")
    expires = int(time.time()) + _seconds(expires_in, 1, "--expires-in") if expires_in else 0
    template = ApiKey(
        id="",
        tenant=tenant,
        name=name,
        models=tuple(m.strip() for m in models.split(",") if m.strip()),
        lane=lane,
        weight=weight,
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        budget_day=budget_day,
        budget_month=budget_month,
        expires=expires,
        cache=cache,
    )
    secret, record = _with_store(lambda store: store.create(template))
    emit_json({"key": secret, **record.public()})
    console.print("Store the key now: it is not shown again (Redis holds only its hash).")


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None) -> None:
    """Every key (no secrets), as a JSON array."""
    emit_json([k.public() for k in _with_store(lambda store: store.list(tenant))])


@keys_app.command("show")
def keys_show(key_id: Annotated[str, typer.Argument(help="the key's id (key_...)")]) -> None:
    """A key's settings and state as JSON (never its secret: only its hash is stored)."""
    record = _with_store(lambda store: store.get(key_id))
    if record is None:
        raise _not_found(key_id)
    emit_json(record.public())


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id (key_...)")]) -> None:
    """Revoke now: every gateway refuses the key within its cache time (about a second)."""
    record = _with_store(lambda store: store.revoke(key_id))
    if record is None:
        raise _not_found(key_id)
    emit_json(record.public())


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="the key's id (key_...)")],
    grace: Annotated[str | None, typer.Option(help="keep the old key working this long, e.g. 1h")] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="the new key's lifetime, e.g. 90d, or never (default: the old one's)")
    ] = None,
) -> None:
    """A new key with the same tenant, limits and expiry; the old one is revoked (after --grace)."""
    from breakwater.broker.api_keys import RotatedAlready

    grace_s = _seconds(grace, 0, "--grace") if grace else 0
    expires = None
    if expires_in is not None:
        expires = 0 if expires_in == "never" else int(time.time()) + _seconds(expires_in, 1, "--expires-in")
    try:
        rotated = _with_store(lambda store: store.rotate(key_id, grace_s, expires))
    except RotatedAlready as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    if rotated is None:
        raise _not_found(key_id)
    secret, record = rotated
    emit_json({"key": secret, "replaces": key_id, **record.public()})


def usage(
    tenant: Annotated[
        list[str] | None, typer.Option(help="tenant (repeat for several; default: every tenant with a key)")
    ] = None,
    start_date: Annotated[str | None, typer.Option(help="first UTC day, YYYY-MM-DD (default: today)")] = None,
    end_date: Annotated[str | None, typer.Option(help="last UTC day (default: start date)")] = None,
    format: Annotated[str, typer.Option(help="json or csv")] = "json",
) -> None:
    """Metered usage per tenant, day and API key: requests by outcome, prompt and completion tokens."""
    from breakwater.broker.ledger import COUNTS, day_of

    if format not in ("json", "csv"):
        raise typer.BadParameter("json or csv", param_hint="--format")
    first = start_date or day_of(time.time())
    last = end_date or first
    for value, hint in ((first, "--start-date"), (last, "--end-date")):
        try:
            date.fromisoformat(value)
        except ValueError:
            raise typer.BadParameter("a date, YYYY-MM-DD", param_hint=hint) from None
    if date.fromisoformat(last) < date.fromisoformat(first):  # as /v1/usage refuses it
        raise typer.BadParameter("on or after --start-date", param_hint="--end-date")

    async def rows(broker: Any) -> list[dict[str, Any]]:
        tenants = tenant or sorted({k.tenant for k in await _all_keys(broker)} | {"anonymous"})
        out = []
        for name in tenants:
            for row in await broker.ledger.usage(name, first, last):
                out.append({"tenant": name, "date": row.day, "key_id": row.key_id, **row.counts})
        return out

    found = with_broker(rows)
    if format == "json":
        emit_json(found)
        return
    writer = csv.writer(sys.stdout)
    writer.writerow(["tenant", "date", "key_id", *COUNTS])
    for row in found:
        writer.writerow([row["tenant"], row["date"], row["key_id"], *(row[c] for c in COUNTS)])


async def _all_keys(broker: Any) -> list[Any]:
    """Every key's record; needs no pepper (records are found through the id index)."""
    found: list[Any] = await broker.api_keys(b"").list()
    return found


tenants_app = typer.Typer(no_args_is_help=True, help="A tenant's own limits, shared by all its keys.")


def _check_tenant(tenant: str, hint: str) -> None:
    """A tenant a key can belong to: 1-64 of A-Z a-z 0-9 _ . -, not the auth-off owner."""
    from breakwater.tenancy import ANONYMOUS

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tenant) or tenant.lower() == ANONYMOUS.tenant:
        raise typer.BadParameter(
            f"1-64 of A-Z a-z 0-9 _ . -, not {ANONYMOUS.tenant!r} (the owner of requests made with auth off)",
            param_hint=hint,
        )


@tenants_app.command("set")
def tenants_set(
    tenant: Annotated[str, typer.Argument(help="the tenant")],
    rpm: Annotated[int, typer.Option(min=0, help="requests per minute, all keys together (0: none)")] = 0,
    tpm: Annotated[int, typer.Option(min=0, help="tokens per minute (0: none)")] = 0,
    max_concurrent: Annotated[int, typer.Option(min=0, help="requests at once (0: none)")] = 0,
    budget_day: Annotated[int, typer.Option(min=0, help="tokens per UTC day (0: none)")] = 0,
    budget_month: Annotated[int, typer.Option(min=0, help="tokens per UTC month (0: none)")] = 0,
) -> None:
    """Replace the tenant's limits: each one not given is none (every gateway applies them within
    its cache time, ~1 s)."""
    from breakwater.tenancy.limits import Limits

    _check_tenant(tenant, "TENANT")
    limits = Limits(rpm, tpm, max_concurrent, budget_day, budget_month)

    async def run(broker: Any) -> Limits:
        await broker.ledger.set_tenant_limits(tenant, limits)
        result: Limits = await broker.ledger.tenant_limits(tenant)
        return result

    emit_json({"tenant": tenant, **asdict(with_broker(run))})


@tenants_app.command("show")
def tenants_show(tenant: Annotated[str, typer.Argument(help="the tenant")]) -> None:
    """The tenant's limits (all 0: only its keys' own limits apply)."""
    limits = with_broker(lambda broker: broker.ledger.tenant_limits(tenant))
    emit_json({"tenant": tenant, **asdict(limits)})
