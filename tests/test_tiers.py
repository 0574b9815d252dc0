"""Units on real alerts: DecentFilter vs real AMPEL, states, data rights, identities, registry."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.tiers.adapters import AlertView, PerAlertFilter
from ampel_dask.tiers.base import UnitConfigError, Verdict
from ampel_dask.tiers.states import T1PolicyConfig, alert_access, build_states, flat_history, one_copy, thinned_history
from ampel_dask.tiers.units.t0_filters import DecentFilter, ExpressionFilter, LSSTQualityFilter

DECENT = {  # the cuts of ../shared/recipes/ampel/ztf_decent.yaml (AMPEL's reference run)
    "min_ndet": 2, "min_tspan": -666, "max_tspan": 5, "min_rb": 0.3, "max_fwhm": 5.5, "max_elong": 1.4,
    "max_magdiff": 1, "max_nbad": 0, "min_sso_dist": 20, "min_gal_lat": 14, "gaia_rs": 0, "gaia_pm_signif": 3,
    "gaia_plx_signif": 3, "gaia_veto_gmag_min": 9, "gaia_veto_gmag_max": 20, "gaia_excessnoise_sig_max": 999,
    "ps1_sgveto_rad": 1, "ps1_sgveto_th": 0.8, "ps1_confusion_rad": 3, "ps1_confusion_sg_tol": 0.1,
}  # fmt: skip
ALL_ACCESS = ["ZTF_ALL", "LSST"]  # programid 0 (2017 commissioning) included


@pytest.fixture(scope="session")
def ztf_archive(tmp_path_factory, data_dir) -> Path:
    """The three real ZTF tarballs of AMPEL's reference run (1,993 alerts)."""
    root = tmp_path_factory.mktemp("ztf_tarballs")
    report = ingest([str(p) for p in sorted((data_dir / "ztf").glob("*.tar.gz"))], root, IngestOptions(workers=0, progress=False))
    assert report.ingested == 1993
    return root


@pytest.fixture(scope="session")
def ztf_alerts(ztf_archive) -> pa.Table:
    arch = Archive(ztf_archive)
    return pa.concat_tables([arch.read(p) for p in arch.partitions()])


def test_decentfilter_agrees_with_real_ampel_alert_by_alert(ztf_alerts, data_dir):
    verdict = DecentFilter(DECENT).verdict(ztf_alerts)
    ours = dict(zip(ztf_alerts.column("alert_id").to_pylist(), zip(verdict.accepted.tolist(), verdict.reason_of())))
    rows = list(csv.DictReader(open(data_dir / "reference" / "ampel_decentfilter_decisions.csv")))
    assert len(rows) == 1993
    reason_differs = []
    for r in rows:
        accepted, reason = ours[int(r["candid"])]
        assert accepted == bool(int(r["accepted"])), r
        theirs = r["reject_reason"] if r["reject_reason"].startswith("missing") else r["reject_reason"].split("=")[0]
        if (reason or "") != theirs:
            reason_differs.append((r["tarball"], reason, theirs))
    assert sum(verdict.accepted) == 22
    # The only reason that differs: 2017 commissioning packets list the trigger again in prv_candidates;
    # AMPEL counts it twice (2 detections), the archive keeps one datapoint per id (nDet comes first).
    assert {(t, a, b) for t, a, b in reason_differs} <= {("ampel_core_real_201712.tar.gz", "nDet", "missing=distpsnr1")}


def test_decentfilter_accepts_ampel_config_file_unchanged(ztf_alerts):
    """The AMPEL job file's filter config (Gaia fields included, gaia_rs 0) validates as is."""
    job = yaml.safe_load(Path(__file__).with_name("data").joinpath("ampel_decent_job.yaml").read_text())
    cfg = job["task"][0]["config"]["directives"][0]["filter"]["config"]
    assert DecentFilter(cfg).verdict(ztf_alerts).accepted.sum() == 22


def test_filter_command_writes_csv_and_counts(ztf_archive, tmp_path):
    cfg = tmp_path / "decent.yaml"
    cfg.write_text(yaml.safe_dump({k: v for k, v in DECENT.items() if not k.startswith("gaia")}))
    out = tmp_path / "decisions.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "ampel_dask.cli", "filter", str(ztf_archive), "--unit", "DecentFilter", "--config", str(cfg), "--out", str(out), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["alerts"] == 1993 and summary["accepted"] == 22
    assert sum(summary["reasons"].values()) == 1993 - 22 and summary["reasons"]["nDet"] > 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 1993 and sum(int(r["accepted"]) for r in rows) == 22
    assert {r["reason"] for r in rows if r["accepted"] == "0"} == set(summary["reasons"])
    assert not any(p.name.startswith("filter") for p in ztf_archive.iterdir())  # stores nothing


