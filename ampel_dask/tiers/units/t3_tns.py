"""T3 TNS AT report: the channel's objects as a Transient Name Server bulk report, written as a file per run
and, when configured, submitted to TNS through its bot API.

The report follows the TNS bulk-report JSON (``{"at_report": {"0": {...}, ...}}``): position, reporting
group, discovery data source, reporter, discovery time (the first detection the channel sees), AT type,
internal name (the survey's object name), proprietary period, the last non-detection before the first
detection (else an archival remark) and photometry (first and latest detection; ``flux_units`` 1 = AB
mag) with TNS's filter and instrument ids. The file ``<filename>.json`` is exactly what the bot sends,
so it can also be uploaded by hand in the TNS web form.

Submission (``url`` set): ``POST <url>/api/set/bulk-report`` with the form fields ``api_key`` and ``data``
(the report JSON), and the ``User-Agent: tns_marker{"tns_id": <bot id>, "type": "bot", "name": <bot
name>}`` header TNS requires; TNS answers ``{"id_code": 200, "id_message": "OK", "data": {"report_id":
...}}``. The bot id and API key come from ``AMPEL_DASK_SECRET_*`` variables, read when the unit reacts;
the key is never logged, written or put in an error message. ``<filename>_submitted.json`` lists each
request's report id and objects. Each object carries an idempotency key (channel, object, state, unit):
with the store's delivery journal an object in a state already reported is not reported again.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from ...io.files import atomic_write
from ...io.layout import DETECTION, NJY_ZP, UPPER_LIMIT
from ...keys import batch_key, key_of
from ..base import T3Context, T3Unit, UnitConfig
from ..env import WorkflowVariable
from ..helpers.push import Endpoint, PushError, journal, object_keys, secret, undelivered

log = logging.getLogger(__name__)

# TNS ids (TNS's /api/values lists; SkyPortal's skyportal/utils/tns.py uses the same): ZTF's camera, its filters
ZTF_INSTRUMENT = 196
ZTF_FILTERS = {"g": 110, "r": 111, "i": 112}
_BOT_NAME = re.compile(r"[A-Za-z0-9_. -]{1,64}\Z")
REPORT_PATH = "/api/set/bulk-report"


class T3TNSReportConfig(UnitConfig):
    reporting_group_id: int = Field(..., ge=0, description="TNS id of the reporting group")
    discovery_data_source_id: int = Field(..., ge=0, description="TNS id of the group whose data discovered the transient")
    reporter: str = Field(..., min_length=1, description="reporters, e.g. 'A. Author (Inst.) on behalf of ...'")
    at_type: int = Field(1, ge=0, description="TNS AT type (1 = PSN, possible supernova)")
    remarks: str = Field("", description="remarks added to every report")
    instrument_ids: dict[str, int] = Field(default_factory=lambda: {"ztf": ZTF_INSTRUMENT}, description="survey -> TNS instrument id")
    filter_ids: dict[str, dict[str, int]] = Field(default_factory=lambda: {"ztf": dict(ZTF_FILTERS)}, description="survey -> band -> TNS filter id")
    photometry: Literal["first_last", "all"] = Field("first_last", description="detections reported: the first and latest, or all")
    archival_remarks: str = Field("no non-detection before the first detection in the alert history",
                                  description="the non-detection remark when the state holds no upper limit before the first detection")  # fmt: skip
    proprietary_days: int = Field(0, ge=0, description="proprietary period [days]")
    filename: str = Field("tns_at_report", description="file name stem of the report in the run's T3 folder")
    # submission (optional)
    url: str | None = Field(None, description="TNS site to submit to, e.g. https://sandbox.wis-tns.org; None = files only")
    bot_id_env: WorkflowVariable | None = Field(None, description="AMPEL_DASK_SECRET_* variable holding the TNS bot id")
    bot_name: str | None = Field(None, description="the TNS bot's name (User-Agent tns_marker)")
    api_key_env: WorkflowVariable | None = Field(None, description="AMPEL_DASK_SECRET_* variable holding the bot's API key")
    batch_size: int = Field(50, ge=1, le=500, description="AT reports per bulk request")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    retries: int = Field(3, ge=0, description="extra attempts after a 5xx/429, timeout or connection error")
    backoff: float = Field(2.0, ge=0, description="first wait before a retry [s]; doubled each time")
    max_backoff: float = Field(60.0, ge=0, description="longest wait between attempts [s] (also caps Retry-After)")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://[^/?#]+/?\Z", v):
            raise ValueError("url is the TNS site, http(s)://host[:port], e.g. https://sandbox.wis-tns.org")
        return v

    @field_validator("filename")
    @classmethod
    def _stem(cls, v: str) -> str:
        if not re.match(r"[A-Za-z0-9_.-]{1,100}\Z", v) or v in (".", ".."):
            raise ValueError("filename is a stem: letters, digits, '_', '.', '-'")
        return v

    @field_validator("bot_name")
    @classmethod
    def _bot_name(cls, v: str | None) -> str | None:
        if v is not None and not _BOT_NAME.match(v):
            raise ValueError("bot_name: 1-64 letters, digits, spaces, '_', '.', '-' (it goes into a header)")
        return v

    @model_validator(mode="after")
    def _submission(self) -> T3TNSReportConfig:
        if self.url is not None and None in (self.bot_id_env, self.bot_name, self.api_key_env):
            raise ValueError("submitting (url set) needs bot_id_env, bot_name and api_key_env")
        return self


class T3TNSReport(T3Unit):
    """The selection as a TNS bulk AT report (a JSON file per run), submitted to TNS when ``url`` is set."""

    Config = T3TNSReportConfig
    version = "1"
    libraries: ClassVar[tuple[str, ...]] = ("astropy",)

    @property
    def delivery_key(self) -> str:
        """The unit part of the idempotency keys: where reports go and what they say, not how they travel."""
        c = self.config
        return key_of(self.name(), str(self.version), c.url, c.reporting_group_id, c.discovery_data_source_id)

    def reports(self, selection: pa.Table) -> tuple[list[dict], list[int]]:
        """(AT reports, the selection row of each): one per object with a detection in its state."""
        c = self.config
        rows, out, chosen = [], [], []
        names = selection.column_names
        data = {k: selection.column(k).to_pylist() for k in ("object_id", "survey", "ra", "dec", "dps") if k in names}
        for i in range(selection.num_rows):  # first the datapoints each report shows
            survey = data.get("survey", ["ztf"] * selection.num_rows)[i] or "ztf"
            dps = data["dps"][i] or []
            det = sorted((d for d in dps if d["kind"] == DETECTION and _mag(d) is not None), key=lambda d: (d["mjd"], d["dp_id"]))
            if not det:
                continue
            uls = [d for d in dps if d["kind"] == UPPER_LIMIT and d["mjd"] < det[0]["mjd"] and d.get("maglim") is not None]
            chosen.append((i, survey, det, max(uls, key=lambda d: d["mjd"]) if uls else None))
        utc = _utc_many([d["mjd"] for _, _, det, ul in chosen for d in [*det, *([ul] if ul else [])]],
                        [s for _, s, det, ul in chosen for _ in range(len(det) + (ul is not None))])  # one conversion for the batch  # fmt: skip
        at = 0
        for i, survey, det, ul in chosen:
            times = dict(zip((id(d) for d in [*det, *([ul] if ul else [])]), utc[at:]))
            at += len(det) + (ul is not None)
            first = det[0]
            shown = det if c.photometry == "all" else ([first, det[-1]] if len(det) > 1 else [first])
            report: dict[str, Any] = {
                "ra": {"value": data["ra"][i], "error": None, "units": "arcsec"},
                "dec": {"value": data["dec"][i], "error": None, "units": "arcsec"},
                "reporting_group_id": str(c.reporting_group_id),
                "discovery_data_source_id": str(c.discovery_data_source_id),
                "reporter": c.reporter,
                "discovery_datetime": times[id(first)],
                "at_type": str(c.at_type),
                "internal_name": str(data["object_id"][i]),
                "remarks": c.remarks,
                "proprietary_period_groups": [str(c.reporting_group_id)],
                "proprietary_period": {"proprietary_period_value": str(c.proprietary_days), "proprietary_period_units": "days"},
                "non_detection": self._non_detection(ul, survey, times[id(ul)] if ul else ""),
                "photometry": {"photometry_group": {str(k): self._point(d, survey, times[id(d)]) for k, d in enumerate(shown)}},
            }
            out.append(report)
            rows.append(i)
        return out, rows

    def _ids(self, survey: str, band: str) -> tuple[str, str]:
        c = self.config
        if survey not in c.instrument_ids:
            raise ValueError(f"{self.name()}: no TNS instrument id for survey {survey!r} (config instrument_ids)")
        band_ids = c.filter_ids.get(survey, {})
        if band not in band_ids:
            raise ValueError(f"{self.name()}: no TNS filter id for {survey} band {band!r} (config filter_ids.{survey})")
        return str(band_ids[band]), str(c.instrument_ids[survey])

    def _point(self, d: dict, survey: str, obsdate: str) -> dict:
        filt, inst = self._ids(survey, d["band"])
        return {"obsdate": obsdate, "flux": round(_mag(d), 3), "flux_error": _round(d.get("mag_err")), "limiting_flux": _round(d.get("maglim")),
                "flux_units": "1", "filter_value": filt, "instrument_value": inst}  # fmt: skip

    def _non_detection(self, d: dict | None, survey: str, obsdate: str) -> dict:
        if d is None:
            return {"archiveid": "0", "archival_remarks": self.config.archival_remarks}
        filt, inst = self._ids(survey, d["band"])
        return {"obsdate": obsdate, "limiting_flux": round(d["maglim"], 3), "flux_units": "1", "filter_value": filt, "instrument_value": inst}

    def react(self, selection: pa.Table, context: T3Context) -> list[dict]:
        c = self.config
        keys = object_keys(selection, context.channel, self.delivery_key)
        book = journal(context, self.delivery_key)
        new = undelivered(book, keys)
        if not new.all():
            log.info("%s: %d of %d objects were reported before in the same state: not again", self.name(), int((~new).sum()), len(keys))
            selection = selection.filter(pa.array(new))
            keys = [k for k, n in zip(keys, new) if n]
        reports, rows = self.reports(selection)
        if not reports:
            return []
        keys = [keys[r] for r in rows]
        stocks = selection.column("stock").take(pa.array(rows)).to_pylist()
        out_dir = Path(context.out_dir)
        path = out_dir / f"{c.filename}.json"
        atomic_write(path, json.dumps(_bulk(reports), indent=1, allow_nan=False).encode())
        records = [{"kind": "file", "format": "tns-json", "path": str(path), "reports": len(reports), "skipped": selection.num_rows - len(reports)}]
        if c.url is None:
            return records
        return records + self._submit(reports, keys, stocks, context, out_dir / f"{c.filename}_submitted.json")

    def _submit(self, reports: list[dict], keys: list[str], stocks: list[int], context: T3Context, path: Path) -> list[dict]:
        c = self.config
        bot_id = secret(self.name(), c.bot_id_env or "", "the TNS bot id")
        if not bot_id.isdigit():
            raise PushError(f"{self.name()}: environment variable {c.bot_id_env} (the TNS bot id) is not a number")
        api_key = secret(self.name(), c.api_key_env or "", "the TNS API key")
        marker = "tns_marker" + json.dumps({"tns_id": int(bot_id), "type": "bot", "name": c.bot_name})
        tns = Endpoint(self.name(), c.url or "", c.url or "", {"User-Agent": marker, "Accept": "application/json"}, (api_key,),
                       c.timeout, c.retries, c.backoff, c.max_backoff)  # fmt: skip
        book = journal(context, self.delivery_key)
        done: list[dict] = []
        for start in range(0, len(reports), c.batch_size):
            batch = slice(start, start + c.batch_size)
            names = [r["internal_name"] for r in reports[batch]]
            try:
                status, answer = tns.form(REPORT_PATH, {"api_key": api_key, "data": json.dumps(_bulk(reports[batch]), allow_nan=False)})
                report_id = _report_id(answer)
                if report_id is None:
                    raise PushError(f"{self.name()}: TNS did not accept the report: {tns.redact(_said(answer))}", status)
            except PushError as exc:
                exc.sent = done
                left = len(reports) - start
                exc.args = (f"{exc.args[0]} ({len(done)} earlier requests were accepted; {left} reports not submitted)",)
                _write_submitted(path, done)
                raise
            if book is not None:  # durable before the next request: a crash from here on submits nothing twice
                book.record(batch_key(keys[batch]), keys[batch], stocks[batch], str(context.run_id), status)
            log.info("%s: submitted %d AT reports to %s (report id %s)", self.name(), len(names), c.url, report_id)
            done.append({"kind": "tns", "url": c.url, "report_id": report_id, "reports": len(names), "objects": names,
                         "idempotency_keys": keys[batch], "status": status})  # fmt: skip
        _write_submitted(path, done)
        return [{k: v for k, v in d.items() if k not in ("objects", "idempotency_keys")} | {"path": str(path)} for d in done]


def _bulk(reports: list[dict]) -> dict:
    return {"at_report": {str(i): r for i, r in enumerate(reports)}}


def _write_submitted(path: Path, done: list[dict]) -> None:
    if done:
        atomic_write(path, json.dumps(done, indent=1).encode())


def _report_id(answer: Any) -> str | None:
    """TNS's report id from a bulk-report answer (``id_code`` 200 and ``data.report_id``), else None."""
    if isinstance(answer, dict) and str(answer.get("id_code")) == "200" and isinstance(answer.get("data"), dict):
        rid = answer["data"].get("report_id")
        return None if rid in (None, "") else str(rid)
    return None


