"""``breakwater bench`` refuses what it cannot run or keep before it sends anything, and a failure to
write its results still shows what it measured."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from breakwater.redis_server import free_port

# One request a second for a second, to a port nothing listens on: it fails at once.
QUICK = ["--model", "m", "--profile", "constant", "--rate", "1", "--duration", "1"]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "breakwater", "bench", "--url", f"http://127.0.0.1:{free_port()}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )


def test_a_result_folder_that_cannot_be_made_is_refused_before_the_run(tmp_path: Path) -> None:
    """Its parent a file: the whole run went by, then NotADirectoryError's traceback lost it."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "results"
    done = bench(*QUICK, "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert f"Invalid value for --out: {out}: Not a directory" in done.stderr, done.stderr
    assert "requests to" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--profile", "concurrency", "--concurrency", "0"), "--concurrency"),  # "none of the 0 completed"
        (("--input-tokens", "-5"), "--input-tokens"),  # taken silently
        (("--output-tokens", "0"), "--output-tokens"),
        (("--num-requests", "0"), "--num-requests"),
    ],
)
def test_a_count_under_one_is_refused(tmp_path: Path, args: tuple[str, ...], flag: str) -> None:
    done = bench("--model", "m", *args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert f"Invalid value for '{flag}'" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_results_it_cannot_write_are_still_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failing after the run (a full disk) was a traceback, and the run's figures were lost."""
    from breakwater import cli
    from breakwater.bench import report

    def full(*_: Any) -> list[Path]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write", full)
    url = f"http://127.0.0.1:{free_port()}"
    done = CliRunner().invoke(cli.app, ["bench", "--url", url, *QUICK, "--out", str(tmp_path)])
    assert done.exit_code == 1, done.output
    assert "breakwater bench: constant" in done.stdout  # the table of what the run measured
    assert "stream integrity errors" in done.stdout, done.stdout
    said = "error: could not write the results to "
    assert said in done.stderr and "No space left on device" in done.stderr, done.stderr
