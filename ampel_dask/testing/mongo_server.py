"""A MongoDB-wire-protocol server for tests and local runs: SecantusDB in a process of its own.

Why this and not mongod: no real MongoDB can be installed on the machines this project is tested on
(its installers download binaries; there is no Docker). SecantusDB (PyPI ``secantusdb``, a beta, GPL-2.0)
is a MongoDB-compatible server on WiredTiger that pymongo talks to like to mongod: indexes (unique,
compound), upserts, bulk writes, aggregation. It is a test dependency only and runs as a separate
process; nothing in ``ampel_dask`` imports it.

It advertises itself as the primary of a one-node replica set named ``secantus`` at the port it really
listens on, so the plain URI works (transactions and change streams too).

Layout of the data directory passed to :func:`start_mongo`::

    DIR/secantusd.toml   an empty config file (stops SecantusDB from picking up ./secantusd.toml etc.)
    DIR/secantusd.log    the server's log
    DIR/db/              the WiredTiger home (survives restarts on the same DIR)

SecantusDB takes 2-4 s to exit; :meth:`MongoServer.stop` waits for the process, after which the
directory can be reused. Command line::

    python -m ampel_dask.testing.mongo_server DIR [--port N]

prints ``MONGO_URI mongodb://127.0.0.1:PORT/`` and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_LISTENING = re.compile(r"secantus listening on (\S+):(\d+)")

# Run in the child before it becomes the server (os.execv keeps the PID): ask Linux to SIGTERM it when
# the parent dies, so a killed test run leaves no server behind.
_EXEC_DYING_WITH_PARENT = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


class MongoServer:
    """A running SecantusDB process (see :func:`start_mongo`)."""

    def __init__(self, proc: subprocess.Popen, uri: str, data_dir: Path, log_path: Path):
        self.proc = proc
        self.uri = uri
        self.data_dir = data_dir
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server by PID and wait for it to exit (SIGKILL after ``timeout``); its exit code.
        Once this returns, the data directory is free for another server."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> MongoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exited {self.proc.returncode}"
        return f"MongoServer(uri={self.uri!r}, pid={self.pid}, {state})"


def secantus_available() -> bool:
    return importlib.util.find_spec("secantus") is not None


def start_mongo(
    data_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    cache_size: str = "256M",
    timeout: float = 60.0,
    die_with_parent: bool = True,
) -> MongoServer:
    """Start SecantusDB on ``host``:``port`` (0: a free port) with its data in ``data_dir``; return once
    pymongo can ping it.

    With ``die_with_parent`` the server gets SIGTERM when the thread that called this exits (Linux
    PR_SET_PDEATHSIG): call it from the main thread, or pass False and stop the server yourself.
    """
    if not secantus_available():
        raise ModuleNotFoundError("SecantusDB is not installed: pip install secantusdb==0.7.0b3", name="secantus")
    from pymongo import MongoClient

    data_dir = Path(data_dir).resolve()
    (data_dir / "db").mkdir(parents=True, exist_ok=True)
    config = data_dir / "secantusd.toml"
    if not config.exists():
        config.write_text("# empty on purpose: the launcher passes everything as flags\n")
    log_path = data_dir / "secantusd.log"
    offset = log_path.stat().st_size if log_path.exists() else 0  # a restart appends to the same log

    server = [
        "-m", "secantus", "--config", str(config), "--host", host, "--port", str(port),
        "--storage-path", str(data_dir / "db"), "--cache-size", cache_size, "--log-level", "INFO",
    ]
    if die_with_parent:
        cmd = [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *server]
    else:
        cmd = [sys.executable, *server]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir)

    deadline = time.monotonic() + timeout
    try:
        address = None
        while address is None:
            text = log_path.read_bytes()[offset:].decode(errors="replace")
            m = _LISTENING.search(text)
            if m:
                address = (m.group(1), int(m.group(2)))
            elif proc.poll() is not None:
                raise RuntimeError(f"SecantusDB exited with {proc.returncode} before listening:\n{text[-4000:]}")
            elif time.monotonic() > deadline:
                raise TimeoutError(f"SecantusDB not listening after {timeout:.0f} s; log {log_path}")
            else:
                time.sleep(0.02)
        h, p = address
        uri = f"mongodb://{'[' + h + ']' if ':' in h else h}:{p}/"
        remaining = max(1.0, deadline - time.monotonic())
        with MongoClient(uri, serverSelectionTimeoutMS=int(remaining * 1000)) as client:
            client.admin.command("ping")
    except BaseException:
        MongoServer(proc, "", data_dir, log_path).stop(10)
        raise
    return MongoServer(proc, uri, data_dir, log_path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ampel_dask.testing.mongo_server",
        description="Run SecantusDB (MongoDB wire protocol) on loopback until SIGTERM/SIGINT.",
    )
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    ap.add_argument("--cache-size", default="256M")
    a = ap.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = start_mongo(a.data_dir, host=a.host, port=a.port, cache_size=a.cache_size)
    except (ModuleNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"mongo_server: {exc}", file=sys.stderr)
        return 2
    print("MONGO_URI", server.uri, flush=True)
    try:
        while not stop.wait(0.5) and server.running():
            pass
    finally:
        code = server.stop()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
