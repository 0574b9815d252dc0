"""Supernova models and bandpasses for sncosmo fits, from installed packages or files, never downloaded.

sncosmo's registry fetches most built-in models and bandpasses from a remote server at first use; a
worker must not. What the wheels really bundle (checked in sncosmo 2.13.0): the Hsiao SN Ia template
(``hsiao-subsampled``, Hsiao v3 on a coarser grid) and the Bessell bandpasses; so models and bandpasses
come from here instead:

- bandpasses: ``speclite:lsst2023-g`` (speclite's LSST total throughputs, u-y), ``pyphot:ZTF_g``
  (pyphot's ZTF g/r/i transmission curves, from the SVO filter service), ``sncosmo:bessellb`` (the
  Bessell curves sncosmo ships), or a path to a two-column text file (wavelength [Angstrom], transmission);
- models: ``hsiao`` (sncosmo's bundled template), ``salt2`` / ``salt3`` from a folder of the usual model
  files: a path, or ``package:NAME/SUBDIR`` for a folder an installed package ships (the SALT2 files of
  ``saltshaker-sn``: ``package:saltshaker/initfiles``), located without importing the package.

The content hash of every file read from a path enters the unit's config (:func:`files_hash`); files
inside an installed package are covered by the package's version (the unit's ``libraries``).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ...keys import files_hash

# sncosmo's file names for each model kind (the model covariance files are read only with modelcov)
SALT_FILES = {
    "salt2": {"m0file": "salt2_template_0.dat", "m1file": "salt2_template_1.dat", "clfile": "salt2_color_correction.dat"},
    # sncosmo's SALT3Source reads its variance files whether or not the fit uses the model covariance
    "salt3": {"m0file": "salt3_template_0.dat", "m1file": "salt3_template_1.dat", "clfile": "salt3_color_correction.dat",
              "cdfile": "salt3_color_dispersion.dat", "lcrv00file": "salt3_lc_variance_0.dat",
              "lcrv11file": "salt3_lc_variance_1.dat", "lcrv01file": "salt3_lc_covariance_01.dat"},
}
SALT_COV_FILES = {
    "salt2": {"cdfile": "salt2_color_dispersion.dat", "errscalefile": "salt2_lc_dispersion_scaling.dat",
              "lcrv00file": "salt2_lc_relative_variance_0.dat", "lcrv11file": "salt2_lc_relative_variance_1.dat",
              "lcrv01file": "salt2_lc_relative_covariance_01.dat"},
    "salt3": {},
}  # fmt: skip
TRIM_LEVEL = 0.01
SNCOSMO_BUNDLED_BANDPASSES = {"bessellux", "bessellb", "bessellv", "bessellr", "besselli"}

DEFAULT_BANDPASSES: dict[str, dict[str, str]] = {
    "ztf": {b: f"pyphot:ZTF_{b}" for b in "gri"},
    "lsst": {b: f"speclite:lsst2023-{b}" for b in "ugrizy"},
}


def package_dir(spec: str) -> Path:
    """``package:NAME/SUB/DIR`` -> that folder inside the installed package NAME (not imported)."""
    name, _, sub = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: package {name!r} is not installed")
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise FileNotFoundError(f"{spec}: {path} does not exist in the installed package")
    return path


def resolve_dir(spec: str) -> Path:
    path = package_dir(spec) if spec.startswith("package:") else Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {spec} does not exist")
    return path


def model_files(kind: str, model_dir: str | None, modelcov: bool) -> list[Path]:
    """The files a model of this kind reads from its folder (missing ones are an error naming them)."""
    if kind == "hsiao":
        return []
    if model_dir is None:
        raise ValueError(f"model {kind} needs model_dir (a folder of {kind.upper()} model files)")
    folder = resolve_dir(model_dir)
    names = {**SALT_FILES[kind], **(SALT_COV_FILES[kind] if modelcov else {})}
    paths = [folder / n for n in names.values()]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: missing {kind.upper()} model file(s) {missing}")
    return paths


def is_file_spec(spec: str) -> bool:
    return not spec.startswith(("speclite:", "pyphot:", "sncosmo:"))


@lru_cache(maxsize=4)
def load_source(kind: str, model_dir: str | None, modelcov: bool, digest: str) -> Any:
    """The sncosmo Source, parsed once per process (SALT2 files take ~1 s); ``digest`` keys the cache
    by content, so a rewritten folder is parsed again."""
    import sncosmo

    if kind == "hsiao":
        return sncosmo.get_source("hsiao-subsampled")  # package data of sncosmo itself, no download
    folder = str(resolve_dir(model_dir))  # type: ignore[arg-type]
    names = {**SALT_FILES[kind], **(SALT_COV_FILES[kind] if modelcov else {})}
    cls = sncosmo.SALT2Source if kind == "salt2" else sncosmo.SALT3Source
    return cls(modeldir=folder, **names, name=kind)


def load_bandpass(spec: str) -> Any:
    """An ``sncosmo.Bandpass`` from a package's bundled curve or a file (see the module doc)."""
    import sncosmo

    where, _, name = spec.partition(":")
    if where == "speclite":
        import speclite.filters

        f = speclite.filters.load_filter(name)
        wave, trans = np.asarray(f.wavelength, dtype=float), np.asarray(f.response, dtype=float)
    elif where == "pyphot":
        path = package_dir("package:pyphot/libs/ascii_sources") / f"{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: pyphot ships no {path.name}")
        data = np.loadtxt(path, delimiter=",", comments="#", skiprows=_header_rows(path))
        wave, trans = data[:, 0] * 10.0, data[:, 1]  # pyphot's ascii curves are in nm
    elif where == "sncosmo":
        if name not in SNCOSMO_BUNDLED_BANDPASSES:
            raise ValueError(f"{spec}: sncosmo downloads this bandpass at first use; only {sorted(SNCOSMO_BUNDLED_BANDPASSES)} ship with it")
        return sncosmo.get_bandpass(name)
    else:
        data = np.loadtxt(spec, comments="#")
        wave, trans = data[:, 0], data[:, 1]
        name = spec
    wave, idx = np.unique(wave, return_index=True)
    # zero-padded edges trimmed (below 1% of the peak; pyphot's ZTF i leaks ~0.8% at 300 nm): a band's extent decides which redshifts it fits
    return sncosmo.Bandpass(wave, np.clip(trans[idx], 0, None), name=name or spec, trim_level=TRIM_LEVEL)


def _header_rows(path: Path) -> int:
    """Lines before the numbers of a pyphot ascii curve (comments and a column-name line)."""
    with open(path) as fh:
        for i, line in enumerate(fh):
            s = line.strip()
            if s and not s.startswith("#") and s[0].isdigit():
                return i
    return 0


__all__ = ["DEFAULT_BANDPASSES", "load_bandpass", "load_source", "model_files", "files_hash", "package_dir", "is_file_spec"]
