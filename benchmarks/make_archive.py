"""A large archive of replicated real alerts (ZTF or Rubin/LSST), written straight to Parquet (for benchmarks).

The real alerts of one survey in ../shared/data are ingested once; then each replica k gets new alert,
object and datapoint ids (so every state is new) and jittered photometry (so T2 results differ too). Each
replica is moved in time as a whole per object (all times of an object shift by the same whole number of
days) so that its objects start on one of ``nights`` consecutive nights: survey-sized nights instead of
the real sample's scatter over many nights. Written straight to Parquet parts, streaming (memory stays at
a few parts), instead of re-encoding and ingesting Avro. Replica 0 is the real alerts themselves (ids
and photometry unchanged, times shifted).

ZTF: ids move by ``k * ID_STEP`` (within their sign's half of int64: :func:`shifted`) / ``k * STOCK_STEP``
(the packed ZTF names are far below it), every datapoint copy gets its own jitter. LSST: Rubin ids use all 64 bits (diaObjectIds above 3e18), so an additive step would
overflow; ids and stocks are renumbered densely instead (:func:`dense_ids`), and the jitter is drawn per
datapoint id, so a measurement repeated in later packets (prvDiaSources) and the alert's trigger columns
(mag, flux, psfFlux) carry the same jittered value.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.io.archive import Archive
from ampel_dask.io.layout import DETECTION, FORCED, NIGHT_OFFSET_DAYS, night_of

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ID_STEP = 10**16  # ZTF replica k: alert and detection ids + k * ID_STEP (other datapoints: - k * ID_STEP), see shifted()
STOCK_STEP = 100 * 26**7  # ZTF replica k: stock + k * STOCK_STEP (the packed ZTF name space is below this)
# the real alerts each survey's replicas are made of (paths under the data folder), and its cached base archive
SOURCES = {
    "ztf": ["ztf"],
    # the Rubin alerts (Fink's v7.4 and v9.0 tarballs, LSSTCam v10) and ELAsTiCC 0.9 (also normalised as survey lsst)
    "lsst": ["lsst/rubin_fink_v7_4.tar.gz", "lsst/rubin_fink_v9_0.tar.gz", "lsst/rubin_lsstcam_v10", "lsst/elasticc_v0_9_alerce.tar.gz"],
}
BASE_DIRS = {"ztf": "base-archive-4", "lsst": "base-archive-lsst-1"}  # ztf 4: with the history_programids mask (data rights)
JITTER_MAG = 0.03
# rows held back per night until a part is full, at most (then the largest nights are written early, as
# smaller parts): the real LSST sample spreads over ~320 nights (ELAsTiCC's light curves), so at 10 M
# alerts most nights would fill their part only near the end, holding ~8 M rows (~12 GB) in memory.
# None for ZTF: its archives stay what they were.
BUFFER_ROWS = {"ztf": None, "lsst": 2_000_000}


def base_table(work: Path, data_dir: Path = DATA, survey: str = "ztf") -> pa.Table:
    """Every real alert of ``survey`` in ``data_dir``, ingested once into ``work`` (cached) and read back."""
    base = work / BASE_DIRS[survey]
    if not (base / "_index.parquet").exists():
        ingest([str(data_dir / s) for s in SOURCES[survey]], base, IngestOptions(workers=0, progress=False))
    arch = Archive(base)
    parts = [arch.read(p) for p in arch.partitions([survey])]
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


NIGHT0 = 61000  # MJD of the first night of the benchmark archive (2025-11-21)
TIME_COLUMNS = {"ztf": ("jd", "jdstarthist", "jdendhist"), "lsst": ("first_det_mjd", "last_det_mjd")}


def object_days(stock: np.ndarray, mjd: np.ndarray, k: int, nights: int, survey: str, night0: int = NIGHT0) -> np.ndarray:
    """Whole days to add to each row so that its object's first alert lands on night night0 + k % nights
    (in the survey's night naming: LSST nights begin at MJD + 0.5)."""
    order = np.argsort(stock, kind="stable")
    starts = np.flatnonzero(np.r_[True, stock[order][1:] != stock[order][:-1]])
    first = np.minimum.reduceat(mjd[order], starts)
    obj_first = first[np.searchsorted(stock[order][starts], stock)]
    return (night0 + k % nights) - np.floor(obj_first - NIGHT_OFFSET_DAYS[survey])


def dense_ids(values: np.ndarray, universe: np.ndarray, k: int) -> np.ndarray:
    """Replica ``k``'s ids for ``values`` (each one of the sorted distinct base ids ``universe``, m of them):
    unchanged for k = 0; else ``+-(start + (k - 1) m + rank)`` keeping the sign (negative ids: hashes of
    forced photometry and limits, solar-system stocks), with ``start`` above every positive base id and
    the negative ones kept below every negative base id's magnitude. One-to-one within a replica, disjoint
    across replicas and from the base (checked)."""
    if k == 0:
        return values
    m = len(universe)
    rank = np.searchsorted(universe, values)
    pos_start = int(universe[-1]) + 1 if len(universe) and universe[-1] >= 0 else 0
    neg = universe[universe < 0]
    if pos_start + k * m >= 2**63 or (len(neg) and k * m >= -int(neg[-1])):
        raise ValueError(f"replica {k}: {m} ids per replica do not fit beside the base ids")
    band = np.int64((k - 1) * m) + rank
    return np.where(values >= 0, pos_start + band, -(1 + band))


def _universe(*arrays: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]))


