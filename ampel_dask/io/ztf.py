"""ZTF alerts (schemas 1.x to 4.02, IPAC and Spark-rewritten ``topLevelRecord`` packets) -> columns.

Every candidate field of schema 4.02 becomes a column (null where an older schema lacks it; the 1.x
names sgmag/srmag/simag/szmag/sgscore map to their 4.x "...1" names). The history nests the trigger,
``prv_candidates`` (detections and upper limits) and ``fp_hists`` (forced photometry).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..keys import negative_id, text_id
from .avro import WriterSchema
from .layout import (
    DETECTION,
    FLAG_BAD_PHOT,
    FLAG_NEGATIVE,
    FORCED,
    MJD_JD_OFFSET,
    UPPER_LIMIT,
    alert_schema,
    mag_to_flux,
    night_of,
    ztf_stock,
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

SURVEY = "ztf"
BANDS = pa.array([None, "g", "r", "i"], pa.string())
POSITIVE = pa.array(["t", "1", "true", "T"], pa.string())

_F, _D, _I, _L, _S = pa.float32(), pa.float64(), pa.int32(), pa.int64(), pa.string()
# candidate fields of ZTF alert schema 4.02, in schema order (ra, dec, isdiffpos are common columns)
CANDIDATE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("jd", _D), ("fid", _I), ("pid", _L), ("diffmaglim", _F), ("pdiffimfilename", _S), ("programpi", _S),
    ("programid", _I), ("candid", _L), ("tblid", _L), ("nid", _I), ("rcid", _I), ("field", _I),
    ("xpos", _F), ("ypos", _F), ("magpsf", _F), ("sigmapsf", _F), ("chipsf", _F), ("magap", _F),
    ("sigmagap", _F), ("distnr", _F), ("magnr", _F), ("sigmagnr", _F), ("chinr", _F), ("sharpnr", _F),
    ("sky", _F), ("magdiff", _F), ("fwhm", _F), ("classtar", _F), ("mindtoedge", _F), ("magfromlim", _F),
    ("seeratio", _F), ("aimage", _F), ("bimage", _F), ("aimagerat", _F), ("bimagerat", _F), ("elong", _F),
    ("nneg", _I), ("nbad", _I), ("rb", _F), ("ssdistnr", _F), ("ssmagnr", _F), ("ssnamenr", _S),
    ("sumrat", _F), ("magapbig", _F), ("sigmagapbig", _F), ("ranr", _D), ("decnr", _D), ("sgmag1", _F),
    ("srmag1", _F), ("simag1", _F), ("szmag1", _F), ("sgscore1", _F), ("distpsnr1", _F), ("ndethist", _I),
    ("ncovhist", _I), ("jdstarthist", _D), ("jdendhist", _D), ("scorr", _D), ("tooflag", _I),
    ("objectidps1", _L), ("objectidps2", _L), ("sgmag2", _F), ("srmag2", _F), ("simag2", _F), ("szmag2", _F),
    ("sgscore2", _F), ("distpsnr2", _F), ("objectidps3", _L), ("sgmag3", _F), ("srmag3", _F), ("simag3", _F),
    ("szmag3", _F), ("sgscore3", _F), ("distpsnr3", _F), ("nmtchps", _I), ("rfid", _L), ("jdstartref", _D),
    ("jdendref", _D), ("nframesref", _I), ("rbversion", _S), ("dsnrms", _F), ("ssnrms", _F), ("dsdiff", _F),
    ("magzpsci", _F), ("magzpsciunc", _F), ("magzpscirms", _F), ("nmatches", _I), ("clrcoeff", _F),
    ("clrcounc", _F), ("zpclrcov", _F), ("zpmed", _F), ("clrmed", _F), ("clrrms", _F), ("neargaia", _F),
    ("neargaiabright", _F), ("maggaia", _F), ("maggaiabright", _F), ("exptime", _F), ("drb", _F),
    ("drbversion", _S),
]  # fmt: skip
ALIASES = {"sgmag1": "sgmag", "srmag1": "srmag", "simag1": "simag", "szmag1": "szmag", "sgscore1": "sgscore"}
SCHEMA = alert_schema([pa.field(n, t) for n, t in CANDIDATE_FIELDS])
ZTF_NULL = -99999.0  # forced-photometry "no value" sentinel
LN10_25 = math.log(10) / 2.5


def normalize(rows: pa.StructArray, ws: WriterSchema, sources: list[str]) -> Normalized:
    n = len(rows)
    has_cand = has_field(rows, "candidate")
    cands = pc.struct_field(rows, "candidate") if has_cand else pa.array([{}] * n, pa.struct([]))
    missing_cand = np.asarray(cands.is_null()) | (not has_cand)
    cols = {name: column(cands, [name] + ([ALIASES[name]] if name in ALIASES else []), typ) for name, typ in CANDIDATE_FIELDS}
    jd = f64(cols["jd"])
    mjd = jd - MJD_JD_OFFSET
    fid = i64(cols["fid"])
    band = BANDS.take(pa.array(np.where((fid >= 1) & (fid <= 3), fid, 0)))
    positive = _isdiffpos(cands)
    mag = f64(cols["magpsf"])
    flux = np.where(_not_false(positive), 1.0, -1.0) * mag_to_flux(mag)
    flux_err = np.abs(flux) * f64(cols["sigmapsf"]) * LN10_25
    object_ids, stocks = _objects(rows)

    common = {
        "alert_id": cols["candid"],
        "stock": pa.array(stocks, pa.int64()),
        "object_id": pa.array(object_ids, pa.string()),
        "survey": pa.array([SURVEY] * n, pa.string()),
        "night": pa.array(night_of(mjd, SURVEY)),
        "mjd": nan_to_null(mjd),
        "ra": column(cands, ["ra"], pa.float64()),
        "dec": column(cands, ["dec"], pa.float64()),
        "band": band,
        "mag": nan_to_null(mag),
        "mag_err": nan_to_null(f64(cols["sigmapsf"])),
        "flux": nan_to_null(flux),
        "flux_err": nan_to_null(flux_err),
        "isdiffpos": positive,
        "schema": pa.array([f"ztf {v}" for v in _versions(rows, ws)], pa.string()),
        "source": pa.array(sources, pa.string()),
    }
    dps = assemble_dps(n, [_trigger_dps(cols, common), *_prv_dps(rows), _fp_dps(rows)])
    common.update(history_summary(dps))
    arrays = [common[f.name] if f.name in common else cols[f.name] for f in SCHEMA if f.name != "dps"] + [dps]
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    keep, rejects = reject_rows(
        table,
        [
            (missing_cand, "packet has no candidate record"),
            (np.array(cols["candid"].is_null()), "candidate.candid is missing"),
            (~np.isfinite(mjd), "candidate.jd is missing"),
            (stocks_missing(stocks), "no objectId (and no alertId) to name the object"),
        ],
    )
    cut = cutouts_table(cols["candid"], rows)
    return Normalized(rows_where(table, keep), rows_where(cut, keep), rejects)


def stocks_missing(stocks: list[int | None]) -> np.ndarray:
    return np.array([s is None for s in stocks])


def _versions(rows: pa.StructArray, ws: WriterSchema) -> list[str]:
    default = str(ws.raw.get("version") or ws.name)
    return [v or default for v in texts(rows, "schemavsn")]


def _isdiffpos(records: pa.StructArray) -> pa.Array:
    """'t'/'1'/1/True -> True, 'f'/'0'/0/False -> False (schema 1.1 used an int); null stays null."""
    if not has_field(records, "isdiffpos"):
        return pa.nulls(len(records), pa.bool_())
    raw = pc.struct_field(records, "isdiffpos")
    if pa.types.is_string(raw.type):
        value = pc.is_in(raw, value_set=POSITIVE)
    else:
        value = pc.cast(raw, pa.bool_())
    return pc.if_else(raw.is_null(), pa.scalar(None, pa.bool_()), value)


def _not_false(flag: pa.Array) -> np.ndarray:
    return pc.fill_null(flag, True).to_numpy(zero_copy_only=False)


def _objects(rows: pa.StructArray) -> tuple[list[str | None], list[int | None]]:
    """ZTF object names and their packed int64 stock; 1.1/1.2 test packets only carry an alertId."""
    names: list[str | None] = []
    stocks: list[int | None] = []
    alert_ids = column(rows, ["alertId"], pa.int64()).to_pylist()
    for name, alert_id in zip(texts(rows, "objectId"), alert_ids):
        if name:
            names.append(name)
            try:
                stocks.append(ztf_stock(name))
            except ValueError:
                stocks.append(int(negative_id(4, np.array([text_id(name)]))[0]))
        elif alert_id is not None:
            names.append(None)
            stocks.append(int(negative_id(3, np.array([alert_id]))[0]))
        else:
            names.append(None)
            stocks.append(None)
    return names, stocks


def _trigger_dps(cols: dict[str, pa.Array], common: dict[str, pa.Array]) -> DatapointPart:
    n = len(cols["candid"])
    negative = pc.fill_null(pc.invert(common["isdiffpos"]), False).to_numpy(zero_copy_only=False)
    return DatapointPart(
        np.arange(n, dtype=np.int64),
        {
            "dp_id": cols["candid"],
            "mjd": common["mjd"],
            "band": common["band"],
            "kind": pa.array(np.full(n, DETECTION, dtype=np.int8)),
            "flux": common["flux"],
            "flux_err": common["flux_err"],
            "mag": common["mag"],
            "mag_err": common["mag_err"],
            "maglim": cols["diffmaglim"],
            "ra": common["ra"],
            "dec": common["dec"],
            "programid": cols["programid"],
            "rb": cols["rb"],
            "flags": pa.array(np.where(negative, FLAG_NEGATIVE, 0).astype(np.int32)),
        },
    )


def _prv_dps(rows: pa.StructArray) -> list[DatapointPart]:
    """prv_candidates: entries with a candid are detections, the others upper limits."""
    items, alert = flatten(rows, "prv_candidates")
    if not len(items):
        return []
    get = {
        name: column(items, [name], typ)
        for name, typ in [
            ("candid", _L), ("jd", _D), ("fid", _I), ("pid", _L), ("magpsf", _F), ("sigmapsf", _F),
            ("diffmaglim", _F), ("programid", _I), ("rb", _F), ("ra", _D), ("dec", _D),
        ]
    }  # fmt: skip
    mjd = f64(get["jd"]) - MJD_JD_OFFSET
    fid = i64(get["fid"])
    band = BANDS.take(pa.array(np.where((fid >= 1) & (fid <= 3), fid, 0)))
    positive = _not_false(_isdiffpos(items))
    is_det = ~np.array(get["candid"].is_null())
    mag = f64(get["magpsf"])
    maglim = f64(get["diffmaglim"])
    flux = np.where(positive, 1.0, -1.0) * mag_to_flux(mag)
    flux_err = np.where(is_det, np.abs(flux) * f64(get["sigmapsf"]) * LN10_25, mag_to_flux(maglim) / 5.0)
    ul_id = negative_id(UPPER_LIMIT, f64(get["jd"]), fid, i64(get["pid"]), maglim)
    dp_id = np.where(is_det, i64(get["candid"]), ul_id)
    det_only = ~is_det
    return [
        DatapointPart(
            alert,
            {
                "dp_id": pa.array(dp_id),
                "mjd": nan_to_null(mjd),
                "band": band,
                "kind": pa.array(np.where(is_det, DETECTION, UPPER_LIMIT).astype(np.int8)),
                "flux": nan_to_null(np.where(is_det, flux, np.nan)),
                "flux_err": nan_to_null(flux_err),
                "mag": nan_to_null(np.where(is_det, mag, np.nan)),
                "mag_err": nan_to_null(np.where(is_det, f64(get["sigmapsf"]), np.nan)),
                "maglim": nan_to_null(maglim),
                "ra": pa.array(f64(get["ra"]), mask=det_only | np.isnan(f64(get["ra"]))),
                "dec": pa.array(f64(get["dec"]), mask=det_only | np.isnan(f64(get["dec"]))),
                "programid": get["programid"],
                "rb": get["rb"],
                "flags": pa.array(np.where(is_det & ~positive, FLAG_NEGATIVE, 0).astype(np.int32)),
            },
        )
    ]


def _fp_dps(rows: pa.StructArray) -> DatapointPart:
    """fp_hists (schema 4.x): forced-photometry difference fluxes in DN, scaled to nJy by magzpsci."""
    items, alert = flatten(rows, "fp_hists")
    if not len(items):
        return DatapointPart(alert, {})
    get = {
        name: column(items, [name], typ)
        for name, typ in [
            ("jd", _D), ("fid", _I), ("pid", _L), ("field", _I), ("rcid", _I), ("programid", _I),
            ("forcediffimflux", _F), ("forcediffimfluxunc", _F), ("magzpsci", _F), ("diffmaglim", _F),
            ("procstatus", _S),
        ]
    }  # fmt: skip
    jd = f64(get["jd"])
    fid = i64(get["fid"])
    scale = mag_to_flux(f64(get["magzpsci"]))  # nJy per DN
    raw, raw_err = f64(get["forcediffimflux"]), f64(get["forcediffimfluxunc"])
    flux = np.where(raw == ZTF_NULL, np.nan, raw * scale)
    flux_err = np.where(raw_err == ZTF_NULL, np.nan, raw_err * scale)
    status = pc.fill_null(get["procstatus"], "0").to_pylist()
    bad = np.array([s.strip() not in ("0", "") for s in status]) | ~np.isfinite(flux)
    return DatapointPart(
        alert,
        {
            "dp_id": pa.array(negative_id(FORCED, jd, fid, i64(get["pid"]), i64(get["field"]), i64(get["rcid"]))),
            "mjd": nan_to_null(jd - MJD_JD_OFFSET),
            "band": BANDS.take(pa.array(np.where((fid >= 1) & (fid <= 3), fid, 0))),
            "kind": pa.array(np.full(len(items), FORCED, dtype=np.int8)),
            "flux": nan_to_null(flux),
            "flux_err": nan_to_null(flux_err),
            "maglim": get["diffmaglim"],
            "programid": get["programid"],
            "flags": pa.array(np.where(bad, FLAG_BAD_PHOT, 0).astype(np.int32)),
        },
    )


__all__ = ["SCHEMA", "SURVEY", "normalize", "FLAG_BAD_PHOT"]
