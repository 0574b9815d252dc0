"""Keys that cannot collide and that cover what was computed.

Oracles: a slow plain-Python content id (sha256 over each datapoint's canonical field tuple, sorted, so
independent of order), whose partition of generated states (same content <-> same id) the vectorised
ids must induce too; plain-Python sorting and membership for the 128-bit id helpers; end-to-end runs on
real alerts (../shared/data) with one datapoint value altered in a copy of a packet; a monkeypatched
library version; a plain-Python per-datapoint photometry for T2PointPhotometry.
"""

from __future__ import annotations

import bisect

import hashlib
import importlib.metadata
import math
import shutil
from collections import Counter
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ampel_dask import keys
from ampel_dask.graph.explain import explain
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.graph.plan import plan_workflow, unit_versions
from ampel_dask.graph.provenance import with_provenance
from ampel_dask.graph.runner import RunOptions, run_workflow
from ampel_dask.graph.selection import left_join
from ampel_dask.graph.tasks import _dep_results
from ampel_dask.graph.workflow import Workflow
from ampel_dask.io.archive import Archive
from ampel_dask.io.arrays import contains, first_rows, lookup, merged, search, sorted_unique
from ampel_dask.io.layout import DATAPOINT
from ampel_dask.io.stores import ParquetStore
from ampel_dask.io.stores.mongo import MongoStore
from ampel_dask.tiers.states import T1PolicyConfig, build_states
from ampel_dask.tiers.units.t2_lightcurve import T2LightCurveFeatures
from ampel_dask.tiers.units.t2_summary import T2LightCurveSummary

from .server_fixtures import mongo, mongo_db  # noqa: F401

NAMES = [f.name for f in DATAPOINT]
STATES = pa.schema([("stock", pa.int64()), ("dps", pa.list_(DATAPOINT))])
NAN = float("nan")

# ---------------------------------------------------------------------------------------------------
# the slow reference: a content id in plain Python
# ---------------------------------------------------------------------------------------------------


