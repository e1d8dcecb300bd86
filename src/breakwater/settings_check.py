"""The environment's settings checked as an operator needs them said: a bad value in one line that
names its variable (not a traceback), and a ``BREAKWATER_*`` variable no part of Breakwater reads (a
typo: ``BREAKWATER_AUTHH=keys`` would otherwise leave auth off without a word)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import ValidationError

from breakwater.config import GatewaySettings, WorkerSettings
from breakwater.hosts import is_loopback
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


def gateway_problem(settings: GatewaySettings) -> str | None:
    """Why a gateway with ``settings`` must not start, said in one line, or None: API keys without
    their pepper, or a listener others can reach with auth off by default (``BREAKWATER_AUTH=off``
    set on purpose serves without keys, behind an authentication of the operator's own)."""
    if settings.auth == "keys":
        try:
            settings.pepper()
        except ValueError as exc:
            return str(exc)
    elif "auth" not in settings.model_fields_set and not is_loopback(settings.host):
        return (
            f"--host {settings.host} with auth off would serve anyone who can reach it without a key: "
            "set BREAKWATER_AUTH=keys (with BREAKWATER_AUTH_PEPPER_FILE), listen on 127.0.0.1, or set "
            "BREAKWATER_AUTH=off to serve without keys on purpose (behind your own authentication)"
        )
    return None


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
