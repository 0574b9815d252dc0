"""Parquet alert dumps (broker data lakes) as ingest input: every real sample ingests and reconciles, and
an alert archives to the same row from Parquet as from Avro.

Oracles: row counts and ids read from the dumps with pyarrow alone; the Avro path's archive of the same
alerts (the Parquet written here from fastavro's records, or Fink's own dumps of alerts also shipped as
Avro); ELAsTiCC's truth table; plain-Python arithmetic on float64 for ids a float cannot hold.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ampel_dask.cli import main
from ampel_dask.io import parquet_alerts
from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.io.layout import DETECTION, ztf_name
from ampel_dask.io.sources import SourceError

from .conftest import dump_alert_ids, group_location

OPTS = IngestOptions(workers=0, progress=False)
PER_GROUP = 150  # Avro alerts per manifest group rewritten as Parquet (every schema version is among them)


def samples(data_dir: Path) -> list[Path]:
    """Every Parquet alert dump in the shared data (the parquet/ folder, and two that sit beside packets
    and labels)."""
    found = sorted((data_dir / "parquet").glob("*.parquet"))
    found += sorted((data_dir / "lsst" / "rubin_lsstcam_v10").glob("*.parquet"))
    found += sorted((data_dir / "labels" / "elasticc_truth_sample").glob("*.parquet"))
    return found


def archive_rows(root: Path, ids: set[int] | None = None) -> dict[int, dict]:
    """Every archived alert (or those of ``ids``) as a dict: all columns, the history ``dps`` and its
    cutouts, by alert id."""
    arch = Archive(root)
    out: dict[int, dict] = {}
    wanted = pa.array(sorted(ids), pa.int64()) if ids is not None else None
    for part in arch.partitions():
        table = arch.read(part)
        if wanted is not None:
            table = table.filter(pc.is_in(table.column("alert_id"), value_set=wanted))
            if not table.num_rows:
                continue
        cut = arch.read_cutouts(part)
        stamps = {r["alert_id"]: r for r in cut.to_pylist()} if cut is not None else {}
        for row in table.to_pylist():
            row["cutouts"] = stamps.get(row["alert_id"])
            out[row["alert_id"]] = row
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def differing(a: dict, b: dict, skip=("source",)) -> list[str]:
    """Columns whose values differ; ``source`` names the file a row came from, so it differs by design."""
    assert a.keys() == b.keys()
    return [k for k in a if k not in skip and not same(a[k], b[k])]


# --- every real sample ----------------------------------------------------------------------------


def test_every_parquet_sample_ingests_and_reconciles(data_dir, tmp_path):
    """Counts from the footer, ids and object names from the rows, read with pyarrow alone."""
    seen = 0
    for path in samples(data_dir):
        rows = pq.ParquetFile(path).metadata.num_rows
        ids = dump_alert_ids(path)
        root = tmp_path / path.stem
        report = ingest([str(path)], root, OPTS)
        assert report.quarantined == 0, (path.name, report.quarantine_reasons)
        assert report.read == rows and report.ingested + report.duplicates == rows, path.name
        got = archive_rows(root)
        assert sorted(got) == sorted(set(ids)) and report.ingested == len(set(ids)), path.name
        table = pq.read_table(path)
        if "candidate" in table.column_names:  # ZTF: names, times and the trigger's photometry
            cand = table.column("candidate").to_pylist()
            for name, c in zip(table.column("objectId").to_pylist(), cand):
                row = got[c["candid"]]
                assert row["object_id"] == name and ztf_name(row["stock"]) == name
                assert row["mjd"] == c["jd"] - 2400000.5 and row["ra"] == c["ra"] and row["dec"] == c["dec"]
                assert np.float32(row["mag"]) == np.float32(c["magpsf"])
                assert row["band"] == "gri"[c["fid"] - 1]
        else:  # Rubin: the object, time and flux of the triggering diaSource
            for s in table.column("diaSource").to_pylist():
                row = got[s["diaSourceId"]]
                assert row["stock"] == (s["diaObjectId"] or -s["ssObjectId"])
                assert row["mjd"] == s.get("midpointMjdTai", s.get("midPointTai"))
                assert np.float32(row["flux"]) == np.float32(s.get("psfFlux", s.get("psFlux")))
                assert row["band"] == (s.get("band") or s.get("filterName")).lower()
        assert all(20000101 < r["night"] < 20300101 for r in got.values())
        seen += 1
    assert seen == 7


def test_history_lengths_match_the_dumps(data_dir, tmp_path):
    """Every history entry of a dump row is a datapoint of its archived alert: the trigger, each
    prv_candidates / prvDiaSources entry, each forced source (counted with pyarrow's list lengths)."""
    for path in samples(data_dir):
        table = pq.read_table(path)
        root = tmp_path / path.stem
        ingest([str(path)], root, OPTS)
        got = archive_rows(root)
        ztf = "candidate" in table.column_names
        ids = dump_alert_ids(path)
        lists = ["prv_candidates", "fp_hists"] if ztf else ["prvDiaSources", "prvDiaForcedSources", "prvDiaNondetectionLimits"]
        expected = np.ones(table.num_rows, dtype=np.int64)
        for name in lists:
            if name in table.column_names and pa.types.is_list(table.schema.field(name).type):
                expected += pc.fill_null(pc.list_value_length(table.column(name)), 0).to_numpy()
        lengths = np.array([len(got[i]["dps"]) for i in ids])
        assert (lengths == expected).all(), path.name


def test_elasticc_truth_alerts_are_ingested(data_dir, tmp_path):
    """The ELAsTiCC SN Ia truth table names alerts of Fink's Parquet dump beside it: ingesting that
    folder archives every one of them under its diaSourceId, with its diaObjectId as the stock."""
    folder = data_dir / "labels" / "elasticc_truth_sample"
    with open(folder / "elasticc_truth.csv") as fh:
        truth = list(csv.DictReader(fh))
    report = ingest([str(folder)], tmp_path, OPTS)
    assert report.skipped_files == [str(folder / "elasticc_truth.csv")]
    assert (report.read, report.ingested, report.quarantined) == (len(truth), len(truth), 0)
    got = archive_rows(tmp_path)
    for t in truth:
        row = got[int(t["diaSourceId"])]
        assert row["stock"] == int(t["diaObjectId"])
        sep = math.hypot((row["ra"] - float(t["RA"])) * math.cos(math.radians(row["dec"])), row["dec"] - float(t["DEC"]))
        assert sep * 3600 < 0.01  # the simulated object's position
        assert row["mjd"] >= float(t["MJD_DETECT_FIRST"]) - 1e-3  # an alert is a detection: never before the first
    assert {r["survey"] for r in got.values()} == {"lsst"}


# --- the same rows from Avro and from Parquet ------------------------------------------------------


def _packets(data_dir: Path, location: str):
    """(label, bytes) of a group's container packets, in the order ingest reads them."""
    path = data_dir / location
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.name.endswith((".avro", ".avro.gz")) and not p.name.startswith("."):
                yield str(p), p.read_bytes()
    else:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if m.isfile():
                    yield m.name, tar.extractfile(m).read()


def write_dumps(data_dir: Path, location: str, out: Path, limit: int) -> set[int]:
    """A group's first ``limit`` Avro alerts, decoded by fastavro, written as a data lake would: one
    Parquet file per writer schema, nested columns with the types pyarrow infers from the records
    (floats as double, all-null fields as null), row groups of 16, and the Avro schema in the footer as
    parquet-avro keeps it. Returns the alert ids written."""
    by_schema: dict[str, list[dict]] = defaultdict(list)
    n = 0
    for _, data in _packets(data_dir, location):
        if n >= limit:
            break
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        reader = fastavro.reader(io.BytesIO(data))
        text = reader.metadata["avro.schema"]
        text = text.decode() if isinstance(text, bytes) else text
        for rec in reader:
            by_schema[text].append(rec)
            n += 1
    ids = set()
    out.mkdir(parents=True)
    for i, (text, records) in enumerate(by_schema.items()):
        table = pa.Table.from_pylist(records).replace_schema_metadata({"parquet.avro.schema": text})
        pq.write_table(table, out / f"part-{i:05d}.parquet", row_group_size=16)
        for r in records:
            ids.add(r["candidate"]["candid"] if "candidate" in r else r["diaSource"]["diaSourceId"])
    return ids


def test_parquet_written_from_avro_alerts_archives_the_same_rows(group_archives, data_dir, manifest, tmp_path):
    """For every container group: its alerts as Parquet ingest (in chunks of 40 alerts, so across row
    groups and files) to rows equal in every column, history and cutout to the Avro ingest's, for
    every schema version of the shared data."""
    compared = Counter()
    for group, rows in sorted(manifest.items()):
        if not rows[0]["encoding"].endswith("avro-container"):
            continue
        location = group_location(rows)
        written = write_dumps(data_dir, location, tmp_path / group / "in", PER_GROUP)
        report = ingest([str(tmp_path / group / "in")], tmp_path / group / "archive", IngestOptions(workers=0, progress=False, chunk_packets=40))
        assert report.quarantined == 0, (group, report.quarantine_reasons)
        copies = Counter(int(r["alert_id"]) for r in rows)
        parquet = archive_rows(tmp_path / group / "archive")
        avro = archive_rows(group_archives[group][0], written)
        assert set(parquet) == written, group
        for alert_id in written:
            if copies[alert_id] > 1:  # which copy is kept depends on input order, which differs here
                continue
            assert differing(parquet[alert_id], avro[alert_id]) == [], (group, alert_id)
            assert parquet[alert_id]["source"].startswith(str(tmp_path / group / "in"))
            compared[parquet[alert_id]["schema"]] += 1
    ztf = {s for s in compared if s.startswith("ztf")}
    lsst = {s for s in compared if not s.startswith("ztf")}
    assert sum(compared[s] for s in ztf) > 850 and sum(compared[s] for s in lsst) > 400
    assert len(ztf) >= 12 and {"elasticc 0.9", "lsst 9.0", "lsst 10.0"} <= lsst  # ZTF 1.1-4.02, Rubin, ELAsTiCC


def test_fink_dumps_agree_with_the_same_alerts_as_avro(group_archives, data_dir, manifest, tmp_path):
    """Fink's own dumps hold alerts also shipped as Avro (ztf/fink_client). Spark-written (types as the
    packet's): equal in every column. pandas-written (superluminous: prv_candidates.candid is float64, as
    an int column with nulls becomes in pandas): equal except that the history detections, whose ids
    have lost digits in float64, carry a stable negative id instead, the same in every alert; nothing
    else changes and no datapoint is lost."""
    avro = archive_rows(group_archives["ztf_fink_client"][0])

    root = tmp_path / "spark"
    ingest([str(data_dir / "parquet" / "fink_ztf_datatest_part2.parquet")], root, OPTS)
    spark = archive_rows(root)
    assert len(spark) == 67 and set(spark) <= set(avro)
    for alert_id, row in spark.items():
        assert differing(row, avro[alert_id]) == [], alert_id
    # one alert whichever form it came in: the Avro packets after the dump add only the alerts it lacks
    rows = manifest["ztf_fink_client"]
    unique = {int(r["alert_id"]) for r in rows}
    report = ingest([str(data_dir / group_location(rows))], root, OPTS)
    assert (report.read, report.ingested) == (len(rows), len(unique - set(spark)))
    assert report.duplicates == len(rows) - report.ingested

    path = data_dir / "parquet" / "fink_ztf_superluminous.parquet"
    prv_type = pq.read_schema(path).field("prv_candidates").type.value_type.field("candid").type
    assert prv_type == pa.float64()
    root = tmp_path / "pandas"
    ingest([str(path)], root, OPTS)
    pandas = archive_rows(root)
    both = set(pandas) & set(avro)
    assert len(both) == 57
    stand_in: dict[tuple, int] = {}
    for alert_id in both:
        p, a = pandas[alert_id], avro[alert_id]
        assert differing(p, a, skip=("source", "dps")) == [], alert_id
        assert len(p["dps"]) == len(a["dps"])

        def key(d):
            return (d["mjd"], d["kind"], d["band"], d["flux"], d["ra"], d["dec"], d["maglim"])

        a_dps = {key(d): d for d in a["dps"]}
        for d in p["dps"]:
            ref = a_dps[key(d)]
            assert differing(d, ref, skip=("dp_id",)) == []
            lossy = ref["kind"] == DETECTION and ref["dp_id"] != alert_id and abs(ref["dp_id"]) > 2**53
            if lossy:  # a history detection whose candid a float64 cannot hold
                assert d["dp_id"] < 0 and stand_in.setdefault(key(d), d["dp_id"]) == d["dp_id"]
            else:
                assert d["dp_id"] == ref["dp_id"]
    assert len(stand_in) > 100 and len(set(stand_in.values())) == len(stand_in)


# --- chunks, batches, workers ---------------------------------------------------------------------


def test_a_big_row_group_is_read_in_batches(data_dir, tmp_path):
    """One row group of 50 alerts of one night, ingested with chunks of 8: parts of 8 rows (the group
    was read batch by batch, not whole) and the same archived rows as in one part."""
    table = pq.read_table(data_dir / "parquet" / "fink_lsst_or4_v7_1.parquet")
    src = tmp_path / "one_group.parquet"
    pq.write_table(table, src, row_group_size=table.num_rows)
    assert pq.ParquetFile(src).metadata.num_row_groups == 1
    small = ingest([str(src)], tmp_path / "small", IngestOptions(workers=0, progress=False, chunk_packets=8, compact_rows=0))  # parts as read
    whole = ingest([str(src)], tmp_path / "whole", OPTS)
    assert small.ingested == whole.ingested == 50
    assert sorted(p.rows for p in Archive(tmp_path / "small").partitions()) == [2] + [8] * 6
    assert [p.rows for p in Archive(tmp_path / "whole").partitions()] == [50]
    a, b = archive_rows(tmp_path / "small"), archive_rows(tmp_path / "whole")
    assert a.keys() == b.keys() and all(differing(a[k], b[k]) == [] for k in a)


def test_slices_cover_every_row_group_once(data_dir, tmp_path):
    table = pq.read_table(data_dir / "parquet" / "fink_lsst_or4_v7_1.parquet")
    src = tmp_path / "groups.parquet"
    pq.write_table(table, src, row_group_size=7)
    dump = parquet_alerts.open_dump(src)
    assert dump.rows == 50 and len(dump.row_groups) == 8
    for max_rows in (1, 7, 13, 50, 1000):
        got = list(parquet_alerts.slices(dump, 1 << 30, max_rows))
        assert [g for s in got for g in s.row_groups] == list(range(8))
        assert [s.first_row for s in got] == list(np.cumsum([0] + [s.rows for s in got[:-1]]))
        assert sum(s.rows for s in got) == 50
        assert all(s.rows <= max(max_rows, 7) for s in got)


def test_workers_give_the_same_parts(data_dir, tmp_path):
    """On a 2-worker LocalCluster (chunks of row groups travel to the workers) as in this process."""
    src = str(data_dir / "parquet")
    one = ingest([src], tmp_path / "one", IngestOptions(workers=0, progress=False, chunk_packets=40))
    two = ingest([src], tmp_path / "two", IngestOptions(workers=2, progress=False, chunk_packets=40))
    assert one.summary() | {"seconds": 0} == two.summary() | {"seconds": 0}
    assert Archive(tmp_path / "one").index().equals(Archive(tmp_path / "two").index())


# --- what is not an alert dump, and rows that are bad ---------------------------------------------


def test_parquet_that_is_not_an_alert_dump(data_dir, tmp_path, group_archives):
    catalog = data_dir / "catalogs" / "gcvs.parquet"
    with pytest.raises(SourceError, match="without alert-packet columns.*ra, dec, VarType"):
        ingest([str(catalog)], tmp_path / "a", OPTS)
    result = CliRunner().invoke(main, ["ingest", str(catalog), "--archive", str(tmp_path / "a")])
    assert result.exit_code == 2 and "gcvs.parquet: Parquet without alert-packet columns" in result.output
    # in a folder: skipped with the reason, the dumps beside it ingested
    root, _ = group_archives["ztf_kowalski"]
    part = Archive(root).partitions()[0]
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "catalog.parquet").write_bytes(catalog.read_bytes())
    (folder / "part.parquet").write_bytes((root / part.path).read_bytes())
    (folder / "alerts.parquet").write_bytes((data_dir / "parquet" / "fink_ztf_alerts.parquet").read_bytes())
    report = ingest([str(folder)], tmp_path / "b", OPTS)
    assert (report.read, report.ingested, report.quarantined) == (51, 51, 0)
    reasons = sorted(report.skipped_files)
    assert "catalog.parquet (Parquet without alert-packet columns" in reasons[0]
    assert "part.parquet (an ampel-dask archive file" in reasons[1]


