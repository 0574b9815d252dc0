"""A large archive of replicated real ZTF alerts, written straight to Parquet (for pipeline benchmarks).

The real ZTF alerts of ../shared/data are ingested once; then each replica k gets new alert, object and
datapoint ids (so every state is new) and jittered photometry (so T2 results differ too). Each replica is
moved in time as a whole per object (all times of an object shift by the same whole number of days) so
that its objects start on one of ``nights`` consecutive nights: ZTF-sized nights of ~10^5 alerts instead
of the real sample's scatter over 150 nights. Written straight to Parquet parts, streaming (memory stays
at a few parts), instead of re-encoding and ingesting Avro.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ampel_dask.io.archive import Archive
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.io.layout import DETECTION

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ID_STEP = 10**16  # replica k: alert and detection ids + k * ID_STEP (other datapoints: - k * ID_STEP), see shifted()
STOCK_STEP = 100 * 26**7  # replica k: stock + k * STOCK_STEP (the packed ZTF name space is below this)


def base_table(work: Path, data_dir: Path = DATA) -> pa.Table:
    base = work / "base-archive-4"  # 4: with the history_programids mask (data rights)
    if not (base / "_index.parquet").exists():
        ingest([str(data_dir / "ztf")], base, IngestOptions(workers=0, progress=False))
    arch = Archive(base)
    parts = [arch.read(p) for p in arch.partitions(["ztf"])]
    return pa.concat_tables(parts, promote_options="default")


def shifted(ids: np.ndarray, shift: int) -> np.ndarray:
    """``ids`` moved by ``shift`` away from zero within their sign's half of int64, modulo 2**63: a
    bijection that keeps positive ids (alerts, detections) positive and negative ones (other
    datapoints) negative for any number of replicas (a 10 M-alert archive needs ~4,000 replicas of the
    2,562 real alerts; plain int64 arithmetic overflowed past ~900)."""
    ids = np.asarray(ids, dtype=np.int64)
    s = np.uint64(shift % 2**63)
    low = np.uint64(2**63 - 1)
    pos = ((ids.astype(np.uint64) + s) & low).astype(np.int64)  # ids >= 0
    neg = ~((((~ids).astype(np.uint64)) + s) & low).astype(np.int64)  # ids < 0: ~id = -id - 1 >= 0
    return np.where(ids >= 0, pos, neg)


NIGHT0 = 61000  # MJD of the first night of the benchmark archive (2025-11-22)
TIME_COLUMNS = ("jd", "jdstarthist", "jdendhist")


def replica(base: pa.Table, k: int, rng: np.random.Generator, nights: int = 10, night0: int = NIGHT0) -> pa.Table:
    n = base.num_rows
    shift = k * ID_STEP
    # whole-day shift per object: its first alert lands on night night0 + k % nights
    stock = base.column("stock").to_numpy()
    mjd0 = base.column("mjd").to_numpy()
    order = np.argsort(stock, kind="stable")
    first = np.minimum.reduceat(mjd0[order], np.flatnonzero(np.r_[True, stock[order][1:] != stock[order][:-1]]))
    uniq = stock[order][np.r_[True, stock[order][1:] != stock[order][:-1]]]
    obj_first = first[np.searchsorted(uniq, stock)]
    days = (night0 + k % nights) - np.floor(obj_first)
    dps = base.column("dps").combine_chunks()
    flat = dps.values
    dp_id = flat.field("dp_id").to_numpy(zero_copy_only=False)
    kind = flat.field("kind").to_numpy(zero_copy_only=False)
    new_id = shifted(dp_id, shift)
    mag = flat.field("mag").to_numpy(zero_copy_only=False)
    jitter = rng.normal(0.0, 0.03, len(mag)) if k else np.zeros(len(mag))
    det = kind == DETECTION
    new_mag = np.where(det, mag + jitter, mag)
    flux = flat.field("flux").to_numpy(zero_copy_only=False)
    new_flux = np.where(det, flux * 10 ** (-0.4 * jitter), flux)
    fields = {f.name: flat.field(f.name) for f in flat.type}
    dp_days = np.repeat(days, np.diff(np.asarray(dps.offsets)))
    fields["mjd"] = pc.add(flat.field("mjd"), pa.array(dp_days))
    fields["dp_id"] = pa.array(new_id)
    fields["mag"] = pa.array(new_mag, mask=np.isnan(new_mag))
    fields["flux"] = pa.array(new_flux, mask=np.isnan(new_flux))
    new_flat = pa.StructArray.from_arrays(list(fields.values()), fields=list(flat.type))
    new_dps = pa.ListArray.from_arrays(dps.offsets, new_flat)
    trig_jitter = rng.normal(0.0, 0.03, n) if k else np.zeros(n)
    cols = {name: base.column(name) for name in base.column_names}
    cols["alert_id"] = pa.array(shifted(base.column("alert_id").to_numpy(), shift))
    cols["candid"] = cols["alert_id"]
    cols["stock"] = pc.add(base.column("stock"), k * STOCK_STEP)
    cols["object_id"] = pc.binary_join_element_wise(base.column("object_id").fill_null("noname"), pa.scalar(f"r{k}"), "-")
    for name in ("mag", "magpsf"):
        cols[name] = pc.add(base.column(name), pa.array(trig_jitter).cast(base.column(name).type))
    cols["dps"] = new_dps
    cols["mjd"] = pc.add(base.column("mjd"), pa.array(days))
    for name in TIME_COLUMNS:
        cols[name] = pc.add(base.column(name), pa.array(days))
    from ampel_dask.io.layout import night_of

    cols["night"] = pa.array(night_of(cols["mjd"].to_numpy(), "ztf"))
    return pa.table(cols)


def build(target: Path, alerts: int, part_rows: int = 25_000, nights: int = 10, work: Path | None = None, first_replica: int = 0,
          night0: int = NIGHT0) -> Path:  # fmt: skip
    """Write an archive of ``alerts`` replicated real ZTF alerts into ``target`` (cached when complete).
    ``first_replica``, ``night0``: other objects on other nights (bench_history.py adds such an archive's
    parts to another one: replicas are told apart by their number)."""
    marker = target / "_bench.json"
    wanted = {"alerts": alerts, "part_rows": part_rows, "nights": nights, "layout": 5}  # 2: histories in _dps-*.arrow; 3: Parquet LZ4; 4: history_programids; 5: shifted() ids
    if first_replica or night0 != NIGHT0:
        wanted |= {"first_replica": first_replica, "night0": night0}
    if marker.exists() and json.loads(marker.read_text()).get("params") == wanted:
        return target
    shutil.rmtree(target, ignore_errors=True)
    base = base_table(work or target.parent)
    base = base.drop_columns([c for c in base.column_names if c.startswith("cutout")])
    rng = np.random.default_rng(1)
    arch = Archive(target)
    arch.create()
    buffers: dict[int, list[pa.Table]] = {}
    sizes: dict[int, int] = {}
    new = []
    written = 0

    def flush(night: int) -> None:
        rows = pa.concat_tables(buffers.pop(night))
        sizes.pop(night)
        new.append(arch.write_part(rows, None))

    k = first_replica
    while written < alerts:
        rep = replica(base, k, rng, nights, night0).slice(0, alerts - written)
        written += rep.num_rows
        k += 1
        night_col = rep.column("night").to_numpy()
        for night in np.unique(night_col):
            rows = rep.filter(pa.array(night_col == night))
            buffers.setdefault(int(night), []).append(rows)
            sizes[int(night)] = sizes.get(int(night), 0) + rows.num_rows
            if sizes[int(night)] >= part_rows:
                flush(int(night))
    for night in list(buffers):
        flush(night)
    arch.add_partitions(new)
    marker.write_text(json.dumps({"params": wanted, "base_alerts": base.num_rows, "partitions": len(new), "replicas": k - first_replica}))
    return target


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target")
    ap.add_argument("--alerts", type=int, default=1_000_000)
    ap.add_argument("--part-rows", type=int, default=25_000)
    ap.add_argument("--nights", type=int, default=10)
    a = ap.parse_args()
    print(build(Path(a.target), a.alerts, a.part_rows, a.nights))
