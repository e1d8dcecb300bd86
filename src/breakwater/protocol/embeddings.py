"""``/v1/embeddings``: the request model, the compact form a worker returns vectors in, and the
OpenAI response.

An embedding request is a short job through the same queue and admission as a completion: the
worker's engine embeds every input (mean-pooled, L2-normalised) and finishes the request with one
text event holding the vectors (``pack``: base64 float32 per input), so the record, retention,
resume and crash recovery are the completions' own. The gateway shortens vectors to ``dimensions``
(renormalised, as OpenAI's text-embedding-3 models do) and encodes them as floats or base64.
"""

from __future__ import annotations

import base64
import math
from array import array
from typing import Any, Literal

import orjson
from pydantic import ConfigDict, Field, field_validator

from breakwater.protocol.openai import ACCEPTED_ONLY, Tagged, Whole

MAX_INPUTS = 2048
KNOWN_EXTRAS = frozenset({"store", "service_tier"})


class EmbeddingRequest(Tagged):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Whole | None = Field(default=None, ge=1, le=1 << 16)
    user: str | None = None
    timeout: float | None = Field(default=None, gt=0.0, le=86_400.0, description="Breakwater: deadline (s)")
    lane: Literal["interactive", "batch"] = "interactive"

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
            raise ValueError("token ids as input are not supported: send text")
        texts = value if isinstance(value, list) else [value]
        if not texts or len(texts) > MAX_INPUTS:
            raise ValueError(f"input must hold 1 to {MAX_INPUTS} texts")
        if any(isinstance(t, str) and not t for t in texts):
            raise ValueError("input texts must be non-empty")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def unsupported_parameter(self) -> str | None:
        extra = self.model_extra or {}
        for name in extra:
            if name not in KNOWN_EXTRAS and extra[name] is not None:
                return name
        for name, accepted in ACCEPTED_ONLY.items():  # as for completions: asking nothing only
            if extra.get(name) not in accepted:
                return name
        return None


def normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def pack(vectors: list[list[float]]) -> str:
    """What a worker finishes an embedding request with: one base64 float32 blob per input."""
    return orjson.dumps([base64.b64encode(array("f", v).tobytes()).decode() for v in vectors]).decode()


def unpack(text: str) -> list[list[float]]:
    out = []
    for blob in orjson.loads(text):
        vector = array("f")
        vector.frombytes(base64.b64decode(blob))
        out.append(vector.tolist())
    return out


def embedding_response(
    model: str,
    vectors: list[list[float]],
    usage: dict[str, int] | None,
    encoding_format: str,
    dimensions: int | None,
) -> dict[str, Any]:
    """OpenAI's body; ``dimensions`` must not exceed the vectors' (the caller checks)."""
    data = []
    for i, vector in enumerate(vectors):
        if dimensions is not None and dimensions < len(vector):
            vector = normalised(vector[:dimensions])
        value: Any = vector
        if encoding_format == "base64":
            value = base64.b64encode(array("f", vector).tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    prompt = int((usage or {}).get("prompt_tokens", 0))
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
