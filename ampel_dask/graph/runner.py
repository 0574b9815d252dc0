"""Run a workflow: compile, execute on a Dask cluster, reconcile counts, write the run manifest."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Iterator, Literal

from .. import __version__
from ..io.archive import Archive
from ..io.files import checkpoint
from ..io.locks import scratch_dir, sweep
from ..io.stores import StoreFormatError, open_store
from ..keys import T2, T3, stage_of, task_key
from .compile import CompiledRun, compile_run
from .failures import NOUN, Blocked, RunFailed, UnitFailed, merge, run_reason, t3_blocked
from .guard import PassRatioExceeded, limits, over_limit
from .plan import check_columns, plan_workflow, unit_versions
from .progress import Progress, as_finished, on_terminal
from .watchdog import StalledRun, Watchdog
from .workers import WORKER_MALLOC
from .workflow import Workflow, WorkflowError

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("ampel_dask")


@dataclass
class RunOptions:
    """How one run goes, besides what the workflow says (command-line overrides and the callers' needs)."""

    archive: str | None = None
    store: str | None = None
    workers: int | None = None
    progress: bool | None = None
    cluster: Literal["local", "slurm", "address"] | None = None  # override of workflow.cluster.kind
    jobs: int | None = None
    client: Client | None = None  # an existing client (tests, notebooks, live mode)
    run_id: str | None = None  # chosen in advance (``submit`` ties a SLURM job to its run)
    partitions: list[str] | None = None  # only these archive parts (paths), e.g. a live micro-batch's
    t3_states: dict[str, list[str]] | None = None  # channel -> earlier runs' state names T3 reads too (live)
    manifest_extra: dict | None = None  # more provenance for the manifest (live: topic, offsets, batch)
    echo: Callable[[str], None] | None = None  # where human-readable lines go (stderr on the CLI)
    wait: float | None = 0  # seconds to wait for a store another run holds (then io.locks.Busy); None = for ever


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def run_workflow(wf: Workflow, opts: RunOptions | None = None) -> dict:
    """Run ``wf``; one run per store at a time: the store is held for the whole run (``opts.wait``: how
    long to wait for another run's; :class:`~ampel_dask.io.locks.Busy` names it). First removes the
    scratch a killed run or ingest left (shuffle folders, staging folders whose owner is gone)."""
    opts = opts or RunOptions()
    if opts.run_id is None:
        opts = replace(opts, run_id=new_run_id())
    store = open_store(wf.store.resolve(opts.store))
    try:
        store.check_format()  # a store of another key format is refused before anything is written to it
    except StoreFormatError as exc:
        raise WorkflowError(str(exc)) from None
    with store.locked(opts.run_id, opts.wait):
        shuffle_root = Path(store.shuffle_dir(opts.run_id, "_")).parent.parent
        swept = _sweep(shuffle_root, opts.archive or wf.archive.path)
        if swept:
            (opts.echo or log.warning)(f"removed scratch left by killed runs/ingests: {', '.join(f'{k} {len(v)}' for k, v in swept.items())}")
            opts = replace(opts, manifest_extra={**(opts.manifest_extra or {}), "swept": swept})
        try:
            with scratch_dir(shuffle_root / opts.run_id, {"run_id": opts.run_id}):  # held: no other run sweeps it
                return _run_workflow(wf, opts)
        finally:
            try:
                shuffle_root.rmdir()  # _shuffle itself, when no other run's scratch is in it
            except OSError:
                pass


def _sweep(shuffle_root: Path, archive_path: str | None) -> dict[str, list[str]]:
    """Scratch folders whose owners died (their lock is free): a killed run's shuffle, a killed ingest's
    staging in the archive; a live owner's are left alone (``io/locks.sweep``)."""
    swept = {"shuffle": sweep(shuffle_root), "archive_tmp": sweep(Archive(Path(archive_path)).tmp_dir) if archive_path else []}
    return {k: v for k, v in swept.items() if v}


def _run_workflow(wf: Workflow, opts: RunOptions) -> dict:
    echo = opts.echo or (lambda *_: None)
    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat()
    plans = plan_workflow(wf)
    archive_path = opts.archive or wf.archive.path
    if not archive_path:
        raise WorkflowError("no archive: give --archive or archive.path in the workflow")
    archive = Archive(Path(archive_path).resolve())
    if not archive.exists():
        raise WorkflowError(f"{archive_path} is not an ampel-dask archive (run `ampel-dask ingest ... --archive {archive_path}` first)")
    store = open_store(wf.store.resolve(opts.store))
    try:
        store.check_format(create=True)
    except StoreFormatError as exc:
        raise WorkflowError(str(exc)) from None
    run_id = opts.run_id or new_run_id()
    parts = [p for p in archive.partitions() if wf.archive.wants(p.survey, p.night)]
    if opts.partitions is not None:
        wanted = set(opts.partitions)
        parts = [p for p in parts if p.path in wanted]
    check_columns(wf, plans, {p.survey for p in parts})
    t_compile = time.perf_counter()
    rows = sum(p.rows for p in parts)
    run = compile_run(plans, archive, parts, store, run_id, wf.buckets_for(rows), wf.batch_rows, opts.t3_states, frozenset(limits(wf)),
                      kept_buckets=wf.buckets_for(rows, kept=True), stage_rows=wf.stage_rows)  # fmt: skip
    t_exec = time.perf_counter()
    results: dict[str, Any] = {}
    raised: dict[str, UnitFailed] = {}  # sink -> the T0, T1, T3 unit failure it raised (T2's come in the stages' counts)
    dashboard = None
    workers: list[dict] = []
    stopped = None  # why guarded channels' T3 did not run (graph/guard.py)
    if run.graph or run.held:
        with _client(wf, opts, store.root) as client:
            dashboard = getattr(client, "dashboard_link", None)
            if dashboard and on_terminal(opts.progress):
                echo(f"Dask dashboard: {dashboard}")
            if run.graph:
                results, raised = _execute(client, run, opts.progress, wf.cluster.stall_timeout)
            if run.held and not (stopped := over_limit(store, run, wf)):  # T0 counts known: within the limits
                held = _gate_held(run, results, raised)
                done, more = _execute(client, CompiledRun(graph=held, sinks=run.held_sinks), opts.progress, wf.cluster.stall_timeout)
                results.update(done)
                raised.update(more)
            client.run(checkpoint)  # every worker makes what it wrote durable (files, markers, folders) before the manifest
            workers = _workers(client)
    failures = _failures(run, results, raised, plans)
    why = run_reason(failures)  # None: nothing failed, or every failure was recorded
    # states a work unit wrote anew (a night added, history extended) replace the old ones in the store;
    # not in a run over chosen parts (a live batch): its work units are not the whole selection, and
    # every older batch's states would be read to find none to remove; not after a failed run either
    keep = opts.partitions is not None or why is not None
    superseded = {} if keep else {c: n for c, names in run.t1_names.items() if (n := store.prune_states(c, names))}
    t_done = time.perf_counter()
    for d in run.shuffle_dirs:
        shutil.rmtree(d, ignore_errors=True)
        for parent in (Path(d).parent, Path(d).parent.parent):  # _shuffle/<run id>, then _shuffle, if empty
            try:
                parent.rmdir()
            except OSError:
                break
    summary = _summarise(run, results, store, plans, parts, run_id)
    summary["status"] = "failed" if why else "stopped" if stopped else "ok"
    summary["failures"] = failures
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    if stopped:
        summary["stopped"] = stopped
    elif run.held:
        summary["tasks"] += CompiledRun(graph=run.held).tasks
    if not run.graph and not run.held:
        summary["note"] = f"nothing to compute: all {len(parts)} partition(s) already processed with this workflow"
    selected = {p.path for p in parts}
    manifest = {
        **summary,
        "workflow": wf.name,
        "workflow_hash": wf.hash,
        "ampel_dask": __version__,
        "python": platform.python_version(),
        "units": unit_versions(plans),
        "archive": str(archive.root),
        "store": store.spec,
        "inputs": [{"path": p.path, "content_hash": p.content_hash, "rows": p.rows} for p in parts],
        # a history channel joins datapoints of every part of its surveys, beyond the selection
        "history_inputs": [{"path": p.path, "content_hash": p.content_hash} for p in run.history_partitions if p.path not in selected],
        "timings": {"compile": round(t_exec - t_compile, 3), "execute": round(t_done - t_exec, 3), "total": summary["seconds"]},
        "dashboard": dashboard,
        "workers": workers,
        "started": started,
        "superseded_state_sets": superseded,
        **(opts.manifest_extra or {}),
    }
    store.write_manifest(run_id, manifest)
    # after the manifest: `explain` and `status` can say what happened (states and T2 results are stored)
    if why:
        raise RunFailed(why + (f"; and {stopped}" if stopped else ""), summary)
    if stopped:
        raise PassRatioExceeded(stopped, summary)
    return summary


def _workers(client) -> list[dict]:
    """Where the graph ran: each worker's host, pid, SLURM job and malloc settings (provenance for
    cluster runs; the allocator settings move a run's speed, see ``graph/workers.py``)."""

    def where() -> dict:
        import dask

        return {"host": platform.node(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "malloc": {k: os.environ.get(k) for k in WORKER_MALLOC}, "profiler": dask.config.get("distributed.worker.profile.enabled")}  # fmt: skip

    try:
        info = client.run(where)
    except Exception:  # a worker leaving while we ask must not fail the run
        return []
    return [{"address": addr, **v} for addr, v in sorted(info.items())]


@contextmanager
def _client(wf: Workflow, opts: RunOptions, store_root: Path) -> Iterator[Any]:
    if opts.client is not None:
        yield opts.client
        return
    from .cluster import make_cluster, slurm_log_dir

    with make_cluster(wf.cluster.overridden(opts.cluster, opts.workers, opts.jobs), slurm_log_dir(store_root)) as client:
        yield client


def _execute(client, run: CompiledRun, progress: bool | None, stall_timeout: float | None = None) -> tuple[dict, dict[str, UnitFailed]]:
    """The sinks' results, and the unit failures they raised, by sink (the tasks that depend on a failed
    task raise its failure too: :func:`_failures` counts each once); the work that does not depend on a
    failure goes on."""
    from concurrent.futures import CancelledError

    futures = client.get(run.graph, run.sinks, sync=False)
    results = {}
    raised: dict[str, UnitFailed] = {}
    with Progress(progress, len(futures), "run") as bar, Watchdog(client, futures, stall_timeout) as dog:
        for fut in as_finished(futures):
            try:
                value = fut.result()
            except CancelledError:
                if dog.reason:
                    raise StalledRun(dog.reason) from None
                raise
            except UnitFailed as exc:
                raised[fut.key] = exc
                value = None
            if value is not None and not hasattr(value, "num_rows"):  # T1 sinks return tables: keep only small summaries
                results[fut.key] = value
            bar.update(1)
    return results, raised


def _gate_held(run: CompiledRun, results: dict, raised: dict[str, UnitFailed]) -> dict:
    """The held T3 graph (channels with a max_pass_ratio), where a channel whose states or T2 results a
    unit failed on without recording it gets no selection (``Blocked``), as in the main graph: its held
    selection does not wait for those tasks (they ran before), so their outcome is looked up here."""
    held = dict(run.held)
    for channel, sel_key in run.held_selections.items():
        upstream = run.produced_by.get(channel, [])
        why = t3_blocked(channel, tuple(results.get(k) for k in upstream)) or next((str(raised[k]) for k in upstream if k in raised), None)
        if why and sel_key in held:
            held[sel_key] = Blocked(why)
    return held


def _failures(run: CompiledRun, results: dict, raised: dict[str, UnitFailed], plans) -> list[dict]:
    """Every unit failure of the run, one entry per unit (and policy): T0, T1, T2 (from the stages'
    counts, in graph order), T3; a T0 failure names every channel that shares the failed filter chain.
    A failure is counted once, however many sinks raised it (``where``: the task that failed)."""
    t0_of = {p.name: p.t0_key for p in plans}
    found = []
    once = {exc.where: exc for exc in raised.values()}
    for exc in sorted(once.values(), key=lambda e: (list(NOUN).index(e.tier), e.where)):
        f = exc.as_dict()
        if exc.tier == "T0":
            f["channels"] = [p.name for p in plans if p.t0_key == t0_of.get(exc.channels[0])]
        found.append(f)
    stages = [results.get(task_key(T2, name)) or {} for name in run.t2_names]
    found += [f for res in stages for f in res.get("failures", [])]
    order = list(NOUN)
    return sorted(merge(found), key=lambda f: order.index(f["tier"]))


def _summarise(run: CompiledRun, results: dict, store, plans, parts, run_id: str) -> dict:
    channels = {}
    for c in plans:
        agg = {"passed": 0, "rejected": 0, "reasons": {}}
        for name in run.count_names[c.name]:
            info = store.task_info(name) or {}
            agg["passed"] += info.get("passed", 0)
            agg["rejected"] += info.get("rejected", 0)
            for k, v in info.get("reasons", {}).items():
                agg["reasons"][k] = agg["reasons"].get(k, 0) + v
        channels[c.name] = agg
    computed = reused = failed = recorded = 0
    by_unit: dict[str, dict] = {}
    for name in run.t2_names:
        res = results.get(task_key(T2, name))
        if res is None:  # skipped: done in an earlier run, everything reused now
            info = store.task_info(name) or {}
            for u, c in info.get("units", {}).items():
                d = by_unit.setdefault(u, {"computed": 0, "reused": 0, "failed": 0, "recorded": 0})
                n = c.get("states", c.get("points", 0))  # a T2PointUnit counts datapoints
                d["reused"] += n
                reused += n
            continue
        computed += res["computed"]
        reused += res["reused"]
        failed += res["failed"]
        recorded += res.get("recorded", 0)
        for u, c in res["units"].items():
            d = by_unit.setdefault(u, {"computed": 0, "reused": 0, "failed": 0, "recorded": 0})
            d["computed"] += c["computed"]
            d["reused"] += c["reused"]
            d["failed"] += c.get("failed", 0)
            d["recorded"] += c.get("recorded", 0)
    t3 = [r for k, r in results.items() if stage_of(k) == T3]
    skipped = sorted({r["channel"]: r["skipped"] for r in t3 if r.get("skipped")}.items())
    outputs = sum(len(r.get("outputs", [])) for r in t3)
    t3_paths = [o.get("path") for r in t3 for o in r.get("outputs", []) if o.get("path")]
    alerts = sum(p.rows for p in parts)
    return {
        "run_id": run_id,
        "alerts": alerts,
        # alerts = passed + rejected + not_processed (only a failed run leaves alerts not processed)
        "channels": {k: {"passed": v["passed"], "rejected": v["rejected"], **({"not_processed": n} if (n := alerts - v["passed"] - v["rejected"]) else {})}
                     for k, v in channels.items()},  # fmt: skip
        "t2": {"computed": computed, "reused": reused, "failed": failed, "recorded": recorded},
        "t3": {"outputs": outputs, **({"not_run": dict(skipped)} if skipped else {})},
        "tasks": run.tasks,
        "rejections": {k: v["reasons"] for k, v in channels.items()},
        "t2_units": by_unit,
        "t3_outputs": t3_paths,
        "partitions": {"total": len(parts), "skipped": run.skipped_partitions},
        "state_names": run.t1_names,  # channel -> store names of this run's states (live mode's T3 scope)
    }


__all__ = ["run_workflow", "RunOptions", "RunFailed", "new_run_id", "os"]
