"""How many SLURM worker jobs a run asks for (graph/cluster.slurm_size), without SLURM: the workflow's
cluster section and --jobs first, then the config file's ``ampel_dask: slurm:`` section, then one job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ampel_dask.graph.cluster import jobqueue_settings, slurm_size
from ampel_dask.graph.workflow import ClusterSpec, WorkflowError

REPO_YAML = Path(__file__).resolve().parents[1] / "slurm" / "jobqueue.yaml"


def config(tmp_path: Path, ours: dict | None, name: str = "jq.yaml") -> str:
    doc = {"jobqueue": {"slurm": {"cores": 1, "memory": "2GB"}}}
    if ours is not None:
        doc["ampel_dask"] = {"slurm": ours}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_the_repositorys_jobqueue_yaml_section_is_read():
    doc = yaml.safe_load(REPO_YAML.read_text())
    spec = ClusterSpec(kind="slurm", config_file=str(REPO_YAML))
    assert slurm_size(spec) == {"jobs": doc["ampel_dask"]["slurm"]["jobs"]} == {"jobs": 2}
    assert jobqueue_settings(spec)["memory"] == doc["jobqueue"]["slurm"]["memory"]  # the other section, as before


def test_the_workflow_and_the_command_line_come_first(tmp_path):
    path = config(tmp_path, {"jobs": 2})
    assert slurm_size(ClusterSpec(kind="slurm", config_file=path, jobs=5)) == {"jobs": 5}
    adaptive = {"minimum_jobs": 1, "maximum_jobs": 3}
    spec = ClusterSpec(kind="slurm", config_file=path, adaptive=adaptive)
    assert slurm_size(spec) == {"adaptive": adaptive}
    assert slurm_size(spec.overridden(jobs=4)) == {"jobs": 4}  # --jobs 4 replaces adaptive
    assert slurm_size(ClusterSpec(kind="slurm")) == {"jobs": 1}  # no file, nothing said: one job


def test_the_files_adaptive_section(tmp_path):
    adaptive = {"minimum_jobs": 1, "maximum_jobs": 4, "interval": "1s"}
    assert slurm_size(ClusterSpec(kind="slurm", config_file=config(tmp_path, {"adaptive": adaptive}))) == {"adaptive": adaptive}
    assert slurm_size(ClusterSpec(kind="slurm", config_file=config(tmp_path, None, "none.yaml"))) == {"jobs": 1}


@pytest.mark.parametrize("ours, message", [
    ({"jobs": 2, "adaptive": {"minimum_jobs": 1}}, "gives both jobs and adaptive"),
    ({"job": 2}, "takes jobs or adaptive, not job"),
    ({"jobs": 0}, "jobs is a number of worker jobs >= 1, not 0"),
    ({"adaptive": [1, 2]}, "adaptive is a mapping of adapt"),
])  # fmt: skip
def test_a_wrong_section_is_a_clear_error(tmp_path, ours, message):
    path = config(tmp_path, ours)
    with pytest.raises(WorkflowError, match=message) as err:
        slurm_size(ClusterSpec(kind="slurm", config_file=path))
    assert path in str(err.value)
