"""Which JSON Schema keywords the grammar enforces, and the first one a schema uses that it would not.

The grammar of a structured output comes from llama.cpp's converter (``json_schema_to_gbnf``), which
takes one branch per (sub)schema (a ``$ref``, a union, an enum, an object's properties, an array's
items, a string's pattern, format or length, else the bare type) and passes over every keyword that
branch does not read. A keyword passed over would be promised and not kept (``"maximum": 9``
answered with 12), so a schema that uses one is refused by name before anything is queued.
Annotations (titles, descriptions, defaults, examples) constrain nothing and are always accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",  # OpenAPI's hint beside a union whose members' tags the union enforces
    }
)
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
ENFORCED = (
    "type, properties, required, additionalProperties, items (with minItems and maxItems), "
    "prefixItems, enum, const, anyOf, oneOf, allOf of object schemas, $ref with $defs, and for a "
    "string one of pattern, format (date, time, date-time, uuid) or minLength with maxLength"
)
_OBJECT_PARTS = frozenset({"type", "properties", "required"})
MAX_DEPTH = 64  # levels of nesting in a schema (JSON's own encoder stops at 255; no schema needs 64)
# The grammar repeats a rule once per unit of a string's length, an array's item count and a pattern's
# `{m,n}`, nested one inside the next: llama.cpp's grammar parser refuses that nesting past ~1,000
# (the llamacpp engine answered "could not parse the output grammar") and overflowed its stack far
# past it (maxLength 100,000 killed the worker), and building it took the gateway ~1 s a million.
MAX_REPEAT = 1000
MAX_REPEATS = 20_000  # all of a schema's together: the grammar's size, the time to build it
_COUNTS = (("minLength", "maxLength"), ("minItems", "maxItems"))
# Every `{...}` the converter reads as a repetition: `{m}`, `{m,}`, `{m,n}`, `{,n}`, spaces and all.
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def unenforced(schema: Any, at: str = "") -> str | None:
    """The first keyword of ``schema`` the grammar would pass over, as "`keyword` at `path`"
    (the path from the schema's root; "`keyword`" alone at the root); None when it keeps them all.
    A schema malformed where it is read (``properties`` a list, ``anyOf`` a number) is named so."""
    try:
        return _unenforced(schema, at)
    except (TypeError, AttributeError, ValueError, KeyError) as exc:
        return f"a part that is no JSON Schema ({type(exc).__name__}: {str(exc)[:80]})"


def _unenforced(schema: Any, at: str = "") -> str | None:
    if not isinstance(schema, dict):
        return None
    used = {k for k in schema if k not in ANNOTATIONS and k not in ("$defs", "definitions")}
    for key in sorted(used - _read_by_its_branch(schema)):
        return f"`{key}` at `{at}`" if at else f"`{key}`"
    why = pattern_problem(schema["pattern"]) if isinstance(schema.get("pattern"), str) else None
    if why is not None:
        return f"`pattern` at `{at}` ({why})" if at else f"`pattern` ({why})"
    for i, part in enumerate(schema.get("allOf") or []):  # only the members' properties are read
        if (
            not isinstance(part, dict)
            or set(part) - _OBJECT_PARTS - ANNOTATIONS
            or part.get("type")
            not in (
                None,
                "object",
            )
        ):
            return f"`allOf` with a member that is not an object's properties at `{_at(at, f'allOf.{i}')}`"
    for key, sub in _subschemas(schema):
        found = _unenforced(sub, _at(at, key))
        if found is not None:
            return found
    return None


def repeats_problem(schema: Any) -> str | None:
    """Why the grammar of ``schema`` would be too large to build or to parse, or None: a length, an
    item count or a pattern's repetition over :data:`MAX_REPEAT`, or all of them over
    :data:`MAX_REPEATS`; or bounds no answer can keep (a minimum over its maximum, a negative or
    fractional count), which the converter took as they came (`minLength: 5, maxLength: 2` was
    answered with five characters)."""
    total, todo = 0, [("", schema)]
    while todo:
        at, sub = todo.pop()
        if not isinstance(sub, dict):
            continue
        where = f" at `{at}`" if at else ""
        counts: list[tuple[Any, str]] = []
        for low, high in _COUNTS:
            problem = _bounds_problem(sub, low, high)
            if problem is not None:
                return problem + where
            counts.append(max((sub.get(key) or 0, key) for key in (low, high)))
        pattern = sub.get("pattern")
        if isinstance(pattern, str):
            counts += [(max(int(m or 0), int(n or 0)), "pattern") for m, n in _QUANTIFIER.findall(pattern)]
        for n, key in counts:
            if n > MAX_REPEAT:
                return f"`{key}`{where} asks for {n} repetitions (the grammar enforces up to {MAX_REPEAT})"
            total += int(n)
        todo += [(_at(at, key), part) for key, part in _subschemas(sub)]
    if total > MAX_REPEATS:
        return (
            f"its lengths, item counts and pattern repetitions add up to {total} (the grammar "
            f"enforces at most {MAX_REPEATS} in all)"
        )
    return None


def _bounds_problem(schema: dict[str, Any], low: str, high: str) -> str | None:
    """Why a pair of bounds (``minLength``/``maxLength``, ``minItems``/``maxItems``) cannot be kept."""
    for key in (low, high):
        n = schema.get(key)
        if key in schema and (isinstance(n, bool) or not isinstance(n, int | float) or n < 0 or n != int(n)):
            return f"`{key}` is {orjson.dumps(n).decode()}, not a count (a whole number, 0 or more)"
    if low in schema and high in schema and schema[low] > schema[high]:
        return f"`{low}` ({schema[low]}) is more than `{high}` ({schema[high]}): no answer keeps both"
    return None


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests objects and lists more than ``limit`` levels deep."""
    level: list[Any] = [value]
    for _ in range(limit + 1):
        level = [
            v
            for item in level
            if isinstance(item, dict | list)
            for v in (item.values() if isinstance(item, dict) else item)
            if isinstance(v, dict | list)
        ]
        if not level:
            return False
    return True


def _at(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _read_by_its_branch(schema: dict[str, Any]) -> set[str]:
    """The keywords the converter's branch for ``schema`` reads (in its order of branches)."""
    kind = schema.get("type")
    if "$ref" in schema:
        return {"$ref"}
    if "oneOf" in schema or "anyOf" in schema:  # (oneOf first: an anyOf beside it is not read)
        members = schema.get("oneOf") or schema.get("anyOf") or []
        same = all(isinstance(m, dict) and m.get("type") == kind for m in members)
        return {"oneOf" if "oneOf" in schema else "anyOf"} | ({"type"} if same else set())
    if isinstance(kind, list):
        return {"type"}
    for key in ("const", "enum"):
        if key in schema:
            values = schema[key] if key == "enum" and isinstance(schema[key], list) else [schema[key]]
            return {key} | ({"type"} if all(_is(v, kind) for v in values) else set())
    if kind in (None, "object") and (
        "properties" in schema or schema.get("additionalProperties", True) is not True
    ):
        return _object_branch(schema)
    if kind in (None, "object") and "allOf" in schema:
        return {"type", "allOf"}
    return _typed_branch(schema, kind)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "object": (dict,),
    "array": (list,),
}


def _is(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of JSON type ``kind`` (any, when there is none)."""
    if kind is None:
        return True
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(kind, str) and isinstance(value, _JSON_TYPES.get(kind, ()))


def _object_branch(schema: dict[str, Any]) -> set[str]:
    """An object's keywords: ``required`` only of listed properties, and other properties
    (``additionalProperties`` true or a schema) only where every listed one is required (with an
    optional one the converter's rule runs the two together without a comma)."""
    read = {"type", "properties"}
    listed = set(schema.get("properties") or {})
    required = schema.get("required", [])
    if isinstance(required, list) and set(required) <= listed:
        read.add("required")
    extra = schema.get("additionalProperties")
    if extra is None or extra is False or listed <= set(required if isinstance(required, list) else []):
        read.add("additionalProperties")
    return read


def _typed_branch(schema: dict[str, Any], kind: Any) -> set[str]:
    """The rest of the converter's branches: arrays, strings, then the bare type."""
    if kind in (None, "array") and "items" in schema:
        return {"type", "items"} | ({"minItems", "maxItems"} if isinstance(schema["items"], dict) else set())
    if kind in (None, "array") and "prefixItems" in schema:
        # Exactly its members (a tuple): bounds that admit that many hold (pydantic writes both).
        n = len(schema["prefixItems"]) if isinstance(schema["prefixItems"], list) else -1
        held = schema.get("minItems", 0) <= n <= schema.get("maxItems", n)
        return {"type", "prefixItems"} | ({"minItems", "maxItems"} if held else set())
    if kind in (None, "string") and "pattern" in schema:
        return {"type", "pattern"}
    if kind in (None, "string") and schema.get("format") in FORMATS:
        return {"type", "format"}
    if kind == "string" and ("minLength" in schema or "maxLength" in schema):
        return {"type", "minLength", "maxLength"}
    if kind == "object" and schema.get("additionalProperties") is True:
        return {"type", "additionalProperties"}
    return {"type"}


def _subschemas(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """The schemas inside ``schema`` that the grammar visits, each with its path below it."""
    out: list[tuple[str, Any]] = []
    for name, sub in (schema.get("properties") or {}).items():
        out.append((f"properties.{name}", sub))
    if isinstance(schema.get("additionalProperties"), dict):
        out.append(("additionalProperties", schema["additionalProperties"]))
    items = schema.get("items")
    if isinstance(items, dict):
        out.append(("items", items))
    for key in ("prefixItems", "anyOf", "oneOf", "allOf") + (("items",) if isinstance(items, list) else ()):
        for i, sub in enumerate(schema.get(key) or []):
            out.append((f"{key}.{i}", sub))
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            out.append((f"{key}.{name}", sub))
    return out


# A pattern's escapes the grammar converter copies as they are (which llama.cpp's parser refuses),
# as the character classes they stand for; only characters a JSON string holds unescaped (a space
# for white space: a tab or a newline would need an escape the grammar does not write).
_CLASSES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " "}
_SAFE = '"\\\\\\x7F\\x00-\\x1F'  # what a negated class must leave out, in GBNF


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be enforced in a JSON string, or None."""
    if not (pattern.startswith("^") and pattern.endswith("$")):
        return "not anchored: it must start with ^ and end with $"
    if '"' in pattern or "\\\\" in pattern or any(c < " " for c in pattern) or _range_over_escapes(pattern):
        return 'it matches `"`, `\\` or a control character, which a JSON string must escape'
    in_class, i = False, 0
    while i < len(pattern) - 1:
        ch, nxt = pattern[i], pattern[i + 1]
        if ch == "\\":
            if nxt.isalnum() and (nxt.lower() not in _CLASSES or (in_class and nxt.isupper())):
                return f"its `\\{nxt}` (enforced: \\d \\w \\s, their negations outside [...], punctuation)"
            i += 2
            continue
        in_class = (in_class and ch != "]") or (not in_class and ch == "[")
        i += 1
    return None


def _range_over_escapes(pattern: str) -> bool:
    """Whether a class range of ``pattern`` (`[ -~]`, `[A-z]`) spans `"` or `\\`."""
    for low, high in re.findall(r"(?<!\\)(.)-(?!\])(.)", pattern):
        if low <= '"' <= high or low <= "\\" <= high:
            return True
    return False


def json_patterns(schema: Any) -> Any:
    """``schema`` with every pattern as :func:`json_pattern` writes it."""
    if isinstance(schema, list):
        return [json_patterns(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: json_patterns(v) for k, v in schema.items()}
    if isinstance(schema.get("pattern"), str) and isinstance(schema.get("type", "string"), str):
        out["pattern"] = json_pattern(schema["pattern"])
    return out


def json_pattern(pattern: str) -> str:
    """``pattern`` with its escapes as character classes the converter copies to a valid grammar."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            i += 2
            if nxt.lower() in _CLASSES:
                chars = _CLASSES[nxt.lower()]
                if in_class:
                    out.append(chars)  # (a negated one inside a class is not enforced: refused above)
                else:
                    out.append(f"[^{chars}]" if nxt.isupper() else f"[{chars}]")
            else:
                out.append(f"\\x{ord(nxt):02X}" if in_class else f"[\\x{ord(nxt):02X}]")
            continue
        in_class = (in_class and ch != "]") or (not in_class and ch == "[")
        out.append(ch)
        i += 1
    return "".join(out)


def json_safe_classes(grammar: str) -> str:
    """The converter's `.` and negated classes leave out what a JSON string must escape (a class's
    `[^` only: never text inside a literal, an enum's value `"[^a]"`)."""
    grammar = grammar.replace("dot ::= [^\\x0A\\x0D]", f"dot ::= [^{_SAFE}]")
    out, i, state = [], 0, ""  # state: "" (rule text), '"' (a literal), "[" (a class)
    while i < len(grammar):
        ch = grammar[i]
        if state and ch == "\\":
            out.append(grammar[i : i + 2])
            i += 2
            continue
        if not state and ch == "[" and grammar.startswith("[^", i) and not grammar.startswith('[^"\\', i):
            out.append(f"[^{_SAFE}")
            state, i = "[", i + 2
            continue
        if not state and ch in '"[':
            state = ch
        elif (state == '"' and ch == '"') or (state == "[" and ch == "]"):
            state = ""
        out.append(ch)
        i += 1
    return "".join(out)


ROOT_DEF = "root-schema"  # the root's own definition, where a schema refers to itself (`"$ref": "#"`)


def converter_ready(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` as the converter can follow its references: definitions named as grammar rules may
    be (`linked_list_node` became a rule name llama.cpp refused), the root's own references (`#`)
    through a definition of it, and a root that is only a reference (pydantic's recursive models)
    replaced by what it names (the converter failed on both)."""
    own = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    names: dict[str, str] = {}
    for name in own:  # prefixed: never the name of a rule the converter gives a property or a type
        safe = "def-" + re.sub(r"[^a-zA-Z0-9-]", "-", name)
        while safe in names.values() or safe == ROOT_DEF:
            safe += "-"
        names[name] = safe
    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}

    def moved(value: Any) -> Any:
        return retargeted(value, lambda name: names.get(name, name), ROOT_DEF)

    defs = {names[name]: moved(sub) for name, sub in own.items() if isinstance(sub, dict)}
    root = moved(body)
    if refers_to_root(body):
        defs[ROOT_DEF] = root
    ref = root.get("$ref") if set(root) - ANNOTATIONS == {"$ref"} else None
    if isinstance(ref, str) and ref.removeprefix("#/$defs/") in defs:
        root = dict(defs[ref.removeprefix("#/$defs/")])
    return {**root, "$defs": defs} if defs else root


def retargeted(value: Any, rename: Callable[[str], str], root: str) -> Any:
    """``value`` with its references pointed at definitions moved to the root's ``$defs``:
    `#/$defs/X` or `#/definitions/X` (a pointer into one keeps the rest of its path) at
    `#/$defs/<rename(X)>`, `#` at `#/$defs/<root>`; definitions inside it left out."""
    if isinstance(value, list):
        return [retargeted(v, rename, root) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: retargeted(v, rename, root) for k, v in value.items() if k not in ("$defs", "definitions")}
    ref = value.get("$ref")
    if ref == "#":
        out["$ref"] = f"#/$defs/{root}"
    elif isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
        parts = ref.split("/")
        parts[1], parts[2] = "$defs", rename(parts[2])
        out["$ref"] = "/".join(parts)
    return out


def refers_to_root(value: Any) -> bool:
    """Whether ``value`` (a schema, or part of one) refers to its root (a `$ref` of `#`)."""
    if isinstance(value, dict):
        return value.get("$ref") == "#" or any(refers_to_root(v) for v in value.values())
    return isinstance(value, list) and any(refers_to_root(v) for v in value)
