"""SN Ia light-curve fits with sncosmo (SALT2/SALT3 or the Hsiao template), one batch of states per call.

Everything that can be decided for all states at once is done on the flattened datapoints of the batch:
which points enter (kinds, bands known for the state's survey, finite flux with a positive error; a
detection is dropped where forced photometry measured the same epoch in the same band, so no epoch
counts twice), which bands the model covers at the state's redshift, and which states cannot be fitted
(too few points, no significant point, a light curve consistent with a constant, no redshift). Only the
fits themselves run per state: ``sncosmo.fit_lc`` (iminuit) on that state's slice of the arrays.

Redshift: fixed from a :class:`T2RedshiftDigest` (a dependency), from a column of the states table
(Python API), or fitted within bounds; a state whose digest or column has no redshift is fitted within
the bounds when ``fit_missing_z`` is set, else it gets code ``NO_REDSHIFT``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from ...io.arrays import codes_of
from ...io.layout import DETECTION, FORCED, NJY_ZP
from ..base import T2StateUnit, UnitConfig, pinned_hash
from ..columns import floats
from ..helpers.snmodels import DEFAULT_BANDPASSES, files_hash, is_file_spec, load_bandpass, load_source, model_files
from ..states import KINDS
from .t2_redshift import T2RedshiftDigest, T2RedshiftDigestConfig

OK, TOO_FEW_POINTS, NO_SIGNAL, FLAT, NO_REDSHIFT, FIT_ERROR, NOT_CONVERGED = range(7)
CODES = {OK: "ok", TOO_FEW_POINTS: "too few points (or bands) the model covers", NO_SIGNAL: "too few significant points",
         FLAT: "light curve consistent with a constant", NO_REDSHIFT: "no redshift", FIT_ERROR: "sncosmo raised",
         NOT_CONVERGED: "fit did not converge (iminuit)"}  # fmt: skip
SAME_EPOCH_DAYS = 1e-4  # a detection this close to a forced point of the same band is the same exposure


class T2SNCosmoFitConfig(UnitConfig):
    model: Literal["salt2", "salt3", "hsiao"] = Field("salt2", description="salt2/salt3: x0, x1, c from model_dir's files; hsiao: sncosmo's bundled Hsiao template (t0 and amplitude only)")
    model_dir: str | None = Field("package:saltshaker/initfiles", description="folder of SALT model files, or package:NAME/DIR inside an installed package (default: the SALT2 files saltshaker-sn ships)")
    model_hash: str | None = Field(None, description="content hash of the model files (and file bandpasses); None: taken from the files (a mismatch is an error)")
    bandpasses: dict[str, dict[str, str]] = Field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_BANDPASSES.items()},
                                                  description="survey -> band -> bandpass: 'speclite:lsst2023-g', 'pyphot:ZTF_g', 'sncosmo:bessellb' or a file (Angstrom, transmission)")  # fmt: skip
    redshift: Literal["digest", "column", "fit"] = Field("fit", description="digest: T2RedshiftDigest's z (dependency); column: the states' z_column; fit: a free parameter within z_bounds")
    digest: T2RedshiftDigestConfig | None = Field(None, description="the redshift digest's config (redshift: digest)")
    z_column: str = Field("z", description="states column holding the redshift (redshift: column)")
    fit_missing_z: bool = Field(False, description="states without a digest/column redshift: fit z within z_bounds instead of code NO_REDSHIFT")
    z_bounds: tuple[float, float] = Field((0.01, 1.0), description="redshift range of a fitted z")
    x1_bounds: tuple[float, float] = Field((-5.0, 5.0), description="SALT stretch range")
    c_bounds: tuple[float, float] = Field((-0.5, 1.0), description="SALT colour range")
    t0_margin: float = Field(30.0, gt=0, description="t0 within [first point - margin, last point + margin] (days)")
    kinds: list[Literal["detection", "forced"]] = Field(default=["detection", "forced"], min_length=1, description="datapoint kinds fitted (a detection at the epoch of a forced point is dropped)")
    min_points: int = Field(5, ge=2, description="fewer usable points (in bands the model covers) -> TOO_FEW_POINTS")
    min_bands: int = Field(1, ge=1, description="fewer bands with points -> TOO_FEW_POINTS")
    min_snr: float = Field(5.0, gt=0, description="a point is significant at flux/flux_err >= min_snr (sncosmo's guesses use these)")
    min_significant: int = Field(2, ge=1, description="fewer significant points -> NO_SIGNAL")
    flat_pvalue: float = Field(1e-3, ge=0, lt=1, description="a light curve a constant flux fits with a chi2 p-value above this -> FLAT (0: no check)")
    modelcov: bool = Field(False, description="include the model's covariance in the fit (SALT only; ~3x slower)")
    maxcall: int = Field(10000, ge=100, description="iminuit's call limit per fit")

    @model_validator(mode="after")
    def _consistent(self) -> T2SNCosmoFitConfig:
        for name, (lo, hi) in (("z_bounds", self.z_bounds), ("x1_bounds", self.x1_bounds), ("c_bounds", self.c_bounds)):
            if not lo < hi:
                raise ValueError(f"{name}: lower bound must be below the upper")
        if self.z_bounds[0] <= 0:
            raise ValueError("z_bounds: redshifts must be positive")
        if self.redshift == "digest" and self.digest is None:
            raise ValueError("redshift: digest needs a digest config")
        if self.model in ("salt2", "salt3") and not self.model_dir:
            raise ValueError(f"model {self.model} needs model_dir")
        return self


class T2SNCosmoFit(T2StateUnit):
    """SALT2/SALT3 (or Hsiao) fit per state: ``t0``, ``x0``, ``x1``, ``c`` (Hsiao: ``x0`` is its amplitude,
    ``x1``/``c`` null), their errors, ``z`` (and ``z_fitted``), ``mb`` (rest-frame Bessell B peak, AB),
    ``chi2``, ``ndof``, ``chi2_ndof``, ``n_points``, ``n_bands`` and ``code`` (see ``CODES``; 0 = fitted).

    Fluxes are the datapoints' nJy (AB zero point 31.4). Every failure is a code, never an exception.
    """

    Config = T2SNCosmoFitConfig
    version = "1"
    column_labels = {
        "z": ("Redshift", ""),
        "z_err": ("Redshift error", ""),
        "z_fitted": ("Redshift fitted", ""),
        "t0": ("Peak time t0", "MJD"),
        "t0_err": ("t0 error", "d"),
        "x0": ("Amplitude x0", ""),
        "x0_err": ("x0 error", ""),
        "x1": ("Stretch x1", ""),
        "x1_err": ("x1 error", ""),
        "c": ("Colour c", ""),
        "c_err": ("c error", ""),
        "mb": ("Peak B magnitude, rest frame (AB)", "mag"),
        "chi2": ("Fit chi2", ""),
        "ndof": ("Degrees of freedom", ""),
        "chi2_ndof": ("Fit chi2/dof", ""),
        "n_points": ("Points fitted", ""),
        "n_bands": ("Bands fitted", ""),
    }
    # distributions whose versions shape the results (for the unit's identity)
    libraries: ClassVar[tuple[str, ...]] = ("sncosmo", "iminuit", "numpy", "scipy", "speclite", "pyphot")  # the model files: by content hash in the config

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        c = self.config
        files = model_files(c.model, c.model_dir, c.modelcov)
        files += [_path(s) for bands in c.bandpasses.values() for s in bands.values() if is_file_spec(s)]
        digest = pinned_hash(self.name(), c.model_dir or c.model, files_hash(files), c.model_hash)
        self.config = c.model_copy(update={"model_hash": digest})
        self.band_keys = [f"{survey}:{band}" for survey, bands in sorted(c.bandpasses.items()) for band in sorted(bands)]
        self.band_specs = [c.bandpasses[k.split(":", 1)[0]][k.split(":", 1)[1]] for k in self.band_keys]
        self.digest = T2RedshiftDigest(c.digest) if c.redshift == "digest" else None
        self._fit: tuple[Any, list[Any]] | None = None

    def __getstate__(self) -> dict:  # ship the config, not the parsed model (tens of MB)
        return {**self.__dict__, "_fit": None}

    def dependencies(self) -> list[T2StateUnit]:
        return [self.digest] if self.digest is not None else []

    def _model(self) -> tuple[Any, list[Any]]:
        if self._fit is None:
            import sncosmo

            c = self.config
            source = load_source(c.model, c.model_dir, c.modelcov, c.model_hash)
            self._fit = (sncosmo.Model(source=source), [load_bandpass(s) for s in self.band_specs])
        return self._fit

    @property
    def params(self) -> list[str]:
        return ["x0"] if self.config.model == "hsiao" else ["x0", "x1", "c"]

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table:
        c = self.config
        n = states.num_rows
        model, bandpasses = self._model()
        pts = self._points(states, bandpasses, model)
        z, z_fit = self._redshifts(states, inputs)
        code = np.full(n, OK, dtype=np.int32)
        code[np.isnan(z) & ~z_fit] = NO_REDSHIFT
        # bands the model covers at the state's redshift (over the whole range when z is fitted)
        lo = np.where(z_fit, c.z_bounds[1], z)[pts.row]
        hi = np.where(z_fit, c.z_bounds[0], z)[pts.row]
        covered = (pts.bp_min >= model.source.minwave() * (1 + lo)) & (pts.bp_max <= model.source.maxwave() * (1 + hi))
        pts = pts.where(covered | np.isnan(lo))
        n_points = np.bincount(pts.row, minlength=n)
        n_bands = _distinct_per_row(pts.row, pts.bp, n)
        n_sig = np.bincount(pts.row, weights=(pts.flux / pts.err) >= c.min_snr, minlength=n).astype(np.int64)
        code[(code == OK) & ((n_points < c.min_points) | (n_bands < c.min_bands))] = TOO_FEW_POINTS
        code[(code == OK) & (n_sig < c.min_significant)] = NO_SIGNAL
        if c.flat_pvalue > 0:
            code[(code == OK) & (_constant_pvalue(pts.row, pts.flux, pts.err, n) > c.flat_pvalue)] = FLAT
        out = {k: np.full(n, np.nan) for k in ["t0", "t0_err", *(f for p in self.params for f in (p, f"{p}_err")), "z_err", "mb", "chi2", "chi2_ndof"]}
        out["z"] = np.where(z_fit, np.nan, z)
        ndof = np.full(n, -1, dtype=np.int32)
        offsets = np.r_[0, np.cumsum(n_points)]
        for i in np.flatnonzero(code == OK):  # the fits: sncosmo per state, on slices of the batch arrays
            s = slice(offsets[i], offsets[i + 1])
            code[i] = self._fit_one(model, bandpasses, pts, s, float(z[i]), bool(z_fit[i]), out, ndof, i)
        cols: dict[str, pa.Array] = {"z": pa.array(out["z"]), "z_fitted": pa.array(z_fit)}
        for k in ["z_err", "t0", "t0_err", *(f for p in self.params for f in (p, f"{p}_err"))]:
            cols[k] = pa.array(out[k])
        if c.model == "hsiao":
            cols.update({k: pa.nulls(n, pa.float64()) for k in ("x1", "x1_err", "c", "c_err")})
        cols.update(mb=pa.array(out["mb"]), chi2=pa.array(out["chi2"]), ndof=pa.array(ndof), chi2_ndof=pa.array(out["chi2_ndof"]))
        cols.update(n_points=pa.array(n_points.astype(np.int32)), n_bands=pa.array(n_bands.astype(np.int32)), code=pa.array(code))
        return pa.table(cols)

    def _fit_one(self, model, bandpasses, pts, s: slice, z: float, z_fit: bool, out: dict, ndof: np.ndarray, i: int) -> int:
        import sncosmo

        c = self.config
        t = pts.mjd[s]
        data = {"time": t, "band": np.asarray(bandpasses, dtype=object)[pts.bp[s]], "flux": pts.flux[s], "fluxerr": pts.err[s],
                "zp": np.full(len(t), NJY_ZP), "zpsys": np.full(len(t), "ab")}  # fmt: skip
        vparams = ["t0", *(["amplitude"] if c.model == "hsiao" else self.params)]
        bounds = {"t0": (t.min() - c.t0_margin, t.max() + c.t0_margin)}
        if c.model != "hsiao":
            bounds.update(x1=c.x1_bounds, c=c.c_bounds)
            model.set(x1=0.0, c=0.0)
        if z_fit:
            vparams.append("z")
            bounds["z"] = c.z_bounds
            model.set(z=float(np.mean(c.z_bounds)))
        else:
            model.set(z=z)
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                res, fitted = sncosmo.fit_lc(data, model, vparams, bounds=bounds, minsnr=c.min_snr, modelcov=c.modelcov, maxcall=c.maxcall)
                mb = fitted.source_peakmag("bessellb", "ab")
        except Exception:  # sncosmo/iminuit refuse some light curves (e.g. nothing left inside the model's phases)
            return FIT_ERROR
        names = list(res.param_names)
        par = dict(zip(names, res.parameters))
        err = dict(res.errors)
        out["t0"][i], out["t0_err"][i] = par["t0"], err.get("t0", np.nan)
        for p in self.params:
            src = "amplitude" if c.model == "hsiao" else p
            out[p][i], out[f"{p}_err"][i] = par[src], err.get(src, np.nan)
        if z_fit:
            out["z"][i], out["z_err"][i] = par["z"], err.get("z", np.nan)
        out["mb"][i], out["chi2"][i] = mb, res.chisq
        ndof[i] = int(res.ndof)
        out["chi2_ndof"][i] = res.chisq / res.ndof if res.ndof > 0 else np.nan
        return OK if res.success else NOT_CONVERGED

    def _points(self, states: pa.Table, bandpasses: list[Any], model) -> _Points:
        """The batch's usable points, ordered by (state, time), with their bandpass index and extent."""
        c = self.config
        arr = states.column("dps").combine_chunks()
        offsets = np.asarray(arr.offsets)
        flat = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        row = np.repeat(np.arange(states.num_rows, dtype=np.int64), np.diff(offsets))
        survey = pc.take(states.column("survey").combine_chunks(), pa.array(row))
        key = pc.binary_join_element_wise(pc.fill_null(survey, ""), pc.fill_null(flat.field("band"), ""), ":")
        bp = codes_of(key, self.band_keys)
        kind = np.asarray(flat.field("kind").to_numpy(zero_copy_only=False))
        mjd, flux, err = (floats(flat.field(f)) for f in ("mjd", "flux", "flux_err"))
        keep = (bp >= 0) & np.isin(kind, [KINDS[k] for k in c.kinds]) & np.isfinite(mjd) & np.isfinite(flux) & np.isfinite(err) & (err > 0)
        idx = np.flatnonzero(keep)
        group = row[idx] * len(self.band_keys) + bp[idx]
        order = np.lexsort((mjd[idx], group))
        idx, group = idx[order], group[order]
        t, k = mjd[idx], kind[idx]
        same_prev = np.r_[False, (group[1:] == group[:-1]) & (np.diff(t) < SAME_EPOCH_DAYS)]
        same_next = np.r_[same_prev[1:], False]
        forced_prev = np.r_[False, k[:-1] == FORCED]
        forced_next = np.r_[k[1:] == FORCED, False]
        dup = (k == DETECTION) & ((same_prev & forced_prev) | (same_next & forced_next))
        idx = idx[~dup]
        idx = idx[np.lexsort((mjd[idx], row[idx]))]
        bmin = np.array([b.minwave() for b in bandpasses])
        bmax = np.array([b.maxwave() for b in bandpasses])
        return _Points(row[idx], bp[idx], mjd[idx], flux[idx], err[idx], bmin[bp[idx]], bmax[bp[idx]])

    def _redshifts(self, states: pa.Table, inputs: dict[str, pa.Table] | None) -> tuple[np.ndarray, np.ndarray]:
        """(z, fit z?) per state; z is NaN where it is fitted or unknown."""
        c = self.config
        n = states.num_rows
        if c.redshift == "fit":
            return np.full(n, np.nan), np.ones(n, dtype=bool)
        if c.redshift == "column":
            if c.z_column not in states.column_names:
                raise ValueError(f"T2SNCosmoFit: redshift: column needs a states column {c.z_column!r}")
            z = floats(states.column(c.z_column))
        else:
            assert self.digest is not None
            got = self.digest.rows_for(states, inputs, "T2SNCosmoFit")
            z = floats(got.column("z"))
        z = np.where(z > 0, z, np.nan)
        return z, np.isnan(z) & c.fit_missing_z