def test_a_damaged_file_is_quarantined(data_dir, tmp_path):
    good = (data_dir / "parquet" / "fink_ztf_alerts.parquet").read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(good)
    (folder / "b.parquet").write_bytes(good[: len(good) // 2])  # no footer
    report = ingest([str(folder)], tmp_path / "archive", OPTS)
    assert (report.read, report.ingested, report.quarantined) == (52, 51, 1)
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "archive" / "quarantine").glob("*.json")]
    assert entry["source"].endswith("b.parquet") and "unreadable Parquet file" in entry["reason"]


def test_a_damaged_row_group_is_quarantined_with_its_rows(data_dir, tmp_path):
    """Row group 3 of 5 (rows 30-39) overwritten in its compressed pages: those 10 rows are quarantined
    as one entry that counts them, the rows before and after are archived as from the intact file."""
    table = pq.read_table(data_dir / "parquet" / "fink_lsst_or4_v7_1.parquet")
    src = tmp_path / "groups.parquet"
    pq.write_table(table, src, row_group_size=10, compression="snappy")
    group = pq.ParquetFile(src).metadata.row_group(3)
    start = min(group.column(j).data_page_offset for j in range(group.num_columns))
    size = sum(group.column(j).total_compressed_size for j in range(group.num_columns))
    data = bytearray(src.read_bytes())
    for k in range(start + 100, start + size - 100, 997):
        data[k] ^= 0xFF
    bad = tmp_path / "damaged.parquet"
    bad.write_bytes(bytes(data))
    opts = IngestOptions(workers=0, progress=False, chunk_packets=10)
    report = ingest([str(bad)], tmp_path / "archive", opts)
    assert (report.read, report.ingested, report.quarantined) == (50, 40, 10)
    assert report.quarantine_reasons == {"unreadable Parquet rows": 10}
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "archive" / "quarantine").glob("*.json")]
    assert (entry["source"], entry["record"], entry["records"]) == (str(bad), 30, 10)
    ingest([str(src)], tmp_path / "ref", opts)
    ref, got = archive_rows(tmp_path / "ref"), archive_rows(tmp_path / "archive")
    lost = set(pc.struct_field(table.column("diaSource"), "diaSourceId").to_pylist()[30:40])
    assert set(ref) - set(got) == lost and all(differing(got[k], ref[k]) == [] for k in got)