def canonical(value: object) -> str:
    """A field value as text that tells apart what a unit can tell apart: null, NaN (one NaN), -0.0."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else value.hex()
    return repr(value)


def reference_point(dp: dict) -> str:
    return repr(tuple((name, canonical(dp[name])) for name in NAMES))


def reference_state(stock: int, dps: list[dict]) -> str:
    """sha256 of the object and the sorted canonical datapoints (a multiset: order does not count)."""
    return hashlib.sha256(repr((stock, sorted(reference_point(dp) for dp in dps))).encode()).hexdigest()


def vectorised_states(table: pa.Table) -> list[bytes]:
    """The code under test: keys.datapoint_lanes + keys.state_ids over a table of states."""
    arr = table.column("dps").combine_chunks()
    offsets = np.asarray(arr.offsets)
    flat = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    rows = np.repeat(np.arange(len(arr)), np.diff(offsets))
    ids = keys.state_ids(table.column("stock").to_numpy(), keys.datapoint_lanes(flat), rows, table.num_rows)
    return [bytes(i) for i in ids]


def same_partition(a: list, b: list) -> bool:
    """Do ``a`` and ``b`` group the same positions together (a[i] == a[j] exactly when b[i] == b[j])?"""
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


FIELD_VALUES = {
    "dp_id": [1, 2, -3, 2**62],
    "mjd": [59000.0, 59000.5, None, NAN],
    "band": ["g", "r", "ztfg", "", None],
    "kind": [0, 1, 2],
    "flux": [1.0, -1.0, 0.0, -0.0, 1.0000000000000002, NAN, None],
    "flux_err": [1.0, 0.5, None],
    "mag": [20.0, 20.000000000000004, NAN, None],
    "mag_err": [0.1, None],
    "maglim": [21.0, None],
    "ra": [1.0, 359.0, None],
    "dec": [2.0, -2.0, None],
    "programid": [1, 2, 0, None],
    "rb": [0.5, 0.25, NAN, None],
    "flags": [0, 1, -1, None],
}
assert list(FIELD_VALUES) == NAMES
datapoints = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in FIELD_VALUES.items()})


@st.composite
def state_batches(draw, one_byte_bands: bool = False) -> list[tuple[int, list[dict]]]:
    """States drawn from a small pool of datapoints (so ids repeat), and states made from earlier ones:
    permuted, one field of one datapoint changed (to null, NaN, -0.0, the next float ...), extended."""
    values = dict(FIELD_VALUES, band=["g", "r"]) if one_byte_bands else FIELD_VALUES
    points = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in values.items()})
    pool = draw(st.lists(points, min_size=1, max_size=6))
    states: list[tuple[int, list[dict]]] = []
    for _ in range(draw(st.integers(1, 8))):
        how = draw(st.sampled_from(["new", "permute", "alter", "extend"])) if states else "new"
        if how == "new":
            states.append((draw(st.sampled_from([7, 8])), draw(st.lists(st.sampled_from(pool), max_size=5))))
            continue
        stock, base = draw(st.sampled_from(states))
        if how == "permute":
            dps = draw(st.permutations(base))
        elif how == "alter" and base:
            i, name = draw(st.integers(0, len(base) - 1)), draw(st.sampled_from(NAMES))
            dps = [*base[:i], {**base[i], name: draw(st.sampled_from(values[name]))}, *base[i + 1 :]]
        else:
            dps = [*base, draw(st.sampled_from(pool))]
        states.append((stock, list(dps)))
    return states


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=state_batches())
def test_content_ids_partition_states_as_the_plain_python_reference(batch):
    table = pa.Table.from_pylist([{"stock": s, "dps": dps} for s, dps in batch], schema=STATES)
    stored = table.to_pylist()  # the values as a unit reads them (rb is a float32)
    want = [reference_state(r["stock"], r["dps"]) for r in stored]
    got = vectorised_states(table)
    assert all(len(g) == 16 for g in got)
    assert same_partition(got, want)
    # a state's id is its own: the same alone as among other states, in blocks of any size
    alone = [vectorised_states(table.slice(i, 1))[0] for i in range(table.num_rows)]
    block = keys.BLOCK
    try:
        keys.BLOCK = 2
        small_blocks = vectorised_states(table)
    finally:
        keys.BLOCK = block
    assert alone == got == small_blocks
    # the datapoints' own ids (what T2PointUnit results are keyed by) partition them as their content does
    flat = [dp for r in stored for dp in r["dps"]]
    if flat:
        lanes = keys.datapoint_lanes(pa.array(flat, DATAPOINT))
        assert same_partition([bytes(i) for i in keys.point_ids(lanes)], [reference_point(dp) for dp in flat])


@settings(max_examples=100, deadline=None)
@given(batch=state_batches(one_byte_bands=True), other=st.sampled_from(["ztfg", "", None]))
def test_one_byte_bands_hash_as_any_other_string(batch, other):
    """Bands of one byte are looked up in a table, other strings hashed one by one: a batch that holds
    a longer band (or a null one) gives its other states the same ids."""
    table = pa.Table.from_pylist([{"stock": s, "dps": dps} for s, dps in batch], schema=STATES)
    extra = pa.Table.from_pylist([{"stock": 1, "dps": [{**batch[0][1][0], "band": other}] if batch[0][1] else []}], schema=STATES)
    assert vectorised_states(pa.concat_tables([table, extra]))[: table.num_rows] == vectorised_states(table)


def with_dictionary_band(table: pa.Table, index_type: pa.DataType, extra: list[str]) -> pa.Table:
    """``table`` with each datapoint's ``band`` dictionary-encoded: indices of ``index_type`` into a
    dictionary that holds ``extra`` values no datapoint uses, first (so indices differ from a plain
    encoding's), then the bands in use."""
    arr = table.column("dps").combine_chunks()
    flat = arr.values
    band = flat.field("band").to_pylist()
    words = [*extra, *sorted({b for b in band if b is not None} - set(extra))]
    idx = pa.array([None if b is None else words.index(b) for b in band], index_type)
    enc = pa.DictionaryArray.from_arrays(idx, pa.array(words, pa.string()))
    fields = [enc if f.name == "band" else flat.field(f.name) for f in DATAPOINT]
    types = [pa.field("band", enc.type) if f.name == "band" else f for f in DATAPOINT]
    dps = pa.ListArray.from_arrays(arr.offsets, pa.StructArray.from_arrays(fields, fields=types))
    return pa.table({"stock": table.column("stock"), "dps": dps})


@settings(max_examples=100, deadline=None)
@given(batch=state_batches(), index_type=st.sampled_from([pa.int8(), pa.int32()]), extra=st.lists(st.sampled_from(["i", "ztfr", "z"]), unique=True))
def test_dictionary_encoded_bands_hash_as_plain_strings(batch, index_type, extra):
    """An encoding is not content: states whose ``band`` is dictionary-encoded (the loop keeps it so)
    get the ids of the same states with plain strings, and their datapoints the same point ids."""
    table = pa.Table.from_pylist([{"stock": s, "dps": dps} for s, dps in batch], schema=STATES)
    enc = with_dictionary_band(table, index_type, extra)
    assert pa.types.is_dictionary(enc.column("dps").type.value_type.field("band").type)
    plain, dict_ = (t.column("dps").combine_chunks().values for t in (table, enc))
    assert dict_.field("band").to_pylist() == plain.field("band").to_pylist()
    assert vectorised_states(enc) == vectorised_states(table)
    assert np.array_equal(keys.point_ids(keys.datapoint_lanes(dict_)), keys.point_ids(keys.datapoint_lanes(plain)))


def test_a_changed_value_in_any_field_changes_the_state_id():
    """Each field of a real-looking datapoint, changed alone (to null, or to another value), gives
    another id; reordering the datapoints does not."""
    base = {"dp_id": 5, "mjd": 59000.25, "band": "r", "kind": 0, "flux": 1500.0, "flux_err": 30.0, "mag": 23.5, "mag_err": 0.02,
            "maglim": 21.0, "ra": 10.0, "dec": 20.0, "programid": 1, "rb": 0.75, "flags": 0}  # fmt: skip
    other = {**base, "dp_id": 6, "mjd": 59001.25}
    states = [[base, other], [other, base]]
    for name in NAMES:
        states.append([{**base, name: None}, other])
        v = base[name]
        changed = "g" if name == "band" else v + 1 if isinstance(v, int) else v * 1.0000001
        states.append([{**base, name: changed}, other])
    got = vectorised_states(pa.Table.from_pylist([{"stock": 3, "dps": s} for s in states], schema=STATES))
    assert got[0] == got[1] and len(set(got)) == len(got) - 1


# ---------------------------------------------------------------------------------------------------
# sorting, de-duplicating and searching 128-bit ids
# ---------------------------------------------------------------------------------------------------

LANE = st.sampled_from([0, 1, 2, 2**63, 2**64 - 1])  # few values: first lanes tie with second lanes apart


def ids_of(pairs: list[tuple[int, int]]) -> np.ndarray:
    return np.frombuffer(b"".join(a.to_bytes(8, "little") + b.to_bytes(8, "little") for a, b in pairs), dtype=keys.ID_DTYPE)


def pairs_of(ids: np.ndarray) -> list[tuple[int, int]]:
    return [(int.from_bytes(bytes(i)[:8], "little"), int.from_bytes(bytes(i)[8:], "little")) for i in ids]


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(LANE, LANE), max_size=40), queries=st.lists(st.tuples(LANE, LANE), max_size=20))
def test_id_helpers_equal_plain_python(pairs, queries):
    ids, q = ids_of(pairs), ids_of(queries)
    assert list(first_rows(ids)) == sorted({p: i for i, p in reversed(list(enumerate(pairs)))}.values())
    uniq = sorted_unique(ids)
    assert pairs_of(uniq) == sorted(set(pairs))  # by first lane, then second, as unsigned numbers
    assert list(contains(uniq, q)) == [p in set(pairs) for p in queries]
    distinct = list(dict.fromkeys(pairs))
    assert list(lookup(ids_of(distinct), q)) == [distinct.index(p) if p in distinct else -1 for p in queries]
    assert pairs_of(merged(uniq, q)) == sorted(set(pairs) | set(queries))  # a sorted cache grown by inserts


