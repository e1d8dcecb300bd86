"""Versions and aliases (issue 19): the names, the alias record, and how a request picks a version.

A version is a model name of its own, ``<model>@<version>``, served by workers started with
``model_version`` (they register that name and pull its queue). An alias maps a name clients use to
versions with integer weights. The gateway picks one version per request at admission and queues
the request on it, so retries, reclaim, continuation and resume stay on that version.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

VERSION_SEP = "@"
TTFT_SLOS = (250, 500, 1000, 2000, 5000, 10000)  # the SLOs (ms) gateways count misses of, per version
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")

Sticky = Literal["none", "tenant", "user"]
STICKY: tuple[Sticky, ...] = ("none", "tenant", "user")


def served_name(model: str, version: str) -> str:
    """The name a worker serving ``version`` of ``model`` registers ('' version: the model's own)."""
    if not version:
        return model
    if not _VERSION.fullmatch(version):
        raise ValueError(
            f"a model version is 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -): {version!r}"
        )
    if VERSION_SEP in model:
        raise ValueError(f"model {model!r} already names a version; give the model without `@`")
    return f"{model}{VERSION_SEP}{version}"


def base_of(name: str) -> str:
    """``llama@2026-11`` -> ``llama``; a name without a version is its own base."""
    return name.split(VERSION_SEP, 1)[0]


def check_alias_name(name: str) -> None:
    if not _NAME.fullmatch(name) or VERSION_SEP in name or "#" in name:
        raise ValueError(f"an alias is a model name without `@` or `#` (1-128 characters): {name!r}")


@dataclass(frozen=True, slots=True)
class Guard:
    """Roll a canary back (its weight to 0) when, over the last ``window_s`` since the alias last
    changed, with at least ``min_requests`` finished on it and on the baseline, its error rate
    exceeds the baseline's by ``max_error_delta``, or (``ttft_slo_ms`` > 0) its share of first
    tokens later than that SLO does (its burn of the SLO), or (``ttft_ratio`` > 0) its mean time to
    first token is more than that many times the baseline's. ``baseline``: the version the others are
    judged against; '' means the one with the greatest weight (which must then be unique)."""

    max_error_delta: float = 0.05
    min_requests: int = 50
    window_s: int = 60
    ttft_ratio: float = 0.0
    baseline: str = ""
    ttft_slo_ms: int = 0  # > 0: also roll back when its share of first tokens later than this exceeds
    # the baseline's by max_error_delta (the SLO's burn); one of broker.rollouts.TTFT_SLOS_MS


def _check_weights(alias: str, weights: dict[str, int], what: str) -> None:
    if not weights:
        raise ValueError(f"{what} of alias {alias!r} needs at least one version")
    for version, weight in weights.items():
        if version == alias:
            raise ValueError(f"alias {alias!r} cannot name itself")
        if weight < 0:
            raise ValueError(f"weight of {version!r} is {weight}; weights are >= 0")


@dataclass(frozen=True, slots=True)
class Alias:
    """``weights``: version -> weight (>= 0), in the order given; ``tenants``: a tenant's own
    weights, where its split differs. ``revision`` counts changes (the store sets it).
    ``rolled_back``: versions the guard rolled back since the last change by hand, with why (the
    alert fires while any is listed)."""

    name: str
    weights: dict[str, int]
    sticky: Sticky = "none"
    guard: Guard | None = None
    revision: int = 0
    updated_ms: int = 0
    by: str = ""
    note: str = ""
    rolled_back: dict[str, str] = field(default_factory=dict)
    tenants: dict[str, dict[str, int]] = field(default_factory=dict)
    # When the guard's evidence starts (Redis's clock, ms): a change by hand resets it, the guard's
    # own rollbacks do not (the other canaries keep their window).
    since_ms: int = 0

    def __post_init__(self) -> None:
        check_alias_name(self.name)
        _check_weights(self.name, self.weights, "the weights")
        for tenant, weights in self.tenants.items():
            _check_weights(self.name, weights, f"tenant {tenant!r}'s weights")
        if self.sticky not in STICKY:
            raise ValueError(f"sticky is one of {', '.join(STICKY)}, not {self.sticky!r}")
        if self.guard is not None:
            if self.guard.ttft_slo_ms and self.guard.ttft_slo_ms not in TTFT_SLOS:
                raise ValueError(f"the guard's TTFT SLO is one of {', '.join(map(str, TTFT_SLOS))} ms")
            if self.guard.baseline and self.guard.baseline not in self.weights:
                raise ValueError(f"the guard's baseline {self.guard.baseline!r} is not one of the versions")
            if self.guard.baseline and not self.weights[self.guard.baseline] and len(self.live) > 0:
                raise ValueError(f"the guard's baseline {self.guard.baseline!r} has weight 0")
            top = max(self.weights.values())
            if not self.guard.baseline and top and list(self.weights.values()).count(top) > 1:
                raise ValueError(
                    "the greatest weight is shared: name the guard's baseline (--guard-baseline)"
                )

    @property
    def versions(self) -> list[str]:
        """Every version the alias names, for every tenant."""
        named = dict.fromkeys(self.weights)
        for weights in self.tenants.values():
            named.update(dict.fromkeys(weights))
        return list(named)

    def serves(self, version: str) -> bool:
        """Some split (the alias's or a tenant's) gives ``version`` a weight above 0."""
        return any(w.get(version, 0) > 0 for w in (self.weights, *self.tenants.values()))

    def weights_for(self, tenant: str) -> dict[str, int]:
        return self.tenants.get(tenant, self.weights)

    def live_for(self, tenant: str) -> list[tuple[str, int]]:
        """The tenant's versions with weight > 0, in order."""
        return [(v, w) for v, w in self.weights_for(tenant).items() if w > 0]

    @property
    def live(self) -> list[tuple[str, int]]:
        """The versions with weight > 0, in order (the default split)."""
        return [(v, w) for v, w in self.weights.items() if w > 0]

    @property
    def baseline(self) -> str:
        """The guard's baseline: named, or the version with the greatest weight."""
        if self.guard is not None and self.guard.baseline:
            return self.guard.baseline
        return max(self.weights, key=lambda v: self.weights[v])

    def pick_by_hash(self, key: str, live: list[tuple[str, int]] | None = None) -> str:
        """The version for ``key`` (a tenant or a user): a fixed point in [0, 1) per alias and key,
        mapped through the cumulative weights. A weight change moves only the keys whose point
        crosses a boundary."""
        live = self.live if live is None else live
        total = sum(w for _, w in live)
        digest = hashlib.blake2b(f"{self.name}\x1f{key}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64 * total
        for version, weight in live:
            if point < weight:
                return version
            point -= weight
        return live[-1][0]

    def without(self, version: str, *, by: str, why: str) -> Alias:
        """The alias with ``version``'s weight 0 everywhere (the guard's rollback). A tenant's own
        split left with no weight is dropped: that tenant is back on the alias's split."""
        tenants = {t: {**w, version: 0} if version in w else w for t, w in self.tenants.items()}
        return replace(
            self,
            weights={**self.weights, version: 0} if version in self.weights else self.weights,
            tenants={t: w for t, w in tenants.items() if any(w.values())},
            by=by,
            note=f"rolled back {version}: {why}",
            rolled_back={**self.rolled_back, version: why},
        )

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "name": self.name,
            "weights": [[v, w] for v, w in self.weights.items()],
            "sticky": self.sticky,
            "revision": self.revision,
            "updated_ms": self.updated_ms,
            "by": self.by,
            "note": self.note,
            "rolled_back": self.rolled_back,
            "since_ms": self.since_ms,
        }
        if self.tenants:
            data["tenants"] = {t: [[v, w] for v, w in ws.items()] for t, ws in self.tenants.items()}
        if self.guard is not None:
            g = self.guard
            data["guard"] = {
                "max_error_delta": g.max_error_delta,
                "min_requests": g.min_requests,
                "window_s": g.window_s,
                "ttft_ratio": g.ttft_ratio,
                "baseline": g.baseline,
                "ttft_slo_ms": g.ttft_slo_ms,
            }
        return orjson.dumps(data).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Alias:
        data = orjson.loads(raw)
        guard = data.get("guard")
        return cls(
            name=str(data["name"]),
            weights={str(v): int(w) for v, w in data["weights"]},
            sticky=data.get("sticky", "none"),
            guard=Guard(**{k: v for k, v in guard.items() if k in Guard.__dataclass_fields__})
            if guard
            else None,
            revision=int(data.get("revision", 0)),
            updated_ms=int(data.get("updated_ms", 0)),
            by=str(data.get("by", "")),
            note=str(data.get("note", "")),
            rolled_back={str(k): str(v) for k, v in (data.get("rolled_back") or {}).items()},
            tenants={
                str(t): {str(v): int(w) for v, w in ws} for t, ws in (data.get("tenants") or {}).items()
            },
            since_ms=int(data.get("since_ms", 0)),
        )


class SmoothWeighted:
    """nginx's smooth weighted round robin over an alias's live versions: over any run of ``total``
    picks each version gets exactly its weight, spread out (90/10: one in ten, not ten in a row)."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}
        self._of: tuple[tuple[str, int], ...] = ()

    def pick(self, live: list[tuple[str, int]]) -> str:
        key = tuple(live)
        if key != self._of:  # the weights changed: start over
            self._of, self._current = key, {v: 0 for v, _ in live}
        total = sum(w for _, w in live)
        for version, weight in live:
            self._current[version] += weight
        best = max(self._current, key=lambda v: self._current[v])
        self._current[best] -= total
        return best


def parse_weights(items: list[str]) -> dict[str, int]:
    """``["llama@a=90", "llama@b=10"]`` (a bare version gets weight 100) -> {version: weight}."""
    weights: dict[str, int] = {}
    for item in items:
        version, sep, weight = item.partition("=")
        if not version:
            raise ValueError(f"expected VERSION=WEIGHT, got {item!r}")
        try:
            weights[version] = int(weight) if sep else 100
        except ValueError:
            raise ValueError(f"weight of {version!r} is not an integer: {weight!r}") from None
    return weights
