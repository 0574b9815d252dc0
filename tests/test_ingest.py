"""Ingest of the real ZTF and LSST packets in ../shared/data: counts, ids, hashes, round trip."""

from __future__ import annotations

import gzip
import io
from datetime import datetime, timedelta
import math
import struct
import tarfile
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.io.layout import FORCED, UPPER_LIMIT

from .conftest import dump_alert_ids, group_location


def read_archive(root: Path) -> pa.Table:
    arch = Archive(root)
    tables = [arch.read(p) for p in arch.partitions()]
    cols = ["alert_id", "stock", "object_id", "survey", "night", "mjd", "ra", "dec", "band", "mag", "flux", "dps"]
    return pa.concat_tables([t.select(cols) for t in tables]) if tables else None


def test_every_group_reconciles_with_manifest(group_archives, manifest, data_dir):
    for group, (root, report) in group_archives.items():
        rows = manifest[group]
        dumped = dump_alert_ids(data_dir / group_location(rows))  # a Parquet dump beside the packets
        assert report.quarantined == 0, (group, report.quarantine_reasons)
        assert report.read == len(rows) + len(dumped), group
        assert report.ingested + report.duplicates == len(rows) + len(dumped), group
        # what is archived is exactly the distinct alert ids of the manifest group (and of its dumps)
        table = read_archive(root)
        ids = sorted(table.column("alert_id").to_pylist())
        assert ids == sorted({int(r["alert_id"]) for r in rows} | set(dumped)), group
        assert len(ids) == report.ingested
        index_rows = sum(p.rows for p in Archive(root).partitions())
        assert index_rows == report.ingested


def test_objects_and_nights_match_manifest(group_archives, manifest):
    for group, (root, _) in group_archives.items():
        table = read_archive(root)
        by_id = dict(zip(table.column("alert_id").to_pylist(), table.column("object_id").to_pylist()))
        expected: dict[int, set] = {}
        for r in manifest[group]:  # a duplicated alert id may come with another object name in an older schema
            expected.setdefault(int(r["alert_id"]), set()).add(r["object_id"] or None)
        for alert_id, names in expected.items():
            assert by_id[alert_id] in names, (group, alert_id)
        nights = table.column("night").to_numpy()
        mjd = table.column("mjd").to_numpy()
        plausible = (mjd > 30000) & (mjd < 100000)
        assert (nights[plausible] > 19000000).all() and (nights[~plausible] == 0).all()


def test_upper_limits_and_forced_photometry_present(group_archives, manifest):
    """Where a packet carries upper limits or fp_hists, the archived history has them (kind 1 / 2)."""
    seen_fp = seen_ul = 0
    for group, (root, _) in group_archives.items():
        table = read_archive(root)
        dps = dict(zip(table.column("alert_id").to_pylist(), table.column("dps").to_pylist()))
        for r in manifest[group]:
            kinds = [d["kind"] for d in dps[int(r["alert_id"])]]
            if r["n_fp"] and int(r["n_fp"]) > 0:
                assert kinds.count(FORCED) == int(r["n_fp"]), (group, r["alert_id"])
                seen_fp += 1
            if r["survey"] == "ztf" and int(r["n_prv"] or 0) > 0:
                seen_ul += UPPER_LIMIT in kinds
    assert seen_fp >= 24 + 12  # kowalski 2023 and boom packets carry fp_hists
    assert seen_ul > 1000


_MEMBERS: dict[Path, dict[str, bytes]] = {}


def _member(path: Path, name: str) -> bytes:
    """A tarball member's bytes (each tarball streamed once: seeking a .tar.gz restarts it each time)."""
    if path not in _MEMBERS:
        with tarfile.open(path, "r|*") as tar:
            _MEMBERS[path] = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    return _MEMBERS[path][name]