@settings(max_examples=200, deadline=None)
@given(old=st.lists(st.integers(-50, 50), max_size=40), new=st.lists(st.integers(-50, 50), max_size=20))
def test_merged_integers_equal_plain_python(old, new):
    assert merged(np.array(sorted(set(old)), dtype=np.int64), np.array(new, dtype=np.int64)).tolist() == sorted(set(old) | set(new))


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 30), LANE), max_size=300), seed=st.integers(0, 2**32 - 1), n=st.integers(1000, 3000))
def test_id_helpers_with_many_queries_equal_plain_python(pairs, seed, n):
    """Past ``SORT_NEEDLES`` queries the binary searches sort them first (``arrays.search``): the
    answers stay those of plain Python sets, with first lanes shared by many ids."""
    rng = np.random.default_rng(seed)
    pool = pairs + [(int(a), int(b)) for a, b in rng.integers(0, 31, size=(50, 2))]
    queries = [pool[i] for i in rng.integers(0, len(pool), n)]
    uniq, q = sorted_unique(ids_of(pairs)), ids_of(queries)
    assert list(contains(uniq, q)) == [p in set(pairs) for p in queries]
    assert pairs_of(merged(uniq, q)) == sorted(set(pairs) | set(queries))
    ints = np.array(sorted({a for a, _ in pairs}), dtype=np.int64)
    qi = np.array([a for a, _ in queries], dtype=np.int64)
    assert list(contains(ints, qi)) == [a in {x for x, _ in pairs} for a in qi.tolist()]
    for side in ("left", "right"):
        assert search(ints, qi, side).tolist() == [bisect.bisect_left(ints.tolist(), a) if side == "left" else bisect.bisect_right(ints.tolist(), a) for a in qi.tolist()]