def test_a_row_that_cannot_be_normalised_is_quarantined_alone(data_dir, tmp_path):
    """Two bad rows of a real dump (no candidate; no jd): quarantined with file and row number and the
    row's own bytes; the other 65 archived as before."""
    path = data_dir / "parquet" / "fink_ztf_datatest_part2.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[5]["candidate"]["jd"] = None
    rows[9]["candidate"] = None
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad, row_group_size=4)
    report = ingest([str(bad)], tmp_path / "archive", OPTS)
    assert (report.read, report.ingested, report.quarantined) == (67, 65, 2)
    entries = {e["record"]: e for e in (json.loads(p.read_text()) for p in (tmp_path / "archive" / "quarantine").glob("*.json"))}
    assert entries.keys() == {5, 9}
    assert entries[5]["reason"] == "cannot normalise: candidate.jd is missing"
    assert entries[9]["reason"] == "cannot normalise: packet has no candidate record"
    for row, entry in entries.items():
        assert entry["source"] == str(bad)
        raw = pq.read_table(tmp_path / "archive" / "quarantine" / entry["raw_file"])
        assert raw.column("candid").to_pylist() == [rows[row]["candid"]]
    ingest([str(path)], tmp_path / "ref", OPTS)
    ref, got = archive_rows(tmp_path / "ref"), archive_rows(tmp_path / "archive")
    assert set(ref) - set(got) == {rows[5]["candid"], rows[9]["candid"]}
    assert all(differing(got[k], ref[k]) == [] for k in got)


