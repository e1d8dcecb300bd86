"""``breakwater models alias set|show|list|history|delete`` against a real Redis: weights, stickiness,
the guard's settings, compare-and-set revisions, who changed what, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
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
    assert guarded["guard"] == {"max_error_delta": 0.1, "min_requests": 50, "window_s": 60, "ttft_ratio": 0.0}
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
