"""The request record type is the one place its field names live besides the Lua scripts."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from breakwater.broker.record import FIELDS, RequestRecord, RequestSpec, Status

# Field names in the scripts: the quoted words after a hash command's key argument.
_HASH_CALL = re.compile(r"redis\.call\('(HMGET|HSET|HINCRBY|HGET)',\s*KEYS\[1\],([^)]*)\)")
_QUOTED = re.compile(r"'([a-z_]+)'")
# Their KEYS[1] is not a request record: a tenant's hash, a batch's, a file's.
NOT_RECORD_SCRIPTS = {
    *("limits.lua", "meter.lua", "batch_move.lua", "batch_answer.lua", "file_delete.lua", "key_rotate.lua")
}


def _script_fields() -> set[str]:
    found: set[str] = set()
    lua = resources.files("breakwater.broker").joinpath("lua")
    for script in lua.iterdir():
        if script.name in NOT_RECORD_SCRIPTS:
            continue
        text = script.read_text()
        for _, args in _HASH_CALL.findall(text):
            # In HSET, quoted words alternate with values; values here are never quoted words
            # except statuses, which are not field names.
            found |= {w for w in _QUOTED.findall(args) if w not in {s.value for s in Status}}
    return found


def test_every_field_the_scripts_use_is_declared() -> None:
    fields = _script_fields()
    assert {"attempt", "status", "seq", "tokens", "wseq", "deadline_ms"} <= fields  # the parse works
    assert fields <= FIELDS, sorted(fields - FIELDS)


def test_no_field_name_outside_the_record_module() -> None:
    """Outside broker/ (record, scripts, the broker that reads them), no source file names a field."""
    src = Path(__file__).resolve().parents[2] / "src" / "breakwater"
    hits = []
    for path in src.rglob("*.py"):
        if path.parent.name == "broker":
            continue
        text = path.read_text()
        for name in ("deadline_ms", "created_ms", "tokens_at_start", "detached_ms", "wseq", "job_id"):
            if f'"{name}"' in text or f"'{name}'" in text:
                hits.append(f"{path.relative_to(src)}: {name}")
    assert hits == []


def test_spec_round_trips_through_the_hash() -> None:
    spec = RequestSpec(
        model="m",
        lane="batch",
        kind="chat",
        request_id="req",
        timeout_s=12.5,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=7,
        temperature=0.0,
        top_p=0.9,
        top_k=40,
        seed=0,
        stop=["\n"],
        ignore_eos=True,
        include_usage=True,
        choices=6,
        prompts=3,
    )
    assert RequestSpec.from_hash(spec.to_hash()) == spec
    record = RequestRecord.from_hash({**spec.to_hash(), "status": "running", "attempt": "2"}, emitted="ab")
    assert (record.status, record.attempt, record.emitted, record.chat) == (Status.RUNNING, 2, "ab", True)