# ---------------------------------------------------------------------------------------------------
# end to end on real alerts
# ---------------------------------------------------------------------------------------------------

OBJECT = "ZTF21abiuvdk"


def workflow(t2: list) -> Workflow:
    return Workflow.model_validate({"name": "keys", "channels": [{"name": "ALL", "access": ["ZTF_PUB", "ZTF_PRIV"], "t2": t2}]})


def run(archive: Path, store: Path, wf: Workflow) -> dict:
    return run_workflow(wf, RunOptions(archive=str(archive), store=str(store), workers=0, progress=False))


def detections(record: dict) -> list[dict]:
    return [c for c in [record["candidate"], *record["prv_candidates"]] if c.get("candid") is not None and c.get("magpsf") is not None]


@pytest.fixture(scope="module")
def packets(data_dir, manifest, tmp_path_factory) -> dict:
    """The latest packet of ZTF21abiuvdk (ztf/pitt_google) as is, and a copy with the magnitude of one
    earlier detection changed (the same datapoint ids, one value differs), each in an archive of its own."""
    rows = sorted((r for r in manifest["ztf_pitt_google"] if r["object_id"] == OBJECT), key=lambda r: float(r["time"]))
    src = data_dir / rows[-1]["file"]
    with open(src, "rb") as fh:
        reader = fastavro.reader(fh)
        schema, record = reader.writer_schema, next(reader)
    prv = [p for p in record["prv_candidates"] if p.get("candid") is not None and p.get("magpsf") is not None]
    assert len(prv) >= 3
    altered = {**record, "prv_candidates": [dict(p) for p in record["prv_candidates"]]}
    target = next(p for p in altered["prv_candidates"] if p["candid"] == prv[1]["candid"])
    target["magpsf"] = min(d["magpsf"] for d in detections(record)) - 1.5  # brighter than every detection
    root = tmp_path_factory.mktemp("keys")
    (root / "original").mkdir()
    (root / "altered").mkdir()
    shutil.copy(src, root / "original" / src.name)
    with open(root / "altered" / src.name, "wb") as fh:
        fastavro.writer(fh, schema, [altered])
    for name in ("original", "altered"):
        assert ingest([str(root / name)], root / f"archive_{name}", IngestOptions(workers=0, progress=False)).ingested == 1
    return {"root": root, "original": record, "altered": altered, "candid": prv[1]["candid"]}


