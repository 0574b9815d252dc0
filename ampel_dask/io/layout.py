"""The one columnar layout every survey is normalised into, and the ids that make rows stable.

An alert is one row: identity (alert_id, stock, object_id), where and when (ra, dec, mjd, night), the
trigger's photometry (band, mag, flux, ...), survey extras as plain columns, and its photometric history
as a nested ``dps`` list of datapoints. Datapoint ids are stable across ingests: detections keep the
survey's source id, upper limits and forced photometry get a negative 64-bit hash of what identifies them.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

LAYOUT_VERSION = 1

# datapoint kinds
DETECTION, UPPER_LIMIT, FORCED = 0, 1, 2
KIND_NAMES = {DETECTION: "detection", UPPER_LIMIT: "upper_limit", FORCED: "forced"}

# datapoint flags (bit mask; 0 = nothing to report)
FLAG_BAD_PHOT = 1  # the survey flagged the measurement (LSST psfFlux_flag, ZTF forced procstatus != 0)
FLAG_NEGATIVE = 2  # negative difference flux (ZTF isdiffpos 'f' / LSST isNegative)

# AB zero point of fluxes in nJy: m = -2.5 log10(f / nJy) + 31.4
NJY_ZP = 31.4
MJD_JD_OFFSET = 2400000.5

DATAPOINT = pa.struct(
    [
        ("dp_id", pa.int64()),
        ("mjd", pa.float64()),
        ("band", pa.string()),
        ("kind", pa.int8()),
        ("flux", pa.float64()),  # nJy, signed
        ("flux_err", pa.float64()),
        ("mag", pa.float64()),  # AB, detections only
        ("mag_err", pa.float64()),
        ("maglim", pa.float64()),  # 5-sigma limiting magnitude where the survey gives one
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("programid", pa.int32()),  # ZTF data rights (1 public, 2 partnership, 3 Caltech); null for LSST
        ("rb", pa.float32()),  # ZTF rb / LSST reliability
        ("flags", pa.int32()),
    ]
)
DATAPOINT_FIELDS = [f.name for f in DATAPOINT]
# ``band`` as the run's loop holds it (decoded histories, the history join's shuffle files) and as the
# archive's history files store it: a handful of names per batch, so 2-byte codes instead of a 4-byte
# offset and a byte per datapoint (fixed width: gathers are faster too). Datapoints leave the loop (states,
# the archive's readers) with plain strings, :data:`DATAPOINT`.
BAND_CODES = pa.dictionary(pa.int16(), pa.string())


def _with_band(dps: pa.Array | pa.ChunkedArray, band_type: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """Datapoints (a list of structs, or the structs) with ``band`` cast to ``band_type``; no copy of
    the other fields, and nothing done when it has that type already."""
    if isinstance(dps, pa.ChunkedArray):
        chunks = [_with_band(c, band_type) for c in dps.chunks]
        return pa.chunked_array(chunks, type=chunks[0].type) if chunks else pa.chunked_array([], _retyped(dps.type, band_type))
    typ = dps.type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        if typ.value_type.field("band").type == band_type:
            return dps
        values = _with_band(dps.values, band_type)
        cls = pa.ListArray if pa.types.is_list(typ) else pa.LargeListArray
        return cls.from_arrays(dps.offsets, values, mask=dps.is_null() if dps.null_count else None)
    if typ.field("band").type == band_type:
        return dps
    names = [f.name for f in typ]
    arrays = [band_as(dps.field(n), band_type) if n == "band" else dps.field(n) for n in names]
    return pa.StructArray.from_arrays(arrays, fields=list(_retyped(typ, band_type)), mask=dps.is_null() if dps.null_count else None)


def band_as(band: pa.Array | pa.ChunkedArray, band_type: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """A ``band`` column as plain strings or as codes (``band_type``), whichever it was."""
    if band.type == band_type:
        return band
    if pa.types.is_dictionary(band_type) and not pa.types.is_dictionary(band.type):
        band = band.dictionary_encode()
    return band.cast(band_type)


def _retyped(typ: pa.DataType, band_type: pa.DataType) -> pa.DataType:
    if pa.types.is_list(typ):
        return pa.list_(_retyped(typ.value_type, band_type))
    return pa.struct([pa.field("band", band_type) if f.name == "band" else f for f in typ])


def coded_bands(dps: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Datapoints with ``band`` as :data:`BAND_CODES` (how the loop and the history files hold it)."""
    return _with_band(dps, BAND_CODES)


