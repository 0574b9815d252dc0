"""A slow, plain-Python AMPEL-style replay of T1 states: the oracle the vectorised builder is tested against.

Written apart from ``ampel_dask.tiers.states`` on purpose (nothing of it is imported here): it does what
AMPEL's database does, one alert at a time. Alerts are taken in publication order (alert time, then
alert id: two alerts of one exposure are published one after the other too). Each alert's packet is
added to its object's datapoints, where a datapoint already known keeps the copy it was first
published with (AMPEL's insert-if-absent). The alert's state is then the object's datapoints known at
that moment that were observed by the alert's time, that the policy admits (kind, band, flags, rb) and
that the channel may see (ZTF programid 1 public, 2 partnership, 3 Caltech; Rubin public).

The ``packet`` policy is the alert's own packet only, in packet order, with the same cuts.
"""

from __future__ import annotations

import math

KIND_CODE = {"detection": 0, "upper_limit": 1, "forced": 2}
DETECTION = 0
# data rights of ZTF programids per access tag (the documented policy); Rubin data is public
ZTF_PROGRAMS = {"ZTF_PUB": {1}, "ZTF_PRIV": {2}, "ZTF_COLLAB": {2}, "ZTF_CALTECH": {3}, "ZTF_ALL": {0, 1, 2, 3}}
RUBIN_TAGS = {"LSST", "LSST_PUB"}
TIME_EPS = 1e-6  # days: a datapoint at the alert's own time (to float noise) belongs to its state


def may_see(survey: str | None, programid, access: list[str]) -> bool:
    """May a channel with these access tags use a datapoint of this survey and programid?"""
    if survey == "ztf":
        if "ALL" in access:
            return True
        allowed = set()
        for tag in access:
            allowed |= ZTF_PROGRAMS.get(tag, set())
        if programid is None or (isinstance(programid, float) and math.isnan(programid)):
            return False  # unknown programid: private
        return int(programid) in allowed
    if survey == "lsst":
        return "ALL" in access or bool(RUBIN_TAGS & set(access))
    return False


def admitted(dp: dict, policy) -> bool:
    """The policy's cuts on one datapoint (kinds, bands, flag bits, detection reliability)."""
    if dp["kind"] not in {KIND_CODE[k] for k in policy.kinds}:
        return False
    if dp["band"] is not None and dp["band"] in policy.exclude_bands:
        return False
    if policy.exclude_flags and (dp["flags"] or 0) & policy.exclude_flags:
        return False
    if policy.min_rb is not None and dp["kind"] == DETECTION:
        rb = math.inf if dp["rb"] is None else dp["rb"]
        if not rb >= policy.min_rb:  # NaN fails too
            return False
    return True


def observed_by(dp: dict, alert_mjd) -> bool:
    return dp["mjd"] is not None and alert_mjd is not None and dp["mjd"] <= alert_mjd + TIME_EPS


def publication_key(alert: dict) -> tuple:
    mjd = alert["mjd"]
    missing = mjd is None or (isinstance(mjd, float) and math.isnan(mjd))
    return (math.inf if missing else mjd, alert["alert_id"])


def replay(alerts: list[dict], policy, access: list[str]) -> list[list[dict]]:
    """One state per alert (in the order given): the ``history: archive`` policy, as AMPEL's database
    would hold it. ``alerts``: dicts with ``alert_id``, ``stock``, ``survey``, ``mjd``, ``dps``."""
    database: dict[int, dict[int, dict]] = {}  # stock -> dp_id -> the first-published copy
    states: list[list[dict]] = [[] for _ in alerts]
    for i in sorted(range(len(alerts)), key=lambda i: publication_key(alerts[i])):
        alert = alerts[i]
        known = database.setdefault(alert["stock"], {})
        for dp in alert["dps"]:
            if dp["dp_id"] not in known:
                known[dp["dp_id"]] = dp
        state = [dp for dp in known.values()
                 if observed_by(dp, alert["mjd"]) and admitted(dp, policy) and may_see(alert["survey"], dp["programid"], access)]  # fmt: skip
        states[i] = sorted(state, key=lambda dp: (dp["mjd"], dp["dp_id"]))
    return states


def packet_states(alerts: list[dict], policy, access: list[str]) -> list[list[dict]]:
    """One state per alert: the ``packet`` policy (the alert's own packet, in packet order)."""
    return [[dp for dp in a["dps"] if observed_by(dp, a["mjd"]) and admitted(dp, policy) and may_see(a["survey"], dp["programid"], access)]
            for a in alerts]  # fmt: skip


def comparable(state: list[dict]) -> list[tuple]:
    """A state as (dp_id, values) records that compare equal when the datapoints and values are equal
    (NaN == NaN here; ``v == v`` is False for NaN alone)."""
    return [(dp["dp_id"], tuple((k, v if v == v else "nan") for k, v in dp.items())) for dp in state]
