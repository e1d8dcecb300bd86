"""``breakwater models alias``: set, show, list, delete model aliases and read their history (issue 19).

Every change is a compare-and-set on the alias's revision, logged with who made it; gateways see it
within about a second. JSON on stdout, for scripts; warnings on stderr."""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass, replace
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape

from breakwater.cli_tools import emit_json, with_broker
from breakwater.rollout.aliases import Alias

console = Console(stderr=True)
alias_app = typer.Typer(
    no_args_is_help=True,
    help="Model aliases: weighted splits over versions (canary, A/B, blue-green), with history.",
)


def _by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _view(alias: Any, workers: dict[str, int] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(alias.to_json())
    data["weights"] = dict(alias.weights)
    if alias.tenants:
        data["tenants"] = {t: dict(w) for t, w in alias.tenants.items()}
    if workers is not None:
        data["live_workers"] = {v: workers.get(v, 0) for v in alias.versions}
    return data


async def _live(broker: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in (await broker.live_workers()).values():
        counts[str(info["model"])] = counts.get(str(info["model"]), 0) + 1
    return counts


@dataclass(frozen=True)
class _Change:
    """What `alias set` asks for, applied to the alias as it is now (None: a new one)."""

    name: str
    weights: dict[str, int]
    tenant: str | None
    sticky: str | None
    guard: bool | None
    knobs: dict[str, Any]

    def apply(self, current: Alias | None, *, by: str, note: str) -> Alias:
        from breakwater.rollout.aliases import Alias, Guard

        if self.tenant is not None:
            if self.sticky is not None or self.guard is not None or self.knobs:
                raise ValueError(
                    "--tenant sets a tenant's weights only: change stickiness and the guard without it"
                )
            if current is None:
                raise ValueError(f"no alias {self.name}: set its split for everyone first")
            return replace(current, tenants={**current.tenants, self.tenant: self.weights}, by=by, note=note)
        old = current.guard if current is not None else None
        if (
            old is not None
            and old.baseline
            and "baseline" not in self.knobs
            and not self.weights.get(old.baseline)
        ):
            # The named baseline left (a blue-green switch): the greatest weight is the baseline now.
            console.print(
                f"[yellow]note:[/yellow] the guard's baseline {old.baseline} has no weight now; dropped"
            )
            old = replace(old, baseline="")
        keep = self.guard is None and (self.knobs or old is not None)
        new_guard = replace(old or Guard(), **self.knobs) if self.guard or keep else None
        return Alias(
            name=self.name,
            weights=self.weights,
            sticky=self.sticky or (current.sticky if current is not None else "none"),  # type: ignore[arg-type]
            guard=new_guard,
            by=by,
            note=note,
            tenants=current.tenants if current is not None else {},
        )


@alias_app.command("set")
def alias_set(
    name: Annotated[str, typer.Argument(help="the alias clients use, e.g. llama-3-8b")],
    versions: Annotated[
        list[str],
        typer.Argument(help="VERSION=WEIGHT ... (e.g. llama-3-8b@2026-11=90 llama-3-8b@2026-12=10)"),
    ],
    tenant: Annotated[
        str | None,
        typer.Option(help="set this tenant's own split (the alias must exist); others keep the alias's"),
    ] = None,
    sticky: Annotated[
        str | None, typer.Option(help="none | tenant | user: one version per tenant or per `user` value")
    ] = None,
    guard: Annotated[
        bool | None,
        typer.Option(
            help="roll back a canary (weight to 0) that fails against the baseline (default: as it was)"
        ),
    ] = None,
    guard_baseline: Annotated[
        str | None,
        typer.Option(help="guard: the version canaries are judged against (default: greatest weight)"),
    ] = None,
    guard_error_delta: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="guard: error rate allowed above the baseline's")
    ] = None,
    guard_min_requests: Annotated[
        int | None, typer.Option(min=1, help="guard: finished requests on canary and baseline before judging")
    ] = None,
    guard_window_s: Annotated[
        int | None, typer.Option(min=5, max=600, help="guard: the window judged, in seconds")
    ] = None,
    guard_ttft_slo_ms: Annotated[
        int | None,
        typer.Option(
            help="guard: a TTFT SLO (250, 500, 1000, 2000, 5000 or 10000 ms) whose misses are judged too"
        ),
    ] = None,
    guard_ttft_ratio: Annotated[
        float | None,
        typer.Option(min=0.0, help="guard: mean TTFT allowed, as a multiple of the baseline's (0: off)"),
    ] = None,
    by: Annotated[str | None, typer.Option(help="who makes the change (default: user@host)")] = None,
    note: Annotated[str, typer.Option(help="why, for the history")] = "",
) -> None:
    """Create or change an alias: its versions' weights, or one tenant's (a change by hand clears
    the guard's rollbacks)."""
    from breakwater.rollout.aliases import STICKY, parse_weights

    if sticky is not None and sticky not in STICKY:
        raise typer.BadParameter(f"one of {', '.join(STICKY)}", param_hint="--sticky")
    try:
        weights = parse_weights(versions)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="VERSIONS") from None
    knobs = {
        "max_error_delta": guard_error_delta,
        "min_requests": guard_min_requests,
        "window_s": guard_window_s,
        "ttft_ratio": guard_ttft_ratio,
        "baseline": guard_baseline,
        "ttft_slo_ms": guard_ttft_slo_ms,
    }
    change = _Change(name, weights, tenant, sticky, guard, {k: v for k, v in knobs.items() if v is not None})
    who = by or _by()

    async def run(broker: Any) -> tuple[Alias, dict[str, int]]:
        try:  # applied to the alias as it is; again if another writer came in between
            stored = await broker.rollouts().modify(
                name, lambda current: change.apply(current, by=who, note=note)
            )
        except ValueError as exc:  # refused by the change or by the store (Refused)
            raise typer.BadParameter(str(exc)) from None
        return stored, await _live(broker)

    stored, workers = with_broker(run)
    assert stored is not None  # the change always writes
    for version, weight in (stored.tenants.get(tenant, {}) if tenant else stored.weights).items():
        if weight and not workers.get(version):
            console.print(
                f"[yellow]warning:[/yellow] {version} has no live worker; its requests queue until one starts"
            )
    emit_json(_view(stored, workers))


