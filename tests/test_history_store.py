"""The object-bucketed history that ingest keeps (io/history.py, graph/history.py).

Oracles: the plain-Python replay of AMPEL's database (tests/reference_replay.py) over the packets a
channel may see, for histories kept in any number of ingests and merged in any way; and, end to end on
real alerts, the same run on the same alerts in an archive without the kept history (the run's own
shuffle of the parts' histories), including after compaction moved the rows into other parts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings, strategies as st

from ampel_dask.graph.history import bucket_history, history_segments, segment_rows, update_history
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.graph.workflow import Workflow
from ampel_dask.io import history as hs
from ampel_dask.io.archive import Archive
from ampel_dask.io.compact import CompactOptions, compact, delete_retired
from ampel_dask.io.stores import ParquetStore
from ampel_dask.tiers.states import build_states

from .reference_replay import comparable, may_see, replay
from .test_lookahead import ACCESS, ALERT_SCHEMA, alert_sequences, policies, run

PROGRAMS = [1, 1, 2, 3, None]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(alerts=alert_sequences(), policy=policies, access=st.sampled_from(ACCESS), data=st.data())
def test_states_from_kept_segments_equal_the_replay_of_the_packets_a_channel_may_see(tmp_path_factory, alerts, policy, access, data):
    """Packets of random programids, kept as segments of random ingests (pieces of the archive in any
    order), some of them merged; a channel's states from them are the replay of the packets it may see."""
    for a in alerts:
        a["programid"] = data.draw(st.sampled_from(PROGRAMS)) if a["survey"] == "ztf" else None
    order = data.draw(st.permutations(range(len(alerts))))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(alerts)), max_size=3, unique=True)))
    table = pa.Table.from_pylist([alerts[i] for i in order], schema=ALERT_SCHEMA.append(pa.field("programid", pa.int32())))
    segments: dict[str, list[str]] = {}
    for survey in ("ztf", "lsst"):  # a store per survey, as in an archive
        folder = tmp_path_factory.mktemp(survey)
        paths = []
        for k, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(alerts)])):  # one segment per ingest
            piece = table.slice(lo, hi - lo)
            piece = piece.filter(pa.array([v == survey for v in piece.column("survey").to_pylist()], pa.bool_()))
            if piece.num_rows:
                hs.write_segment(segment_rows(piece), folder, f"seg-{k}.arrow")
                paths.append(str(folder / f"seg-{k}.arrow"))
        if len(paths) > 1 and data.draw(st.booleans()):  # a merge of the first few, as the size tiers do
            n = data.draw(st.integers(2, len(paths)))
            name, _ = hs.merge_segments(paths[:n], folder)
            paths = [str(folder / name), *paths[n:]]
        if paths:
            segments[survey] = paths
    visible = [a for a in alerts if may_see(a["survey"], a["programid"], access)]
    if not visible:
        return
    want = [comparable(s) for s in replay(visible, policy, access)]
    passing = pa.Table.from_pylist(visible, schema=table.schema).drop_columns(["dps"])
    history = bucket_history(segments, passing, access)
    states = build_states(passing, policy, access, history=history)
    assert [comparable(s) for s in states.column("dps").to_pylist()] == want


@given(sizes=st.lists(st.integers(0, 5000), max_size=40), cap=st.sampled_from([300, 4000, hs.MERGE_ROWS]))
def test_merged_tiers_leave_fewer_than_fanout_segments_per_tier_and_every_row(sizes, cap):
    """Merging by size tier until nothing is left to merge: plain arithmetic on row counts. Every row
    stays, no merge writes more than ``cap`` rows, and a tier keeps FANOUT segments below the cap only
    when no two of them fit in one merge."""
    segments = {f"s{i}": n for i, n in enumerate(sizes)}
    total = sum(sizes)
    while groups := hs.tiers_to_merge(segments, cap):
        for i, g in enumerate(groups):
            assert len(g) >= 2 and sum(segments[n] for n in g) <= cap
            segments[f"m{len(segments)}-{i}"] = sum(segments.pop(n) for n in g)
    assert sum(segments.values()) == total
    tiers: dict[int, list[int]] = {}
    for n in segments.values():
        if n < cap:
            tiers.setdefault(len(str(np.base_repr(max(n, 1), hs.FANOUT))) - 1, []).append(n)  # digits in base FANOUT, less one
    for members in tiers.values():
        assert len(members) < hs.FANOUT or sum(sorted(members)[:2]) > cap