def _nonzero(col: pa.ChunkedArray) -> np.ndarray:
    v = col.fill_null(0).to_numpy()
    return v[v != 0]


def _remap_nonzero(col: pa.ChunkedArray, universe: np.ndarray, k: int, sign: int = 1) -> pa.Array:
    """An id column whose 0 / null mean "none": the others renumbered (``sign * dense_ids(sign * v)``)."""
    v = col.fill_null(0).to_numpy()
    some = v != 0
    out = v.copy()
    out[some] = sign * dense_ids(sign * v[some], universe, k)
    return pa.array(out, col.type, mask=col.is_null().to_numpy())


def replica(base: pa.Table, k: int, rng: np.random.Generator, nights: int = 10, survey: str = "ztf", night0: int = NIGHT0) -> pa.Table:
    n = base.num_rows
    shift = k * ID_STEP
    stock = base.column("stock").to_numpy()
    days = object_days(stock, base.column("mjd").to_numpy(), k, nights, survey, night0)
    dps = base.column("dps").combine_chunks()
    flat = dps.values
    dp_id = flat.field("dp_id").to_numpy(zero_copy_only=False)
    kind = flat.field("kind").to_numpy(zero_copy_only=False)
    mag = flat.field("mag").to_numpy(zero_copy_only=False)
    flux = flat.field("flux").to_numpy(zero_copy_only=False)
    cols = {name: base.column(name) for name in base.column_names}
    if survey == "ztf":
        new_id = shifted(dp_id, shift)
        jitter = rng.normal(0.0, JITTER_MAG, len(mag)) if k else np.zeros(len(mag))  # per datapoint copy
        jittered = kind == DETECTION
        trig_jitter = rng.normal(0.0, JITTER_MAG, n) if k else np.zeros(n)
        cols["alert_id"] = pa.array(shifted(base.column("alert_id").to_numpy(), shift))
        cols["candid"] = cols["alert_id"]
        cols["stock"] = pc.add(base.column("stock"), k * STOCK_STEP)
        cols["object_id"] = pc.binary_join_element_wise(base.column("object_id").fill_null("noname"), pa.scalar(f"r{k}"), "-")
        for name in ("mag", "magpsf"):
            cols[name] = pc.add(base.column(name), pa.array(trig_jitter).cast(base.column(name).type))
    else:
        alert_id = base.column("alert_id").to_numpy()
        parent = base.column("parentDiaSourceId")
        ids = _universe(dp_id, alert_id, _nonzero(parent))
        new_id = dense_ids(dp_id, ids, k)
        # one jitter per datapoint id: the same measurement in several packets stays one value
        uniq, inverse = np.unique(new_id, return_inverse=True)
        per_dp = rng.normal(0.0, JITTER_MAG, len(uniq)) if k else np.zeros(len(uniq))
        jitter = per_dp[inverse]
        jittered = (kind == DETECTION) | (kind == FORCED)
        new_alert = dense_ids(alert_id, ids, k)
        at = np.searchsorted(uniq, new_alert)
        if (at >= len(uniq)).any() or (uniq[np.minimum(at, len(uniq) - 1)] != new_alert).any():
            raise ValueError("an alert's trigger is not among its datapoints")
        trig_jitter = per_dp[at]
        stocks = _universe(stock, _nonzero(base.column("diaObjectId")), -_nonzero(base.column("ssObjectId")))
        new_stock = dense_ids(stock, stocks, k)
        cols["alert_id"] = pa.array(new_alert)
        cols["parentDiaSourceId"] = _remap_nonzero(parent, ids, k)
        cols["stock"] = pa.array(new_stock)
        cols["object_id"] = pa.array([str(s) if s > 0 else f"ss:{-s}" for s in new_stock.tolist()], pa.string())
        cols["diaObjectId"] = _remap_nonzero(base.column("diaObjectId"), stocks, k)
        cols["ssObjectId"] = _remap_nonzero(base.column("ssObjectId"), stocks, k, sign=-1)
        cols["mag"] = pc.add(base.column("mag"), pa.array(trig_jitter))
        factor = 10 ** (-0.4 * trig_jitter)
        for name in ("flux", "psfFlux"):
            cols[name] = pc.multiply(base.column(name), pa.array(factor).cast(base.column(name).type))
    new_mag = np.where(jittered, mag + jitter, mag)
    new_flux = np.where(jittered, flux * 10 ** (-0.4 * jitter), flux)
    fields = {f.name: flat.field(f.name) for f in flat.type}
    dp_days = np.repeat(days, np.diff(np.asarray(dps.offsets)))
    fields["mjd"] = pc.add(flat.field("mjd"), pa.array(dp_days))
    fields["dp_id"] = pa.array(new_id)
    fields["mag"] = pa.array(new_mag, mask=np.isnan(new_mag))
    fields["flux"] = pa.array(new_flux, mask=np.isnan(new_flux))
    new_flat = pa.StructArray.from_arrays(list(fields.values()), fields=list(flat.type))
    cols["dps"] = pa.ListArray.from_arrays(dps.offsets, new_flat)
    cols["mjd"] = pc.add(base.column("mjd"), pa.array(days))
    for name in TIME_COLUMNS[survey]:
        cols[name] = pc.add(base.column(name), pa.array(days))
    cols["night"] = pa.array(night_of(cols["mjd"].to_numpy(), survey))
    return pa.table(cols)


