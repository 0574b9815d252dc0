"""T3 SkyPortal / Fritz publisher: the channel's objects as SkyPortal candidates, with their photometry and
their T2 results as an annotation, through SkyPortal's REST API (as Kowalski posts ZTF alerts to Fritz).

Per object (token auth: ``Authorization: token <TOKEN>``, the token from an ``AMPEL_DASK_SECRET_*``
variable, never logged or written):

1. ``GET /api/candidates/{obj_id}?includeAlerts=true``: which filters already hold this alert
   (``passing_alerts``) and the object's annotations (400 / 404: a new object);
2. ``POST /api/candidates`` ``{id, ra, dec, filter_ids, passing_alert_id, passed_at}`` for the filters
   that do not hold it yet (``passed_at`` is the alert's time, so the same alert is the same candidate);
3. ``PUT /api/photometry`` the state's datapoints in flux space (``flux``/``fluxerr`` in nJy with
   ``zp`` 31.4 AB, ``filter`` as sncosmo names ``ztfg`` ... ``lssty``, upper limits with a null flux,
   forced photometry with origin ``alert_fp``): PUT resolves duplicates, so points already there are not
   added again;
4. the annotation of ``origin``: ``POST /api/sources/{obj_id}/annotations`` when the object has none,
   ``PUT /api/sources/{obj_id}/annotations/{id}`` when its data changed, nothing when equal.

So a re-run posts nothing new (and PUTs photometry SkyPortal already has). With the store's delivery
journal an object in a state already published is not even asked about. ``when_configured``: a shipped
workflow publishes only once the operator has set the URL and token variables.
"""

from __future__ import annotations

import logging
import math
import re
from datetime import datetime
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from ...io.layout import DETECTION, FORCED, NJY_ZP, UPPER_LIMIT
from ...keys import key_of
from ..base import T3Context, T3Unit, UnitConfig
from ..env import WorkflowVariable, read_variable
from ..helpers.push import Endpoint, PushError, base_url, journal, object_keys, one_url, secret, undelivered
from .t3_export import json_safe, match_columns, t2_columns

log = logging.getLogger(__name__)

KIND_CODES = {"detection": DETECTION, "upper_limit": UPPER_LIMIT, "forced": FORCED}
_ORIGIN = re.compile(r"\w[\w:.\- ]{0,99}\Z")  # SkyPortal: an annotation origin starts with a word character


class T3SkyPortalConfig(UnitConfig):
    url: str | None = Field(None, description="SkyPortal / Fritz base URL, e.g. https://fritz.science (not secret; else url_env)")
    url_env: WorkflowVariable | None = Field(None, description="AMPEL_DASK_SECRET_* variable holding the base URL")
    token_env: WorkflowVariable = Field(..., description="AMPEL_DASK_SECRET_* variable holding the API token")
    filter_ids: list[int] = Field(..., min_length=1, description="SkyPortal filter ids the candidates pass")
    instrument_ids: dict[str, int] = Field(..., min_length=1, description="survey -> SkyPortal instrument id, e.g. {ztf: 1}")
    group_ids: list[int] | Literal["all"] = Field(..., description="groups that may see the photometry and annotations ('all': every group)")
    stream_ids: list[int] | None = Field(None, description="streams of the photometry (data rights on SkyPortal)")
    kinds: list[Literal["detection", "upper_limit", "forced"]] = Field(["detection", "upper_limit", "forced"], description="datapoints sent as photometry")
    origin: str = Field("ampel_dask", description="the annotation's origin (one annotation per origin and object)")
    annotate: list[str] | None = Field(None, description="T2 columns (shell patterns) in the annotation; None = every T2 column, [] = no annotation")
    when_configured: bool = Field(False, description="publish only once the url_env and token_env variables are set; until then send "
                                                     "nothing and say so (a shipped workflow the operator turns on with the secrets)")  # fmt: skip
    timeout: float = Field(30.0, gt=0, description="seconds per request")
    retries: int = Field(3, ge=0, description="extra attempts after a 5xx/429, timeout or connection error")
    backoff: float = Field(1.0, ge=0, description="first wait before a retry [s]; doubled each time")
    max_backoff: float = Field(30.0, ge=0, description="longest wait between attempts [s] (also caps Retry-After)")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://[^/?#]+(/[^?#]*)?\Z", v):
            raise ValueError("url must be an http(s) base URL, e.g. https://fritz.science")
        return v

    @field_validator("origin")
    @classmethod
    def _origin(cls, v: str) -> str:
        if not _ORIGIN.match(v):
            raise ValueError("origin must start with a letter, digit or '_' (SkyPortal's rule)")
        return v

    @model_validator(mode="after")
    def _one_url(self) -> T3SkyPortalConfig:
        one_url(self.url, self.url_env)
        return self