# ---------------------------------------------------------------------------------------------------
# end to end on real alerts
# ---------------------------------------------------------------------------------------------------

SOURCES = ["ztf/ampel_core_real_201712.tar.gz", "ztf/pitt_google", "lsst/rubin_fink_v9_0.tar.gz"]


def nan_safe(value):
    """Values that compare equal when equal, NaN included (a NaN float is not equal to itself)."""
    if isinstance(value, dict):
        return {k: nan_safe(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(nan_safe(v) for v in value)
    return "nan" if isinstance(value, float) and value != value else value


ACCESS_OF = {"PUB": ["ZTF_PUB", "LSST"], "ALL": ["ZTF_ALL", "LSST"]}


def history_workflow() -> Workflow:
    """Accept everything a channel may see, join the archive, summarise the light curve: a public
    channel and one that sees every ZTF programme."""
    return Workflow.model_validate({"name": "kept", "channels": [
        {"name": name, "access": access, "t1": {"unit": "T1Policy", "config": {"history": "archive", "kinds": ["detection", "upper_limit"]}},
         "t2": ["T2LightCurveSummary"]} for name, access in ACCESS_OF.items()]})  # fmt: skip


def results(store: Path) -> dict:
    """Per channel and alert: its state's id and datapoints; per state: its T2 result (without run provenance)."""
    s = ParquetStore(store)
    out: dict = {}
    for channel in ACCESS_OF:
        states = s.read_states(channel)
        out[channel] = {r["alert_id"]: (r["state_id"], comparable(r["dps"])) for r in states.select(["alert_id", "state_id", "dps"]).to_pylist()}
    (unit, key), = s.t2_units()
    t2 = s.read_t2(unit, key)
    body = [c for c in t2.column_names if c not in ("run_id", "t2_key", "alert_id")]
    out["t2"] = {r["state_id"]: sorted(r.items()) for r in t2.select(body).to_pylist()}
    return nan_safe(out)


def test_a_run_on_the_kept_history_equals_the_run_that_shuffles_after_many_ingests_and_a_compaction(tmp_path, data_dir):
    """The same real alerts ingested in ten batches with the history kept (segments merged, then the
    parts compacted: the new parts are covered as the old were), and in one batch without it; both
    channels' states and the T2 results are the same, and only the first archive's run reads the kept
    history."""
    files = sorted(f for s in SOURCES for f in ([data_dir / s] if (data_dir / s).is_file() else (data_dir / s).rglob("*.avro")))
    kept, plain = tmp_path / "kept", tmp_path / "plain"
    batches = [files[: len(files) // 2], files[len(files) // 2 : -8], *([f] for f in files[-8:])]  # the tarballs in the first
    merges = 0
    for batch in batches:
        rep = ingest([str(f) for f in batch], kept, IngestOptions(workers=0, progress=False, compact_rows=0))
        assert rep.history["parts"] == rep.partitions
        merges += rep.history["merged"]
    assert merges >= 1  # single alerts' segments are of one size tier: merged
    ingest([str(f) for f in files], plain, IngestOptions(workers=0, progress=False, history=False))
    arch = Archive(kept)
    assert sum(len(hs.load_manifest(kept, s)["segments"]) for s in ("ztf", "lsst")) >= 3
    done = compact(arch, CompactOptions(target_rows=5000))
    assert done.replaced > 0  # parts moved; the kept history covers their successors
    assert history_segments(arch, arch.partitions()) is not None
    assert history_segments(Archive(plain), Archive(plain).partitions()) is None
    assert update_history(arch)["parts"] == 0  # nothing left to cover
    # segments merged away wait for their grace period; then exactly the ones the manifests name are left
    live = hs.live_files(kept)
    arch.retire(sorted(live)[:1])  # a name retired and then written again by a merge is live: kept
    delete_retired(arch, 0)
    on_disk = {f.relative_to(kept).as_posix() for f in kept.glob("survey=*/_history/seg-*")}
    assert on_disk == live and live
    run(kept, tmp_path / "s_kept", history_workflow())
    run(plain, tmp_path / "s_plain", history_workflow())
    got, want = results(tmp_path / "s_kept"), results(tmp_path / "s_plain")
    assert got == want
    # every alert each channel may see has a state (counted from the archive's rows with pyarrow alone)
    seen = {"PUB": 0, "ALL": 0}
    for p in Archive(plain).partitions():
        t = pq.read_table(plain / p.path)
        pid = t.column("programid").to_pylist() if "programid" in t.column_names else [None] * t.num_rows
        seen["ALL"] += t.num_rows
        seen["PUB"] += sum(p.survey == "lsst" or v == 1 for v in pid)
    assert {c: len(got[c]) for c in ACCESS_OF} == seen and seen["PUB"] > 300
    assert sum(len(d) for _, d in got["ALL"].values()) > 10 * len(got["ALL"])  # states hold archived light curves
    # the check bites: a segment that lost rows gives other states
    seg = Path(hs.segment_paths(kept, "ztf")[0])
    rows = pa.ipc.open_file(pa.memory_map(str(seg))).read_all()
    hs.write_segment(rows.slice(0, rows.num_rows // 2), seg.parent, seg.name)
    run(kept, tmp_path / "s_cut", history_workflow())
    assert results(tmp_path / "s_cut") != want


def test_an_ingest_whose_history_update_fails_keeps_its_alerts_says_why_and_the_next_one_catches_up(tmp_path, data_dir, monkeypatch, caplog):
    """A full disk while segments are written: the alerts are archived and indexed anyway, the ingest
    reports the reason and logs a warning; runs shuffle meanwhile (same states as with the history),
    and the next ingest covers the parts the failed one left. No partial segment is left behind."""
    files = sorted((data_dir / "ztf/pitt_google").rglob("*.avro"))
    arch = Archive(tmp_path / "a")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hs, "write_segment", full)
    rep = ingest([str(f) for f in files[:-1]], arch.root, IngestOptions(workers=0, progress=False))
    monkeypatch.undo()
    assert rep.ingested == len(files) - 1 and rep.quarantined == 0
    assert "No space left on device" in rep.history["error"]
    assert any("history was not updated" in r.message for r in caplog.records)
    assert sum(p.rows for p in arch.partitions()) == len(files) - 1
    assert history_segments(arch, arch.partitions()) is None  # runs shuffle
    assert not list(arch.root.glob("survey=*/_history/*seg-*"))  # nothing half-written
    run(arch.root, tmp_path / "s_shuffled", history_workflow())
    rep = ingest([str(files[-1])], arch.root, IngestOptions(workers=0, progress=False))
    assert rep.history["parts"] == len(arch.partitions())  # the parts the failed ingest left, and its own
    assert history_segments(arch, arch.partitions()) is not None
    run(arch.root, tmp_path / "s_kept", history_workflow())
    plain = tmp_path / "plain"
    ingest([str(f) for f in files], plain, IngestOptions(workers=0, progress=False, history=False))
    run(plain, tmp_path / "s_plain", history_workflow())
    assert results(tmp_path / "s_kept") == results(tmp_path / "s_plain")
    shuffled = results(tmp_path / "s_shuffled")
    assert {c: len(shuffled[c]) for c in ACCESS_OF} == {"PUB": len(files) - 1, "ALL": len(files) - 1}


def test_the_history_command_covers_an_archive_ingested_without_it(tmp_path, data_dir):
    """`ampel-dask history ARCHIVE` on a --no-history archive: afterwards every part is covered, a
    second call adds nothing, and a run reads the kept history with the results of the shuffle."""
    import json

    from click.testing import CliRunner

    from ampel_dask.cli import main

    files = sorted((data_dir / "ztf/pitt_google").rglob("*.avro"))
    root = tmp_path / "a"
    ingest([str(f) for f in files], root, IngestOptions(workers=0, progress=False, history=False))
    run(root, tmp_path / "s_shuffled", history_workflow())
    arch = Archive(root)
    assert history_segments(arch, arch.partitions()) is None
    res = CliRunner().invoke(main, ["history", str(root), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["parts"] == len(arch.partitions())
    assert history_segments(arch, arch.partitions()) is not None
    again = CliRunner().invoke(main, ["history", str(root), "--json"])
    assert json.loads(again.output.strip().splitlines()[-1])["parts"] == 0
    run(root, tmp_path / "s_kept", history_workflow())
    assert results(tmp_path / "s_kept") == results(tmp_path / "s_shuffled")
    assert CliRunner().invoke(main, ["history", str(tmp_path)]).exit_code == 2  # not an archive: a usage error


def test_a_history_of_another_layout_is_built_again_and_only_its_old_segments_go(tmp_path, data_dir):
    """A manifest of another layout (here: it says 16 buckets) is not read: the history is built again,
    its old segments are retired, and deleting retired files leaves exactly the new ones, even where an
    old segment's name is a new one's."""
    import json

    files = sorted((data_dir / "ztf/pitt_google").rglob("*.avro"))
    root = tmp_path / "a"
    ingest([str(f) for f in files], root, IngestOptions(workers=0, progress=False))
    arch = Archive(root)
    manifest = hs.history_dir(root, "ztf") / "_manifest.json"
    m = json.loads(manifest.read_text())
    old = hs.history_dir(root, "ztf") / "seg-old.arrow"
    old.write_bytes(next(hs.history_dir(root, "ztf").glob("seg-*.arrow")).read_bytes())
    manifest.write_text(json.dumps({**m, "buckets": 16, "segments": {**m["segments"], "seg-old.arrow": 1}}))
    assert history_segments(arch, arch.partitions()) is None  # not read: runs shuffle
    assert update_history(arch)["parts"] == len(arch.partitions())
    assert history_segments(arch, arch.partitions()) is not None
    delete_retired(arch, 0)
    on_disk = {f.relative_to(root).as_posix() for f in root.glob("survey=*/_history/seg-*")}
    assert on_disk == hs.live_files(root) and "seg-old.arrow" not in {p.rsplit("/", 1)[-1] for p in on_disk}
    assert set(m["segments"]) <= {p.rsplit("/", 1)[-1] for p in on_disk}  # same parts, same layout: same names, kept


def test_history_files_a_killed_update_left_are_swept_after_a_day_and_nothing_else(tmp_path, data_dir, caplog):
    """A segment written but never named (the process killed before the manifest), and a writer's
    temporary file, are removed by the next history update once a day old; a fresh unnamed one (another
    update may be about to name it), the named segments, a retired one (its grace period) and the
    manifest stay. The history still gives the run it gave."""
    import json
    import os
    import time

    files = sorted((data_dir / "ztf/pitt_google").rglob("*.avro"))
    root = tmp_path / "a"
    ingest([str(f) for f in files], root, IngestOptions(workers=0, progress=False))
    arch = Archive(root)
    folder = hs.history_dir(root, "ztf")
    named = set(json.loads((folder / "_manifest.json").read_text())["segments"])
    some = (folder / sorted(named)[0]).read_bytes()
    day_old = time.time() - 86_400 - 60
    planted = {"seg-killed.arrow": day_old, ".seg-killed2.arrow.0123.tmp": day_old, "seg-fresh.arrow": time.time(), "seg-retired.arrow": day_old}
    for name, mtime in planted.items():
        (folder / name).write_bytes(some)
        os.utime(folder / name, (mtime, mtime))
    with arch.locked():
        arch.retire([(folder / "seg-retired.arrow").relative_to(root).as_posix()])
    before = {f.name for f in folder.iterdir()}
    assert update_history(arch)["parts"] == 0  # nothing new to cover: the sweep runs anyway
    assert {f.name for f in folder.iterdir()} == before - {"seg-killed.arrow", ".seg-killed2.arrow.0123.tmp"}
    assert named | {"seg-fresh.arrow", "seg-retired.arrow", "_manifest.json"} == {f.name for f in folder.iterdir()}
    assert any("removed 2 history file(s)" in r.message for r in caplog.records)
    assert history_segments(arch, arch.partitions()) is not None
    run(root, tmp_path / "s_kept", history_workflow())
    plain = tmp_path / "plain"
    ingest([str(f) for f in files], plain, IngestOptions(workers=0, progress=False, history=False))
    run(plain, tmp_path / "s_plain", history_workflow())
    assert results(tmp_path / "s_kept") == results(tmp_path / "s_plain")
