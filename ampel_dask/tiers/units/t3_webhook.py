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

import logging
import re
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from ...keys import batch_key, delivery_keys, key_of
from ..base import T3Context, T3Unit, UnitConfig, shown
from ..env import WorkflowVariable
from ..helpers.push import Endpoint, PushError, base_url, one_url, secret
from .t3_export import json_safe, match_columns, t2_columns

log = logging.getLogger(__name__)

BASE_FIELDS = ("object_id", "stock", "ra", "dec", "mjd")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}\Z")  # an HTTP header name (RFC 9110 token)
USER_AGENT = "ampel-dask-T3Webhook/1"


class WebhookError(PushError):
    """The endpoint refused the request (4xx) or kept failing after all retries (or a secret it needs is
    not set); ``sent`` holds the records of the batches delivered before the failure."""


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
        one_url(self.url, self.url_env)
        return self


class T3Webhook(T3Unit):
    """POST ``{"channel", "run_id", "objects": [...]}`` in batches to an HTTP endpoint; each object and
    request carries an idempotency key, and what was delivered is not posted again (module docstring)."""

    Config = T3WebhookConfig
    version = "1"

    @property
    def reads_dps(self) -> bool:
        """Only when ``columns`` asks for them: by default an object is posted with its T2 results."""
        return self.config.columns is not None and bool(match_columns(["dps"], self.config.columns))

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
        endpoint = self._endpoint()
        records: list[dict] = []
        bodies = self.payloads(selection, context, keys)
        for i, body in enumerate(bodies):
            obj_keys = [o["idempotency_key"] for o in body["objects"]]
            request = batch_key(obj_keys)
            try:
                status, _ = endpoint.json("POST", "", body, headers={"Idempotency-Key": request})
            except PushError as exc:
                left = sum(len(b["objects"]) for b in bodies[i:])
                done = f"{len(records)} earlier batches were delivered; " if records else ""
                err = WebhookError(f"{exc.args[0]} ({done}{left} objects not delivered: the next run posts them)", exc.status)
                err.sent = records
                raise err from None
            if journal is not None:  # durable before the next request: a crash from here on re-posts nothing delivered
                journal.record(request, obj_keys, [o["stock"] for o in body["objects"]], str(context.run_id), status)
            log.info("%s: posted %d objects to %s (HTTP %d)", self.name(), len(body["objects"]), endpoint.shown, status)
            records.append({"kind": "webhook", "url": endpoint.shown, "objects": len(body["objects"]), "status": status})
        return records

    def _endpoint(self) -> Endpoint:
        """The endpoint with its secrets, read now (at reaction time) and redacted from every message."""
        c = self.config
        try:
            url, shown_url, hidden = base_url(self.name(), c.url, c.url_env)
            headers = {h: secret(self.name(), var, f"for header {h}") for h, var in c.headers_from_env.items()}
        except PushError as exc:
            raise WebhookError(str(exc)) from None
        return Endpoint(self.name(), url, shown_url, {"User-Agent": USER_AGENT, **headers}, hidden + tuple(headers.values()),
                        c.timeout, c.retries, c.backoff, c.max_backoff)  # fmt: skip


__all__ = ["T3Webhook", "T3WebhookConfig", "WebhookError"]