class T3SkyPortal(T3Unit):
    """Publish the selection to SkyPortal / Fritz: candidates, photometry, an annotation of T2 results."""

    Config = T3SkyPortalConfig
    version = "1"
    libraries: ClassVar[tuple[str, ...]] = ("astropy",)

    @property
    def delivery_key(self) -> str:
        c = self.config
        return key_of(self.name(), str(self.version), c.url or f"${c.url_env}", c.filter_ids, c.instrument_ids, c.group_ids,
                      c.stream_ids, c.kinds, c.origin, c.annotate)  # fmt: skip

    # --- what is sent (pure functions of the selection: tested against the documented API) ---

    def candidate(self, row: dict, filter_ids: list[int]) -> dict:
        return {"id": str(row["object_id"]), "ra": row["ra"], "dec": row["dec"], "filter_ids": filter_ids,
                "passing_alert_id": int(row["alert_id"]), "passed_at": _utc(row["mjd"], row.get("survey"))}  # fmt: skip

    def photometry(self, row: dict) -> dict | None:
        c = self.config
        survey = row.get("survey") or "ztf"
        if survey not in c.instrument_ids:
            raise ValueError(f"{self.name()}: no SkyPortal instrument id for survey {survey!r} (config instrument_ids)")
        kinds = {KIND_CODES[k] for k in c.kinds}
        pts = sorted((d for d in row["dps"] or [] if d["kind"] in kinds and _finite(d.get("flux_err")) and _finite(d.get("mjd"))
                      and (d["kind"] == UPPER_LIMIT or _finite(d.get("flux")))), key=lambda d: (d["mjd"], d["dp_id"]))  # fmt: skip
        if not pts:
            return None
        body: dict[str, Any] = {
            "obj_id": str(row["object_id"]),
            "instrument_id": c.instrument_ids[survey],
            "mjd": [d["mjd"] for d in pts],
            "flux": [None if d["kind"] == UPPER_LIMIT else d["flux"] for d in pts],
            "fluxerr": [d["flux_err"] for d in pts],
            "zp": [NJY_ZP] * len(pts),
            "magsys": ["ab"] * len(pts),
            "filter": [f"{survey}{str(d['band']).lower()}" for d in pts],
            "ra": [d.get("ra") for d in pts],
            "dec": [d.get("dec") for d in pts],
            "origin": ["alert_fp" if d["kind"] == FORCED else None for d in pts],
            "group_ids": c.group_ids,
        }
        if c.stream_ids is not None:
            body["stream_ids"] = c.stream_ids
        return json_safe(body)

    def annotation(self, row: dict, columns: list[str]) -> dict:
        """The annotation's data: the object's T2 results (JSON values; nulls left out)."""
        return {k: v for k in columns if (v := json_safe(row.get(k))) is not None}

    # --- the reaction ---

    def react(self, selection: pa.Table, context: T3Context) -> list[dict]:
        c = self.config
        keys = object_keys(selection, context.channel, self.delivery_key)
        book = journal(context, self.delivery_key)
        new = undelivered(book, keys)
        if not new.any():
            return []
        if c.when_configured:
            unset = [v for v in (c.url_env, c.token_env) if v and not read_variable(v)]
            if unset:
                log.info("%s: not configured (%s unset): nothing published", self.name(), ", ".join(unset))
                return [{"kind": "skyportal", "skipped": f"not configured: {', '.join(unset)} unset", "objects": 0}]
        names = selection.column_names
        columns = [n for n in (t2_columns(names) if c.annotate is None else match_columns(names, c.annotate)) if n != "dps"]
        wanted = ["object_id", "stock", "alert_id", "mjd", "ra", "dec", "survey", "dps", *columns]
        data = {k: selection.column(k).to_pylist() for k in wanted if k in names}
        url, shown, url_secrets = base_url(self.name(), c.url, c.url_env)
        token = secret(self.name(), c.token_env, "the SkyPortal token")
        api = Endpoint(self.name(), url, shown, {"Authorization": f"token {token}", "Accept": "application/json",
                       "User-Agent": f"ampel-dask-{self.name()}/{self.version}"}, (token, *url_secrets), c.timeout, c.retries, c.backoff, c.max_backoff)  # fmt: skip
        totals = {"objects": 0, "candidates": 0, "photometry_points": 0, "annotations_posted": 0, "annotations_updated": 0}
        for i in range(selection.num_rows):
            if not new[i]:
                continue
            row = {k: v[i] for k, v in data.items()}
            try:
                done = self._publish(api, row, columns)
            except PushError as exc:
                exc.args = (f"{exc.args[0]} (object {row['object_id']}; {totals['objects']} objects published before it)",)
                exc.sent = [{"kind": "skyportal", "url": shown, **totals}]
                raise
            if book is not None:  # durable before the next object: a crash from here on publishes nothing twice
                book.record(keys[i], [keys[i]], [row["stock"]], str(context.run_id), 200)
            totals["objects"] += 1
            for k, v in done.items():
                totals[k] += v
        log.info("%s: %s to %s", self.name(), ", ".join(f"{k} {v}" for k, v in totals.items()), shown)
        return [{"kind": "skyportal", "url": shown, **totals}]

    def _publish(self, api: Endpoint, row: dict, columns: list[str]) -> dict[str, int]:
        c = self.config
        obj = str(row["object_id"])
        done = {"candidates": 0, "photometry_points": 0, "annotations_posted": 0, "annotations_updated": 0}
        status, known = api.json("GET", f"/api/candidates/{obj}", query={"includeAlerts": "true"}, accept=(400, 404))
        known = _data(api, known) if status == 200 else {}
        held = {(a.get("filter_id"), a.get("passing_alert_id")) for a in known.get("passing_alerts") or []}
        missing = [f for f in c.filter_ids if (f, int(row["alert_id"])) not in held]
        if missing:
            _data(api, api.json("POST", "/api/candidates", self.candidate(row, missing))[1])
            done["candidates"] = len(missing)
        phot = self.photometry(row)
        if phot is not None:
            _data(api, api.json("PUT", "/api/photometry", phot)[1])
            done["photometry_points"] = len(phot["mjd"])
        note = self.annotation(row, columns) if columns else {}
        if note:
            mine = next((a for a in known.get("annotations") or [] if a.get("origin") == c.origin), None)
            body = {"origin": c.origin, "data": note, **({"group_ids": c.group_ids} if c.group_ids != "all" else {})}
            if mine is None:
                _data(api, api.json("POST", f"/api/sources/{obj}/annotations", body)[1])
                done["annotations_posted"] = 1
            elif mine.get("data") != note:
                _data(api, api.json("PUT", f"/api/sources/{obj}/annotations/{mine['id']}", {**body, "obj_id": obj})[1])
                done["annotations_updated"] = 1
        return done


def _data(api: Endpoint, answer: Any) -> dict:
    """The ``data`` of a SkyPortal answer ``{"status": "success", "data": ...}``; an error answer raises."""
    if not isinstance(answer, dict) or answer.get("status") != "success":
        said = answer.get("message") if isinstance(answer, dict) else answer
        raise PushError(f"{api.unit}: SkyPortal answered with an error: {api.redact(str(said))[:300]}")
    return answer.get("data") or {}


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def _utc(mjd: float, survey: str | None) -> str:
    """ISO UTC of an alert time (Rubin's are TAI): an arrow-parseable ``passed_at``."""
    from astropy.time import Time

    t = Time(mjd, format="mjd", scale="tai" if survey == "lsst" else "utc").utc.datetime
    return datetime.isoformat(t)


__all__ = ["T3SkyPortal", "T3SkyPortalConfig"]