def test_bad_unit_config_names_unit_and_field(ztf_archive, tmp_path):
    with pytest.raises(UnitConfigError) as err:
        DecentFilter({**DECENT, "min_ndet": "two"})
    assert "DecentFilter.min_ndet" in str(err.value)
    with pytest.raises(UnitConfigError) as err:
        DecentFilter({**DECENT, "max_fwmh": 3})  # a typo is an error, not a silently ignored field
    assert "DecentFilter.max_fwmh" in str(err.value)
    with pytest.raises(UnitConfigError) as err:
        ExpressionFilter({"expr": "rb >"})
    assert "ExpressionFilter.expr" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("min_ndet: 2\n")
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "filter", str(ztf_archive), "--unit", "DecentFilter", "--config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "DecentFilter.max_tspan" in proc.stderr


def test_unit_identity_is_stable_across_processes():
    code = textwrap.dedent(
        """
        import json, sys
        from ampel_dask.tiers.units.t0_filters import DecentFilter
        cfg = json.loads(sys.argv[1])
        print(DecentFilter(dict(reversed(list(cfg.items())))).identity.key)
        """
    )
    keys = set()
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", code, json.dumps(DECENT)], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        keys.add(out.stdout.strip())
    assert len(keys) == 1 and keys == {DecentFilter(DECENT).identity.key}
    assert DecentFilter({**DECENT, "min_rb": 0.31}).identity.key not in keys


def test_state_id_depends_on_datapoints_not_their_order(ztf_alerts):
    sample = ztf_alerts.slice(0, 200)
    base = build_states(sample, T1PolicyConfig(), ALL_ACCESS)
    rows = sample.to_pylist()
    rng = np.random.default_rng(7)
    for r in rows:
        rng.shuffle(r["dps"])
    shuffled = pa.Table.from_pylist(rows, schema=sample.schema)
    assert build_states(shuffled, T1PolicyConfig(), ALL_ACCESS).column("state_id").equals(base.column("state_id"))
    # one datapoint id different -> a different state
    changed = [dict(r) for r in rows]
    for r in changed:
        if r["dps"]:
            r["dps"] = [dict(d) for d in r["dps"]]
            r["dps"][0]["dp_id"] += 1
    other = build_states(pa.Table.from_pylist(changed, schema=sample.schema), T1PolicyConfig(), ALL_ACCESS)
    nonempty = np.asarray(pc.list_value_length(base.column("dps"))) > 0
    assert (np.asarray(other.column("state_id"))[nonempty] != np.asarray(base.column("state_id"))[nonempty]).all()
    assert len(set(base.column("state_id").to_pylist())) == sample.num_rows  # every alert adds its own detection


def test_no_look_ahead_with_archived_history(tmp_path, data_dir):
    """34 alerts of ZTF21abiuvdk: with the object's whole archive joined, no state sees a later point."""
    ingest([str(data_dir / "ztf/pitt_google")], tmp_path, IngestOptions(workers=0, progress=False))
    arch = Archive(tmp_path)
    alerts = pa.concat_tables([arch.read(p) for p in arch.partitions()])
    alerts = alerts.filter(pc.equal(alerts.column("object_id"), "ZTF21abiuvdk"))
    assert alerts.num_rows == 34
    history = flat_history(alerts)
    for policy in (T1PolicyConfig(), T1PolicyConfig(kinds=["detection", "upper_limit", "forced"])):
        states = build_states(alerts, policy, ALL_ACCESS, history=history)
        later_seen = 0
        for mjd, dps in zip(states.column("mjd").to_pylist(), states.column("dps").to_pylist()):
            assert all(d["mjd"] <= mjd + 1e-6 for d in dps)
            later_seen += len(dps)
        # and the archive joined more than the packets alone had
        packet_only = build_states(alerts, policy, ALL_ACCESS)
        assert later_seen >= sum(len(d) for d in packet_only.column("dps").to_pylist())
    # the latest alert's state is the union of all earlier datapoints
    last = int(np.argmax(alerts.column("mjd").to_numpy()))
    full = build_states(alerts, T1PolicyConfig(), ALL_ACCESS, history=history).column("dps")[last].as_py()
    assert len({d["dp_id"] for d in full}) == len(full) > len(alerts.column("dps")[last].as_py())


