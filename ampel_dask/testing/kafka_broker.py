"""A Kafka-protocol broker for tests and local runs: librdkafka's mock cluster in a process of its own.

Why this and not Kafka: no real Apache Kafka can be installed on the machines this project is tested on
(its installers download a JVM distribution; there is no Docker). librdkafka, the C client that the
confluent-kafka wheel bundles, contains a mock cluster that speaks the Kafka protocol on real TCP
listeners on 127.0.0.1. Started through ctypes in a dedicated process, it is a broker like any other:
producers and consumers in other processes, consumer groups, committed offsets, rebalances when a member
dies. The data lives in memory and is gone when the process ends.

Limits of the mock worth knowing:

- ``AdminClient.create_topics`` times out against it. Create topics with ``--topic NAME:PARTITIONS``,
  with :meth:`KafkaServer.create_topic`, or let the first produce auto-create them (with 4
  partitions).
- Each partition keeps only its newest ~5 MiB (and 100,000 message batches): older batches are deleted
  as if by ``retention.bytes``, and a consumer that falls further behind jumps to ``auto.offset.reset``.
  10,000 alerts of 8 kB need >= 16 partitions to be produced before they are consumed.
- Consumer groups settle slowly: a member that disappears without leaving (SIGKILL) holds its partitions
  until its ``session.timeout.ms`` has passed; with several members a rebalance takes up to the rebalance
  timeout (``max.poll.interval.ms``); and even after a clean ``close()`` the next member's join waits
  about the previous member's session timeout. Keep both small in tests (e.g. 3000 and 10000 ms).

Command line::

    python -m ampel_dask.testing.kafka_broker --topic alerts:2 [--topic other:4] [--brokers 1]

prints one line ``BOOTSTRAP host:port[,host:port...]`` on stdout and serves until SIGTERM or SIGINT.

From Python, :func:`start_kafka` runs that command and returns a :class:`KafkaServer`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_BOOTSTRAP = "BOOTSTRAP"


# --------------------------------------------------------------------------------------------------
# the broker process
# --------------------------------------------------------------------------------------------------


def _load_librdkafka() -> ctypes.CDLL:
    """The librdkafka that confluent-kafka uses (the wheel's bundled copy, else the system's)."""
    import confluent_kafka

    site = Path(confluent_kafka.__file__).resolve().parent.parent
    bundled = sorted(glob.glob(str(site / "confluent_kafka.libs" / "librdkafka*.so*")))
    path = bundled[0] if bundled else ctypes.util.find_library("rdkafka")
    if not path:
        raise RuntimeError("librdkafka not found (neither in the confluent-kafka wheel nor on the system)")
    lib = ctypes.CDLL(path)
    vp, cp, ci, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
    for name, restype, argtypes in [
        ("rd_kafka_conf_new", vp, []),
        ("rd_kafka_conf_set", ci, [vp, cp, cp, cp, sz]),
        ("rd_kafka_new", vp, [ci, vp, cp, sz]),
        ("rd_kafka_destroy", None, [vp]),
        ("rd_kafka_mock_cluster_new", vp, [vp, ci]),
        ("rd_kafka_mock_cluster_bootstraps", cp, [vp]),
        ("rd_kafka_mock_cluster_destroy", None, [vp]),
        ("rd_kafka_mock_topic_create", ci, [vp, cp, ci, ci]),
        ("rd_kafka_err2str", cp, [ci]),
    ]:
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise RuntimeError(f"{path} has no {name}: this librdkafka is built without the mock cluster")
        fn.restype, fn.argtypes = restype, argtypes
    if hasattr(lib, "rd_kafka_mock_group_initial_rebalance_delay_ms"):
        lib.rd_kafka_mock_group_initial_rebalance_delay_ms.restype = None
        lib.rd_kafka_mock_group_initial_rebalance_delay_ms.argtypes = [vp, ctypes.c_int32]
    return lib


class _MockCluster:
    """A librdkafka mock cluster owned by a producer handle that is never used to produce."""

    def __init__(self, brokers: int, rebalance_delay_ms: int = 0):
        self.lib = _load_librdkafka()
        self.brokers = brokers
        err = ctypes.create_string_buffer(512)
        conf = self.lib.rd_kafka_conf_new()
        self.lib.rd_kafka_conf_set(conf, b"log_level", b"3", err, len(err))
        self.rk = self.lib.rd_kafka_new(0, conf, err, len(err))  # 0 = RD_KAFKA_PRODUCER
        if not self.rk:
            raise RuntimeError(f"rd_kafka_new: {err.value.decode()}")
        self.mc = self.lib.rd_kafka_mock_cluster_new(self.rk, brokers)
        if not self.mc:
            self.lib.rd_kafka_destroy(self.rk)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        if hasattr(self.lib, "rd_kafka_mock_group_initial_rebalance_delay_ms"):
            # a group's first join completes at once instead of after the mock's default 3 s delay
            self.lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self.mc, rebalance_delay_ms)
        self.bootstrap = self.lib.rd_kafka_mock_cluster_bootstraps(self.mc).decode()

    def create_topic(self, name: str, partitions: int) -> None:
        if not name or partitions < 1:
            raise ValueError(f"bad topic {name!r}:{partitions}")
        rc = self.lib.rd_kafka_mock_topic_create(self.mc, name.encode(), partitions, min(self.brokers, 3))
        if rc:
            raise RuntimeError(f"creating topic {name!r}: {self.lib.rd_kafka_err2str(rc).decode()}")

    def close(self) -> None:
        self.lib.rd_kafka_mock_cluster_destroy(self.mc)
        self.lib.rd_kafka_destroy(self.rk)


def _parse_topic(spec: str) -> tuple[str, int]:
    name, _, parts = spec.partition(":")
    try:
        n = int(parts or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--topic wants NAME[:PARTITIONS], got {spec!r}")
    if not name or n < 1:
        raise argparse.ArgumentTypeError(f"--topic wants NAME[:PARTITIONS], got {spec!r}")
    return name, n


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies (a killed test run leaves no broker)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(1)


def _serve_control(cluster: _MockCluster, stop: threading.Event) -> None:
    """Commands on stdin, one per line, each answered by one line on stdout:
    ``topic NAME PARTITIONS`` -> ``OK topic NAME`` | ``ERR message``; ``ping`` -> ``OK ping``.
    End of input (the parent closed the pipe or died) stops the broker."""
    for line in sys.stdin:
        words = line.split()
        try:
            if words[:1] == ["topic"] and len(words) == 3:
                cluster.create_topic(words[1], int(words[2]))
                reply = f"OK topic {words[1]}"
            elif words == ["ping"]:
                reply = "OK ping"
            else:
                reply = f"ERR unknown command {line.strip()!r}"
        except (ValueError, RuntimeError) as exc:
            reply = f"ERR {exc}"
        print(reply, flush=True)
    stop.set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ampel_dask.testing.kafka_broker",
        description="Run librdkafka's mock Kafka cluster on 127.0.0.1 until SIGTERM/SIGINT.",
    )
    ap.add_argument("--brokers", type=int, default=1, help="number of brokers (default 1)")
    ap.add_argument("--topic", type=_parse_topic, action="append", default=[], metavar="NAME[:PARTITIONS]")
    ap.add_argument("--bootstrap-file", type=Path, help="also write the bootstrap servers to this file")
    ap.add_argument("--rebalance-delay-ms", type=int, default=0, help="group initial rebalance delay")
    ap.add_argument("--control", action="store_true", help="read commands on stdin; stop at its end")
    ap.add_argument("--parent-pid", type=int, help="exit when this process (the parent) dies")
    a = ap.parse_args(argv)
    if a.brokers < 1:
        ap.error("--brokers must be >= 1")

    if a.parent_pid:
        _die_with_parent(a.parent_pid)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    try:
        cluster = _MockCluster(a.brokers, a.rebalance_delay_ms)
    except (ImportError, RuntimeError) as exc:
        print(f"kafka_broker: {exc}", file=sys.stderr)
        return 2
    try:
        for name, partitions in a.topic:
            cluster.create_topic(name, partitions)
        if a.bootstrap_file:
            tmp = a.bootstrap_file.with_name(a.bootstrap_file.name + ".tmp")
            tmp.write_text(cluster.bootstrap + "\n")
            os.replace(tmp, a.bootstrap_file)
        print(_BOOTSTRAP, cluster.bootstrap, flush=True)
        if a.control:
            threading.Thread(target=_serve_control, args=(cluster, stop), daemon=True).start()
        while not stop.wait(0.5):
            pass
    except RuntimeError as exc:
        print(f"kafka_broker: {exc}", file=sys.stderr)
        return 2
    finally:
        cluster.close()
    return 0


# --------------------------------------------------------------------------------------------------
# the Python API
# --------------------------------------------------------------------------------------------------


class KafkaServer:
    """A running broker process (see :func:`start_kafka`)."""

    def __init__(self, proc: subprocess.Popen, lines: queue.Queue, bootstrap: str, log_path: Path):
        self.proc = proc
        self.bootstrap = bootstrap
        self.log_path = log_path
        self._lines = lines  # the broker's stdout, line by line (None at its end)
        self._temporary_log = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 10.0) -> str:
        """Create ``name`` with ``partitions`` partitions (an existing topic is left as it is)."""
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"bad topic name {name!r}")
        with self._lock:
            if not self.running():
                raise RuntimeError(f"kafka broker (pid {self.pid}) is not running")
            self.proc.stdin.write(f"topic {name} {int(partitions)}\n")
            self.proc.stdin.flush()
            reply = _next_line(self._lines, timeout)
        if reply != f"OK topic {name}":
            raise RuntimeError(f"creating topic {name!r}: {reply or 'no answer from the broker'}")
        return name

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the broker by PID and wait for it (SIGKILL after ``timeout``); its exit code.
        A temporary log (no ``log_path`` given to :func:`start_kafka`) is deleted after a clean exit."""
        code = _terminate(self.proc, timeout)
        if code == 0 and self._temporary_log:
            self.log_path.unlink(missing_ok=True)
        return code

    def __enter__(self) -> KafkaServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exited {self.proc.returncode}"
        return f"KafkaServer(bootstrap={self.bootstrap!r}, pid={self.pid}, {state})"


