"""``breakwater models alias set|show|list|history|delete`` against a real Redis: weights, stickiness,
the guard's settings, compare-and-set revisions, who changed what, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

import orjson

from breakwater.broker import Broker
from breakwater.config import GatewaySettings
from breakwater.redis_server import RedisServer
from breakwater.rollout.aliases import Alias


def alias(server: RedisServer, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BREAKWATER_REDIS_URL": server.url, "BREAKWATER_KEY_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "breakwater", "models", "alias", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


def test_set_show_history_and_delete(redis_server: RedisServer, prefix: str) -> None:
    first = ok(
        alias(
            redis_server,
            prefix,
            "set",
            "llama",
            "llama@a=90",
            "llama@b=10",
            "--by",
            "ana",
            "--note",
            "canary",
        )
    )
    assert first["weights"] == {"llama@a": 90, "llama@b": 10} and first["revision"] == 1
    assert first["sticky"] == "none" and "guard" not in first
    assert first["live_workers"] == {"llama@a": 0, "llama@b": 0}
    no_worker = alias(
        redis_server, prefix, "set", "llama", "llama@a=50", "llama@b=50", "--sticky", "user", "--by", "bo"
    )
    assert "llama@a has no live worker" in no_worker.stderr.replace("\n", " ")
    second = ok(no_worker)
    assert second["revision"] == 2 and second["sticky"] == "user"
    # Guard settings, kept by later changes that do not name them; stickiness kept too.
    guarded = ok(
        alias(redis_server, prefix, "set", "llama", "llama@a=99", "llama@b=1", "--guard-error-delta", "0.1")
    )
    assert guarded["guard"] == {
        "max_error_delta": 0.1,
        "min_requests": 50,
        "window_s": 60,
        "ttft_ratio": 0.0,
        "baseline": "",
        "ttft_slo_ms": 0,
    }
    assert guarded["sticky"] == "user"
    kept = ok(
        alias(
            redis_server, prefix, "set", "llama", "llama@b=100", "--by", "cy", "--note", "blue-green switch"
        )
    )
    assert (
        kept["guard"]["max_error_delta"] == 0.1
        and kept["weights"] == {"llama@b": 100}
        and kept["revision"] == 4
    )
    off = ok(alias(redis_server, prefix, "set", "llama", "llama@b=100", "--no-guard"))
    assert "guard" not in off
    shown = ok(alias(redis_server, prefix, "show", "llama"))
    assert shown["revision"] == 5 and shown["weights"] == {"llama@b": 100}
    assert [a["name"] for a in ok(alias(redis_server, prefix, "list"))] == ["llama"]
    history = ok(alias(redis_server, prefix, "history", "llama"))
    assert [h["revision"] for h in history] == [1, 2, 3, 4, 5]
    assert history[0]["by"] == "ana" and history[0]["note"] == "canary"
    assert history[0]["weights"] == {"llama@a": 90, "llama@b": 10}
    assert history[3]["by"] == "cy" and history[3]["note"] == "blue-green switch"
    assert ok(alias(redis_server, prefix, "delete", "llama", "--by", "dee")) == {"deleted": "llama"}
    gone = alias(redis_server, prefix, "show", "llama")
    assert gone.returncode == 1 and "no alias llama" in gone.stderr
    after = ok(alias(redis_server, prefix, "history", "llama"))
    assert after[-1]["by"] == "dee" and after[-1]["weights"] is None and after[-1]["revision"] == 6


async def test_a_change_by_hand_clears_the_guards_rollbacks(redis_server: RedisServer, prefix: str) -> None:
    broker = Broker.connect(GatewaySettings(redis_url=redis_server.url, key_prefix=prefix))
    try:
        await broker.rollouts().put(
            Alias("llama", {"llama@a": 50, "llama@b": 0}, rolled_back={"llama@b": "x"}), expected=0
        )
        assert (await broker.rollouts().alias("llama")).rolled_back == {"llama@b": "x"}  # type: ignore[union-attr]
        ok(alias(redis_server, prefix, "set", "llama", "llama@a=100"))
        stored = await broker.rollouts().alias("llama")
        assert stored is not None and stored.rolled_back == {} and stored.revision == 2
    finally:
        await broker.aclose()


def test_bad_input_is_refused_and_writes_nothing(redis_server: RedisServer, prefix: str) -> None:
    for args, says in [
        (["llama", "llama@a=x"], "not an integer"),
        (["llama", "llama@a=-1"], ">= 0"),
        (["llama", "llama"], "cannot name itself"),
        (["bad@name", "llama@a"], "without `@`"),
        (["llama", "llama@a", "--sticky", "sometimes"], "none, tenant, user"),
    ]:
        result = alias(redis_server, prefix, "set", *args)
        assert result.returncode == 2, (args, result.stdout)
        assert says in " ".join(result.stderr.split()), (args, result.stderr)
    assert ok(alias(redis_server, prefix, "list")) == []
    assert ok(alias(redis_server, prefix, "history", "llama")) == []


def test_chains_ties_and_tenants(redis_server: RedisServer, prefix: str) -> None:
    ok(alias(redis_server, prefix, "set", "llama", "llama@a=90", "llama@b=10"))
    # No alias of aliases: a request would queue on a name no worker serves.
    chained = alias(redis_server, prefix, "set", "chat", "llama=100")
    assert chained.returncode == 2 and "is an alias" in " ".join(chained.stderr.split())
    ok(alias(redis_server, prefix, "set", "chat", "other@a=100"))
    named = alias(redis_server, prefix, "set", "other@a", "llama@a=100")
    assert named.returncode == 2 and "without `@`" in " ".join(named.stderr.split())
    ok(alias(redis_server, prefix, "set", "x", "y@1=100"))
    reverse = alias(redis_server, prefix, "set", "y", "z@1=100")  # fine: y is no version of x
    assert reverse.returncode == 0, reverse.stderr
    # A guard needs a unique baseline: a tie at the top must name one.
    tie = alias(redis_server, prefix, "set", "llama", "llama@a=50", "llama@b=50", "--guard")
    assert tie.returncode == 2 and "--guard-baseline" in " ".join(tie.stderr.split())
    named_base = ok(
        alias(
            redis_server,
            prefix,
            "set",
            "llama",
            "llama@a=50",
            "llama@b=50",
            "--guard",
            "--guard-baseline",
            "llama@a",
        )
    )
    assert named_base["guard"]["baseline"] == "llama@a"
    slo = ok(
        alias(redis_server, prefix, "set", "llama", "llama@a=90", "llama@b=10", "--guard-ttft-slo-ms", "500")
    )
    assert slo["guard"]["ttft_slo_ms"] == 500 and slo["guard"]["baseline"] == "llama@a"
    odd = alias(
        redis_server, prefix, "set", "llama", "llama@a=90", "llama@b=10", "--guard-ttft-slo-ms", "300"
    )
    assert odd.returncode == 2 and "250, 500, 1000" in " ".join(odd.stderr.split())
    # A tenant's own split; the others keep the alias's; clear-tenant puts it back.
    acme = ok(alias(redis_server, prefix, "set", "llama", "llama@b=100", "--tenant", "acme"))
    assert acme["tenants"] == {"acme": {"llama@b": 100}} and acme["weights"] == {"llama@a": 90, "llama@b": 10}
    again = ok(alias(redis_server, prefix, "set", "llama", "llama@a=60", "llama@b=40"))
    assert again["tenants"] == {"acme": {"llama@b": 100}}  # kept by a change of the default split
    assert "tenants" not in ok(alias(redis_server, prefix, "clear-tenant", "llama", "acme"))
    missing = alias(redis_server, prefix, "clear-tenant", "llama", "acme")
    assert missing.returncode == 1
    mixed = alias(redis_server, prefix, "set", "llama", "llama@b=100", "--tenant", "acme", "--sticky", "user")
    assert mixed.returncode == 2 and "--tenant sets a tenant's weights only" in " ".join(mixed.stderr.split())
    # A tenant's split may not name an alias either, nor may an alias take a name a tenant split uses.
    ok(alias(redis_server, prefix, "set", "llama", "beta-model=100", "--tenant", "acme"))
    via_tenant = alias(redis_server, prefix, "set", "beta-model", "llama@a=100")
    assert via_tenant.returncode == 2 and "names `beta-model` as a version" in " ".join(
        via_tenant.stderr.split()
    )
    # A blue-green switch away from a named baseline drops the name (the greatest weight is it now).
    named = ok(
        alias(redis_server, prefix, "set", "llama", "llama@a=50", "llama@b=50", "--guard-baseline", "llama@a")
    )
    assert named["guard"]["baseline"] == "llama@a"
    switched = alias(redis_server, prefix, "set", "llama", "llama@a=0", "llama@b=100")
    assert switched.returncode == 0 and "baseline llama@a has no weight now" in " ".join(
        switched.stderr.split()
    )
    assert ok(switched)["guard"]["baseline"] == ""
    no_alias = alias(redis_server, prefix, "set", "nope", "nope@a=1", "--tenant", "acme")
    assert no_alias.returncode == 2 and "no alias nope" in " ".join(no_alias.stderr.split())


def test_revisions_never_repeat_after_a_delete(redis_server: RedisServer, prefix: str) -> None:
    assert ok(alias(redis_server, prefix, "set", "llama", "llama@a"))["revision"] == 1
    ok(alias(redis_server, prefix, "delete", "llama"))
    assert ok(alias(redis_server, prefix, "set", "llama", "llama@b"))["revision"] == 3
    assert [h["revision"] for h in ok(alias(redis_server, prefix, "history", "llama"))] == [1, 2, 3]


async def test_a_stale_writer_conflicts_and_a_resent_write_is_applied_once(
    redis_server: RedisServer, prefix: str
) -> None:
    from breakwater.broker.rollouts import Conflict

    broker = Broker.connect(GatewaySettings(redis_url=redis_server.url, key_prefix=prefix))
    try:
        store = broker.rollouts()
        first = await store.put(Alias("llama", {"llama@a": 100}), expected=0)
        # The same write sent again (its reply was lost): applied once, answered as written.
        args_alias = Alias("llama", {"llama@a": 100})
        keys = [broker.keys.aliases(), broker.keys.alias_history(), broker.keys.alias_revisions()]
        resent = await store._set(
            keys, ["llama", first.to_json(), 0, 1, "", "", first.updated_ms, 10_000, "llama@a"]
        )
        assert [int(x) for x in resent] == [1, 1]
        assert len(await store.history("llama")) == 1
        # A writer that read revision 0 conflicts now. Its split differs from the stored one: the
        # same record written in the same millisecond would be the resent write above, not a
        # stale one (on a fast run both puts can share Redis's millisecond).
        try:
            await store.put(replace(args_alias, weights={"llama@a": 50, "llama@b": 50}), expected=0)
            raise AssertionError("a stale write was applied")
        except Conflict:
            pass
        assert (await store.alias("llama")) == first
    finally:
        await broker.aclose()