def test_archived_history_states_match_a_per_alert_reference(tmp_path, data_dir):
    """34 alerts of ZTF21abiuvdk, some copies of datapoints altered: each state holds exactly its
    object's datapoints that a packet published at or before the alert (alert time, then id), once
    each, in time order, as the copy of the first packet that published it; thinning pieces of the
    history first changes nothing."""
    ingest([str(data_dir / "ztf/pitt_google")], tmp_path, IngestOptions(workers=0, progress=False))
    arch = Archive(tmp_path)
    alerts = pa.concat_tables([arch.read(p) for p in arch.partitions()])
    alerts = alerts.filter(pc.equal(alerts.column("object_id"), "ZTF21abiuvdk")).to_pylist()
    for i, a in enumerate(alerts):  # every packet's copy differs, so the chosen copy shows
        for d in a["dps"]:
            if d["dp_id"] != a["alert_id"]:
                d["rb"] = float(i)
    alerts = pa.Table.from_pylist(alerts, schema=arch.read(arch.partitions()[0]).schema)
    history = flat_history(alerts)
    policy = T1PolicyConfig(kinds=["detection", "upper_limit", "forced"])
    states = build_states(alerts.drop_columns(["dps"]), policy, ALL_ACCESS, history=history)
    copies: dict[int, list[tuple]] = {}
    for a in alerts.to_pylist():
        for d in a["dps"]:
            copies.setdefault(d["dp_id"], []).append((a["mjd"], a["alert_id"], d))
    first = {k: min(v, key=lambda c: c[:2]) for k, v in copies.items()}  # (publication, copy)
    for mjd, aid, dps in zip(*(states.column(c).to_pylist() for c in ("mjd", "alert_id", "dps"))):
        want = sorted((d for pm, pid, d in first.values() if (pm, pid) <= (mjd, aid) and d["mjd"] <= mjd + 1e-6 and not d["flags"] & policy.exclude_flags),
                      key=lambda d: (d["mjd"], d["dp_id"]))  # fmt: skip
        assert dps == want
    pieces = [one_copy(history.slice(k, 200)) for k in range(0, history.num_rows, 200)]
    assert one_copy(pa.concat_tables(pieces)).equals(one_copy(history))
    # the hist tasks' single-gather version, on alerts in several chunks and a subset of them
    chunked = pa.concat_tables([alerts.slice(0, 10), alerts.slice(10, 15), alerts.slice(25)])
    keep = np.arange(chunked.num_rows) % 3 != 1
    assert thinned_history(chunked, keep).equals(one_copy(flat_history(chunked.filter(pa.array(keep)))))


def test_public_channel_never_sees_partnership_photometry(ztf_alerts):
    """Tests build partnership datapoints (programid 2): a ZTF_PUB channel's states never contain them."""
    sample = ztf_alerts.slice(0, 300).to_pylist()
    private_ids = set()
    for i, r in enumerate(sample):
        for j, d in enumerate(r["dps"]):
            if (i + j) % 3 == 0:
                d["programid"] = 2
                private_ids.add(d["dp_id"])
    table = pa.Table.from_pylist(sample, schema=ztf_alerts.schema)
    public = build_states(table, T1PolicyConfig(), ["ZTF_PUB"])
    seen = {d["dp_id"] for dps in public.column("dps").to_pylist() for d in dps}
    assert private_ids and not (seen & private_ids)
    partner = build_states(table, T1PolicyConfig(), ["ZTF_PUB", "ZTF_PRIV"])
    assert private_ids <= {d["dp_id"] for dps in partner.column("dps").to_pylist() for d in dps}
    # an alert triggered by a partnership detection is not for a public channel at all
    table = table.set_column(table.column_names.index("programid"), "programid", pa.array([2] + [1] * (table.num_rows - 1), pa.int32()))
    assert alert_access(table, ["ZTF_PUB"]).tolist() == [False] + [True] * (table.num_rows - 1)
    # several surveys, a missing one, chunked or dictionary-typed: the same as a row-by-row reference
    from ampel_dask.tiers.states import PUBLIC_SURVEYS, ZTF_ACCESS, access_mask

    def reference(survey, pid, access):
        allowed = set().union(*(ZTF_ACCESS.get(t, set()) for t in access))
        return np.array([("ALL" in access or (not np.isnan(p) and int(p) in allowed)) if s == "ztf" else
                         (s in PUBLIC_SURVEYS and bool(PUBLIC_SURVEYS[s] & set(access) or "ALL" in access)) for s, p in zip(survey, pid)])  # fmt: skip

    names = ["ztf", "lsst", None, "ztf", "decam"] * 60
    mixed = table.set_column(table.column_names.index("survey"), "survey", pa.chunked_array([names[:100], names[100:]], pa.string()))
    pid = np.asarray(mixed.column("programid").to_numpy(), dtype=float)
    pid[::7] = np.nan
    mixed = mixed.set_column(mixed.column_names.index("programid"), "programid", pa.array(pid))
    for access in (["ZTF_PUB"], ["ZTF_PUB", "ZTF_PRIV", "LSST"], ["ALL"]):
        want = reference(names, pid, access)
        assert (access_mask(np.asarray(names, dtype=object), pid, access) == want).all()
        assert want.any() and not want.all()
        assert (alert_access(mixed, access) == want).all()
        as_dict = mixed.set_column(mixed.column_names.index("survey"), "survey", pc.dictionary_encode(mixed.column("survey")))
        assert (alert_access(as_dict, access) == want).all()