def start_kafka(
    topics: dict[str, int] | None = None,
    *,
    brokers: int = 1,
    timeout: float = 30.0,
    log_path: str | os.PathLike | None = None,
    die_with_parent: bool = True,
) -> KafkaServer:
    """Start a broker process with ``topics`` ({name: partitions}) and wait for its bootstrap servers.

    The process is stopped by :meth:`KafkaServer.stop`, and also when this process ends (the broker
    stops at the end of its stdin pipe). With ``die_with_parent`` it also gets SIGTERM when the thread
    that called this exits (Linux PR_SET_PDEATHSIG): call it from the main thread, or pass False.
    librdkafka's log goes to ``log_path`` (default: a temporary file, deleted by a clean stop).
    """
    temporary_log = log_path is None
    if temporary_log:
        fd, name = tempfile.mkstemp(prefix="ampel-dask-kafka-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    cmd = [sys.executable, "-m", "ampel_dask.testing.kafka_broker", "--brokers", str(brokers)]
    cmd += ["--control"] + (["--parent-pid", str(os.getpid())] if die_with_parent else [])
    for name, partitions in (topics or {}).items():
        cmd += ["--topic", f"{name}:{int(partitions)}"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
            env=_child_env(),
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), name="kafka-broker-stdout", daemon=True).start()
    try:
        line = _next_line(lines, timeout)
        if not line.startswith(_BOOTSTRAP + " "):
            raise RuntimeError(
                f"kafka broker did not start (exit {proc.poll()}, said {line!r}); log {log_path}:\n"
                + _tail(log_path)
            )
    except BaseException:
        _terminate(proc, 5.0)
        raise
    server = KafkaServer(proc, lines, line.split()[1], log_path)
    server._temporary_log = temporary_log
    return server


def _child_env() -> dict[str, str]:
    """The environment for ``python -m ampel_dask.testing...``: this package importable even when it
    is not installed (run from a checkout)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.strip())
    stream.close()
    lines.put(None)


def _next_line(lines: queue.Queue, timeout: float) -> str:
    """The child's next stdout line, or '' at its end / after ``timeout`` seconds."""
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        return ""
    if line is None:
        lines.put(None)  # stays at the end for later callers
        return ""
    return line


def _terminate(proc: subprocess.Popen, timeout: float) -> int | None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    for stream in (proc.stdin,):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    return proc.returncode


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
