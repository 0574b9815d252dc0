"""Live-mode metrics in the Prometheus text format: a file rewritten atomically after every batch (for
node_exporter's textfile collector, or a glance with ``cat``) and/or an HTTP endpoint (``/metrics``)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..io.files import atomic_write

PREFIX = "ampel_dask_live_"
_HELP = {
    "batches_total": ("counter", "micro-batches processed (empty ones included)"),
    "empty_batches_total": ("counter", "micro-batches without messages"),
    "alerts_total": ("counter", "alert records read from Kafka (ingested + duplicates + quarantined)"),
    "ingested_total": ("counter", "alerts written to the archive"),
    "duplicates_total": ("counter", "alerts already archived (replays, re-sent messages)"),
    "quarantined_total": ("counter", "messages or records sent to quarantine"),
    "passed_total": ("counter", "alerts accepted by a channel's T0 filters"),
    "t2_computed_total": ("counter", "T2 results computed"),
    "t2_reused_total": ("counter", "T2 results found in the store"),
    "commit_failures_total": ("counter", "offset commits refused (partitions moved to another member)"),
    "last_batch_alerts": ("gauge", "alerts in the last non-empty batch"),
    "last_batch_seconds": ("gauge", "processing time of the last non-empty batch (ingest + run + commit)"),
    "latency_seconds": ("gauge", "last batch: from its oldest message's timestamp to committed results"),
    "latency_seconds_max": ("gauge", "largest latency of any batch so far"),
    "last_batch_timestamp_seconds": ("gauge", "when the last batch finished (unix time)"),
    "lag_messages": ("gauge", "messages behind the partition's high watermark"),
    "up": ("gauge", "1 while the live loop runs"),
}


class LiveMetrics:
    def __init__(self, path: str | Path | None = None, port: int | None = None, host: str = "127.0.0.1"):
        self.path = Path(path) if path else None
        self.labelled: dict[str, dict[tuple[tuple[str, str], ...], float]] = {"passed_total": {}, "lag_messages": {}}
        self.values: dict[str, float] = {k: 0.0 for k, (kind, _) in _HELP.items() if kind == "counter" and k not in self.labelled}
        self.values["up"] = 1.0
        self._lock = threading.Lock()
        self._server = _serve(self, host, port) if port is not None else None

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server else None

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            if labels:
                key = tuple(sorted(labels.items()))
                d = self.labelled.setdefault(name, {})
                d[key] = d.get(key, 0.0) + value
            else:
                self.values[name] = self.values.get(name, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            if labels:
                self.labelled.setdefault(name, {})[tuple(sorted(labels.items()))] = value
            else:
                self.values[name] = value

    def render(self) -> str:
        with self._lock:
            lines = []
            for name, (kind, doc) in _HELP.items():
                plain = name in self.values
                series = self.labelled.get(name, {})
                if not plain and not series:
                    continue
                lines += [f"# HELP {PREFIX}{name} {doc}", f"# TYPE {PREFIX}{name} {kind}"]
                if plain:
                    lines.append(f"{PREFIX}{name} {_num(self.values[name])}")
                for key, v in sorted(series.items()):
                    labels = ",".join(f'{k}="{_esc(val)}"' for k, val in key)
                    lines.append(f"{PREFIX}{name}{{{labels}}} {_num(v)}")
            return "\n".join(lines) + "\n"

    def flush(self) -> None:
        """Rewrite the metrics file (atomically: a scraper never reads half a file)."""
        if self.path is not None:
            atomic_write(self.path, self.render().encode(), durable=False)

    def close(self) -> None:
        self.set("up", 0.0)
        self.set("last_batch_timestamp_seconds", self.values.get("last_batch_timestamp_seconds", time.time()))
        self.flush()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _serve(metrics: LiveMetrics, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every 15 s would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="live-metrics", daemon=True).start()
    return server
