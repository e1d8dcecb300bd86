"""A web page calls the API from a real headless Chromium (Debian's ``chromium``, driven by
Playwright): a page of an allowed origin (``cors_allow_origins``) streams a chat answer with
``fetch`` and an API key, reads the request id the gateway exposes and resumes the stream from it,
and uses the WebSocket with its first-message key; a page of another origin can do none of that,
and nothing it tried was queued; nor can a page whose name was made to point at the gateway (DNS
rebinding)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from playwright.async_api import Browser, Page, async_playwright

from breakwater.redis_server import RedisServer
from tests.helpers import StackProcs, expected_sim, sync_redis

pytestmark = pytest.mark.timeout(180)

PEPPER = "browser-e2e-pepper-0123456789abcd"
MESSAGES = [{"role": "user", "content": "streamed to a browser"}]

STREAM_JS = """async ({url, key, path, method, body, lastEventId}) => {
  const headers = {"Authorization": "Bearer " + key};
  if (body) headers["Content-Type"] = "application/json";
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const resp = await fetch(url + path, {method, headers, body: body ? JSON.stringify(body) : undefined});
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", done = false;
  const ids = [];
  for (;;) {
    const {value, done: end} = await reader.read();
    if (end) break;
    buffer += decoder.decode(value, {stream: true});
    let at;
    while ((at = buffer.indexOf("\\n\\n")) >= 0) {
      const event = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      for (const line of event.split("\\n")) {
        if (line.startsWith("id: ")) ids.push(line.slice(4));
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { done = true; continue; }
        text += JSON.parse(data).choices[0]?.delta?.content ?? "";
      }
    }
  }
  return {status: resp.status, rid: resp.headers.get("x-breakwater-request-id"), text, done, ids};
}"""

SOCKET_JS = """async ({wsUrl, key}) => new Promise((resolve) => {
  const ws = new WebSocket(wsUrl);
  const got = [];
  ws.onopen = () => ws.send(JSON.stringify({auth: key}));
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    got.push(m);
    if (m.type === "authenticated")
      ws.send(JSON.stringify({model: "sim", prompt: "a socket in a page", max_tokens: 8, seed: 3}));
    if (m.type === "done" || m.type === "error") { ws.close(); resolve({got}); }
  };
  ws.onclose = (e) => resolve({got, closed: e.code});
})"""

# The POSTs a page may send anywhere without a CORS preflight (the answer is opaque to it, but the
# request goes out): a JSON body as a Blob without a type (no Content-Type), and as text/plain.
NO_CORS_JS = """async ({url}) => {
  const body = JSON.stringify({model: "sim", messages: [{role: "user", content: "csrf"}], max_tokens: 4});
  const sent = [];
  for (const payload of [new Blob([body]), body]) {
    const resp = await fetch(url + "/v1/chat/completions", {method: "POST", mode: "no-cors", body: payload});
    sent.push(resp.type);
  }
  const form = new FormData();
  form.append("purpose", "batch");
  form.append("file", new Blob([body + "\\n"]), "in.jsonl");
  sent.push((await fetch(url + "/v1/files", {method: "POST", mode: "no-cors", body: form})).type);
  return sent;
}"""

BLOCKED_JS = """async ({url, key}) => {
  try {
    await fetch(url + "/v1/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({model: "sim", messages: [{role: "user", content: "not from here"}]})});
    return "answered";
  } catch (e) { return "blocked: " + e.name; }
}"""


@dataclass
class Site:
    """A page server on 127.0.0.1: its origin is ``http://127.0.0.1:<port>``."""

    server: ThreadingHTTPServer

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><html><body>a web app</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sites() -> Iterator[tuple[Site, Site]]:
    """The app's site (allowed) and another site (not)."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Page) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Site(servers[0]), Site(servers[1])
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@dataclass
class Stack:
    procs: StackProcs
    url: str  # auth=keys
    key: str
    open_url: str  # auth=off (as `make up` on a laptop), the same queue


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, log_dir: Path, sites: tuple[Site, Site]) -> Iterator[Stack]:
    procs = StackProcs(redis_server.url, f"b{uuid.uuid4().hex[:10]}", log_dir)
    try:
        url = procs.add_gateway(auth="keys", auth_pepper=PEPPER, cors_allow_origins=sites[0].origin)
        open_url = procs.add_gateway(cors_allow_origins=sites[0].origin)
        procs.add_worker(sim_decode_base_ms=5, heartbeat_s=0.5)
        env = {
            **os.environ,
            "BREAKWATER_REDIS_URL": procs.redis_url,
            "BREAKWATER_KEY_PREFIX": procs.prefix,
            "BREAKWATER_AUTH_PEPPER": PEPPER,
        }
        made = subprocess.run(
            [sys.executable, "-m", "breakwater", "keys", "create", "--tenant", "web"],
            env=env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        key = str(orjson.loads(made.stdout)["key"])
        procs.wait_workers(url, headers={"Authorization": f"Bearer {key}"})
        yield Stack(procs, url, key, open_url)
    finally:
        procs.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium not found: apt-get install chromium (.ci/run does)"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def _page_of(browser: Browser, site: Site) -> Page:
    page = await browser.new_page()
    await page.goto(site.origin + "/")
    return page


def _records(stack: Stack) -> set[Any]:
    redis = sync_redis(stack.procs.redis_url)
    try:
        return set(redis.scan_iter(match=f"{stack.procs.prefix}:req:*"))
    finally:
        redis.close()


async def test_a_page_of_an_allowed_origin_streams_resumes_and_uses_the_websocket(
    stack: Stack, sites: tuple[Site, Site], browser: Browser
) -> None:
    page = await _page_of(browser, sites[0])
    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 12, "seed": 5, "stream": True}
    args = {"url": stack.url, "key": stack.key, "path": "/v1/chat/completions", "method": "POST"}
    streamed = await page.evaluate(STREAM_JS, {**args, "body": body, "lastEventId": None})
    expected, _, _ = expected_sim(messages=MESSAGES, seed=5, max_tokens=12)
    assert streamed["status"] == 200 and streamed["done"] and streamed["text"] == expected != ""
    rid = streamed["rid"]
    assert rid and rid.startswith("chatcmpl-")  # exposed to the page: it can resume with it

    # Resume after the third event, as a page that lost its connection would.
    after = streamed["ids"][2]
    events = {**args, "path": f"/v1/requests/{rid}/events", "method": "GET", "body": None}
    resumed = await page.evaluate(STREAM_JS, {**events, "lastEventId": after})
    assert resumed["status"] == 200 and resumed["done"]
    assert resumed["ids"][0] == str(int(after) + 1)
    assert expected.endswith(resumed["text"]) and len(resumed["text"]) < len(expected)

    ws_url = stack.url.replace("http://", "ws://") + "/v1/ws"
    socket = await asyncio.wait_for(page.evaluate(SOCKET_JS, {"wsUrl": ws_url, "key": stack.key}), 30)
    kinds = [m["type"] for m in socket["got"]]
    assert kinds[:2] == ["authenticated", "created"] and kinds[-1] == "done", socket
    text = "".join(m["text"] for m in socket["got"] if m["type"] == "token")
    assert text == expected_sim(prompt="a socket in a page", seed=3, max_tokens=8)[0]
    await page.close()


async def test_a_page_of_another_origin_can_use_neither_the_api_nor_the_websocket(
    stack: Stack, sites: tuple[Site, Site], browser: Browser
) -> None:
    before = _records(stack)
    page = await _page_of(browser, sites[1])
    blocked = await page.evaluate(BLOCKED_JS, {"url": stack.url, "key": stack.key})
    assert blocked == "blocked: TypeError"  # the preflight was refused: the POST was never sent
    for url in (stack.url, stack.open_url):  # with a key, and against the gateway without keys
        ws_url = url.replace("http://", "ws://") + "/v1/ws"
        socket = await asyncio.wait_for(page.evaluate(SOCKET_JS, {"wsUrl": ws_url, "key": stack.key}), 30)
        assert socket["got"] == [] and socket["closed"] == 1006  # refused at the handshake
    # Sent without a preflight to the gateway without keys: they reach it, and change nothing (403).
    assert await page.evaluate(NO_CORS_JS, {"url": stack.open_url}) == ["opaque"] * 3
    assert _records(stack) == before
    assert httpx.get(f"{stack.open_url}/v1/files", timeout=10).json()["data"] == []
    await page.close()


REBIND_JS = """async () => {
  const models = await fetch("/v1/models");
  const body = JSON.stringify({model: "sim", messages: [{role: "user", content: "rebound"}], max_tokens: 4});
  const sent = await fetch("/v1/chat/completions",
    {method: "POST", headers: {"Content-Type": "application/json"}, body});
  return [models.status, sent.status, (await sent.json()).error.code];
}"""


async def test_a_page_whose_name_points_at_the_gateway_can_neither_read_nor_send(stack: Stack) -> None:
    """DNS rebinding: the attacker's name made to resolve to 127.0.0.1 (Chromium's resolver rule
    stands for the attacker's DNS). Its page is then of the same origin as anything it fetches from
    the gateway without keys (`make up` on a laptop), so no Origin check can refuse it; its Host
    names it, and a loopback gateway answers to loopback names and addresses only."""
    before = _records(stack)
    port = stack.open_url.rsplit(":", 1)[1]
    chromium = shutil.which("chromium")
    assert chromium, "chromium not found: apt-get install chromium (.ci/run does)"
    rules = "--host-resolver-rules=MAP rebind.test 127.0.0.1"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", rules])
        try:
            page = await browser.new_page()
            landed = await page.goto(f"http://rebind.test:{port}/v1/models")
            assert landed is not None and landed.status == 421
            assert await page.evaluate(REBIND_JS) == [421, 421, "host_not_allowed"]
            own = await page.goto(f"http://localhost:{port}/v1/models")  # the gateway's own names
            assert own is not None and own.status == 200
            assert (await page.goto(f"{stack.open_url}/v1/models")).status == 200  # type: ignore[union-attr]
        finally:
            await browser.close()
    assert _records(stack) == before
