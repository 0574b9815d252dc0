"""Avro records -> one Arrow struct array per writer schema, decoded by Apache DataFusion's Avro reader.

fastavro builds a Python dict per record: ~1.4 ms for a ZTF alert with its history and cutouts, which
was nearly all of an ingest's time. DataFusion (arrow-rs) decodes the same bytes straight into Arrow
columns, ~15x faster. The records of one writer schema are framed into one Avro container (their
blocks as they are, or their raw bytes as one block) and read at once. Where DataFusion cannot read a
batch, fastavro's dicts are converted instead; both give the same values on every schema in the shared
test data (``tests/test_columnar.py``).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import fastavro
import pyarrow as pa

from .avro import MAGIC, Record, WriterSchema

# a batch's DataFusion read may take TIMEOUT_S, plus 1 s per 4 MB and 2 ms per record (it reads 40-200 MB/s
# and ~0.1 ms per record on a loaded 2-core machine): the bytes bound it, never a count a header declares
TIMEOUT_S = 10.0
BYTES_PER_S = 4e6
S_PER_RECORD = 0.002
START_TIMEOUT_S = 120.0  # for the helper to start (imports), apart from any read
_SYNC = b"ampel-dask-sync!"  # any 16 bytes: the container is written and read here only
_EXPANDED: dict[str, bytes] = {}


def _long(n: int) -> bytes:
    """Avro's zig-zag varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _schema_text(ws: WriterSchema) -> bytes:
    """The writer schema with every named type spelt out where it is used: DataFusion does not follow
    references by name (e.g. LSST's prvDiaSources -> diaSource). The encoding does not change."""
    text = _EXPANDED.get(ws.key)
    if text is None:
        text = _EXPANDED[ws.key] = json.dumps(fastavro.schema.expand_schema(ws.raw)).encode()
    return text


def write_container(path: Path, ws: WriterSchema, blocks: list[tuple[int, bytes]]) -> None:
    """An uncompressed Avro container of these (record count, decompressed block bytes), written block
    by block (a chunk's blocks are tens of megabytes: no concatenated copy)."""
    meta = {b"avro.schema": _schema_text(ws), b"avro.codec": b"null"}
    with open(path, "wb") as fh:
        fh.write(MAGIC + _long(len(meta)) + b"".join(_long(len(k)) + k + _long(len(v)) + v for k, v in meta.items()) + _long(0) + _SYNC)
        for count, data in blocks:
            fh.write(_long(count) + _long(len(data)))
            fh.write(data)
            fh.write(_SYNC)


def decode_blocks(ws: WriterSchema, blocks: list[tuple[int, bytes]], tmp_dir: str | Path) -> pa.StructArray:
    """All records of these blocks, in order, as one struct array (raises if DataFusion cannot)."""
    expected = sum(count for count, _ in blocks)
    nbytes = sum(len(data) for _, data in blocks)
    path = Path(tmp_dir) / f".records-{uuid.uuid4().hex}.avro"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_container(path, ws, blocks)
        table = _HELPER.read(path, expected, timeout=TIMEOUT_S + nbytes / BYTES_PER_S + S_PER_RECORD * expected)
    finally:
        path.unlink(missing_ok=True)
    if table.num_rows != expected:
        raise ValueError(f"DataFusion read {table.num_rows} records of {expected}")
    return table.to_struct_array().combine_chunks() if table.num_rows else pa.array([], pa.struct(list(table.schema)))


def _datafusion_read(path: str, expected: int) -> pa.Table:
    from datafusion import SessionConfig, SessionContext

    # one thread (a worker process is one core's work), one batch (no concatenation afterwards)
    ctx = SessionContext(SessionConfig().with_target_partitions(1).with_batch_size(max(expected, 1)))
    ctx.register_avro("records", path)
    return ctx.table("records").to_arrow_table()


class _Helper:
    """DataFusion runs in a helper process of its own: its Avro reader loops for ever on a block with
    bytes after its last record (which a damaged length field can make). A helper that takes too long
    is killed (the next call starts another) and the batch goes to fastavro's careful path. The helper
    says when it is ready (its imports take seconds on a busy machine): only the read itself is timed.
    Tables come back as Arrow IPC files, memory-mapped: no copy in this process."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def read(self, path: Path, expected: int, timeout: float) -> pa.Table:
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                proc = self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                if self._answer(proc, START_TIMEOUT_S) != "ready":
                    self._stop()
                    raise RuntimeError("the DataFusion helper did not start")
            proc.stdin.write(f"{expected} {path}\n")
            proc.stdin.flush()
            answer = self._answer(proc, timeout)
            if answer is None:
                self._stop()
                raise TimeoutError(f"DataFusion did not read {expected} records in {timeout:.0f} s (a damaged block?)")
            status, _, payload = answer.partition(" ")
        if status != "ok":
            raise ValueError(payload or "the DataFusion helper ended")
        try:
            return pa.ipc.open_file(pa.memory_map(payload)).read_all()
        finally:
            Path(payload).unlink(missing_ok=True)

    @staticmethod
    def _answer(proc: subprocess.Popen, timeout: float) -> str | None:
        """The helper's next line, or None if none comes within ``timeout`` seconds."""
        if not select.select([proc.stdout], [], [], timeout)[0]:
            return None
        return proc.stdout.readline().rstrip("\n")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


_HELPER = _Helper()


def _serve() -> None:
    """The helper's loop: 'ready' once imported, then 'COUNT PATH' in, 'ok IPC_PATH' or 'error REASON'
    out, until stdin closes."""
    import datafusion  # noqa: F401  (the slow import, before 'ready')

    print("ready", flush=True)
    for line in sys.stdin:
        count, _, path = line.rstrip("\n").partition(" ")
        try:
            table = _datafusion_read(path, int(count))
            out = f"{path}.arrow"
            with pa.OSFile(out, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            print("ok", out, flush=True)
        except Exception as exc:
            print("error", f"{type(exc).__name__}: {exc}".replace("\n", " "), flush=True)


def records_rows(records: list[Record], tmp_dir: str | Path) -> pa.StructArray:
    """Records fastavro has decoded already (one schema) as one struct array: DataFusion reads their
    raw bytes again (the same column types as :func:`decode_blocks`); else their dicts are converted."""
    try:
        return decode_blocks(records[0].schema, [(1, r.raw) for r in records], tmp_dir)
    except Exception:
        return pa.array([r.value for r in records])


if __name__ == "__main__":
    _serve()