def test_expression_filter_is_vectorised_and_matches_numpy(ztf_alerts):
    f = ExpressionFilter({"expr": "rb > 0.5 and ndethist >= 2 and abs(magdiff) < 0.3"})
    mask = f.verdict(ztf_alerts).accepted
    rb = ztf_alerts.column("rb").to_numpy(zero_copy_only=False).astype(float)
    nd = ztf_alerts.column("ndethist").to_numpy(zero_copy_only=False).astype(float)
    md = ztf_alerts.column("magdiff").to_numpy(zero_copy_only=False).astype(float)
    expected = (np.nan_to_num(rb, nan=-1) > 0.5) & (np.nan_to_num(nd, nan=-1) >= 2) & (np.nan_to_num(np.abs(md), nan=9) < 0.3)
    assert (mask == expected).all() and 0 < mask.sum() < len(mask)
    assert ExpressionFilter({"expr": "band in ['g', 'r'] and ndet >= 3 and tspan < 10"}).verdict(ztf_alerts).accepted.sum() > 0
    assert ExpressionFilter({"expr": "distpsnr1 is None"}).verdict(ztf_alerts).accepted.sum() == 816  # schema 1.3 (2017) has none
    with pytest.raises(ValueError, match="unknown column"):
        ExpressionFilter({"expr": "rbb > 1"}).verdict(ztf_alerts)
    with pytest.raises(UnitConfigError):
        ExpressionFilter({"expr": "__import__('os').system('true')"})


def test_lsst_quality_filter_on_real_rubin_alerts(tmp_path, data_dir):
    ingest([str(data_dir / "lsst/rubin_fink_v9_0.tar.gz"), str(data_dir / "lsst/rubin_fink_v7_4.tar.gz")], tmp_path, IngestOptions(workers=0, progress=False))
    arch = Archive(tmp_path)
    alerts = pa.concat_tables([arch.read(p) for p in arch.partitions()])
    v = LSSTQualityFilter({"min_snr": 5, "min_reliability": 0.0}).verdict(alerts)
    counts = v.counts()
    assert sum(counts.values()) == alerts.num_rows and 0 < counts["accepted"] < alerts.num_rows
    ss = pc.is_valid(alerts.column("ssObjectId")).to_numpy(zero_copy_only=False) & (alerts.column("ssObjectId").fill_null(0).to_numpy() != 0)
    assert not (v.accepted & ss).any()


class AmpelStyleFilter(PerAlertFilter):
    """Written one alert at a time, as for AMPEL: at least 2 detections, latest rb >= 0.5."""

    def process(self, alert: AlertView) -> bool:
        pps = [dp for dp in alert.datapoints if dp.get("candid") is not None]
        return len(pps) >= 2 and alert.datapoints[0]["rb"] is not None and alert.datapoints[0]["rb"] >= 0.5


def test_per_alert_adapter_runs_ampel_style_units(ztf_alerts):
    slow = AmpelStyleFilter().verdict(ztf_alerts).accepted
    fast = ExpressionFilter({"expr": "ndet >= 2 and rb >= 0.5"}).verdict(ztf_alerts).accepted
    assert (slow == fast).all() and slow.sum() > 0


