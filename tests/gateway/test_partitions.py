"""Hot-model partitions: their queue names and slots, and which one a request joins."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from breakwater.broker.cluster import slot_of
from breakwater.config import CommonSettings
from breakwater.gateway.partitions import Partitions
from breakwater.keys import Keys, queues


def primary_of(slot: int, primaries: int) -> int:
    """The primary holding ``slot`` when ``primaries`` hold equal ranges (redis-cli --cluster create)."""
    return min(primaries - 1, slot * primaries // 16384)


def test_an_unpartitioned_model_keeps_its_own_queue() -> None:
    assert queues("sim") == ("sim",)
    assert queues("sim", 3)[0] == "sim"  # going from 1 to N partitions keeps the queued jobs reachable
    assert Keys("bw").jobs(queues("sim", 3)[1], "batch").startswith("bw:jobs:{sim#1.")


@pytest.mark.parametrize("n", [2, 3, 4, 6, 8])
def test_partitions_land_evenly_on_the_primaries_of_an_evenly_split_cluster(n: int) -> None:
    for model in ["sim", "meta-llama/Llama-3.1-70B-Instruct", "smollm2:135m", *(f"m{i}" for i in range(200))]:
        names = queues(model, n)
        assert len(set(names)) == n
        slots = [slot_of(Keys().jobs(q, "interactive")) for q in names]
        # every key of a partition shares its slot (one hash tag)
        assert all(slot_of(Keys().fair(q, "batch")) == s for q, s in zip(names, slots, strict=True))
        for primaries in (2, 3, 4):
            if n % primaries and primaries % n:
                continue  # N and M must divide one another (else: move a slot, docs/deploy.md)
            per_primary = Counter(primary_of(s, primaries) for s in slots)
            assert len(per_primary) == min(n, primaries), (model, primaries, slots)
            assert max(per_primary.values()) == max(1, n // primaries), (model, primaries, slots)


def test_the_partitions_setting() -> None:
    settings = CommonSettings(partitions="sim=3, org/big:70b=2")
    assert settings.partitions_of("sim") == 3
    assert settings.partitions_of("org/big:70b") == 2
    assert settings.partitions_of("other") == 1
    for bad in ("sim", "sim=x", "sim#1=2", "{sim}=2", "sim=2,", "sim=0", "sim=65", "sim=2,sim=3"):
        with pytest.raises(ValidationError):
            CommonSettings(partitions=bad)


def test_a_request_joins_the_less_loaded_of_two_partitions() -> None:
    parts = Partitions(CommonSettings(partitions="sim=3"), max_queued=10)
    names = parts.queues("sim")
    assert parts.limit("sim") == 4  # the lane's bound shared out: ceil(10 / 3)
    assert parts.limit("other") == 10
    assert parts.order("other", "interactive") == ["other"]
    busy, idle, mid = names
    parts.observe(busy, "interactive", 50)
    parts.observe(mid, "interactive", 20)
    parts.observe(idle, "interactive", 0)
    firsts = Counter(parts.order("sim", "interactive")[0] for _ in range(600))
    # two of three are drawn; the less loaded goes first: the busiest never, the idlest whenever drawn
    assert busy not in firsts
    assert firsts[idle] > firsts[mid] > 0
    for _ in range(50):
        order = parts.order("sim", "interactive")
        assert sorted(order) == sorted(names)  # every partition is tried before the lane refuses
    # another lane's lengths are its own: with none seen, every partition is drawn first
    assert set(Counter(parts.order("sim", "batch")[0] for _ in range(300))) == set(names)


def test_a_partition_the_signals_could_not_read_goes_last() -> None:
    parts = Partitions(CommonSettings(partitions="sim=3"), max_queued=10)
    names = parts.queues("sim")
    parts.unreachable(names[0])
    for _ in range(100):
        order = parts.order("sim", "interactive")
        assert order[-1] == names[0] and sorted(order) == sorted(names)
    parts.observe(names[0], "interactive", 0)  # it answered again
    assert {parts.order("sim", "interactive")[0] for _ in range(300)} == set(names)
    for q in names:
        parts.unreachable(q)
    assert sorted(parts.order("sim", "interactive")) == sorted(names)  # all down: all still tried