def test_ids_stored_as_float(data_dir, tmp_path):
    """ELAsTiCC diaSourceIds (~1e9..1e11) fit a float64 exactly: the dump with them as float64 archives
    the same rows. A value that does not fit (2**60 + 1) is not used as an id: that row is quarantined
    saying so, the others are unchanged."""
    path = data_dir / "labels" / "elasticc_truth_sample" / "test_elasticc_earlysnia.parquet"
    table = pq.read_table(path)
    ref_root = tmp_path / "ref"
    ingest([str(path)], ref_root, OPTS)
    ref = archive_rows(ref_root)

    src = table.column("diaSource").combine_chunks()
    ids = pc.struct_field(src, "diaSourceId").to_numpy().astype(np.float64)
    for name, bad_row in (("exact", None), ("lossy", 17)):
        if bad_row is not None:
            ids[bad_row] = float(2**60 + 1)
        fields = [pa.array(ids) if f.name == "diaSourceId" else pc.struct_field(src, f.name) for f in src.type]
        floated = table.set_column(table.column_names.index("diaSource"), "diaSource", pa.StructArray.from_arrays(fields, names=[f.name for f in src.type]))
        pq.write_table(floated, tmp_path / f"{name}.parquet")
        report = ingest([str(tmp_path / f"{name}.parquet")], tmp_path / name, OPTS)
        got = archive_rows(tmp_path / name)
        if bad_row is None:
            assert report.quarantined == 0 and got.keys() == ref.keys()
        else:
            (entry,) = [json.loads(p.read_text()) for p in (tmp_path / name / "quarantine").glob("*.json")]
            assert entry["record"] == bad_row and "diaSource.diaSourceId stored as float64 with digits lost" in entry["reason"]
            assert report.quarantined == 1 and set(ref) - set(got) == {table.column("diaSource")[bad_row]["diaSourceId"].as_py()}
        assert all(differing(got[k], ref[k]) == [] for k in got)


