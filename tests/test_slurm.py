"""Workflows on a real one-node SLURM (slurm/start_slurm.sh, started by the `slurm` fixture)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import pytest

from ampel_dask.graph.runner import RunOptions, run_workflow
from ampel_dask.io.stores import ParquetStore
from ampel_dask.graph.workflow import Workflow
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.graph.workers import WORKER_MALLOC

from .slurm_fixture import slurm  # noqa: F401
from .test_graph import t2_rows

REPO = Path(__file__).resolve().parents[1]
CHANNELS = [{"name": "ALL", "access": ["ZTF_PUB", "ZTF_PRIV", "LSST"], "filters": [{"unit": "ExpressionFilter", "config": {"expr": "ndet >= 2"}}],
             "t2": ["T2LightCurveSummary"]}]  # fmt: skip


def slurm_workflow(tmp_path: Path, batch_rows: int = 10000, **cluster) -> Workflow:
    jobqueue = {"log-directory": str(tmp_path / "worker-logs"), "local-directory": str(tmp_path / "scratch"),
                "walltime": "00:10:00", "scheduler-options": {"dashboard_address": ":0"}}  # fmt: skip
    return Workflow.model_validate({"name": "slurm-test", "channels": CHANNELS, "archive": {"nights": {"from": 20181101, "to": 20220731}},
                                    "batch_rows": batch_rows, "cluster": {"kind": "slurm", "config_file": str(REPO / "slurm" / "jobqueue.yaml"), "jobqueue": jobqueue, **cluster}})  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("slurm_archive")
    ingest([str(data_dir / "ztf/fink_ztf_public_20181129.tar.gz"), str(data_dir / "lsst/elasticc_v0_9_alerce.tar.gz")], root, IngestOptions(workers=0, progress=False))
    return root


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("local_store")
    wf = Workflow.model_validate({"name": "slurm-test", "channels": CHANNELS, "archive": {"nights": {"from": 20181101, "to": 20220731}}})
    return store, run_workflow(wf, RunOptions(archive=str(archive), store=str(store), workers=0, progress=False))


@pytest.mark.timeout(300)
def test_workflow_on_slurm_jobs_matches_local_run(slurm, archive, reference, tmp_path):  # noqa: F811
    ref_store, ref = reference
    store = tmp_path / "store"
    summary = run_workflow(slurm_workflow(tmp_path, jobs=2), RunOptions(archive=str(archive), store=str(store), progress=False))
    assert summary["channels"] == ref["channels"] and summary["t2"]["computed"] == ref["t2"]["computed"] > 0
    assert t2_rows(store) == t2_rows(ref_store)
    manifest = json.loads((store / "runs" / f"{summary['run_id']}.json").read_text())
    jobs = {w["slurm_job_id"] for w in manifest["workers"]}
    assert jobs and None not in jobs  # the workers were sbatch jobs
    assert all(w["malloc"] == WORKER_MALLOC for w in manifest["workers"])  # exported by the job prologue
    assert all(w["profiler"] is False for w in manifest["workers"])  # so is QUIET
    stages = [json.loads(p.read_text()) for p in (store / "tasks").glob("*.json")]
    seen = {s["worker"]["slurm_job_id"] for s in stages if s.get("kind") == "t2"}
    assert seen and None not in seen  # and the tasks ran inside them


@pytest.mark.timeout(400)
def test_scancel_of_a_worker_job_mid_run_gives_the_same_results(slurm, archive, reference, tmp_path, monkeypatch):  # noqa: F811
    from ampel_dask.graph import cluster

    monkeypatch.setattr(cluster, "KEEP_INTERVAL", "200ms")  # look for ended jobs often: the run is short
    ref_store, ref = reference
    store = tmp_path / "store"
    # one alert per batch: ~190 stage tasks instead of 16, so there is a "mid-run" to cancel in; a fixed
    # number of jobs, which is kept (the cancelled one is replaced) as an adaptive cluster's minimum is
    wf = slurm_workflow(tmp_path, batch_rows=1, jobs=2)
    result: dict = {}
    errors: list = []

    def target() -> None:
        try:
            result.update(run_workflow(wf, RunOptions(archive=str(archive), store=str(store), progress=False)))
        except Exception as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=target)
    # the scheduler forgets a lost worker's job after distributed.deploy.lost-worker-timeout (15 s), and
    # only then is it replaced: shortened here so that the replacement shows before the run ends
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "200ms"}):
        t.start()
        deadline = time.time() + 180
        while time.time() < deadline and t.is_alive() and len(list((store / "tasks").glob("*.json"))) < 5:
            time.sleep(0.1)
        running = slurm.squeue("-t", "RUNNING", "-n", "ampel-dask-worker", "-o", "%A").split()
        assert t.is_alive() and running, "no running worker job to cancel mid-run"
        subprocess.run(["scancel", running[0]], check=True)
        replaced = None
        while t.is_alive() and replaced is None:  # a new job is submitted in its place while the run goes on
            replaced = next((j for j in slurm.squeue("-n", "ampel-dask-worker", "-o", "%A").split() if j not in running), None)
            time.sleep(0.2)
        t.join(timeout=300)
    assert not t.is_alive() and not errors, errors
    assert result["channels"] == ref["channels"]
    assert t2_rows(store) == t2_rows(ref_store)
    manifest = json.loads((store / "runs" / f"{result['run_id']}.json").read_text())
    assert replaced, "the cancelled job was not replaced"
    assert running[0] not in {w["slurm_job_id"] for w in manifest["workers"]}


@pytest.mark.timeout(300)
def test_submit_runs_the_workflow_in_an_allocation_and_status_reports_it(slurm, archive, reference, tmp_path):  # noqa: F811
    import yaml

    wf_path = tmp_path / "wf.yml"
    wf_path.write_text(yaml.safe_dump({"name": "slurm-submit", "channels": CHANNELS, "archive": {"nights": {"from": 20181101, "to": 20181231}}}))
    store = tmp_path / "store"
    cli = [sys.executable, "-m", "ampel_dask.cli"]
    proc = subprocess.run([*cli, "submit", str(wf_path), "--store", str(store), "--archive", str(archive), "--cluster", "local", "--workers", "1", "--json"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["job_id"].isdigit()
    state = {}
    deadline = time.time() + 240
    while time.time() < deadline:
        out = subprocess.run([*cli, "status", rec["run_id"], "--store", str(store), "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        state = json.loads(out.stdout.strip().splitlines()[-1])
        if state["state"] == "finished" and state["slurm_state"].startswith("COMPLETED"):
            break
        time.sleep(1)
    assert state.get("state") == "finished", (state, Path(rec["log"]).read_text() if Path(rec["log"]).exists() else "")
    assert state["job_id"] == rec["job_id"] and state["alerts"] == 367 and state["t2"]["computed"] > 0
    assert ParquetStore(store).manifests()[0]["run_id"] == rec["run_id"]
    assert f"ampel-dask driver job {rec['job_id']}" in Path(rec["log"]).read_text()