class _Points:
    """Flat usable datapoints of a batch: state row, bandpass index, time, flux, error, band extent."""

    def __init__(self, row, bp, mjd, flux, err, bp_min, bp_max):
        self.row, self.bp, self.mjd, self.flux, self.err, self.bp_min, self.bp_max = row, bp, mjd, flux, err, bp_min, bp_max

    def where(self, mask: np.ndarray) -> _Points:
        return _Points(*(a[mask] for a in (self.row, self.bp, self.mjd, self.flux, self.err, self.bp_min, self.bp_max)))



def _distinct_per_row(row: np.ndarray, value: np.ndarray, n: int) -> np.ndarray:
    if not len(row):
        return np.zeros(n, dtype=np.int64)
    pairs = np.unique(row * (int(value.max()) + 1) + value)
    return np.bincount(pairs // (int(value.max()) + 1), minlength=n)


def _constant_pvalue(row: np.ndarray, flux: np.ndarray, err: np.ndarray, n: int) -> np.ndarray:
    """p-value of each state's chi2 against its best (weighted-mean) constant flux (0 where < 2 points)."""
    from scipy.stats import chi2 as chi2_dist

    w = 1.0 / err**2
    sw = np.bincount(row, weights=w, minlength=n)
    mean = np.bincount(row, weights=w * flux, minlength=n) / np.where(sw > 0, sw, 1)
    chi2 = np.bincount(row, weights=w * (flux - mean[row]) ** 2, minlength=n)
    dof = np.bincount(row, minlength=n) - 1
    return np.where(dof > 0, chi2_dist.sf(chi2, np.maximum(dof, 1)), 0.0)


def _path(spec: str):
    from pathlib import Path

    if not Path(spec).is_file():
        raise FileNotFoundError(f"bandpass file {spec} does not exist")
    return Path(spec)


__all__ = ["T2SNCosmoFit", "T2SNCosmoFitConfig", "CODES"]