def test_same_datapoint_ids_other_values_get_other_keys_and_are_computed_apart(packets):
    """One store; the packet, then its copy with one detection's magnitude changed: the copy's state
    has the same datapoint ids, a different state id and T2 key, and is computed (with 64-bit ids of
    datapoint ids it was "reused", with the first packet's results)."""
    root = packets["root"]
    wf = workflow(["T2LightCurveSummary", "T2PointPhotometry"])
    store = ParquetStore(root / "store")
    first = run(root / "archive_original", root / "store", wf)
    s1 = store.read_states("ALL").to_pylist()
    second = run(root / "archive_altered", root / "store", wf)
    s2 = store.read_states("ALL").to_pylist()  # the copy's state set replaced the original's (same alert)
    (a,), (b,) = s1, s2
    assert a["alert_id"] == b["alert_id"] and [d["dp_id"] for d in a["dps"]] == [d["dp_id"] for d in b["dps"]]
    differ = [(x["dp_id"], n) for x, y in zip(a["dps"], b["dps"]) for n in NAMES if canonical(x[n]) != canonical(y[n])]
    assert {dp for dp, _ in differ} == {packets["candid"]} and ("dp_id", "mag") in [("dp_id", n) for _, n in differ]
    assert a["state_id"] != b["state_id"] and len(a["state_id"]) == 16
    assert first["t2_units"]["T2LightCurveSummary"] == second["t2_units"]["T2LightCurveSummary"] == {"computed": 1, "reused": 0, "failed": 0, "recorded": 0}
    # per datapoint: only the changed one is new, every other datapoint's result is reused
    assert first["t2_units"]["T2PointPhotometry"] == {"computed": len(a["dps"]), "reused": 0, "failed": 0, "recorded": 0}
    assert second["t2_units"]["T2PointPhotometry"] == {"computed": 1, "reused": len(b["dps"]) - 1, "failed": 0, "recorded": 0}
    (unit, key), = [u for u in store.t2_units() if u[0] == "T2LightCurveSummary"]
    t2 = store.read_t2(unit, key).to_pylist()
    assert len({r["t2_key"] for r in t2}) == 2 and all(len(r["t2_key"]) == 32 for r in t2)
    peak = {r["state_id"]: r["peak_mag"] for r in t2}  # each result from its own packet's values
    assert peak[a["state_id"]] == pytest.approx(min(d["magpsf"] for d in detections(packets["original"])))
    assert peak[b["state_id"]] == pytest.approx(min(d["magpsf"] for d in detections(packets["altered"])))
    assert peak[a["state_id"]] != pytest.approx(peak[b["state_id"]])


def test_joins_refuse_results_of_other_content(packets, tmp_path):
    """The T3 selection's join and the T2 dependency join take a result only for the state content it
    was computed from: states whose datapoints changed (same ids) find none, the others find theirs."""

    def states(name: str) -> pa.Table:
        """The packet's state, and states of its first 1, 2, 3 datapoints (some before the changed one)."""
        arch = Archive(packets["root"] / f"archive_{name}")
        alert = arch.read(arch.partitions()[0])
        dps = alert.column("dps")[0].as_py()
        cuts = pa.array([dps] + [dps[:k] for k in (1, 2, 3)], alert.schema.field("dps").type)
        alerts = pa.concat_tables([alert] * 4).set_column(alert.column_names.index("dps"), "dps", cuts)
        return build_states(alerts, T1PolicyConfig(kinds=["detection", "upper_limit"]), ["ZTF_PUB"])

    orig, alt = states("original"), states("altered")
    same = [x == y for x, y in zip(orig.column("dps").to_pylist(), alt.column("dps").to_pylist())]  # plain Python
    assert same[0] is False and True in same[1:]
    unit = T2LightCurveSummary()
    results = unit.process(orig).append_column("state_id", orig.column("state_id"))
    joined = left_join(alt, results, prefix="S__")
    assert [v is not None for v in joined.column("S__ndet").to_pylist()] == same
    with pytest.raises(TypeError, match="128-bit content ids"):  # a 64-bit id column (an older store) is refused too
        left_join(alt, results.set_column(results.column_names.index("state_id"), "state_id", pa.array(range(4), pa.int64())), prefix="S__")
    store = ParquetStore(tmp_path / "store")
    store.write_t2(unit.name(), unit.identity.key, "k", with_provenance(unit.process(orig), orig, unit, "r"))
    got = _dep_results(store, unit, alt.filter(pa.array(same)), {})
    assert got.column("state_id").to_pylist() == alt.filter(pa.array(same)).column("state_id").to_pylist()
    with pytest.raises(RuntimeError, match=f"no results of T2LightCurveSummary for {same.count(False)} states"):
        _dep_results(store, unit, alt, {})


def test_a_library_version_bump_changes_the_unit_key(monkeypatch):
    before = {u: u.identity.key for u in (T2LightCurveFeatures(), T2LightCurveSummary())}
    plans = plan_workflow(workflow(["T2LightCurveFeatures"]))
    installed = importlib.metadata.version("light-curve")
    assert unit_versions(plans)[f"T2LightCurveFeatures:{plans[0].t2[0].config_hash}"]["libraries"] == {"light-curve": installed}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "light-curve" else real(name))
    after = {type(u): type(u)().identity.key for u in before}
    assert after[T2LightCurveFeatures] != before_key(before, T2LightCurveFeatures)  # declares light-curve
    assert after[T2LightCurveSummary] == before_key(before, T2LightCurveSummary)  # declares nothing
    plans = plan_workflow(workflow(["T2LightCurveFeatures"]))
    assert unit_versions(plans)[f"T2LightCurveFeatures:{plans[0].t2[0].config_hash}"]["libraries"] == {"light-curve": "99.0"}

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ValueError, match="T2LightCurveFeatures declares library 'light-curve', which is not installed"):
        T2LightCurveFeatures()