def _raw_records(data_dir: Path, row: dict) -> list[dict]:
    path = data_dir / row["file"]
    if row["member"]:
        data = _member(path, row["member"])
    else:
        data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:1] == b"\x00":
        sid = struct.unpack(">I", data[1:5])[0]
        schema = fastavro.schema.load_schema(
            str(data_dir / f"schemas/lsst/alert_packet/{sid // 100}/{sid % 100}/lsst.v{sid // 100}_{sid % 100}.alert.avsc")
        )
        return [fastavro.schemaless_reader(io.BytesIO(data[5:]), schema)]
    return list(fastavro.reader(io.BytesIO(data)))


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def test_round_trip_sample_of_fields(group_archives, manifest, data_dir):
    """Values in Parquet equal the Avro values, for a sample of alerts of every group."""
    checked = 0
    for group, (root, _) in group_archives.items():
        counts: dict[str, int] = {}
        for r in manifest[group]:
            counts[r["alert_id"]] = counts.get(r["alert_id"], 0) + 1
        unique = [r for r in manifest[group] if counts[r["alert_id"]] == 1]  # a repeated id keeps its first copy
        sample_ids = pa.array([int(r["alert_id"]) for r in unique[:: max(1, len(unique) // 15)]], pa.int64())
        arch = Archive(root)
        extras = pa.concat_tables([arch.read(p) for p in arch.partitions()], promote_options="default")
        extras = extras.filter(pc.is_in(extras.column("alert_id"), value_set=sample_ids))
        extra_by_id = {r["alert_id"]: r for r in extras.to_pylist()}
        rows_by_id = extra_by_id
        for row in unique[:: max(1, len(unique) // 15)]:
            rec = _raw_records(data_dir, row)[int(row["record"])]
            got = rows_by_id[int(row["alert_id"])]
            full = extra_by_id[int(row["alert_id"])]
            if row["survey"] == "ztf":
                c = rec["candidate"]
                assert _close(got["ra"], c["ra"]) and _close(got["dec"], c["dec"])
                assert _close(got["mjd"], c["jd"] - 2400000.5)
                assert got["band"] == {1: "g", 2: "r", 3: "i"}[c["fid"]]
                for f in ("rb", "magpsf", "sigmapsf", "fwhm", "ndethist", "jdstarthist", "drb", "distpsnr1", "ssdistnr"):
                    if f in c:
                        assert _close(full[f], c[f]), (group, f)
                prv_det = {p["candid"] for p in rec.get("prv_candidates") or [] if p.get("candid")}
                dp_ids = {d["dp_id"] for d in got["dps"] if d["kind"] == 0}
                assert dp_ids == prv_det | {c["candid"]}
            else:
                s = rec["diaSource"]
                assert s["diaSourceId"] == int(row["alert_id"])
                assert _close(got["ra"], s["ra"]) and _close(got["dec"], s.get("dec", s.get("decl")))
                assert _close(got["mjd"], s.get("midpointMjdTai", s.get("midPointTai")))
                assert got["band"] == (s.get("band") or s.get("filterName")).lower()
                assert _close(full["psfFlux"], s.get("psfFlux", s.get("psFlux")))
                prv = {p["diaSourceId"] for p in rec.get("prvDiaSources") or []}
                assert {d["dp_id"] for d in got["dps"] if d["kind"] == 0} == prv | {s["diaSourceId"]}
            checked += 1
    assert checked > 150


def test_cutouts_stored_beside_partition(group_archives, data_dir, manifest):
    root, _ = group_archives["ztf_kowalski"]
    arch = Archive(root)
    row = next(r for r in manifest["ztf_kowalski"] if r["cutouts"] == "True")
    rec = _raw_records(data_dir, row)[0]
    part = next(p for p in arch.partitions() if int(row["alert_id"]) in arch.read(p, ["alert_id"]).column("alert_id").to_pylist())
    assert part.cutouts and Path(root / part.cutouts).parent == Path(root / part.path).parent
    assert "cutout_science" not in arch.read(part).column_names  # never in the hot path
    cut = {r["alert_id"]: r for r in arch.read_cutouts(part).to_pylist()}[int(row["alert_id"])]
    assert cut["cutout_difference"] == rec["cutoutDifference"]["stampData"]


def test_histories_in_their_own_file_and_a_missing_one_is_named(group_archives, tmp_path):
    import shutil

    root, _ = group_archives["ztf_kowalski"]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    arch = Archive(copy)
    part = arch.partitions()[0]
    assert part.dps and "dps" not in pq.read_schema(copy / part.path).names
    assert arch.read(part).column("dps").equals(Archive(root).read(part).column("dps"))
    (copy / part.dps).unlink()
    with pytest.raises(FileNotFoundError, match=part.dps.split("/")[-1]):
        arch.read(part)
    assert "dps" not in arch.read(part, ["alert_id", "stock"]).column_names  # flat columns still read


def test_parallel_ingest_gives_identical_partitions_and_ids(group_archives, data_dir, manifest, tmp_path):
    """Two ingests (in-process and on a 2-worker LocalCluster) of the same input: same hashes, same dp ids."""
    for group in ("ztf_fink_sim_20181129", "ztf_kowalski", "lsst_wire_format"):
        first_root, _ = group_archives[group]
        root = tmp_path / group
        report = ingest([str(data_dir / group_location(manifest[group]))], root, IngestOptions(workers=2, progress=False))
        assert report.quarantined == 0
        a, b = Archive(first_root).index(), Archive(root).index()
        assert a.equals(b), group
        for p in Archive(root).partitions():
            assert (first_root / p.path).read_bytes() == (root / p.path).read_bytes()
        ta, tb = read_archive(first_root), read_archive(root)
        assert ta.column("dps").equals(tb.column("dps"))


def test_ingesting_twice_changes_nothing(tmp_path, data_dir):
    src = str(data_dir / "ztf" / "fink_ztf_public_20181129.tar.gz")
    first = ingest([src], tmp_path, IngestOptions(workers=0, progress=False))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "_index.lock" not in p.name}
    second = ingest([src], tmp_path, IngestOptions(workers=0, progress=False))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "_index.lock" not in p.name}
    assert first.ingested == 367 and first.duplicates == 0
    assert second.ingested == 0 and second.duplicates == 367 and second.partitions == 0
    assert before == after


def test_lsst_night_is_dayobs(group_archives):
    """A Chilean night keeps one name: alerts before and after 00:00 UTC share the dayObs night."""
    root, _ = group_archives["lsst_elasticc_v0_9"]
    table = read_archive(root)
    mjd = table.column("mjd").to_numpy()
    night = table.column("night").to_numpy()
    frac = mjd - np.floor(mjd)
    evening = frac > 0.9  # 21:36-24:00 UTC, i.e. the first half of a Chilean night
    morning = frac < 0.4  # 00:00-09:36 UTC, the second half
    assert evening.any() and morning.any()
    # Rubin's dayObs, computed here with the standard library: the calendar date 12 h before the alert's
    # UTC time (MJD 0 = 1858-11-17 00:00 UTC); so morning alerts belong to the previous UTC day's night
    epoch = datetime(1858, 11, 17)
    day_obs = np.array([int((epoch + timedelta(days=float(m)) - timedelta(hours=12)).strftime("%Y%m%d")) for m in mjd])
    utc_date = np.array([int((epoch + timedelta(days=float(m))).strftime("%Y%m%d")) for m in mjd])
    assert (night == day_obs).all()
    assert (night[morning] != utc_date[morning]).all() and (night[evening] == utc_date[evening]).all()