def build(target: Path, alerts: int, part_rows: int = 25_000, nights: int = 10, work: Path | None = None, survey: str = "ztf",
          data_dir: Path = DATA, buffer_rows: int | None = None, first_replica: int = 0, night0: int = NIGHT0) -> Path:
    """Write an archive of ``alerts`` replicated real alerts of ``survey`` into ``target`` (cached when
    complete); at most ``buffer_rows`` rows (default :data:`BUFFER_ROWS`) wait in memory for their part.
    ``first_replica``, ``night0``: other objects on other nights (bench_history.py adds such an archive's
    parts to another one: replicas are told apart by their number)."""
    marker = target / "_bench.json"
    wanted = {"alerts": alerts, "part_rows": part_rows, "nights": nights, "layout": 5}  # 2: histories in _dps-*.arrow; 3: Parquet LZ4; 4: history_programids; 5: shifted() ids
    if first_replica or night0 != NIGHT0:
        wanted |= {"first_replica": first_replica, "night0": night0}
    buffer_rows = buffer_rows or BUFFER_ROWS[survey]
    if survey != "ztf":  # lsst 1: dense ids, jitter per datapoint id
        wanted = {"survey": survey, **wanted, "layout": 1, "buffer_rows": buffer_rows}
    if marker.exists() and json.loads(marker.read_text()).get("params") == wanted:
        return target
    shutil.rmtree(target, ignore_errors=True)
    base = base_table(work or target.parent, data_dir, survey)
    base = base.drop_columns([c for c in base.column_names if c.startswith("cutout")]).combine_chunks()  # one chunk: takes stay cheap
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
        rep = replica(base, k, rng, nights, survey, night0).slice(0, alerts - written)
        written += rep.num_rows
        k += 1
        night_col = rep.column("night").to_numpy()
        order = np.argsort(night_col, kind="stable")  # each night's rows by one take of their indices (a copy:
        bounds = np.flatnonzero(np.r_[True, np.diff(night_col[order]) != 0, True])  # the replica is not kept alive)
        for start, end in zip(bounds[:-1], bounds[1:]):
            night = night_col[order[start]]
            rows = rep.take(pa.array(order[start:end]))
            buffers.setdefault(int(night), []).append(rows)
            sizes[int(night)] = sizes.get(int(night), 0) + rows.num_rows
            if sizes[int(night)] >= part_rows:
                flush(int(night))
        if buffer_rows and sum(sizes.values()) > buffer_rows:
            for night in sorted(sizes, key=sizes.__getitem__, reverse=True):  # the largest first, down to half
                flush(night)
                if sum(sizes.values()) <= buffer_rows // 2:
                    break
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
    ap.add_argument("--survey", choices=sorted(SOURCES), default="ztf")
    a = ap.parse_args()
    print(build(Path(a.target), a.alerts, a.part_rows, a.nights, survey=a.survey))
