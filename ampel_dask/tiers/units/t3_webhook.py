"""T3 webhook: POST the selected objects as JSON to a URL (a Slack relay, a TNS bot, a marshal).

Secrets stay out of the workflow: the URL itself and header values (API keys, bearer tokens) may come
from environment variables, are read only when the unit reacts, and never appear in logs, errors or
the returned records. Only variables named ``AMPEL_DASK_SECRET_*`` may be named
(:mod:`ampel_dask.tiers.env`): a workflow must not send the Kafka password, or anything else in the
environment, to the URL it names. Transient failures (5xx, 429, connection errors, timeouts) are
retried with exponential backoff; other 4xx answers mean the request is wrong and raise at once.

Idempotent pushes: each object carries an ``idempotency_key`` (channel, object, state, unit: see
``keys.delivery_keys``), each request an ``Idempotency-Key`` header (its objects' keys, combined). With
the framework's delivery journal (``T3Context.deliveries``), keys already delivered are not sent again,
and each acknowledged request is recorded durably before the next one goes out: a re-run, a replayed
live batch, or the next batch of a stream (``--t3-scope stream``) posts only objects in a state not
delivered before. A request that fails (after its retries) fails the run with the number of objects not
delivered; they are posted by the next run.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from ...keys import batch_key, delivery_keys, key_of
from ..base import T3Context, T3Unit, UnitConfig, shown
from ..env import WorkflowVariable, read_variable
from .t3_export import json_safe, match_columns, t2_columns

log = logging.getLogger(__name__)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: urllib would turn the POST into a GET and resend our headers elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)

BASE_FIELDS = ("object_id", "stock", "ra", "dec", "mjd")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}\Z")  # an HTTP header name (RFC 9110 token)
USER_AGENT = "ampel-dask-T3Webhook/1"


class WebhookError(RuntimeError):
    """The endpoint refused the request (4xx) or kept failing after all retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
        self.sent: list[dict] = []  # records of the batches delivered before the failure


class T3WebhookConfig(UnitConfig):
    url: str | None = Field(None, description="endpoint (http/https); not secret. Use url_env for a URL that is")
    url_env: WorkflowVariable | None = Field(None, description="environment variable AMPEL_DASK_SECRET_* holding the URL (e.g. a Slack webhook)")
    timeout: float = Field(10.0, gt=0, description="seconds per request")
    batch_size: int = Field(100, ge=1, description="max objects per request")
    columns: list[str] | None = Field(
        None, description="extra columns per object (shell patterns allowed); None = every T2 column"
    )
    headers_from_env: dict[str, WorkflowVariable] = Field(
        default_factory=dict,
        description="header name -> environment variable AMPEL_DASK_SECRET_* holding its value, e.g. {'Authorization': 'AMPEL_DASK_SECRET_TNS_TOKEN'}",
    )
    retries: int = Field(3, ge=0, description="extra attempts after a 5xx/429, timeout or connection error")
    backoff: float = Field(1.0, ge=0, description="first wait before a retry [s]; doubled each time")
    max_backoff: float = Field(30.0, ge=0, description="longest wait between attempts [s] (also caps Retry-After)")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError("url must start with http:// or https://")
        return v

    @field_validator("headers_from_env")
    @classmethod
    def _header_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [h for h in v if not _TOKEN.match(h)]
        if bad:
            raise ValueError(f"not an HTTP header name: {', '.join(shown(h) for h in bad[:5])}")
        return v

    @model_validator(mode="after")
    def _one_url(self) -> T3WebhookConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env")
        return self


