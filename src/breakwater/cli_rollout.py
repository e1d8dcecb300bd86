"""``breakwater models alias``: set, show, list, delete model aliases and read their history (issue 19).

Every change is a compare-and-set on the alias's revision, logged with who made it; gateways see it
within about a second. JSON on stdout, for scripts; warnings on stderr."""

from __future__ import annotations

import getpass
import socket
from dataclasses import replace
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from breakwater.cli_tools import with_broker

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


def _emit(data: object) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _view(alias: Any, workers: dict[str, int] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(alias.to_json())
    data["weights"] = dict(alias.weights)
    if workers is not None:
        data["live_workers"] = {v: workers.get(v, 0) for v in alias.weights}
    return data


async def _live(broker: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in (await broker.live_workers()).values():
        counts[str(info["model"])] = counts.get(str(info["model"]), 0) + 1
    return counts


@alias_app.command("set")
def alias_set(
    name: Annotated[str, typer.Argument(help="the alias clients use, e.g. llama-3-8b")],
    versions: Annotated[
        list[str],
        typer.Argument(help="VERSION=WEIGHT ... (e.g. llama-3-8b@2026-11=90 llama-3-8b@2026-12=10)"),
    ],
    sticky: Annotated[
        str | None, typer.Option(help="none | tenant | user: one version per tenant or per `user` value")
    ] = None,
    guard: Annotated[
        bool | None,
        typer.Option(
            help="roll back a canary (weight to 0) that fails against the baseline (default: as it was)"
        ),
    ] = None,
    guard_error_delta: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="guard: error rate allowed above the baseline's")
    ] = None,
    guard_min_requests: Annotated[
        int | None, typer.Option(min=1, help="guard: finished requests on the canary before judging")
    ] = None,
    guard_window_s: Annotated[
        int | None, typer.Option(min=5, help="guard: the window judged, in seconds")
    ] = None,
    guard_ttft_ratio: Annotated[
        float | None,
        typer.Option(min=0.0, help="guard: mean TTFT allowed, as a multiple of the baseline's (0: off)"),
    ] = None,
    by: Annotated[str | None, typer.Option(help="who makes the change (default: user@host)")] = None,
    note: Annotated[str, typer.Option(help="why, for the history")] = "",
) -> None:
    """Create or change an alias: its versions' weights (a change by hand clears the guard's rollbacks)."""
    from breakwater.broker.rollouts import Conflict
    from breakwater.rollout.aliases import STICKY, Alias, Guard, parse_weights

    if sticky is not None and sticky not in STICKY:
        raise typer.BadParameter(f"one of {', '.join(STICKY)}", param_hint="--sticky")
    try:
        weights = parse_weights(versions)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="VERSIONS") from None
    knobs = {
        k: v
        for k, v in {
            "max_error_delta": guard_error_delta,
            "min_requests": guard_min_requests,
            "window_s": guard_window_s,
            "ttft_ratio": guard_ttft_ratio,
        }.items()
        if v is not None
    }

    async def run(broker: Any) -> tuple[Alias, dict[str, int]]:
        store = broker.rollouts()
        while True:
            current = await store.alias(name)
            old_guard = current.guard if current is not None else None
            if guard is False:
                new_guard = None
            elif guard or knobs or old_guard is not None:
                new_guard = replace(old_guard or Guard(), **knobs)
            else:
                new_guard = None
            try:
                alias = Alias(
                    name=name,
                    weights=weights,
                    sticky=sticky or (current.sticky if current is not None else "none"),
                    guard=new_guard,
                    by=by or _by(),
                    note=note,
                )
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
            try:
                stored = await store.put(alias, expected=current.revision if current is not None else 0)
            except Conflict:
                continue  # changed meanwhile: apply ours to the new one
            return stored, await _live(broker)

    stored, workers = with_broker(run)
    for version, weight in stored.weights.items():
        if weight and not workers.get(version):
            console.print(
                f"[yellow]warning:[/yellow] {version} has no live worker; its requests queue until one starts"
            )
    _emit(_view(stored, workers))


@alias_app.command("show")
def alias_show(name: Annotated[str, typer.Argument()]) -> None:
    """An alias: its weights, stickiness, guard, revision, who changed it last, live workers per version."""

    async def run(broker: Any) -> tuple[Any, dict[str, int]]:
        return await broker.rollouts().alias(name), await _live(broker)

    alias, workers = with_broker(run)
    if alias is None:
        console.print(f"[red]no alias {name}[/red]")
        raise typer.Exit(1)
    _emit(_view(alias, workers))


@alias_app.command("list")
def alias_list() -> None:
    """Every alias, as `show` prints it."""

    async def run(broker: Any) -> tuple[Any, dict[str, int]]:
        return await broker.rollouts().aliases(), await _live(broker)

    aliases, workers = with_broker(run)
    _emit([_view(a, workers) for _, a in sorted(aliases.items())])


@alias_app.command("history")
def alias_history(
    name: Annotated[str, typer.Argument()],
    count: Annotated[int, typer.Option(min=1, help="the last this many changes")] = 50,
) -> None:
    """Who changed the alias, when, why, and to what (oldest first)."""
    changes = with_broker(lambda b: b.rollouts().history(name, count))
    _emit(
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

    async def run(broker: Any) -> bool:
        store = broker.rollouts()
        current = await store.alias(name)
        if current is None:
            return False
        return bool(await store.delete(name, expected=current.revision, by=by or _by(), note=note))

    if not with_broker(run):
        console.print(f"[red]no alias {name} (or it changed meanwhile)[/red]")
        raise typer.Exit(1)
    _emit({"deleted": name})