@alias_app.command("clear-tenant")
def alias_clear_tenant(
    name: Annotated[str, typer.Argument()],
    tenant: Annotated[str, typer.Argument(help="the tenant whose own split to remove")],
    by: Annotated[str | None, typer.Option(help="who (default: user@host)")] = None,
    note: Annotated[str, typer.Option(help="why, for the history")] = "",
) -> None:
    """Put a tenant back on the alias's split."""

    def without_tenant(current: Alias | None) -> Alias | None:
        if current is None or tenant not in current.tenants:
            return None
        tenants = {t: w for t, w in current.tenants.items() if t != tenant}
        return replace(current, tenants=tenants, by=by or _by(), note=note)

    stored: Alias | None = with_broker(lambda broker: broker.rollouts().modify(name, without_tenant))
    if stored is None:
        console.print(f"[red]no alias {escape(name)} with a split of its own for {escape(tenant)}[/red]")
        raise typer.Exit(1)
    emit_json(_view(stored))


@alias_app.command("show")
def alias_show(name: Annotated[str, typer.Argument()]) -> None:
    """An alias: its weights, stickiness, guard, revision, who changed it last, live workers per version."""

    async def run(broker: Any) -> tuple[Any, dict[str, int]]:
        return await broker.rollouts().alias(name), await _live(broker)

    alias, workers = with_broker(run)
    if alias is None:
        console.print(f"[red]no alias {escape(name)}[/red]")
        raise typer.Exit(1)
    emit_json(_view(alias, workers))


@alias_app.command("list")
def alias_list() -> None:
    """Every alias, as `show` prints it."""

    async def run(broker: Any) -> tuple[Any, dict[str, int]]:
        return await broker.rollouts().aliases(), await _live(broker)

    aliases, workers = with_broker(run)
    emit_json([_view(a, workers) for _, a in sorted(aliases.items())])


@alias_app.command("history")
def alias_history(
    name: Annotated[str, typer.Argument()],
    count: Annotated[int, typer.Option(min=1, help="the last this many changes")] = 50,
) -> None:
    """Who changed the alias, when, why, and to what (oldest first)."""
    changes = with_broker(lambda b: b.rollouts().history(name, count))
    emit_json(
        [
            {
                "revision": c.revision,
                "ts_ms": c.ts_ms,
                "by": c.by,
                "note": c.note,
                "weights": dict(c.alias.weights) if c.alias is not None else None,
            }
            for c in changes
        ]
    )


@alias_app.command("delete")
def alias_delete(
    name: Annotated[str, typer.Argument()],
    by: Annotated[str | None, typer.Option(help="who (default: user@host)")] = None,
    note: Annotated[str, typer.Option(help="why, for the history")] = "",
) -> None:
    """Remove an alias: requests naming it get 404 unless a model of that name is served."""
    if not with_broker(lambda broker: broker.rollouts().remove(name, by=by or _by(), note=note)):
        console.print(f"[red]no alias {escape(name)}[/red]")
        raise typer.Exit(1)
    emit_json({"deleted": name})