def plain_bands(dps: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Datapoints with ``band`` as plain strings (:data:`DATAPOINT`): what leaves the loop."""
    return _with_band(dps, pa.string())
OTHER_PROGRAMID = 15  # the bit of history_programids for a datapoint without a programid in 0..14


def programid_bits(programid: np.ndarray) -> np.ndarray:
    """``1 << programid`` per datapoint (float programids, NaN for none), ``1 << 15`` outside 0..14."""
    pid = np.asarray(programid, dtype=np.float64)
    ok = np.isfinite(pid) & (pid >= 0) & (pid < OTHER_PROGRAMID) & (pid == np.floor(pid))
    return np.left_shift(np.int32(1), np.where(ok, pid, OTHER_PROGRAMID).astype(np.int32))


COMMON = [
    pa.field("alert_id", pa.int64()),
    pa.field("stock", pa.int64()),
    pa.field("object_id", pa.string()),
    pa.field("survey", pa.string()),
    pa.field("night", pa.int32()),
    pa.field("mjd", pa.float64()),
    pa.field("ra", pa.float64()),
    pa.field("dec", pa.float64()),
    pa.field("band", pa.string()),
    pa.field("mag", pa.float64()),
    pa.field("mag_err", pa.float64()),
    pa.field("flux", pa.float64()),
    pa.field("flux_err", pa.float64()),
    pa.field("isdiffpos", pa.bool_()),
    # history aggregates, so that filters on them need not read the nested history
    pa.field("ndet", pa.int32()),  # detections in the packet (trigger included)
    pa.field("first_det_mjd", pa.float64()),
    pa.field("last_det_mjd", pa.float64()),
    # data rights: which programids the history's datapoints carry (bit p: programid p < 15; bit 15:
    # none or another value), so a channel's view recomputes the aggregates only where it must
    pa.field("history_programids", pa.int32()),
    pa.field("schema", pa.string()),
    pa.field("source", pa.string()),
]

CUTOUTS = pa.schema(
    [
        ("alert_id", pa.int64()),
        ("cutout_science", pa.binary()),
        ("cutout_template", pa.binary()),
        ("cutout_difference", pa.binary()),
    ]
)

# --- objects ------------------------------------------------------------------------------------

_ZTF_NAME = re.compile(r"^ZTF(\d\d)([a-z]{7})$")
_B26 = 26**7


def ztf_stock(object_id: str) -> int:
    """Pack a ZTF name (ZTF + 2-digit year + 7 letters) reversibly into a positive int64."""
    m = _ZTF_NAME.match(object_id)
    if not m:
        raise ValueError(f"not a ZTF object name: {object_id!r}")
    n = 0
    for ch in m.group(2):
        n = n * 26 + (ord(ch) - 97)
    return int(m.group(1)) * _B26 + n


def ztf_name(stock: int) -> str:
    """Inverse of :func:`ztf_stock`."""
    year, n = divmod(int(stock), _B26)
    letters = []
    for _ in range(7):
        n, r = divmod(n, 26)
        letters.append(chr(97 + r))
    return f"ZTF{year:02d}{''.join(reversed(letters))}"


# --- nights -------------------------------------------------------------------------------------

# The observatory's own night naming: ZTF names a night by its UTC date (the whole Palomar night
# falls inside one UTC date); Rubin's dayObs is the date in the UTC-12h time zone, so a Chilean night
# (evening before 00:00 UTC, morning after) keeps one name. Times outside 1940-2130 (synthetic
# placeholders in some sample packets) go to night 0 rather than to an invented date.
NIGHT_OFFSET_DAYS = {"ztf": 0.0, "lsst": 0.5}
_MJD_MIN, _MJD_MAX = 30000.0, 100000.0


def night_of(mjd: np.ndarray, survey: str) -> np.ndarray:
    """Observing night as YYYYMMDD (int32) for each MJD; 0 where the time is not a plausible MJD."""
    mjd = np.asarray(mjd, dtype=np.float64)
    ok = np.isfinite(mjd) & (mjd > _MJD_MIN) & (mjd < _MJD_MAX)
    days = np.floor(np.where(ok, mjd, 60000.0) - NIGHT_OFFSET_DAYS[survey]).astype("int64")
    dates = np.datetime64("1858-11-17", "D") + days.astype("timedelta64[D]")
    y = dates.astype("datetime64[Y]").astype(np.int64) + 1970
    m = dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
    d = (dates - dates.astype("datetime64[M]")).astype(np.int64) + 1
    return np.where(ok, y * 10000 + m * 100 + d, 0).astype(np.int32)


# --- photometry ---------------------------------------------------------------------------------


def mag_to_flux(mag: np.ndarray) -> np.ndarray:
    return np.power(10.0, -0.4 * (np.asarray(mag, dtype=np.float64) - NJY_ZP))


def flux_to_mag(flux: np.ndarray) -> np.ndarray:
    flux = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, NJY_ZP - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)


def alert_schema(extras: list[pa.Field]) -> pa.Schema:
    """Arrow schema of one survey's alert rows: common columns, survey extras, then the history."""
    return pa.schema(COMMON + extras + [pa.field("dps", pa.list_(DATAPOINT))])