class T3Webhook(T3Unit):
    """POST ``{"channel", "run_id", "objects": [...]}`` in batches to an HTTP endpoint; each object and
    request carries an idempotency key, and what was delivered is not posted again (module docstring)."""

    Config = T3WebhookConfig
    version = "1"

    @property
    def delivery_key(self) -> str:
        """The unit part of the idempotency keys: what decides where and what is delivered (destination
        and columns), not how (timeouts, retries, batch size): changing those re-posts nothing."""
        c = self.config
        return key_of(self.name(), str(self.version), c.url or f"${c.url_env}", c.columns)

    def object_keys(self, selection: pa.Table, context: T3Context) -> list[str]:
        """The idempotency key of each selected object (channel, stock, state id, unit)."""
        stock = selection.column("stock").to_pylist()
        state = selection.column("state_id").to_pylist() if "state_id" in selection.column_names else [None] * len(stock)
        return delivery_keys(context.channel, self.delivery_key, stock, state)

    def payloads(self, selection: pa.Table, context: T3Context, keys: list[str] | None = None) -> list[dict]:
        """The JSON bodies, one per batch (NaN/inf -> null); each object with its ``idempotency_key``."""
        names = selection.column_names
        c = self.config
        extra = match_columns(names, c.columns) if c.columns is not None else t2_columns(names)
        cols = [n for n in BASE_FIELDS if n in names] + [n for n in extra if n not in BASE_FIELDS]
        data = {n: selection.column(n).to_pylist() for n in cols}
        keys = self.object_keys(selection, context) if keys is None else keys
        objects = [{"idempotency_key": keys[i], **{n: json_safe(data[n][i]) for n in cols}} for i in range(selection.num_rows)]
        return [
            {"channel": context.channel, "run_id": str(context.run_id), "objects": objects[i : i + c.batch_size]}
            for i in range(0, len(objects), c.batch_size)
        ]

    def react(self, selection: pa.Table, context: T3Context) -> list[dict]:
        journal = context.deliveries(self.delivery_key) if context.deliveries is not None else None
        keys = self.object_keys(selection, context)
        if journal is not None and keys:
            done = journal.delivered(keys)
            if done.any():
                log.info("%s: %d of %d objects were delivered before (same state): not posted again", self.name(), int(done.sum()), len(keys))
                keep = ~done
                selection = selection.filter(pa.array(keep))
                keys = [k for k, new in zip(keys, keep) if new]
        if not keys:
            return []
        url, shown = self._url()
        base_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **self._secret_headers()}
        records: list[dict] = []
        bodies = self.payloads(selection, context, keys)
        for i, body in enumerate(bodies):
            obj_keys = [o["idempotency_key"] for o in body["objects"]]
            request = batch_key(obj_keys)
            data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
            try:
                status = self._post(url, shown, data, {**base_headers, "Idempotency-Key": request})
            except WebhookError as exc:
                left = sum(len(b["objects"]) for b in bodies[i:])
                exc.sent = records
                done = f"{len(records)} earlier batches were delivered; " if records else ""
                exc.args = (f"{exc.args[0]} ({done}{left} objects not delivered: the next run posts them)",)
                raise
            if journal is not None:  # durable before the next request: a crash from here on re-posts nothing delivered
                journal.record(request, obj_keys, [o["stock"] for o in body["objects"]], str(context.run_id), status)
            log.info("%s: posted %d objects to %s (HTTP %d)", self.name(), len(body["objects"]), shown, status)
            records.append({"kind": "webhook", "url": shown, "objects": len(body["objects"]), "status": status})
        return records

    # --- secrets: read at reaction time, never logged ---

    def _url(self) -> tuple[str, str]:
        """(URL to call, URL safe to log)."""
        c = self.config
        if c.url is not None:
            return c.url, c.url
        url = read_variable(c.url_env or "")
        if not url:
            raise WebhookError(f"{self.name()}: environment variable {c.url_env} (the webhook URL) is not set")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise WebhookError(f"{self.name()}: ${c.url_env} is not an http(s) URL")
        return url, f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/... (${c.url_env})"

    def _secret_headers(self) -> dict[str, str]:
        out = {}
        for header, var in self.config.headers_from_env.items():
            value = read_variable(var)
            if value is None:
                raise WebhookError(f"{self.name()}: environment variable {var} (for header {header}) is not set")
            if any(c in value for c in "\r\n\0"):  # http.client would refuse it, with the value in its message
                raise WebhookError(f"{self.name()}: environment variable {var} (for header {header}) holds a line break or NUL")
            out[header] = value
        return out

    # --- transport ---

    def _post(self, url: str, shown: str, data: bytes, headers: dict[str, str]) -> int:
        """One POST with retries; returns the (2xx) status."""
        c = self.config
        for attempt in range(c.retries + 1):
            wait = min(c.backoff * 2**attempt, c.max_backoff)
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with _OPENER.open(req, timeout=c.timeout) as resp:
                    resp.read()
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                detail = _body_excerpt(exc)
                if 300 <= exc.code < 400:
                    raise WebhookError(
                        f"{self.name()}: {shown} answered with a redirect (HTTP {exc.code}); configure the final URL", exc.code
                    ) from None
                if exc.code != 429 and exc.code < 500:
                    raise WebhookError(
                        f"{self.name()}: {shown} rejected the request: HTTP {exc.code} {exc.reason}{detail}", exc.code
                    ) from None
                problem, status = f"HTTP {exc.code} {exc.reason}{detail}", exc.code
                wait = min(_retry_after(exc, wait), c.max_backoff)
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, refused/reset connections
                problem, status = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}", None
            if attempt == c.retries:
                raise WebhookError(f"{self.name()}: {shown} failed after {c.retries + 1} attempts; last: {problem}", status)
            log.warning("%s: %s (%s); retry %d/%d in %.2f s", self.name(), shown, problem, attempt + 1, c.retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")


def _body_excerpt(exc: urllib.error.HTTPError, limit: int = 300) -> str:
    """The server's explanation (e.g. Slack's 'invalid_payload'), shortened."""
    try:
        text = exc.read(limit + 1).decode("utf-8", "replace").strip()
    except Exception:
        return ""
    finally:
        exc.close()
    if not text:
        return ""
    return f": {text[:limit]}{'...' if len(text) > limit else ''}"


def _retry_after(exc: urllib.error.HTTPError, default: float) -> float:
    value: Any = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return max(float(value), 0.0) if value is not None else default
    except ValueError:
        return default


__all__ = ["T3Webhook", "T3WebhookConfig", "WebhookError"]
