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

from ..keys import negative_id
from .avro import WriterSchema
from .layout import (
    DETECTION,
    FLAG_BAD_PHOT,
    FLAG_NEGATIVE,
    FORCED,
    UPPER_LIMIT,
    alert_schema,
    flux_to_mag,
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
    has_field,
    history_summary,
    i64,
    nan_to_null,
    reject_rows,
    rows_where,
    texts,
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


def normalize(rows: pa.StructArray, ws: WriterSchema, sources: list[str]) -> Normalized:
    n = len(rows)
    srcs = pc.struct_field(rows, "diaSource")
    missing_src = np.asarray(srcs.is_null())
    extras = {name: column(srcs, names, typ) for name, typ, names in SOURCE_FIELDS}
    alert_id = column(srcs, ["diaSourceId"], _L)
    mjd = f64(column(srcs, MJD, _D))
    band = pc.utf8_lower(column(srcs, BAND, pa.string()))
    flux = f64(extras["psfFlux"])
    flux_err = f64(extras["psfFluxErr"])
    negative = _negative(srcs, flux)
    stock, object_id = _objects(rows, extras)

    common = {
        "alert_id": alert_id,
        "stock": pa.array(stock, _L),
        "object_id": pa.array(object_id, pa.string()),
        "survey": pa.array([SURVEY] * n, pa.string()),
        "night": pa.array(night_of(mjd, SURVEY)),
        "mjd": nan_to_null(mjd),
        "ra": column(srcs, ["ra"], _D),
        "dec": column(srcs, ["dec", "decl"], _D),
        "band": band,
        "mag": nan_to_null(flux_to_mag(flux)),
        "mag_err": nan_to_null(_mag_err(flux, flux_err)),
        "flux": nan_to_null(flux),
        "flux_err": nan_to_null(flux_err),
        "isdiffpos": pa.array(~negative, mask=~np.isfinite(flux) & (not _has_negative_flag(srcs))),
        "schema": pa.array(_versions(rows, ws), pa.string()),
        "source": pa.array(sources, pa.string()),
    }
    trigger = DatapointPart(np.arange(n, dtype=np.int64), _source_dp_columns(srcs))
    prv_items, prv_alert = flatten(rows, "prvDiaSources")
    parts = [trigger, DatapointPart(prv_alert, _source_dp_columns(prv_items))]
    parts.append(_forced(rows))
    parts.append(_limits(rows))
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
    cut = cutouts_table(alert_id, rows)
    return Normalized(rows_where(table, keep), rows_where(cut, keep), rejects)


def _versions(rows: pa.StructArray, ws: WriterSchema) -> list[str]:
    return [_version(ws.name, str(v or "")) for v in texts(rows, "lsst_schema_version")]


def _version(*texts: str) -> str:
    for text in texts:
        m = _VERSION.search(text)
        if m:
            return f"{m.group(1)} {m.group(2)}.{m.group(3)}"
    return "lsst unknown"


def _has_negative_flag(records: pa.StructArray) -> bool:
    return has_field(records, "isNegative") or has_field(records, "is_negative")


def _negative(rows: pa.StructArray, flux: np.ndarray) -> np.ndarray:
    if _has_negative_flag(rows):
        flag = column(rows, ["isNegative", "is_negative"], _B)
        return pc.fill_null(flag, False).to_numpy(zero_copy_only=False) | (flux < 0)
    return flux < 0


def _mag_err(flux: np.ndarray, err: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, MAG_ERR_K * err / flux, np.nan)


def _objects(rows: pa.StructArray, extras: dict[str, pa.Array]) -> tuple[list[int | None], list[str | None]]:
    dia = extras["diaObjectId"].to_pylist()
    ss = extras["ssObjectId"].to_pylist()
    has_obj = has_field(rows, "diaObject")
    obj = column(pc.struct_field(rows, "diaObject"), ["diaObjectId"], _L).to_pylist() if has_obj else [None] * len(rows)
    stock: list[int | None] = []
    names: list[str | None] = []
    for d, s, o in zip(dia, ss, obj):
        if not d:
            d = o
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


def _source_dp_columns(rows: pa.StructArray) -> dict[str, pa.Array]:
    """Datapoint columns of diaSource records (the trigger and prvDiaSources)."""
    flux = f64(column(rows, FLUX, _D))
    err = f64(column(rows, FLUX_ERR, _D))
    negative = _negative(rows, flux)
    bad = pc.fill_null(column(rows, ["psfFlux_flag"], _B), False).to_numpy(zero_copy_only=False)
    return {
        "dp_id": column(rows, ["diaSourceId"], _L),
        "mjd": column(rows, MJD, _D),
        "band": pc.utf8_lower(column(rows, BAND, pa.string())),
        "kind": pa.array(np.full(len(rows), DETECTION, dtype=np.int8)),
        "flux": nan_to_null(flux),
        "flux_err": nan_to_null(err),
        "mag": nan_to_null(flux_to_mag(flux)),
        "mag_err": nan_to_null(_mag_err(flux, err)),
        "ra": column(rows, ["ra"], _D),
        "dec": column(rows, ["dec", "decl"], _D),
        "rb": column(rows, ["reliability"], _F),
        "flags": pa.array((np.where(bad, FLAG_BAD_PHOT, 0) | np.where(negative, FLAG_NEGATIVE, 0)).astype(np.int32)),
    }


def _forced(rows: pa.StructArray) -> DatapointPart:
    items, alert = flatten(rows, "prvDiaForcedSources")
    if not len(items):
        return DatapointPart(alert, {})
    flux = f64(column(items, FLUX, _D))
    return DatapointPart(
        alert,
        {
            "dp_id": pa.array(negative_id(FORCED, i64(column(items, ["diaForcedSourceId"], _L)))),
            "mjd": column(items, MJD, _D),
            "band": pc.utf8_lower(column(items, BAND, pa.string())),
            "kind": pa.array(np.full(len(items), FORCED, dtype=np.int8)),
            "flux": nan_to_null(flux),
            "flux_err": column(items, FLUX_ERR, _D),
            "ra": column(items, ["ra"], _D),
            "dec": column(items, ["dec", "decl"], _D),
            "flags": pa.array(np.where(np.isfinite(flux), 0, FLAG_BAD_PHOT).astype(np.int32)),
        },
    )


def _limits(rows: pa.StructArray) -> DatapointPart:
    items, alert = flatten(rows, "prvDiaNondetectionLimits")
    if not len(items):
        return DatapointPart(alert, {})
    mjd = f64(column(items, MJD, _D))
    noise = f64(column(items, ["diaNoise"], _D))
    return DatapointPart(
        alert,
        {
            "dp_id": pa.array(negative_id(UPPER_LIMIT, i64(column(items, ["ccdVisitId"], _L)), mjd, noise)),
            "mjd": nan_to_null(mjd),
            "band": pc.utf8_lower(column(items, BAND, pa.string())),
            "kind": pa.array(np.full(len(items), UPPER_LIMIT, dtype=np.int8)),
            "flux_err": nan_to_null(noise),
            "maglim": nan_to_null(flux_to_mag(5.0 * noise)),
            "flags": pa.array(np.zeros(len(items), dtype=np.int32)),
        },
    )
