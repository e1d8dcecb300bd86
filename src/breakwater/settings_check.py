"""The environment's settings checked as an operator needs them said: a bad value in one line that
names its variable (not a traceback), and a ``BREAKWATER_*`` variable no part of Breakwater reads (a
typo: ``BREAKWATER_AUTHH=keys`` would otherwise leave auth off without a word)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import ValidationError

from breakwater.config import GatewaySettings, WorkerSettings
from breakwater.sim_settings import SimServerSettings

PREFIX = "BREAKWATER_"
# Read straight from the environment, not through a settings class (VLLM_PYTHON: by tests/vllm_engine).
OTHERS = frozenset({"GATEWAY_SIBLING", "MODEL_CACHE", "PROBE_API_KEY", "VLLM_PYTHON"})
_SECRET_WORDS = ("pepper", "password", "secret", "token", "key", "url")  # a URL may hold a password


def settings_error(exc: ValidationError) -> str | None:
    """A settings class's validation error as lines naming each variable (a secret's value left out);
    None for another model's error (a bug, whose traceback is wanted)."""
    if not exc.title.endswith("Settings"):
        return None
    lines = []
    for error in exc.errors():
        if not error.get("loc"):  # a check of several settings: its input is all of them, secrets too
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        shown = "" if any(w in field for w in _SECRET_WORDS) else f" (got {error.get('input')!r})"
        said = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{PREFIX}{field.upper()}: {said}{shown}")
    return "\n".join(lines)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``BREAKWATER_*`` variables set that neither the gateway, the worker, the sim server nor
    the tools read (the test suite's ``BREAKWATER_TEST_*`` aside)."""
    known = {
        name.upper()
        for cls in (GatewaySettings, WorkerSettings, SimServerSettings)
        for name in cls.model_fields
    } | OTHERS
    found = []
    for variable in os.environ if environ is None else environ:
        name = variable.removeprefix(PREFIX).upper()  # read case-insensitively, as pydantic-settings does
        if variable.startswith(PREFIX) and name not in known and not name.startswith("TEST_"):
            found.append(variable)
    return sorted(found)
