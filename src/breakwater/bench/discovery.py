"""What to ask the target for when the user did not say: the model it lists at ``/v1/models``."""

from __future__ import annotations

import httpx


def http_root(url: str) -> str:
    """The server root of a bench URL (``ws://host/v1/ws`` -> ``http://host``)."""
    root = url.rstrip("/").removesuffix("/v1/ws").removesuffix("/v1")
    return root.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


def list_models(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """The model ids the target's ``GET /v1/models`` lists; ValueError says why when it cannot."""
    models_url = f"{http_root(url)}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(models_url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ValueError(f"could not list the models at {models_url} ({exc}); pass --model") from None
    if resp.status_code != 200:
        raise ValueError(f"{models_url} answered HTTP {resp.status_code}: {snippet(resp.text)}; pass --model")
    try:
        ids = [str(m["id"]) for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{models_url} is not an OpenAI model list: {snippet(resp.text)}; pass --model"
        ) from None
    if not ids:
        raise ValueError(f"{models_url} lists no models (no worker up yet?); pass --model")
    return ids


def snippet(text: str, chars: int = 300) -> str:
    """The start of a body on one line."""
    return " ".join(text.split())[:chars]
