"""What the HTTP push units (TNS reports, SkyPortal) share: requests that retry what is transient and never
leak a secret, and idempotency keys with the delivery journal.

Secrets (API keys, tokens, a secret URL) are read from ``AMPEL_DASK_SECRET_*`` variables when the unit
reacts (:func:`secret`), travel only in the request, and are replaced by ``***`` in anything a unit
says: log lines, errors (a server that echoes the request cannot bring them back), records.

Idempotency follows T3Webhook's design: each object pushed has a key per (channel, object, state, unit)
(:func:`ampel_dask.keys.delivery_keys`); with the framework's delivery journal (``T3Context.deliveries``,
when the store provides one) keys already delivered are not pushed again, and each acknowledged push is
recorded before the next one goes out.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import pyarrow as pa

from ...keys import delivery_keys
from ..env import read_variable

log = logging.getLogger(__name__)


class PushError(RuntimeError):
    """A request the endpoint refused (4xx), or that kept failing after every retry; never holds a secret."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
        self.sent: list[dict] = []  # records of what was delivered before the failure


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: urllib would turn a POST into a GET and resend our headers elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def secret(unit: str, variable: str, what: str) -> str:
    """The value of a workflow's secret variable, checked: set, and no line break or NUL (http.client would
    refuse it with the value in its message)."""
    value = read_variable(variable)
    if not value:
        raise PushError(f"{unit}: environment variable {variable} ({what}) is not set")
    if any(c in value for c in "\r\n\0"):
        raise PushError(f"{unit}: environment variable {variable} ({what}) holds a line break or NUL")
    return value


@dataclass
class Endpoint:
    """One HTTP service: a base URL, headers (secrets included) and the retry policy; every text it
    produces is redacted of ``secrets``."""

    unit: str
    base: str
    shown: str  # the base URL as it may be logged
    headers: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0

    def redact(self, text: str) -> str:
        for s in self.secrets:
            if s:
                text = text.replace(s, "***")
        return text

    def json(self, method: str, path: str, body: Any = None, query: dict | None = None, accept: Sequence[int] = (),
             headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
        """A JSON request; (status, decoded answer). Statuses in ``accept`` are answers, not errors;
        ``headers``: extra headers of this request only (an idempotency key)."""
        data = None if body is None else json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        return self.request(method, path, data, "application/json", query, accept, headers)

    def form(self, path: str, fields: dict[str, str], accept: Sequence[int] = ()) -> tuple[int, Any]:
        """A POST of ``application/x-www-form-urlencoded`` fields; (status, decoded answer)."""
        return self.request("POST", path, urlencode(fields).encode(), "application/x-www-form-urlencoded", None, accept)

    def request(self, method: str, path: str, data: bytes | None, content_type: str | None, query: dict | None,
                accept: Sequence[int], extra: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
        url = (self.base.rstrip("/") + path if path else self.base) + (f"?{urlencode(query)}" if query else "")
        where = f"{method} {self.shown.rstrip('/')}{path}"
        headers = {**self.headers, **(extra or {}), **({"Content-Type": content_type} if content_type and data is not None else {})}
        for attempt in range(self.retries + 1):
            wait = min(self.backoff * 2**attempt, self.max_backoff)
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    return int(resp.status), _decode(resp.read())
            except urllib.error.HTTPError as exc:
                body = _read(exc)
                if exc.code in accept:
                    return exc.code, _decode(body)
                detail = self.redact(_excerpt(body))
                if 300 <= exc.code < 400:
                    raise PushError(f"{self.unit}: {where} answered with a redirect (HTTP {exc.code}); configure the final URL", exc.code) from None
                if exc.code != 429 and exc.code < 500:
                    raise PushError(f"{self.unit}: {where} was refused: HTTP {exc.code} {exc.reason}{detail}", exc.code) from None
                problem, status = f"HTTP {exc.code} {exc.reason}{detail}", exc.code
                wait = min(_retry_after(exc, wait), self.max_backoff)
            except (OSError, http.client.HTTPException) as exc:  # refused/reset connections, timeouts
                problem, status = self.redact(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"), None
            if attempt == self.retries:
                raise PushError(f"{self.unit}: {where} failed after {self.retries + 1} attempts; last: {problem}", status)
            log.warning("%s: %s (%s); retry %d/%d in %.2f s", self.unit, where, problem, attempt + 1, self.retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")


def one_url(url: str | None, url_env: str | None) -> None:
    """A push unit's destination is given once: a URL, or the variable holding a secret one."""
    if (url is None) == (url_env is None):
        raise ValueError("give exactly one of url and url_env")


def base_url(unit: str, url: str | None, url_env: str | None) -> tuple[str, str, tuple[str, ...]]:
    """(URL to call, URL safe to log, secrets it holds) from a plain ``url`` or a secret ``url_env``."""
    if url is not None:
        return url, url, ()
    value = secret(unit, url_env or "", "the service URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PushError(f"{unit}: ${url_env} is not an http(s) URL")
    return value, f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/...(${url_env})", (value,)


# --- idempotency -----------------------------------------------------------------------------------


def object_keys(selection: pa.Table, channel: str, unit_key: str) -> list[str]:
    """The idempotency key of each selected object: (channel, stock, state id, unit)."""
    stock = selection.column("stock").to_pylist()
    state = selection.column("state_id").to_pylist() if "state_id" in selection.column_names else [None] * len(stock)
    return delivery_keys(channel, unit_key, stock, state)


def journal(context: Any, unit_key: str) -> Any:
    """The framework's delivery journal of this unit for the context's channel, or None (no journal: the
    unit used on its own, or a store without one)."""
    deliveries = getattr(context, "deliveries", None)
    return deliveries(unit_key) if deliveries is not None else None


def undelivered(journal: Any, keys: list[str]) -> np.ndarray:
    """Which of ``keys`` were not delivered before (all, without a journal)."""
    if journal is None or not keys:
        return np.ones(len(keys), dtype=bool)
    return ~np.asarray(journal.delivered(keys), dtype=bool)


def _read(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read(64 * 1024)
    except Exception:
        return b""
    finally:
        exc.close()


def _decode(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def _excerpt(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", "replace").strip()
    return f": {text[:limit]}{'...' if len(text) > limit else ''}" if text else ""


def _retry_after(exc: urllib.error.HTTPError, default: float) -> float:
    value: Any = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return max(float(value), 0.0) if value is not None else default
    except ValueError:
        return default


__all__ = ["Endpoint", "PushError", "base_url", "journal", "object_keys", "secret", "undelivered"]
