"""Train a light-curve classifier bundle for the T2Classifier unit from labelled ZTF alerts.

This shows the mechanics (ingest -> states -> T2LightCurveFeatures -> join labels -> fit -> one model
file), not a science result: the shared labels are ~100 objects, from broker cross-matches (SIMBAD
types, TNS, ALeRCE examples) that are not ground truth, mapped by hand to three coarse classes, with
one sample per object (its latest alert's state). Do not read its predictions as classifications.

    python scripts/train_classifier.py --sources ../shared/data/ztf --out model.joblib
    python scripts/train_classifier.py --archive /tmp/arch --out model.joblib   # already ingested

The bundle (joblib) holds the sklearn pipeline (median imputation + random forest), the feature columns
in order, the classes, and the T2LightCurveFeatures config (name, version, config) it was trained on;
`<out>.meta.json` repeats all but the estimator, with the file's hash, so planning needs no unpickling.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from ampel_dask.io.archive import Archive  # noqa: E402
from ampel_dask.tiers.states import T1PolicyConfig, build_states  # noqa: E402
from ampel_dask.tiers.units.t2_classifier import MODEL_FORMAT, feature_matrix, write_metadata  # noqa: E402
from ampel_dask.tiers.units.t2_lightcurve import T2LightCurveFeatures, T2LightCurveFeaturesConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
ACCESS = ["ZTF_PUB", "ZTF_PRIV"]
SOURCE_PRIORITY = ("fink:tns", "alerce:", "fink:cdsxmatch")  # which label wins when an object has several
AGN = {"QSO", "QSO_Candidate", "AGN", "AGN_Candidate", "Seyfert", "Seyfert_1", "Seyfert_2", "Blazar", "BLLac",
       "Blazar_Candidate", "LINER", "LensedImage", "LensedQ"}  # fmt: skip
STELLAR = {"RRLyr", "Cepheid", "Nova", "PN", "PN?", "HotSubdwarf", "Candidate_Hsd", "Candidate_YSO", "YSO", "gammaDor",
           "EllipVar", "HMXB", "XB", "LMXB", "Pulsar", "CV/Nova", "CV", "E", "EB/EW", "RRL", "CEP", "DSCT", "LPV", "Mira",
           "Periodic-Other"}  # fmt: skip


def coarse_label(label: str) -> str | None:
    """Map a SIMBAD / TNS / ALeRCE label to SN, AGN or star; None for what fits none (IR, Radio, ...)."""
    label = label.strip()
    if re.match(r"^(SN|SLSN|Candidate_SN|TDE)", label):
        return "SN"
    if label in AGN:
        return "AGN"
    if label in STELLAR or "*" in label:
        return "star"
    return None


def object_labels(path: Path) -> dict[str, str]:
    """object_id -> coarse class (TNS over ALeRCE over SIMBAD cross-match)."""
    best: dict[str, tuple[int, str]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            cls = coarse_label(row["label"])
            if cls is None:
                continue
            rank = next((i for i, p in enumerate(SOURCE_PRIORITY) if row["label_source"].startswith(p)), len(SOURCE_PRIORITY))
            if row["object_id"] not in best or rank < best[row["object_id"]][0]:
                best[row["object_id"]] = (rank, cls)
    return {k: v[1] for k, v in best.items()}


def labelled_states(archive: Archive, objects: set[str]) -> pa.Table:
    """States of the latest alert of every labelled object in the archive (one sample per object)."""
    tables = []
    wanted = pa.array(sorted(objects))
    for part in archive.partitions(surveys=["ztf"]):
        alerts = archive.read(part)
        alerts = alerts.filter(pc.fill_null(pc.is_in(alerts.column("object_id"), value_set=wanted), False))
        if alerts.num_rows:
            tables.append(build_states(alerts, T1PolicyConfig(), ACCESS))
    if not tables:
        raise SystemExit("no labelled object found in the archive")
    states = pa.concat_tables(tables).combine_chunks()
    order = np.lexsort((states.column("alert_id").to_numpy(), states.column("mjd").to_numpy(), states.column("stock").to_numpy()))
    stock = states.column("stock").to_numpy()[order]
    last = order[np.r_[stock[1:] != stock[:-1], True]]
    return states.take(pa.array(np.sort(last)))


def train(archive: str | Path, labels: str | Path, out: str | Path, features: T2LightCurveFeaturesConfig | None = None,
          n_estimators: int = 50, seed: int = 0, min_class: int = 3) -> dict:  # fmt: skip
    """Fit and save the bundle; returns a summary (samples, classes, training accuracy)."""
    import joblib
    import sklearn
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    by_object = object_labels(Path(labels))
    states = labelled_states(Archive(archive), set(by_object))
    unit = T2LightCurveFeatures(features)
    feats = unit.process(states)
    usable = feats.column("code").to_numpy() == 0
    y = np.array([by_object[o] for o in states.column("object_id").to_pylist()])[usable]
    counts = Counter(y.tolist())
    keep_cls = sorted(k for k, v in counts.items() if v >= min_class)
    if len(keep_cls) < 2:
        raise SystemExit(f"too few labelled samples with features: {dict(counts)}")
    sel = np.isin(y, keep_cls)
    x = feature_matrix(feats.filter(pa.array(usable)), unit.columns)[sel]
    y = y[sel]
    model = Pipeline([
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("forest", RandomForestClassifier(n_estimators=n_estimators, class_weight="balanced", random_state=seed, n_jobs=1)),
    ])  # fmt: skip
    model.fit(x, y)
    summary = {
        "samples": int(len(y)), "classes": {k: int((y == k).sum()) for k in keep_cls},
        "objects_labelled": len(by_object), "states": states.num_rows, "without_features": int((~usable).sum()),
        "train_accuracy": float((model.predict(x) == y).mean()), "sklearn": sklearn.__version__,
    }  # fmt: skip
    bundle = {
        "format": MODEL_FORMAT,
        "model": model,
        "features": unit.columns,
        "classes": [str(k) for k in model.classes_],
        "feature_unit": {"name": unit.name(), "version": str(unit.version), "config": unit.config.model_dump(mode="json")},
        "training": {**summary, "labels": str(labels), "note": "mechanics demo, not a science classifier"},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(bundle, out)
    write_metadata(out, bundle)  # <out>.meta.json: planning a workflow reads this, not the pickle
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="*", help="alert files / folders / tarballs to ingest first")
    ap.add_argument("--archive", help="archive to read (and to ingest --sources into); default: a temp folder")
    ap.add_argument("--labels", default=str(DATA / "labels" / "ztf_object_labels.csv"))
    ap.add_argument("--out", required=True, help="model bundle to write (joblib)")
    ap.add_argument("--n-estimators", type=int, default=50, help="trees; inference costs ~0.1 ms per tree per call, whatever the batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-class", type=int, default=3, help="drop classes with fewer samples")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive or tmp
        if args.sources:
            from ampel_dask.graph.ingest import IngestOptions, ingest

            ingest(args.sources, archive, IngestOptions(workers=0))
        elif not args.archive:
            ap.error("give --sources, --archive, or both")
        summary = train(archive, args.labels, args.out, n_estimators=args.n_estimators, seed=args.seed, min_class=args.min_class)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
