"""Rubin/LSST alerts (lsst schemas 2.x to 11.0, Fink ``topLevelRecord`` rewrites) and ELAsTiCC 0.9.

The alert id is the triggering ``diaSourceId`` (ELAsTiCC packets share one placeholder ``alertId``); the
stock is ``diaObjectId``, or ``-ssObjectId`` for solar-system sources without a diaObject. Field names
changed across versions (midPointTai -> midpointMjdTai, filterName -> band, decl -> dec,
psFlux -> psfFlux); each canonical column lists the names it is read from. Fluxes stay in nJy.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .avro import Record, WriterSchema
from .layout import (
    DETECTION,
    FLAG_BAD_PHOT,
    FLAG_NEGATIVE,
    FORCED,
    UPPER_LIMIT,
    alert_schema,
    flux_to_mag,
    negative_id,
    night_of,
)
from .normalize import (
    DatapointPart,
    Normalized,
    assemble_dps,
    column,
    cutouts_table,
    f64,
    flatten,
    history_summary,
    i64,
    nan_to_null,
    record_fields,
    reject_rows,
    stamp,
)

SURVEY = "lsst"
_F, _D, _I, _L, _B = pa.float32(), pa.float64(), pa.int32(), pa.int64(), pa.bool_()
MJD = ["midpointMjdTai", "midPointTai"]
BAND = ["band", "filterName"]
FLUX = ["psfFlux", "psFlux"]
FLUX_ERR = ["psfFluxErr", "psFluxErr"]
# canonical diaSource extras: (column, arrow type, names across schema versions)
SOURCE_FIELDS: list[tuple[str, pa.DataType, list[str]]] = [
    ("diaObjectId", _L, ["diaObjectId"]),
    ("ssObjectId", _L, ["ssObjectId"]),
    ("parentDiaSourceId", _L, ["parentDiaSourceId"]),
    ("visit", _L, ["visit", "ccdVisitId"]),
    ("detector", _I, ["detector"]),
    ("x", _F, ["x"]),
    ("y", _F, ["y"]),
    ("snr", _F, ["snr"]),
    ("psfFlux", _F, FLUX),
    ("psfFluxErr", _F, FLUX_ERR),
    ("apFlux", _F, ["apFlux"]),
    ("apFluxErr", _F, ["apFluxErr"]),
    ("psfChi2", _F, ["psfChi2", "psChi2"]),
    ("psfNdata", _I, ["psfNdata", "psNdata"]),
    ("extendedness", _F, ["extendedness"]),
    ("reliability", _F, ["reliability"]),
    ("isDipole", _B, ["isDipole"]),
    ("trailLength", _F, ["trailLength"]),
    ("psfFlux_flag", _B, ["psfFlux_flag"]),
    ("pixelFlags", _B, ["pixelFlags"]),
    ("centroid_flag", _B, ["centroid_flag"]),
]
SCHEMA = alert_schema([pa.field(n, t) for n, t, _ in SOURCE_FIELDS])
_VERSION = re.compile(r"(lsst|elasticc)\.v(\d+)_(\d+)")
MAG_ERR_K = 2.5 / np.log(10)


def normalize(records: list[Record], ws: WriterSchema, sources: list[str]) -> Normalized:
    values = [r.value for r in records]
    n = len(values)
    missing_src = np.array([v.get("diaSource") is None for v in values])
    srcs = [v.get("diaSource") or {} for v in values]
    present = record_fields(ws, ["diaSource"])
    extras = {name: column(srcs, names, present, typ) for name, typ, names in SOURCE_FIELDS}
    alert_id = column(srcs, ["diaSourceId"], present, _L)
    mjd = f64(column(srcs, MJD, present, _D))
    band = pc.utf8_lower(column(srcs, BAND, present, pa.string()))
    flux = f64(extras["psfFlux"])
    flux_err = f64(extras["psfFluxErr"])
    negative = _negative(srcs, present, flux)
    stock, object_id = _objects(values, extras)

    common = {
        "alert_id": alert_id,
        "stock": pa.array(stock, _L),
        "object_id": pa.array(object_id, pa.string()),
        "survey": pa.array([SURVEY] * n, pa.string()),
        "night": pa.array(night_of(mjd, SURVEY)),
        "mjd": nan_to_null(mjd),
        "ra": column(srcs, ["ra"], present, _D),
        "dec": column(srcs, ["dec", "decl"], present, _D),
        "band": band,
        "mag": nan_to_null(flux_to_mag(flux)),
        "mag_err": nan_to_null(_mag_err(flux, flux_err)),
        "flux": nan_to_null(flux),
        "flux_err": nan_to_null(flux_err),
        "isdiffpos": pa.array(~negative, mask=~np.isfinite(flux) & (not _has_negative_flag(present))),
        "schema": pa.array([_version(v, ws) for v in values], pa.string()),
        "source": pa.array(sources, pa.string()),
    }
    trigger = DatapointPart(np.arange(n, dtype=np.int64), _source_dp_columns(srcs, present))
    prv_items, prv_alert = flatten(values, "prvDiaSources")
    parts = [trigger, DatapointPart(prv_alert, _source_dp_columns(prv_items, record_fields(ws, ["prvDiaSources"])))]
    parts.append(_forced(values, ws))
    parts.append(_limits(values, ws))
    dps = assemble_dps(n, parts)
    common.update(history_summary(dps))
    arrays = [common[f.name] if f.name in common else extras[f.name] for f in SCHEMA if f.name != "dps"] + [dps]
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    keep, rejects = reject_rows(
        table,
        [
            (missing_src, "packet has no diaSource record"),
            (np.array(alert_id.is_null()), "diaSource.diaSourceId is missing"),
            (~np.isfinite(mjd), "diaSource midpointMjdTai/midPointTai is missing"),
            (np.array([s is None for s in stock]), "neither diaObjectId nor ssObjectId names the object"),
        ],
    )
    cut = cutouts_table(
        alert_id,
        [stamp(v.get("cutoutScience")) for v in values],
        [stamp(v.get("cutoutTemplate")) for v in values],
        [stamp(v.get("cutoutDifference")) for v in values],
    )
    mask = pa.array(keep)
    return Normalized(table.filter(mask), cut.filter(mask), rejects)


def _version(value: dict, ws: WriterSchema) -> str:
    for text in (ws.name, str(value.get("lsst_schema_version") or "")):
        m = _VERSION.search(text)
        if m:
            return f"{m.group(1)} {m.group(2)}.{m.group(3)}"
    return "lsst unknown"


def _has_negative_flag(present: set[str]) -> bool:
    return bool(present & {"isNegative", "is_negative"})


def _negative(rows: list[dict], present: set[str], flux: np.ndarray) -> np.ndarray:
    if _has_negative_flag(present):
        flag = column(rows, ["isNegative", "is_negative"], present, _B)
        return pc.fill_null(flag, False).to_numpy(zero_copy_only=False) | (flux < 0)
    return flux < 0


def _mag_err(flux: np.ndarray, err: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, MAG_ERR_K * err / flux, np.nan)


def _objects(values: list[dict], extras: dict[str, pa.Array]) -> tuple[list[int | None], list[str | None]]:
    dia = extras["diaObjectId"].to_pylist()
    ss = extras["ssObjectId"].to_pylist()
    stock: list[int | None] = []
    names: list[str | None] = []
    for v, d, s in zip(values, dia, ss):
        if not d:
            d = (v.get("diaObject") or {}).get("diaObjectId")
        if d:
            stock.append(int(d))
            names.append(str(d))
        elif s:
            stock.append(-int(s))
            names.append(f"ss:{s}")
        else:
            stock.append(None)
            names.append(None)
    return stock, names


def _source_dp_columns(rows: list[dict], present: set[str]) -> dict[str, pa.Array]:
    """Datapoint columns of diaSource records (the trigger and prvDiaSources)."""
    flux = f64(column(rows, FLUX, present, _D))
    err = f64(column(rows, FLUX_ERR, present, _D))
    negative = _negative(rows, present, flux)
    bad = pc.fill_null(column(rows, ["psfFlux_flag"], present, _B), False).to_numpy(zero_copy_only=False)
    return {
        "dp_id": column(rows, ["diaSourceId"], present, _L),
        "mjd": column(rows, MJD, present, _D),
        "band": pc.utf8_lower(column(rows, BAND, present, pa.string())),
        "kind": pa.array(np.full(len(rows), DETECTION, dtype=np.int8)),
        "flux": nan_to_null(flux),
        "flux_err": nan_to_null(err),
        "mag": nan_to_null(flux_to_mag(flux)),
        "mag_err": nan_to_null(_mag_err(flux, err)),
        "ra": column(rows, ["ra"], present, _D),
        "dec": column(rows, ["dec", "decl"], present, _D),
        "rb": column(rows, ["reliability"], present, _F),
        "flags": pa.array((np.where(bad, FLAG_BAD_PHOT, 0) | np.where(negative, FLAG_NEGATIVE, 0)).astype(np.int32)),
    }


def _forced(values: list[dict], ws: WriterSchema) -> DatapointPart:
    items, alert = flatten(values, "prvDiaForcedSources")
    if not items:
        return DatapointPart(alert, {})
    present = record_fields(ws, ["prvDiaForcedSources"])
    flux = f64(column(items, FLUX, present, _D))
    return DatapointPart(
        alert,
        {
            "dp_id": pa.array(negative_id(FORCED, i64(column(items, ["diaForcedSourceId"], present, _L)))),
            "mjd": column(items, MJD, present, _D),
            "band": pc.utf8_lower(column(items, BAND, present, pa.string())),
            "kind": pa.array(np.full(len(items), FORCED, dtype=np.int8)),
            "flux": nan_to_null(flux),
            "flux_err": column(items, FLUX_ERR, present, _D),
            "ra": column(items, ["ra"], present, _D),
            "dec": column(items, ["dec", "decl"], present, _D),
            "flags": pa.array(np.where(np.isfinite(flux), 0, FLAG_BAD_PHOT).astype(np.int32)),
        },
    )


def _limits(values: list[dict], ws: WriterSchema) -> DatapointPart:
    items, alert = flatten(values, "prvDiaNondetectionLimits")
    if not items:
        return DatapointPart(alert, {})
    present = record_fields(ws, ["prvDiaNondetectionLimits"])
    mjd = f64(column(items, MJD, present, _D))
    noise = f64(column(items, ["diaNoise"], present, _D))
    return DatapointPart(
        alert,
        {
            "dp_id": pa.array(negative_id(UPPER_LIMIT, i64(column(items, ["ccdVisitId"], present, _L)), mjd, noise)),
            "mjd": nan_to_null(mjd),
            "band": pc.utf8_lower(column(items, BAND, present, pa.string())),
            "kind": pa.array(np.full(len(items), UPPER_LIMIT, dtype=np.int8)),
            "flux_err": nan_to_null(noise),
            "maglim": nan_to_null(flux_to_mag(5.0 * noise)),
            "flags": pa.array(np.zeros(len(items), dtype=np.int32)),
        },
    )
