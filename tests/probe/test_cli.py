"""``breakwater probe`` refuses, in a line, what it cannot run with."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def test_a_metrics_port_in_use_is_one_line() -> None:
    """It was start_http_server's OSError traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--url", "http://127.0.0.1:9", "--model", "sim", "--count", "1", "--metrics-port", str(port)]
        done = subprocess.run(
            [sys.executable, "-m", "breakwater", "probe", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "400"},
        )
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == "", done.stdout + done.stderr
