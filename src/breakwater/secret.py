"""Secret settings: a value, or a file (a mounted Kubernetes Secret) that wins over it."""

from __future__ import annotations

from pydantic import SecretStr


def secret(value: SecretStr | None, path: str | None) -> str | None:
    """A secret setting: read from ``path`` (a mounted Secret; it wins) if one is set, else ``value``."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    return value.get_secret_value() if value is not None else None
