"""``breakwater up --autoscale``: workers follow the gateway's ``breakwater_desired_workers``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from breakwater.redis_server import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(240)


def workers(url: str) -> int:
    try:
        data = httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError):
        return -1
    return sum(m["workers"] for m in data if m["id"] == "sim")


@pytest.mark.parametrize(
    "policy",
    [
        # the supervisor on the gateway's breakwater_desired_workers, a worker going after 3 s below
        ["--scale-down-delay", "3"],
        # the simulator's HPA on the engines' busy share, and KEDA on the queue's lag, their clocks
        # 20x faster (sync 0.75 s, polling 1.5 s, scale-down window 15 s)
        ["--autoscale-policy", "hpa:0.5", "--autoscale-time-scale", "20"],
        ["--autoscale-policy", "keda:2", "--autoscale-time-scale", "20"],
    ],
    ids=["supervisor", "hpa", "keda"],
)
async def test_workers_scale_up_under_a_step_load_and_back_down(tmp_path: Path, policy: list[str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        # slow sim workers: 4 sequences, 50 ms a step, so one worker serves ~2.5 req/s of 30 tokens
        "BREAKWATER_CAPACITY": "4",
        "BREAKWATER_SIM_DECODE_BASE_MS": "50",
        "BREAKWATER_HEARTBEAT_S": "0.5",
        # the gateway reports the highest count of the last 5 s (default 30: a test-sized window)
        "BREAKWATER_AUTOSCALE_WINDOW_S": "5",
    }
    cmd = [sys.executable, "-m", "breakwater", "up", "--engine", "sim", "--port", str(port)]
    cmd += [
        "--autoscale",
        "--min-workers",
        "1",
        "--max-workers",
        "3",
        "--data-dir",
        str(tmp_path / "bw"),
        *policy,
    ]
    with open(tmp_path / "up.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[int] = []
    try:
        wait_for(lambda: workers(url) == 1, 60, 0.2, "the stack with one worker")
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)

        async def one(i: int) -> str:
            r = await client.completions.create(
                model="sim", prompt=f"scale {i}", max_tokens=30, seed=i, extra_body={"ignore_eos": True}
            )
            return r.choices[0].finish_reason or ""

        async def watch(stop: asyncio.Event) -> None:
            while not stop.is_set():
                seen.append(await asyncio.to_thread(workers, url))
                await asyncio.sleep(0.5)

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        tasks = []
        for i in range(60):  # 8 req/s for 7.5 s: about three workers' worth
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.125)
        reasons = await asyncio.gather(*tasks)
        stop.set()
        await watcher
        await client.close()
        assert reasons == ["length"] * 60  # no request failed while workers came and went
        assert max(seen) >= 2, seen  # scaled up while the queue grew
        wait_for(lambda: workers(url) == 1, 60, 0.5, "scaled back down to one worker")
        if policy[0] == "--autoscale-policy":  # and it was that controller that scaled: up, then down
            name = {"hpa:0.5": "hpa-utilisation-0.5", "keda:2": "keda-lag-2"}[policy[1]]
            moves = [
                line
                for line in (tmp_path / "up.log").read_text().splitlines()
                if f"autoscale {name}:" in line
            ]
            assert any("1 -> " in m for m in moves) and any(" -> 1 workers" in m for m in moves), moves
    finally:
        proc.send_signal(signal.SIGTERM)  # stops the whole stack, like Ctrl-C
        proc.wait(60)