def _said(answer: Any) -> str:
    if isinstance(answer, dict):
        return f"id_code {answer.get('id_code')}: {answer.get('id_message')}"
    return str(answer)[:300]


def _mag(d: dict) -> float | None:
    """A detection's AB magnitude: the survey's, else from its (positive) flux in nJy."""
    if d.get("mag") is not None and np.isfinite(d["mag"]):
        return float(d["mag"])
    f = d.get("flux")
    return float(NJY_ZP - 2.5 * np.log10(f)) if f is not None and f > 0 else None


def _round(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 3)


def _utc_many(mjds: list[float], surveys: list[str]) -> list[str]:
    """UTC as TNS takes it ('YYYY-MM-DD HH:MM:SS.sss'), one astropy call per time scale: Rubin times are
    TAI, ZTF's UTC."""
    from astropy.time import Time

    out = [""] * len(mjds)
    tai = np.array([s == "lsst" for s in surveys], dtype=bool)
    for scale, pick in (("tai", tai), ("utc", ~tai)):
        idx = np.flatnonzero(pick)
        if len(idx):
            for i, text in zip(idx, np.atleast_1d(Time(np.asarray(mjds, dtype=np.float64)[idx], format="mjd", scale=scale).utc.iso)):
                out[i] = str(text)
    return out


__all__ = ["T3TNSReport", "T3TNSReportConfig", "REPORT_PATH"]
