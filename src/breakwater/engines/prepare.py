"""``breakwater models prepare``: turn a bundled GGUF into a transformers folder that vLLM can load.

vLLM on CPU does not load GGUF, and nothing can come from a model hub here, so the bundled GGUF is
dequantized once into a safetensors folder (bf16) with its tokenizer. The folder is cached under
``$BREAKWATER_MODEL_CACHE`` (default ``~/.cache/breakwater/models``); a ``.prepared`` marker written
last makes the step idempotent and a half-written folder is never used. Needs ``transformers``,
``torch``, ``gguf`` and ``accelerate`` (the ``vllm`` extra).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from breakwater.engines.models import BUNDLED, bundled_gguf

MARKER = ".prepared"


def cache_root() -> Path:
    root = os.environ.get("BREAKWATER_MODEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "breakwater" / "models"


def hf_dir(name: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{name}-hf"


def is_prepared(path: Path) -> bool:
    return (path / MARKER).exists()


def prepare_hf(name: str, root: Path | None = None, *, force: bool = False) -> Path:
    """The transformers folder of bundled model ``name``, converting it on first use."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)}")
    out = hf_dir(name, root)
    if is_prepared(out) and not force:
        return out
    gguf = bundled_gguf(name)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    _convert(gguf, tmp, bos=name.startswith("gemma"))
    (tmp / MARKER).write_text(
        json.dumps({"source": str(gguf), "seconds": round(time.monotonic() - started, 1)}) + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic on one filesystem: readers see no folder or a whole one
    return out


def _convert(gguf: Path, out: Path, *, bos: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if bos:
        # Gemma's tokenizer rebuilt from GGUF adds no BOS token; without it the model's output is garbage.
        tokenizer.add_bos_token = True
    tokenizer.save_pretrained(out)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # the weights are dequantized already; transformers refuses to save otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