def before_key(before: dict, cls: type) -> str:
    return next(k for u, k in before.items() if type(u) is cls)


def test_a_dependent_unit_key_follows_its_dependency(monkeypatch):
    """T2Classifier declares scikit-learn only; its features come from T2LightCurveFeatures, so a new
    light-curve gives it a new key too (results made from the old features are not reused)."""
    from ampel_dask.tiers.units.t2_classifier import T2Classifier

    model = Path(__file__).resolve().parents[1] / "workflows" / "models" / "ztf_classifier.joblib"
    key = T2Classifier(model=str(model)).identity.key
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "light-curve" else real(name))
    assert T2Classifier(model=str(model)).identity.key != key


# ---------------------------------------------------------------------------------------------------
# on the alerts of ztf/pitt_google: library upgrades, T2PointUnit
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pitt(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pitt") / "archive"
    ingest([str(data_dir / "ztf" / "pitt_google")], root, IngestOptions(workers=0, progress=False))
    return root


def test_upgrading_a_declared_library_recomputes(pitt, tmp_path, monkeypatch):
    wf = workflow(["T2LightCurveFeatures", "T2LightCurveSummary"])
    first = run(pitt, tmp_path / "store", wf)
    n = first["t2_units"]["T2LightCurveFeatures"]["computed"]
    assert n > 50 and first["t2_units"]["T2LightCurveSummary"]["computed"] == n
    again = run(pitt, tmp_path / "store", wf)
    assert again["t2"] == {"computed": 0, "reused": 2 * n, "failed": 0, "recorded": 0}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "light-curve" else real(name))
    upgraded = run(pitt, tmp_path / "store", wf)
    assert upgraded["t2_units"]["T2LightCurveFeatures"] == {"computed": n, "reused": 0, "failed": 0, "recorded": 0}  # all again
    assert upgraded["t2_units"]["T2LightCurveSummary"] == {"computed": 0, "reused": n, "failed": 0, "recorded": 0}  # untouched by light-curve


def reference_photometry(dp: dict, min_snr: float = 5.0) -> dict:
    """T2PointPhotometry the plain way, one datapoint: SNR, AB magnitude from the flux in nJy."""
    f, e = dp["flux"], dp["flux_err"]
    if f is None or e is None or not math.isfinite(f) or not math.isfinite(e) or e <= 0:
        return {"snr": None, "mag": None, "mag_err": None, "significant": None, "code": 1}
    bright = f > 0
    return {"snr": f / e, "mag": 31.4 - 2.5 * math.log10(f) if bright else None, "mag_err": 2.5 / math.log(10) * e / f if bright else None,
            "significant": f / e >= min_snr, "code": 0}  # fmt: skip


def test_point_unit_results_equal_plain_python_and_are_computed_once(pitt, tmp_path):
    store_dir = tmp_path / "store"
    first = run(pitt, store_dir, workflow(["T2PointPhotometry"]))
    store = ParquetStore(store_dir)
    states = store.read_states("ALL").to_pylist()
    contents = {}  # distinct datapoint contents (plain Python), by dp_id
    for s in states:
        for dp in s["dps"]:
            contents.setdefault(dp["dp_id"], {})[reference_point(dp)] = dp
    distinct = sum(len(v) for v in contents.values())
    total = sum(len(s["dps"]) for s in states)
    # each distinct datapoint computed once in the run (a later work unit finds what an earlier one computed)
    assert first["t2_units"]["T2PointPhotometry"]["computed"] == distinct < total
    (unit, key), = store.t2_point_units()
    rows = store.read_t2_points(unit, key).to_pylist()
    assert len(rows) == distinct and len({r["point_id"] for r in rows}) == distinct and all(len(r["t2_key"]) == 32 for r in rows)
    fields = ("snr", "mag", "mag_err", "significant", "code")
    by_dp: dict[int, list] = {}
    for r in rows:
        by_dp.setdefault(r["dp_id"], []).append(tuple(r[f] for f in fields))
    assert by_dp.keys() == contents.keys()
    for dp_id, copies in contents.items():  # a datapoint with two differing copies: two results
        want = Counter(tuple(reference_photometry(dp)[f] for f in fields) for dp in copies.values())
        got = by_dp[dp_id]
        assert len(got) == len(want), dp_id
        for w in want:
            assert any(all(g == pytest.approx(x, rel=1e-12) if isinstance(x, float) else g == x for g, x in zip(row, w)) for row in got), (dp_id, w)
    assert {r["code"] for r in rows} == {0, 1}  # detections and upper limits both there
    again = run(pitt, store_dir, workflow(["T2PointPhotometry"]))
    assert again["t2"] == {"computed": 0, "reused": distinct + first["t2"]["reused"], "failed": 0, "recorded": 0}
    info = explain(OBJECT, store_dir)
    mine = {dp["dp_id"] for s in states if s["object_id"] == OBJECT for dp in s["dps"]}
    assert {t["dp_id"] for t in info["t2_points"]} == mine and all(len(t["point_id"]) == 32 for t in info["t2_points"])


