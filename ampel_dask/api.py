"""The Python API a notebook uses: ``import ampel_dask as ad``.

Five calls cover the work: :func:`ingest` alert packets into an archive, :func:`run` a workflow over it,
:func:`open_archive` to look at alerts (lazy; select, then convert), :func:`open_store` to read results as
pandas frames, and units used directly on frames (``DecentFilter(min_ndet=2).verdict(frame)``);
:func:`backtest` tells what a workflow's channels would pass, against labels. The ``ampel-dask`` command
is a thin layer over the same functions.

Examples
--------
>>> import ampel_dask as ad
>>> ad.ingest(["alerts/"], "archive")                                  # doctest: +SKIP
>>> result = ad.run("workflows/ztf_archive.yml", archive="archive", store="store")  # doctest: +SKIP
>>> alerts = ad.open_archive("archive").select(surveys=["ztf"], cone=(150.1, 2.2, 0.5)).to_pandas()  # doctest: +SKIP
>>> ad.open_store("store").objects("DECENT")                            # doctest: +SKIP
>>> ad.backtest("workflows/infant_sne.yml", archive="archive", labels="labels.csv").classes_frame()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .graph.ingest import IngestOptions, IngestReport
from .graph.ingest import ingest as _ingest
from .graph.runner import RunOptions, run_workflow
from .graph.workflow import Workflow, load_workflow
from .io.archive import Archive, Partition, read_part
from .io.stores import ResultStore, store_spec
from .io.stores import open_store as _open_store

if TYPE_CHECKING:
    import pandas as pd

    from .graph.backtest import Backtest


def ingest(sources: str | Path | list[str | Path], archive: str | Path, workers: int | None = 0, progress: bool | None = False, **options: Any) -> IngestReport:
    """Read alert packets into an archive (created if missing).

    Parameters
    ----------
    sources : path or list of paths
        Avro files, folders, globs, nightly tarballs (``.tar.gz``) or broker Parquet dumps.
    archive : path
        The archive folder.
    workers : int or None
        Dask worker processes; ``0`` (the default here) decodes in this process, ``None`` uses all cores.
    progress : bool or None
        Show a progress bar (``None``: when stderr is a terminal).
    **options
        Further :class:`~ampel_dask.io.ingest.IngestOptions` fields (``chunk_mb``, ``schema_dirs``, ...).

    Returns
    -------
    IngestReport
        Counts that reconcile: ``read = ingested + duplicates + quarantined``.
    """
    srcs = [str(s) for s in ([sources] if isinstance(sources, (str, Path)) else sources)]
    return _ingest(srcs, archive, IngestOptions(workers=workers, progress=progress, **options))


def compact(archive: str | Path, target_rows: int = 25_000, nights: tuple[int, int] | None = None, grace_seconds: float = 3600.0) -> dict:
    """Merge each night's parts that are not full into parts of ``target_rows`` (what ``ingest`` does for
    the nights it wrote; ``nights``: only from..to, YYYYMMDD); returns parts before/after and what was done."""
    from .graph.compact import CompactOptions, compact as _compact

    return _compact(archive, CompactOptions(target_rows=target_rows, grace_seconds=grace_seconds), night_range=nights).summary()


@dataclass
class Run:
    """What a finished run made: its counts (``summary``), its manifest and its store."""

    summary: dict
    store: Store

    @property
    def run_id(self) -> str:
        return self.summary["run_id"]

    @property
    def counts(self) -> dict:
        """Alerts, per-channel passed/rejected, T2 computed/reused/failed/recorded, T3 outputs, failures."""
        return {k: self.summary[k] for k in ("alerts", "channels", "t2", "t3", "failures") if k in self.summary}

    @property
    def manifest(self) -> dict:
        """The run manifest: workflow hash, unit versions, inputs with content hashes, timings."""
        return next(m for m in self.store.runs(frame=False) if m.get("run_id") == self.run_id)

    @property
    def outputs(self) -> list[str]:
        """Paths of the T3 outputs (reports, exports)."""
        return list(self.summary.get("t3_outputs", []))

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, alerts={self.summary.get('alerts')}, t2={self.summary.get('t2')}, outputs={len(self.outputs)})"


def run(workflow: str | Path | Workflow | dict, archive: str | Path | None = None, store: str | Path | None = None, cluster: str | None = None,
        workers: int | None = None, client: Any = None, progress: bool | None = False) -> Run:  # fmt: skip
    """Run a workflow (T0 -> T1 -> T2 -> T3 as a Dask graph).

    Parameters
    ----------
    workflow : path, Workflow or dict
        A workflow file, a loaded :class:`~ampel_dask.graph.workflow.Workflow`, or its content as a dict.
    archive, store : path, optional
        Override the workflow's ``archive.path`` / ``store.path`` (``store`` may be a ``mongodb://`` URI).
    cluster : {"local", "slurm", "address"}, optional
        Override ``cluster.kind``.
    workers : int, optional
        Local worker processes (``0``: threads in this process).
    client : distributed.Client, optional
        Run on an existing cluster instead of starting one.

    Returns
    -------
    Run

    Raises
    ------
    ampel_dask.graph.failures.RunFailed
        A unit raised and its failures were not recorded (``on_error: fail``): the message names it, the
        exception's ``summary`` holds the counts; the run manifest is written all the same.
    ampel_dask.graph.guard.PassRatioExceeded
        A channel passed more than its ``max_pass_ratio``: its T3 did not run (``summary`` as above).
    """
    wf = workflow if isinstance(workflow, Workflow) else Workflow.model_validate(workflow) if isinstance(workflow, dict) else load_workflow(workflow)
    opts = RunOptions(archive=str(archive) if archive else None, store=str(store) if store else None, cluster=cluster,  # type: ignore[arg-type]
                      workers=workers, client=client, progress=progress)  # fmt: skip
    summary = run_workflow(wf, opts)
    return Run(summary, Store(_open_store(wf.store.resolve(opts.store))))


def backtest(workflow: str | Path | Workflow | dict, archive: str | Path | None = None, labels: str | Path | None = None,
             nights: tuple[int, int] | None = None, object_column: str | None = None, label_column: str | None = None,
             label_source: str | None = None) -> Backtest:  # fmt: skip
    """What each channel's filters pass, per night, and against labels (``ampel-dask backtest``).

    Parameters
    ----------
    workflow : path, Workflow or dict
    archive : path, optional
        Overrides the workflow's ``archive.path``.
    labels : path, optional
        A CSV/Parquet file of (object, class): ELAsTiCC's truth table (diaObjectId, GENTYPE), ZTF object
        labels (object_id, label); ``object_column`` / ``label_column`` name others, ``label_source`` keeps
        the rows whose ``label_source`` starts with it.
    nights : (int, int), optional
        Only these nights (YYYYMMDD, inclusive).

    Returns
    -------
    Backtest
        ``to_dict()``, ``table()`` (text), ``nights_frame()`` / ``classes_frame()`` (pandas), ``plot(path)``.
    """
    from .graph.backtest import backtest as _backtest, load_labels

    wf = workflow if isinstance(workflow, Workflow) else Workflow.model_validate(workflow) if isinstance(workflow, dict) else load_workflow(workflow)
    lab = load_labels(labels, object_column, label_column, label_source) if labels is not None else None
    return _backtest(wf, archive, lab, nights)


# --- the archive -------------------------------------------------------------------------------------


def open_archive(path: str | Path) -> ArchiveView:
    """An archive, lazily: nothing is read until a ``to_*`` call (see :class:`ArchiveView`)."""
    arch = Archive(path)
    if not arch.exists():
        raise FileNotFoundError(f"{path} is not an ampel-dask archive (no _index.parquet)")
    return ArchiveView(arch)


@dataclass(frozen=True)
class ArchiveView:
    """A selection of an archive's alerts: select by survey, nights, objects and a sky cone; convert to
    pyarrow, pandas or a dask DataFrame. Selections compose (``view.select(...).select(...)``)."""

    archive: Archive
    surveys: tuple[str, ...] | None = None
    nights: tuple[int, int] | None = None  # inclusive range
    stocks: tuple[int, ...] | None = None
    cone: tuple[float, float, float] | None = None  # ra, dec, radius (degrees)
    columns: tuple[str, ...] | None = None

    def select(self, surveys: list[str] | None = None, nights: int | tuple[int, int] | None = None, objects: list[str | int] | None = None,
               cone: tuple[float, float, float] | None = None, columns: list[str] | None = None) -> ArchiveView:  # fmt: skip
        """A narrower view. ``nights``: one YYYYMMDD or an inclusive (from, to); ``objects``: ZTF names,
        LSST diaObjectIds or stocks; ``cone``: (ra, dec, radius) in degrees; ``columns``: only these
        (``dps`` adds each alert's history)."""
        from .graph.explain import resolve_stock

        upd: dict[str, Any] = {}
        if surveys is not None:
            upd["surveys"] = tuple(surveys)
        if nights is not None:
            upd["nights"] = (nights, nights) if isinstance(nights, int) else (int(nights[0]), int(nights[1]))
        if objects is not None:
            upd["stocks"] = tuple(resolve_stock(str(o))[0] for o in objects)
        if cone is not None:
            upd["cone"] = tuple(float(x) for x in cone)
        if columns is not None:
            upd["columns"] = tuple(columns)
        return ArchiveView(**{**self.__dict__, **upd})

    def partitions(self) -> list[Partition]:
        """The archive parts this view reads (by the index: survey, night and time ranges)."""
        parts = self.archive.partitions(list(self.surveys) if self.surveys else None)
        if self.nights:
            parts = [p for p in parts if self.nights[0] <= p.night <= self.nights[1]]
        return parts

    def _filter(self) -> pc.Expression | None:
        expr = None

        def both(e: pc.Expression) -> None:
            nonlocal expr
            expr = e if expr is None else expr & e

        if self.stocks is not None:
            both(pc.field("stock").isin(pa.array(self.stocks, pa.int64())))
        if self.cone is not None:  # a box around the cone first (statistics prune row groups), exact below
            ra, dec, r = self.cone
            both((pc.field("dec") >= dec - r) & (pc.field("dec") <= dec + r))
        return expr

    def to_arrow(self) -> pa.Table:
        """The selected alerts as one Arrow table (``dps``: histories as ``list<struct>``, when asked for)."""
        return self._read(histories=True)

    def _read(self, histories: bool) -> pa.Table:
        want = list(self.columns) if self.columns else None
        flat_cols = None if want is None else sorted({*(c for c in want if c != "dps"), "alert_id", "stock", "ra", "dec"})  # alert_id: joins dps
        tables = []
        for part in self.partitions():
            path = self.archive.root / part.path
            t = pads.dataset(path, format="parquet").to_table(columns=flat_cols, filter=self._filter())
            if self.cone is not None:
                t = t.filter(pa.array(_in_cone(t, *self.cone)))
            if histories and t.num_rows and (want is None or "dps" in want):
                t = _with_dps(t, path)
            tables.append(t)
        if not tables:
            return pa.table({})
        table = pa.concat_tables(tables, promote_options="default")
        return table.select([c for c in want if c in table.column_names]) if want else table

    def to_pandas(self) -> pd.DataFrame:
        """The selected alerts as a pandas DataFrame (histories as lists of dicts, if selected)."""
        return self.to_arrow().to_pandas()

    def to_hats(self, path: str | Path, name: str = "alerts", margin_arcsec: float = 10.0) -> Path:
        """The selected alerts' flat columns as a HATS collection (catalog + margin) that
        ``lsdb.open_catalog`` opens (see :mod:`ampel_dask.graph.hats`)."""
        from .graph.hats import write_hats

        return write_hats(self._read(histories=False), path, name, margin_arcsec)

    def to_dask(self) -> Any:
        """The selected alerts' flat columns as a lazy ``dask.dataframe`` (one partition per archive part)."""
        import dask.dataframe as dd

        paths = [str(self.archive.root / p.path) for p in self.partitions()]
        cols = None if self.columns is None else [c for c in self.columns if c != "dps"]
        filters = None
        if self.stocks is not None:
            filters = [("stock", "in", list(self.stocks))]
        df = dd.read_parquet(paths, columns=cols, filters=filters)
        if self.cone is not None:
            ra, dec, r = self.cone
            df = df[df.map_partitions(lambda p: _in_cone_frame(p, ra, dec, r), meta=(None, bool))]
        return df

    def __repr__(self) -> str:
        parts = self.partitions()
        return f"ArchiveView({str(self.archive.root)!r}: {len(parts)} part(s), {sum(p.rows for p in parts)} alerts before object/cone cuts)"


def _in_cone(t: pa.Table, ra: float, dec: float, r: float) -> np.ndarray:
    from .tiers.sky import angular_distance

    return angular_distance(t.column("ra").to_numpy(zero_copy_only=False), t.column("dec").to_numpy(zero_copy_only=False), ra, dec) <= r


def _in_cone_frame(frame: Any, ra: float, dec: float, r: float) -> Any:
    from .tiers.sky import angular_distance

    return angular_distance(frame["ra"].to_numpy(), frame["dec"].to_numpy(), ra, dec) <= r


def _with_dps(t: pa.Table, path: Path) -> pa.Table:
    """Join each selected alert's history back (histories are stored per part in row order)."""
    full = read_part(path, ["alert_id", "dps"])
    ids = full.column("alert_id").to_numpy()
    by_id = np.argsort(ids)
    at = by_id[np.searchsorted(ids, t.column("alert_id").to_numpy(), sorter=by_id)]
    return t.append_column("dps", full.column("dps").take(pa.array(at)))


# --- the result store -------------------------------------------------------------------------------


def open_store(path: str | Path) -> Store:
    """A result store (a Parquet folder or a ``mongodb://`` URI), read as pandas frames."""
    st = _open_store(store_spec(path))
    if not st.manifests():
        raise FileNotFoundError(f"{path}: no result store here (no run manifests)")
    return Store(st)


@dataclass
class Store:
    """Results as pandas frames: runs, states per channel, T2 results per unit, each channel's objects
    with their latest T2 columns, and one object's provenance chain."""

    backend: ResultStore
    _frames: dict = field(default_factory=dict, repr=False)

    def runs(self, frame: bool = True) -> Any:
        """One row per run (id, workflow, alerts, seconds, ...), oldest first; ``frame=False``: manifests."""
        ms = sorted(self.backend.manifests(), key=lambda m: m.get("started", ""))
        if not frame:
            return ms
        import pandas as pd

        keep = ("run_id", "workflow", "workflow_hash", "status", "started", "alerts", "seconds", "tasks")
        return pd.DataFrame([{k: m.get(k) for k in keep} | {"t2_computed": (m.get("t2") or {}).get("computed"),
                                                             "t2_reused": (m.get("t2") or {}).get("reused"),
                                                             "t2_failed": (m.get("t2") or {}).get("failed")} for m in ms])  # fmt: skip

    def channels(self) -> list[str]:
        return self.backend.channels()

    def states(self, channel: str, with_datapoints: bool = False) -> pd.DataFrame:
        """The channel's states (one per alert it accepted): state_id, stock, object_id, alert_id, mjd, ..."""
        cols = None if with_datapoints else ["state_id", "stock", "object_id", "alert_id", "survey", "mjd", "ra", "dec"]
        t = self.backend.read_states(channel, columns=cols)
        if t is None:
            raise KeyError(f"no states of channel {channel!r} in this store (channels: {', '.join(self.channels()) or 'none'})")
        return t.to_pandas()

    def units(self) -> list[str]:
        return sorted({u for u, _ in self.backend.t2_units()})

    def t2(self, unit: str) -> pd.DataFrame:
        """Every stored result of a T2 unit (all its configs), with provenance columns."""
        t = self._t2(unit)
        if t is None:
            raise KeyError(f"no results of T2 unit {unit!r} in this store (units: {', '.join(self.units()) or 'none'})")
        return t.to_pandas()

    def _t2(self, unit: str) -> pa.Table | None:
        tables = [t for u, k in self.backend.t2_units() if u == unit and (t := self.backend.read_t2(u, k)) is not None]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def objects(self, channel: str) -> pd.DataFrame:
        """One row per object of the channel: its latest state, with the latest T2 results of that state
        as ``<Unit>__<column>`` columns (what the channel's T3 units see)."""
        from .graph.selection import left_join
        from .io.arrays import first_rows, order_by
        from .io.stores import FAILURE, PROVENANCE
        from .keys import id_values

        states = self.backend.read_states(channel, columns=["state_id", "stock", "object_id", "alert_id", "survey", "mjd", "ra", "dec"])
        if states is None:
            raise KeyError(f"no states of channel {channel!r} in this store")
        stock, mjd, alert = (states.column(c).to_numpy() for c in ("stock", "mjd", "alert_id"))
        order = order_by((stock, "ascending"), (mjd, "descending"), (alert, "descending"))
        sel = states.take(pa.array(order[np.r_[True, stock[order][1:] != stock[order][:-1]]]))
        failed_units = {u for u, _ in self.backend.t2_failure_units()}
        for unit in sorted(set(self.units()) | failed_units):
            res = self._t2(unit)
            pieces = []
            if res is not None:
                res = res.filter(pc.is_in(res.column("state_id"), value_set=sel.column("state_id")))
                pieces.append(res.select(["state_id", *[c for c in res.column_names if c not in PROVENANCE or c == "code"]]))
            if unit in failed_units:  # recorded failures (on_error: record) of states without a result since: as T3 sees them
                done = res.column("state_id") if res is not None else pa.array([], sel.schema.field("state_id").type)
                open_ = pc.filter(sel.column("state_id"), pc.invert(pc.is_in(sel.column("state_id"), value_set=done)))
                fails = [t for u, k in self.backend.t2_failure_units() if u == unit and (t := self.backend.read_t2_failures(u, k, id_values(open_))) is not None]
                pieces += [t.select(["state_id", "code", FAILURE]) for t in fails if t.num_rows]
            right = pa.concat_tables(pieces, promote_options="default") if pieces else None
            if right is not None and right.num_rows:
                sel = left_join(sel, right.take(pa.array(first_rows(id_values(right.column("state_id"))))), prefix=f"{unit}__")
        return sel.to_pandas()

    def to_hats(self, channel: str, path: str | Path, margin_arcsec: float = 10.0) -> Path:
        """The channel's objects (latest state with its T2 columns, as :meth:`objects`) as a HATS
        collection named after the channel."""
        from .graph.hats import write_hats

        return write_hats(self.objects(channel), path, channel, margin_arcsec)

    def explain(self, obj: str | int) -> dict:
        """One object's chain: alerts -> states per channel -> T2 results -> T3 outputs, with run ids."""
        from .graph.explain import explain

        return explain(str(obj), self.backend.spec.get("uri") or self.backend.spec["path"])


__all__ = ["ingest", "compact", "run", "backtest", "open_archive", "open_store", "Run", "ArchiveView", "Store", "IngestReport"]
