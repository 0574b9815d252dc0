"""Defaults a user trips on: where SLURM worker jobs write their logs, and when an ingest starts a cluster.

The SLURM settings are checked in the job script dask-jobqueue writes (what sbatch reads: ``-o``/``-e``
name the output files; without them SLURM writes ``slurm-<job>.out`` into the submitting directory),
with no SLURM needed. The ingest's choice is checked against the input's size on disk, summed here
with ``os.path.getsize``, on both sides of the threshold.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask
import pytest

from ampel_dask.graph import ingest as graph_ingest
from ampel_dask.graph.cluster import jobqueue_settings, slurm_cluster, slurm_log_dir
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.graph.workflow import ClusterSpec

REPO = Path(__file__).resolve().parents[1]


def sbatch_outputs(spec: ClusterSpec, log_dir: Path | None) -> dict[str, str]:
    """The ``#SBATCH -o`` / ``-e`` arguments of the worker job script."""
    cluster = slurm_cluster(spec, log_dir)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    return {line.split()[1]: line.split()[2] for line in script.splitlines() if line.startswith(("#SBATCH -o", "#SBATCH -e"))}


def test_slurm_worker_logs_go_to_the_store_unless_configured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store_logs = slurm_log_dir(tmp_path / "store")
    assert store_logs == (tmp_path / "store" / "logs" / "slurm").resolve()
    with dask.config.set({"jobqueue.slurm.log-directory": None}):
        # `--cluster slurm` with no config: the store's log folder, created
        out = sbatch_outputs(ClusterSpec(kind="slurm"), store_logs)
        assert set(out) == {"-o", "-e"} and all(Path(v).parent == store_logs for v in out.values())
        assert store_logs.is_dir()
        # the repository's jobqueue.yaml leaves it to the store too
        assert jobqueue_settings(ClusterSpec(kind="slurm", config_file=str(REPO / "slurm/jobqueue.yaml")), store_logs)["log-directory"] == str(store_logs)
        # a folder in the workflow's jobqueue section wins
        mine = tmp_path / "my-logs"
        out = sbatch_outputs(ClusterSpec(kind="slurm", jobqueue={"log-directory": str(mine)}), store_logs)
        assert all(Path(v).parent == mine for v in out.values())
        # without a store (a caller that gives none) nothing is set: dask-jobqueue's own behaviour
        assert "log-directory" not in jobqueue_settings(ClusterSpec(kind="slurm"))
    # one in dask's config (DASK_CONFIG=slurm/ or a user's ~/.config/dask) wins as well
    with dask.config.set({"jobqueue.slurm.log-directory": str(tmp_path / "dask-config-logs")}):
        assert "log-directory" not in jobqueue_settings(ClusterSpec(kind="slurm"), store_logs)
        out = sbatch_outputs(ClusterSpec(kind="slurm"), store_logs)
        assert all(Path(v).parent == tmp_path / "dask-config-logs" for v in out.values())
    assert not list(tmp_path.glob("slurm-*.out"))


class ClusterStarted(Exception):
    pass


def test_small_inputs_are_ingested_without_a_cluster(data_dir, tmp_path, monkeypatch):
    def no_cluster(*args, **kwargs):
        raise ClusterStarted

    monkeypatch.setattr(graph_ingest, "local_cluster", no_cluster)
    src = data_dir / "ztf" / "kowalski"
    size_mb = sum(os.path.getsize(p) for p in src.rglob("*") if p.is_file()) / 2**20
    assert 1 < size_mb < 64
    # the default (workers=None): a few MB are decoded here
    report = ingest([str(src)], tmp_path / "a", IngestOptions(progress=False))
    assert report.read == report.ingested > 0
    # just under the threshold: here; just over: a cluster is started
    report = ingest([str(src)], tmp_path / "b", IngestOptions(progress=False, in_process_mb=size_mb * 1.001))
    assert report.ingested == report.read
    with pytest.raises(ClusterStarted):
        ingest([str(src)], tmp_path / "c", IngestOptions(progress=False, in_process_mb=size_mb * 0.999))
    # an explicit number of workers always gets them
    with pytest.raises(ClusterStarted):
        ingest([str(src)], tmp_path / "d", IngestOptions(progress=False, workers=2))
    # the same archive either way (here it is the in-process decode both times; tests/test_ingest.py
    # compares the cluster's archive with the in-process one)
    parts = lambda root: sorted(p.name for p in Path(root).rglob("part-*.parquet"))  # noqa: E731
    assert parts(tmp_path / "a") == parts(tmp_path / "b") and parts(tmp_path / "a")