ZTF_IDS = st.one_of(st.none(), st.integers(0, 2**63 - 1), st.integers(0, 2**53))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(ZTF_IDS, max_size=5), min_size=1, max_size=6), st.lists(ZTF_IDS, min_size=6, max_size=6))
def test_float_ids_are_exact_or_not_ids(histories, triggers):
    """Plain-Python reference: an id held as float64 x is the int x when int(x) is what was stored
    (integral, |x| <= 2**53); a history detection's other ids become negative stand-ins, equal for equal
    inputs and distinct otherwise; an alert-level one becomes null and its row is noted."""
    n = len(histories)
    triggers = triggers[:n]
    prv = [[{"candid": None if v is None else float(v), "jd": 2459000.5 + j, "fid": 1, "pid": 7, "ra": 1.0, "dec": 2.0, "magpsf": 18.0} for j, v in enumerate(h)] for h in histories]
    item = pa.struct([(k, pa.float64()) for k in ("candid", "jd", "fid", "pid", "ra", "dec", "magpsf")])
    batch = pa.RecordBatch.from_pydict({
        "candid": pa.array([None if v is None else float(v) for v in triggers], pa.float64()),
        "prv_candidates": pa.array(prv, pa.list_(item)),
    })  # fmt: skip
    rows, lost = parquet_alerts.conform(batch)
    got_top = pc.struct_field(rows, "candid").to_pylist()
    got_prv = [[d["candid"] for d in h] for h in pc.struct_field(rows, "prv_candidates").to_pylist()]

    def exact(v):  # what a float64 holds for certain: integers up to 2**53 (and it does hold them)
        if v is not None and abs(v) <= 2**53:
            assert int(float(v)) == v
            return True
        return False

    noted = defaultdict(set)
    for i, v in enumerate(triggers):
        if v is None:
            assert got_top[i] is None
        elif exact(v):
            assert got_top[i] == v
        else:
            assert got_top[i] is None
            noted[i].add("candid")
    stand_ins: dict[tuple, int] = {}
    for i, h in enumerate(histories):
        for j, v in enumerate(h):
            g = got_prv[i][j]
            if v is None:
                assert g is None
            elif exact(v):
                assert g == v
            else:
                assert g < 0
                noted[i].add("prv_candidates.candid")
                stand_ins.setdefault((float(v), j), g)
                assert stand_ins[(float(v), j)] == g
    assert len(set(stand_ins.values())) == len(stand_ins)
    assert {i: set(v) for i, v in lost.items()} == dict(noted)
