"""Local HTTP servers that speak the documented APIs of TNS (bulk AT reports) and SkyPortal (candidates,
photometry, annotations), for the T3 push units' tests.

Each checks what a request must be (method, path, headers, the payload's documented fields and types) and
answers as the real service does, keeping state so that idempotency can be observed: SkyPortal refuses a
second candidate row for the same (object, filter, passed_at) and a second annotation of one origin
(HTTP 400, as its database constraints make it), and a PUT of photometry adds only points it does not
hold. A request that breaks the documented rules is answered 422 and recorded in ``violations``.

TNS: ``POST /api/set/bulk-report`` (form fields ``api_key``, ``data``; header ``User-Agent:
tns_marker{"tns_id": ..., "type": "bot", "name": ...}``) -> ``{"id_code": 200, "id_message": "OK",
"data": {"report_id": ...}}`` (TNS bulk-report manual; SkyPortal's and AMPEL's TNS bots send the same).
SkyPortal: ``skyportal/handlers/api/candidate``, ``photometry`` (PUT: "Update and/or upload photometry,
resolving potential duplicates"), ``annotation`` (``/api/sources/{obj_id}/annotations``), token auth
``Authorization: token <TOKEN>``.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class _Server:
    def __init__(self):
        self.requests: list[dict] = []
        self.violations: list[str] = []
        self.script: list[int] = []  # statuses to answer next instead of handling (then normal answers)
        self.echo_errors = False  # scripted errors echo the request body (a careless server)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = {"method": self.command, "path": urlsplit(self.path).path, "query": parse_qs(urlsplit(self.path).query),
                       "headers": dict(self.headers), "body": body}  # fmt: skip
                with outer.lock:
                    outer.requests.append(req)
                    scripted = outer.script.pop(0) if outer.script else None
                    if scripted is not None:
                        status, answer = scripted, (body.decode(errors="replace") if outer.echo_errors else "busy")
                    else:
                        status, answer = outer.handle(req)
                data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def bad(self, why: str) -> tuple[int, dict]:
        self.violations.append(why)
        return 422, {"status": "error", "message": why}

    def handle(self, req: dict) -> tuple[int, object]:
        raise NotImplementedError


# --- TNS ---------------------------------------------------------------------------------------------

PHOT_FIELDS = {"obsdate", "flux", "flux_units", "filter_value", "instrument_value"}
NONDET_FIELDS = {"obsdate", "limiting_flux", "flux_units", "filter_value", "instrument_value"}
AT_FIELDS = {"ra", "dec", "reporting_group_id", "discovery_data_source_id", "reporter", "discovery_datetime", "at_type",
             "non_detection", "photometry"}  # fmt: skip
TNS_TIME = "%Y-%m-%d %H:%M:%S.%f"


class FakeTNS(_Server):
    def __init__(self, api_key: str, bot_id: int, bot_name: str):
        self.api_key, self.bot_id, self.bot_name = api_key, bot_id, bot_name
        self.reports: list[dict] = []  # accepted AT reports
        super().__init__()

    def handle(self, req: dict) -> tuple[int, object]:
        if req["method"] != "POST" or req["path"] != "/api/set/bulk-report":
            return self.bad(f"{req['method']} {req['path']} is not the bulk-report API")
        agent = req["headers"].get("User-Agent", "")
        if not agent.startswith("tns_marker"):
            return self.bad(f"User-Agent {agent!r} is not a tns_marker")
        try:
            marker = json.loads(agent[len("tns_marker"):])
        except ValueError:
            return self.bad("tns_marker is not JSON")
        if marker != {"tns_id": self.bot_id, "type": "bot", "name": self.bot_name}:
            return self.bad(f"tns_marker {marker}")
        if not req["headers"].get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return self.bad("the bulk report is a form")
        form = parse_qs(req["body"].decode())
        if set(form) != {"api_key", "data"} or any(len(v) != 1 for v in form.values()):
            return self.bad(f"form fields {sorted(form)}")
        if form["api_key"][0] != self.api_key:
            return 401, {"id_code": 401, "id_message": "Unauthorized"}
        data = json.loads(form["data"][0])
        problems = check_at_reports(data)
        if problems:
            return self.bad("; ".join(problems))
        self.reports += [data["at_report"][k] for k in sorted(data["at_report"], key=int)]
        return 200, {"id_code": 200, "id_message": "OK", "data": {"report_id": str(1000 + len(self.requests))}}


def check_at_reports(data: dict) -> list[str]:
    """The TNS bulk-report rules an AT report must meet (the fields TNS requires, their forms)."""
    problems = []
    reports = data.get("at_report")
    if not isinstance(reports, dict) or not reports or sorted(reports, key=int) != [str(i) for i in range(len(reports))]:
        return ["at_report is a mapping '0', '1', ... of reports"]
    for k, r in reports.items():
        missing = AT_FIELDS - set(r)
        if missing:
            problems.append(f"{k}: missing {sorted(missing)}")
            continue
        for coord in ("ra", "dec"):
            if not isinstance(r[coord], dict) or not isinstance(r[coord].get("value"), (int, float)):
                problems.append(f"{k}: {coord}.value")
        for f in ("reporting_group_id", "discovery_data_source_id", "at_type"):
            if not str(r[f]).isdigit():
                problems.append(f"{k}: {f} is an id")
        try:
            datetime.strptime(r["discovery_datetime"], TNS_TIME)
        except (TypeError, ValueError):
            problems.append(f"{k}: discovery_datetime {r['discovery_datetime']!r}")
        nd = r["non_detection"]
        if not (NONDET_FIELDS <= set(nd) or {"archiveid", "archival_remarks"} <= set(nd)):
            problems.append(f"{k}: non_detection needs a limit or an archival remark")
        group = r["photometry"].get("photometry_group") if isinstance(r["photometry"], dict) else None
        if not isinstance(group, dict) or not group:
            problems.append(f"{k}: photometry.photometry_group")
            continue
        for p in group.values():
            if not PHOT_FIELDS <= set(p) or p["flux_units"] != "1" or not isinstance(p["flux"], (int, float)):
                problems.append(f"{k}: photometry point {p}")
            try:
                datetime.strptime(p["obsdate"], TNS_TIME)
            except (TypeError, ValueError):
                problems.append(f"{k}: obsdate {p.get('obsdate')!r}")
    return problems


# --- SkyPortal ---------------------------------------------------------------------------------------

SKYPORTAL_FILTERS = {"ztfg", "ztfr", "ztfi", "lsstu", "lsstg", "lsstr", "lssti", "lsstz", "lssty"}
PHOT_LISTS = ("mjd", "flux", "fluxerr", "zp", "magsys", "filter")


class FakeSkyPortal(_Server):
    def __init__(self, token: str, filters: set[int], instruments: set[int]):
        self.token, self.filters, self.instruments = token, filters, instruments
        self.objs: dict[str, dict] = {}
        self.candidates: list[dict] = []  # (obj_id, filter_id, passed_at, passing_alert_id)
        self._candidate_keys: set[tuple] = set()
        self._by_obj: dict[str, dict[str, list]] = {}  # obj -> {"candidates": [...], "annotations": [...]}
        self.photometry: dict[tuple, dict] = {}  # point -> its values and id
        self.annotations: dict[int, dict] = {}
        super().__init__()

    def handle(self, req: dict) -> tuple[int, object]:
        if req["headers"].get("Authorization") != f"token {self.token}":
            return 401, {"status": "error", "message": "Credentials malformed"}
        m, path = req["method"], req["path"]
        body = None
        if m in ("POST", "PUT"):
            if req["headers"].get("Content-Type") != "application/json":
                return self.bad("SkyPortal takes JSON")
            body = json.loads(req["body"])
        if m == "GET" and (g := re.fullmatch(r"/api/candidates/([^/]+)", path)):
            obj = self.objs.get(g[1])
            if obj is None:
                return 400, {"status": "error", "message": "Invalid ID"}
            mine = self._by_obj.get(g[1], {})
            data = {"id": g[1], "ra": obj["ra"], "dec": obj["dec"], "annotations": list(mine.get("annotations", []))}
            if req["query"].get("includeAlerts") == ["true"]:
                cands = mine.get("candidates", [])
                data["filter_ids"] = [c["filter_id"] for c in cands]
                data["passing_alerts"] = [{k: c[k] for k in ("filter_id", "passing_alert_id", "passed_at")} for c in cands]
            return 200, {"status": "success", "data": data}
        if m == "POST" and path == "/api/candidates":
            return self.post_candidate(body)
        if m == "PUT" and path == "/api/photometry":
            return self.put_photometry(body)
        if m == "POST" and (g := re.fullmatch(r"/api/sources/([^/]+)/annotations", path)):
            return self.post_annotation(g[1], body)
        if m == "PUT" and (g := re.fullmatch(r"/api/sources/([^/]+)/annotations/(\d+)", path)):
            a = self.annotations.get(int(g[2]))
            if a is None or a["obj_id"] != g[1]:
                return 400, {"status": "error", "message": "Could not find any accessible annotations."}
            if not isinstance(body.get("data"), dict) or body.get("origin") != a["origin"]:
                return self.bad(f"annotation update {body}")
            a["data"] = body["data"]
            return 200, {"status": "success", "data": {}}
        return self.bad(f"{m} {path} is not an endpoint the publisher should call")

    def post_candidate(self, b: dict) -> tuple[int, object]:
        if not (isinstance(b.get("id"), str) and isinstance(b.get("ra"), float) and isinstance(b.get("dec"), float)):
            return self.bad(f"candidate id/ra/dec {b}")
        if not (isinstance(b.get("filter_ids"), list) and b["filter_ids"] and set(b["filter_ids"]) <= self.filters):
            return self.bad(f"filter_ids {b.get('filter_ids')}")
        if not isinstance(b.get("passing_alert_id"), int):
            return self.bad("passing_alert_id is an integer")
        try:
            datetime.fromisoformat(b["passed_at"])
        except (KeyError, TypeError, ValueError):
            return self.bad(f"passed_at {b.get('passed_at')!r}")
        if any((b["id"], f, b["passed_at"]) in self._candidate_keys for f in b["filter_ids"]):  # unique (obj, filter, passed_at)
            return 400, {"status": "error", "message": f"Failed to post candidate for object {b['id']}: duplicate key candidates_main_index"}
        self.objs.setdefault(b["id"], {"ra": b["ra"], "dec": b["dec"]})
        for f in b["filter_ids"]:
            self._candidate_keys.add((b["id"], f, b["passed_at"]))
            self.candidates.append({"obj_id": b["id"], "filter_id": f, "passed_at": b["passed_at"], "passing_alert_id": b["passing_alert_id"]})
            self._by_obj.setdefault(b["id"], {}).setdefault("candidates", []).append(self.candidates[-1])
        return 200, {"status": "success", "data": {"ids": list(range(len(self.candidates) - len(b["filter_ids"]), len(self.candidates)))}}

    def put_photometry(self, b: dict) -> tuple[int, object]:
        if b.get("obj_id") not in self.objs:
            return 400, {"status": "error", "message": f"Invalid object ID: {b.get('obj_id')}"}
        if b.get("instrument_id") not in self.instruments:
            return self.bad(f"instrument_id {b.get('instrument_id')}")
        n = len(b.get("mjd") or [])
        if not n or any(not isinstance(b.get(k), list) or len(b[k]) != n for k in PHOT_LISTS):
            return self.bad("photometry lists of equal length: " + ", ".join(PHOT_LISTS))
        if set(b["filter"]) - SKYPORTAL_FILTERS or set(b["magsys"]) != {"ab"} or any(e is None or e <= 0 for e in b["fluxerr"]):
            return self.bad(f"filters {set(b['filter'])}, magsys {set(b['magsys'])} or fluxerr")
        if not (b.get("group_ids") == "all" or (isinstance(b.get("group_ids"), list) and all(isinstance(g, int) for g in b["group_ids"]))):
            return self.bad("group_ids")
        origin = b.get("origin") or [None] * n
        ids = []
        for i in range(n):
            key = (b["obj_id"], b["instrument_id"], b["mjd"][i], b["filter"][i], b["flux"][i], b["fluxerr"][i], origin[i])
            if key not in self.photometry:  # PUT: a point already held is not added again
                self.photometry[key] = {"zp": b["zp"][i], "group_ids": b["group_ids"], "stream_ids": b.get("stream_ids"), "id": len(self.photometry)}
            ids.append(self.photometry[key]["id"])
        return 200, {"status": "success", "data": {"ids": ids, "upload_id": "u"}}

    def post_annotation(self, obj: str, b: dict) -> tuple[int, object]:
        if obj not in self.objs:
            return 400, {"status": "error", "message": "Invalid object"}
        if not re.match(r"^\w+", b.get("origin") or "") or not isinstance(b.get("data"), dict) or not b["data"]:
            return self.bad(f"annotation {b}")
        if any(a["origin"] == b["origin"] for a in self._by_obj.get(obj, {}).get("annotations", [])):
            return 400, {"status": "error", "message": "duplicate annotation origin"}
        aid = len(self.annotations) + 1
        self.annotations[aid] = {"id": aid, "obj_id": obj, "origin": b["origin"], "data": b["data"], "author_id": 1}
        self._by_obj.setdefault(obj, {}).setdefault("annotations", []).append(self.annotations[aid])
        return 200, {"status": "success", "data": {"annotation_id": aid}}