def test_point_results_round_trip_through_mongo(pitt, tmp_path, mongo, mongo_db):  # noqa: F811
    run(pitt, tmp_path / "store", workflow(["T2PointPhotometry"]))
    pq_ = ParquetStore(tmp_path / "store")
    (unit, key), = pq_.t2_point_units()
    table = pq_.read_t2_points(unit, key)
    mg = MongoStore(mongo.uri, mongo_db.name, tmp_path / "mongo_files")
    mg.write_t2_points(unit, key, "task", table)
    assert mg.t2_point_units() == [(unit, key)]
    assert [bytes(i) for i in mg.done_point_ids(unit, key)] == [bytes(i) for i in pq_.done_point_ids(unit, key)]
    back = mg.read_t2_points(unit, key)
    assert back.schema.equals(table.schema)
    order = lambda t: t.sort_by("point_id").to_pylist()  # noqa: E731
    assert [{k: v for k, v in r.items()} for r in order(back)] == order(table) or _same_rows(order(back), order(table))
    some = pq_.done_point_ids(unit, key)[::5]
    assert sorted(mg.read_t2_points(unit, key, some).column("point_id").to_pylist()) == sorted(bytes(i) for i in some)


def _same_rows(a: list[dict], b: list[dict]) -> bool:
    """Row equality with NaN equal to NaN."""
    norm = lambda r: {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}  # noqa: E731
    return [norm(r) for r in a] == [norm(r) for r in b]


def test_a_store_of_the_64_bit_era_is_refused_not_mixed(pitt, tmp_path, mongo, mongo_db):  # noqa: F811
    """A store with runs but no key format (what earlier versions wrote) is refused by run (exit 2 from
    the CLI: a WorkflowError) and explain, instead of getting new results beside old 64-bit ids."""
    import json

    from ampel_dask.graph.workflow import WorkflowError
    from ampel_dask.io.stores import StoreFormatError

    old = tmp_path / "old"
    (old / "runs").mkdir(parents=True)
    (old / "runs" / "20250101T000000-abcdef.json").write_text(json.dumps({"run_id": "20250101T000000-abcdef"}))
    with pytest.raises(WorkflowError, match="earlier ampel-dask .64-bit state ids and keys."):
        run(pitt, old, workflow(["T2LightCurveSummary"]))
    with pytest.raises(StoreFormatError, match="use a new store"):
        explain(OBJECT, old)
    assert sorted(p.name for p in old.iterdir()) == ["runs"]  # nothing written
    new = tmp_path / "new"
    run(pitt, new, workflow(["T2LightCurveSummary"]))
    assert (new / "FORMAT").read_text().strip() == keys.KEY_FORMAT
    (new / "FORMAT").write_text("something else\n")
    with pytest.raises(WorkflowError, match="something else"):
        run(pitt, new, workflow(["T2LightCurveSummary"]))
    mg = MongoStore(mongo.uri, mongo_db.name, tmp_path / "mongo_files")
    mg.check_format()  # an empty database: nothing to check, nothing created
    assert mongo_db.list_collection_names() == []
    mg.db.runs.insert_one({"_id": "20250101T000000-abcdef"})
    with pytest.raises(StoreFormatError, match="earlier ampel-dask"):
        mg.check_format(create=True)