def test_unit_from_an_installed_package_is_discovered(tmp_path):
    """A tiny science package, installed (dist-info with entry points) during the test, is found."""
    site = tmp_path / "site"
    pkg = site / "tiny_science"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(
        """
        from ampel_dask.tiers.base import T0Filter, UnitConfig, Verdict

        class BrightConfig(UnitConfig):
            max_mag: float = 18.0

        class BrightFilter(T0Filter):
            '''Alerts brighter than max_mag.'''
            Config = BrightConfig
            version = "0.3"
            def apply(self, alerts):
                return Verdict.from_mask(alerts.column("mag").to_numpy(zero_copy_only=False) < self.config.max_mag, "faint")
        """
    ))  # fmt: skip
    dist = site / "tiny_science-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-science\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[ampel_dask.units]\nBrightFilter = tiny_science:BrightFilter\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "units", "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    units = {u["name"]: u for u in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert units["BrightFilter"] == {"name": "BrightFilter", "tier": "T0", "version": "0.3", "config": {"max_mag": "float"}}
    assert {"DecentFilter", "ExpressionFilter", "LSSTQualityFilter"} <= set(units)
    assert all(u["tier"] in ("T0", "T1", "T2", "T3") for u in units.values())


def test_verdict_keeps_first_failing_reason():
    v = Verdict.accept_all(4)
    v.reject(np.array([True, False, False, True]), "a")
    v.reject(np.array([True, True, False, False]), "b")
    assert v.reason_of() == ["a", "b", None, "a"] and v.counts() == {"accepted": 1, "a": 2, "b": 1}


def test_galactic_latitude_matches_astropy_on_real_alert_positions(ztf_alerts):
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    from ampel_dask.tiers.sky import galactic_latitude

    ra, dec = ztf_alerts.column("ra").to_numpy(), ztf_alerts.column("dec").to_numpy()
    ref = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs").galactic.b.deg
    assert np.abs(galactic_latitude(ra, dec) - ref).max() < 1e-9  # degrees
    assert (np.abs(ref) < 14).any() and (np.abs(ref) > 14).any()  # the DecentFilter cut falls inside the sample


def test_unit_registry_scan_is_kept_and_refreshed_for_a_new_name(monkeypatch):
    """Entry points are scanned once per process; a unit registered later (pip install in a running
    notebook) is still found, and an unknown name lists the installed units."""
    from importlib.metadata import EntryPoint

    from ampel_dask.tiers import registry

    real = registry.entry_points
    calls = []

    def counting(group):
        calls.append(group)
        return real(group=group)

    monkeypatch.setattr(registry, "entry_points", counting)
    registry.installed(refresh=True)
    assert registry.load("DecentFilter") is DecentFilter and registry.load("ExpressionFilter") is ExpressionFilter
    assert len(calls) == 1
    late = EntryPoint("LateFilter", "ampel_dask.tiers.units.t0_filters:ExpressionFilter", registry.GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), late])
    assert registry.load("LateFilter") is ExpressionFilter
    with pytest.raises(registry.UnknownUnit, match="unknown unit 'Nope'.*DecentFilter"):
        registry.load("Nope")
    monkeypatch.setattr(registry, "entry_points", real)
    registry.installed(refresh=True)


def test_take_rows_gathers_across_chunks_like_one_array(ztf_alerts):
    """take_rows never concatenates the whole input, and returns what a take on the concatenation would."""
    from ampel_dask.io.arrays import take_rows

    values = pc.list_flatten(ztf_alerts.column("dps")).combine_chunks()
    n = len(values)
    chunks = [values.slice(0, n // 3), values.slice(n // 3, 0), values.slice(n // 3, n // 2), values.slice(n // 3 + n // 2)]
    whole = pa.concat_arrays(chunks)
    rng = np.random.default_rng(7)
    for idx in (rng.integers(0, n, 5000), np.sort(rng.integers(0, n, 300)), np.array([n - 1, 0, n - 1]), np.array([], dtype=np.int64)):
        got = take_rows(chunks, idx)
        assert got.type == values.type and got.equals(whole.take(pa.array(idx, pa.int64())))
    assert take_rows(pa.chunked_array(chunks), np.arange(n)).equals(whole)
