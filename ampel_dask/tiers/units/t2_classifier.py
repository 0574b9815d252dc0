"""A saved scikit-learn classifier applied to T2LightCurveFeatures results, a whole batch per call.

The model file (joblib) carries what makes its predictions meaningful: the estimator (imputation
included), the feature columns in order, the classes, and the config of the feature unit it was trained
on. Both that feature config and a hash of the model file enter this unit's config, so a retrained model
or other features give other result keys. A ``<model>.meta.json`` sidecar (written by the training script)
repeats the metadata with the file's hash, so planning needs no unpickling; the estimator is loaded where
it runs. Loading a model file runs pickled code: only load your own.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ...keys import file_hash
from ..base import T2StateUnit, UnitConfig, pinned_hash
from .t2_lightcurve import T2LightCurveFeatures, T2LightCurveFeaturesConfig

MODEL_FORMAT = "ampel_dask.classifier/1"
OK, NO_FEATURES = 0, 1


def model_hash(path: str | Path) -> str:
    """Content hash of a model file (see :func:`ampel_dask.keys.file_hash`). A regular file only: a device
    or FIFO (``model: /dev/zero``) would never end."""
    if Path(path).exists() and not Path(path).is_file():
        raise ValueError(f"{path}: not a regular file")
    return file_hash(path)


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """Unpickle a bundle. An estimator pickled by another scikit-learn minor version is an error:
    sklearn only warns, and such an estimator may predict wrongly or fail deep inside a worker (a
    patch release is accepted)."""
    import warnings

    import joblib
    from sklearn.exceptions import InconsistentVersionWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InconsistentVersionWarning)
        try:
            bundle = joblib.load(path)
        except Exception as exc:  # a text or random file: unpickling fails in any of a dozen ways
            raise ValueError(f"{path}: not a model file joblib can read ({type(exc).__name__}: {exc})") from None
    for other in (c for c in caught if not issubclass(c.category, InconsistentVersionWarning)):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    for w in (c.message for c in caught if issubclass(c.category, InconsistentVersionWarning)):
        if _minor(w.original_sklearn_version) != _minor(w.current_sklearn_version):
            raise ValueError(
                f"{path}: {w.estimator_name} was pickled by scikit-learn {w.original_sklearn_version}, this is "
                f"{w.current_sklearn_version}; pickles do not carry across versions: retrain the model "
                f"(scripts/train_classifier.py) or install scikit-learn=={w.original_sklearn_version}"
            )
    if not isinstance(bundle, dict) or bundle.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not an ampel_dask classifier bundle ({MODEL_FORMAT})")
    problems = _meta_problems(bundle)
    if problems:
        raise ValueError(f"{path}: not an ampel_dask classifier bundle (missing or malformed: {', '.join(problems)})")
    return bundle


def _meta_problems(meta: dict[str, Any]) -> list[str]:
    """The metadata planning reads that a bundle (or sidecar) lacks or has in the wrong shape."""
    problems = [k for k in META_KEYS if k not in meta]
    if not problems:
        fu = meta["feature_unit"]
        problems += [] if isinstance(fu, dict) and isinstance(fu.get("config"), dict) else ["feature_unit.config"]
        problems += [k for k in ("features", "classes") if not isinstance(meta[k], list)]
    return problems


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def load_model(path: str | Path) -> dict[str, Any]:
    """The model bundle, cached per file and process (a rewritten file is reloaded)."""
    st = Path(path).stat()
    return _load(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


META_KEYS = ("format", "features", "classes", "feature_unit")


def meta_path(path: str | Path) -> Path:
    return Path(f"{path}.meta.json")


def write_metadata(path: str | Path, bundle: dict[str, Any] | None = None) -> Path:
    """Write ``<model>.meta.json``: what planning needs (features, classes, feature config) and the
    model file's hash, so a workflow is planned without unpickling the model (sklearn import + load)."""
    import json

    from ...io.files import atomic_write

    bundle = bundle if bundle is not None else load_model(path)
    meta = {k: bundle[k] for k in META_KEYS} | {"model_hash": model_hash(path)}
    atomic_write(meta_path(path), json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta_path(path)


def model_metadata(path: str | Path) -> dict[str, Any]:
    """The bundle's metadata plus ``model_hash``: from the sidecar when it describes this very file,
    else from the model itself (a missing or stale sidecar costs time, never a wrong identity)."""
    import json

    digest = model_hash(path)
    side = meta_path(path)
    if side.exists():
        try:
            meta = json.loads(side.read_text())
        except ValueError:
            meta = {}
        if isinstance(meta, dict) and meta.get("model_hash") == digest and meta.get("format") == MODEL_FORMAT and not _meta_problems(meta):
            return meta
    bundle = load_model(path)
    return {k: bundle[k] for k in META_KEYS} | {"model_hash": digest}


def feature_matrix(table: pa.Table, columns: list[str]) -> np.ndarray:
    """Float64 (rows, columns) array; nulls and +-inf become NaN, as in training."""
    x = np.empty((table.num_rows, len(columns)))
    for j, c in enumerate(columns):
        x[:, j] = pc.fill_null(pc.cast(table.column(c), pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    x[~np.isfinite(x)] = np.nan
    return x


def predict_proba(model: Any, x: np.ndarray) -> np.ndarray:
    """``model.predict_proba(x)``; for a (pipeline ending in a) random forest, the trees are called
    directly: the forest's own call dispatches each tree through joblib with sklearn's config context,
    ~0.2 ms per tree, 4-7x the tree evaluation itself on a work unit's few hundred states. The result
    is the same mean of the trees' probabilities (the test compares them)."""
    steps = getattr(model, "steps", None)
    *pre, last = [s for _, s in steps if s not in (None, "passthrough")] if steps else [model]
    trees = getattr(last, "estimators_", None)
    if not _plain_forest(last, trees):
        return model.predict_proba(x)
    for step in pre:
        x = step.transform(x)
    x = np.ascontiguousarray(x, dtype=np.float32)  # what the forest's input check makes of it
    p = trees[0].predict_proba(x, check_input=False)
    for t in trees[1:]:
        p += t.predict_proba(x, check_input=False)
    return p / len(trees)


def _plain_forest(est: Any, trees: Any) -> bool:
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
    from sklearn.tree import BaseDecisionTree

    return (type(est) in (RandomForestClassifier, ExtraTreesClassifier) and isinstance(trees, list) and bool(trees)
            and all(isinstance(t, BaseDecisionTree) and t.n_outputs_ == 1 for t in trees) and est.n_outputs_ == 1)  # fmt: skip


def class_column(name: str) -> str:
    return "p_" + re.sub(r"\W+", "_", str(name)).strip("_")


class T2ClassifierConfig(UnitConfig):
    model: str = Field(..., description="model bundle written by scripts/train_classifier.py (joblib)")
    model_hash: str | None = Field(None, description="content hash of the model file; None: taken from the file (a mismatch is an error)")
    features: T2LightCurveFeaturesConfig | None = Field(None, description="feature unit config; None: the one the model was trained with")
    columns: list[str] | None = Field(None, description="feature columns in model order; None: from the model file")


class T2Classifier(T2StateUnit):
    """Class probabilities (``p_<class>``) and the most probable class (``classification``) per state.

    ``code``: 0 ok; 1 = the feature unit found no usable light curve (probabilities NaN, class null).
    """

    Config = T2ClassifierConfig
    version = "1"
    libraries = ("scikit-learn",)  # the estimator's code (the features: a dependency, in the identity too)
    column_labels = {"classification": ("Most probable class", ""), "p_{cls}": ("P({cls})", "")}

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        c = self.config
        meta = model_metadata(c.model)
        digest = pinned_hash(self.name(), c.model, meta["model_hash"], c.model_hash)
        trained = T2LightCurveFeaturesConfig.model_validate(meta["feature_unit"]["config"])
        if c.features is not None and c.features != trained:
            raise ValueError("T2Classifier: features config differs from the one the model was trained with")
        columns = list(meta["features"])
        if c.columns is not None and list(c.columns) != columns:
            raise ValueError("T2Classifier: columns differ from the model's feature columns")
        self.config = c.model_copy(update={"model_hash": digest, "features": trained, "columns": columns})
        self.classes = [str(k) for k in meta["classes"]]
        self.feature_unit = T2LightCurveFeatures(trained)
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The estimator, loaded on first use: the driver that plans a workflow never unpickles it."""
        if self._model is None:
            bundle = load_model(self.config.model)
            if model_hash(self.config.model) != self.config.model_hash:
                raise ValueError(f"T2Classifier: {self.config.model} changed since the workflow was planned")
            self._model = bundle["model"]
        return self._model

    def dependencies(self) -> list[T2StateUnit]:
        return [self.feature_unit]

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table:
        feats = (inputs or {}).get(self.feature_unit.name())
        if feats is None:  # standalone use: compute the features here
            feats = self.feature_unit.process(states)
        if feats.num_rows != states.num_rows:
            raise ValueError(f"T2Classifier: {feats.num_rows} feature rows for {states.num_rows} states")
        n = states.num_rows
        ok = pc.fill_null(pc.equal(feats.column("code"), 0), False).to_numpy(zero_copy_only=False)
        proba = np.full((n, len(self.classes)), np.nan)
        if ok.any():
            p = predict_proba(self.model, feature_matrix(feats, self.config.columns)[ok])
            order = [list(map(str, self.model.classes_)).index(k) for k in self.classes]
            proba[ok] = p[:, order]
        best = np.argmax(np.where(ok[:, None], proba, -1.0), axis=1) if n else np.zeros(0, dtype=np.int64)
        labels = np.asarray(self.classes, dtype=object)[best]
        cols: dict[str, pa.Array] = {"classification": pa.array(labels, pa.string(), mask=~ok)}
        for j, k in enumerate(self.classes):
            cols[class_column(k)] = pa.array(proba[:, j])
        cols["code"] = pa.array(np.where(ok, OK, NO_FEATURES).astype(np.int32))
        return pa.table(cols)


__all__ = ["T2Classifier", "T2ClassifierConfig", "predict_proba", "load_model", "model_hash", "model_metadata", "write_metadata", "feature_matrix", "MODEL_FORMAT"]
