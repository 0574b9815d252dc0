"""The workflow file: archive selection, channels (T0 filters, T1 policy, T2 and T3 units), cluster, store.

Validated by pydantic; a mistake is reported with the field's path and its line in the YAML file.
Unit configs are validated by the units themselves when the workflow is planned; the workflow keeps
its file's line numbers so that those errors name their line too (:meth:`Workflow.where`).
The file is user input: it is read within limits (size, nodes, depth: :mod:`.safe_yaml`), channel
names are safe folder names, and user text in an error is escaped before it reaches a terminal.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..io.stores import store_spec
from ..keys import canonical_json, hash_text
from ..tiers.base import shown, terminal_safe
from .safe_yaml import YamlFileError, YamlLimits, gc_paused, read_yaml

# a channel name becomes a folder name in the store (states/<channel>/, t3/<channel>/): no '.', '..',
# separators, control characters or names longer than a file system takes
CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UnitRef(Model):
    """A unit by registry name with its config (validated by the unit's own model)."""

    unit: str
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        return {"unit": v} if isinstance(v, str) else v


class T2Ref(UnitRef):
    """A T2 unit reference; ``on_error`` says what a state the unit raises on does to the run."""

    on_error: Literal["fail", "record"] = Field(
        "fail", description="fail: the run fails (exit 1); record: the failed states are stored with their error, counted, retried by the next run"
    )


class NightRange(Model):
    start: int = Field(alias="from")
    end: int = Field(alias="to")


def parse_nights(text: str) -> tuple[int, int]:
    """``A:B`` (inclusive, YYYYMMDD) or one night ``A``."""
    a, sep, b = text.partition(":")
    try:
        lo, hi = int(a), int(b if sep else a)
    except ValueError:
        raise ValueError(f"--nights takes YYYYMMDD:YYYYMMDD (or one YYYYMMDD), not {text!r}") from None
    if not (10000101 <= lo <= 99991231 and 10000101 <= hi <= 99991231) or lo > hi:
        raise ValueError(f"--nights takes two YYYYMMDD nights, the first not after the second, not {text!r}")
    return lo, hi


class ArchiveSpec(Model):
    path: str | None = Field(None, description="archive folder (overridden by --archive)")
    surveys: list[Literal["ztf", "lsst"]] | None = Field(None, description="only these surveys")
    nights: list[int] | NightRange | None = Field(None, description="list of YYYYMMDD, or {from:, to:}")

    def wants(self, survey: str, night: int) -> bool:
        if self.surveys and survey not in self.surveys:
            return False
        if isinstance(self.nights, NightRange):
            return self.nights.start <= night <= self.nights.end
        if self.nights:
            return night in self.nights
        return True


class ChannelSpec(Model):
    name: str
    access: list[str] = Field(default_factory=lambda: ["ZTF_PUB", "LSST"], description="data rights (AMPEL tags)")
    filters: list[UnitRef] = Field(default_factory=list, description="T0 filters, all must accept")
    t1: UnitRef = Field(default_factory=lambda: UnitRef(unit="T1Policy"), description="T1 state policy")
    t2: list[T2Ref] = Field(default_factory=list)
    t3: list[UnitRef] = Field(default_factory=list)
    max_pass_ratio: float | None = Field(
        None, gt=0, le=1, description="largest fraction of the run's alerts the channel may pass; a run that passes more stops before "
        "the channel's T3 reactions, with the reason (a filter gone wrong must not flood TNS or a marshal)")  # fmt: skip

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not CHANNEL_NAME.match(v):
            raise ValueError(f"channel name {shown(v)} is not allowed: 1-64 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit (it names the channel's folders in the store)")  # fmt: skip
        return v


class ClusterSpec(Model):
    kind: Literal["local", "slurm", "address"] = "local"
    workers: int | None = Field(None, ge=0, description="local: worker processes (None = all cores, 0 = no cluster)")
    memory_limit: str | None = Field("auto", description="local: per-worker memory limit")
    jobs: int | None = Field(None, ge=1, description="slurm: fixed number of worker jobs (one that ends is replaced)")
    adaptive: dict[str, Any] | None = Field(None, description="slurm: adapt() arguments, e.g. {minimum_jobs: 1, maximum_jobs: 4}")
    jobqueue: dict[str, Any] = Field(default_factory=dict, description="slurm: dask-jobqueue SLURMCluster settings")
    config_file: str | None = Field(None, description="slurm: a jobqueue.yaml (e.g. slurm/jobqueue.yaml)")
    address: str | None = Field(None, description="address: tcp://host:port of a running scheduler")
    profile: bool = Field(False, description="keep Dask's worker profiler (dashboard Profile tab); off, workers run ~10% faster")

    def overridden(self, kind: str | None = None, workers: int | None = None, jobs: int | None = None) -> ClusterSpec:
        """This section with the command line's overrides (``--cluster``, ``--workers``, ``--jobs``; a
        fixed number of jobs replaces ``adaptive``): the one place they are resolved."""
        update: dict[str, Any] = {}
        if kind is not None:
            update["kind"] = kind
        if workers is not None:
            update["workers"] = workers
        if jobs is not None:
            update.update(jobs=jobs, adaptive=None)
        return self.model_copy(update=update) if update else self
    stall_timeout: float | None = Field(
        600, gt=0, description="seconds without a worker able to run tasks (jobs ended, workers paused) before a run fails; null = wait for ever"
    )


class StoreSpec(Model):
    kind: Literal["parquet", "mongo"] = "parquet"
    path: str | None = Field(None, description="parquet: store folder (overridden by --store)")
    uri: str | None = Field(None, description="mongo: mongodb:// URI")
    database: str = "ampel_dask"

    def resolve(self, override: str | None = None) -> dict:
        """The spec of the store a run writes to: ``override`` (``--store``: a folder or a mongodb:// URI),
        else this section's."""
        if override:
            return store_spec(override, self.path)
        if self.kind == "mongo":
            if not self.uri:
                raise WorkflowError("store.kind is mongo but store.uri is missing")
            return store_spec(self.uri, self.path, self.database)
        return store_spec(self.path or "store")


class Workflow(Model):
    name: str
    archive: ArchiveSpec = Field(default_factory=ArchiveSpec)
    channels: list[ChannelSpec] = Field(min_length=1)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    history_buckets: int = Field(16, ge=1, description="object buckets of the history join (channels with T1 history: archive), at least")
    history_bucket_rows: int = Field(125_000, ge=1, description="selected alerts per history bucket, at most: a larger selection gets more buckets")
    kept_history_bucket_rows: int = Field(62_500, ge=1, description="the same, when the history join reads the history ingest keeps (no shuffle of the archive)")
    batch_rows: int = Field(10_000, ge=1, description="small archive parts are read together up to this many alerts per task")
    stage_rows: int = Field(400_000, ge=1, description="alerts of the work units whose packet-channel states one T2 stage computes, at most (a stage holds their states at once: for a channel that passes most alerts, 100000 keeps each worker ~0.3 GB smaller; benchmarks/README.md)")
    _source: str | None = PrivateAttr(None)  # the file it was loaded from, and the line of each field
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)

    def buckets_for(self, rows: int, kept: bool = False) -> int:
        """Object buckets of the history join for a selection of ``rows`` alerts: a bucket's states are
        built, held and handed to its T2 stage by one task, so its size is bounded, not its number (10 M
        alerts through ztf_archive.yml, 2 workers: 16 buckets peaked at 2.3 GB per worker in the history
        phase, 160 at 0.8 GB but 15% slower, 80, the default's, at ~1 GB and as fast as 16). ``kept``: the
        join reads the kept history, where a bucket costs no shuffle of the archive's datapoints and
        smaller ones are no slower (10 M LSST alerts, 2 workers: 80 buckets 169-172 s at 1.41-1.45 GiB
        per worker, 160 buckets 163.6 s at 1.07 GiB)."""
        per = self.kept_history_bucket_rows if kept else self.history_bucket_rows
        return max(self.history_buckets, -(-rows // per))

    def where(self, loc: tuple) -> str:
        """``FILE:LINE: `` of the field at ``loc`` (keys and indexes), or of its nearest enclosing field
        with a line; empty for a workflow not loaded from a file."""
        if self._source is None:
            return ""
        line = next((self._lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in self._lines), None)
        return f"{self._source}:{line}: " if line else f"{self._source}: "

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not (0 < len(v) <= 128 and v.isprintable()):
            raise ValueError(f"the workflow name {shown(v)} is not allowed: 1-128 printable characters")
        return v

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, v: list[ChannelSpec]) -> list[ChannelSpec]:
        dup = sorted(n for n, k in Counter(c.name for c in v).items() if k > 1)  # linear: 70,000 channels are fine
        if dup:
            raise ValueError(f"channel names must be unique: {', '.join(dup[:10])}{f' and {len(dup) - 10} more' if len(dup) > 10 else ''}")
        return v

    @property
    def hash(self) -> str:
        return hash_text(canonical_json(self.model_dump(mode="json", by_alias=True)))


class WorkflowError(ValueError):
    """A workflow file that does not validate; the message names fields and their lines. Any control
    character left in it (user text not escaped where it was quoted) is escaped here."""

    def __init__(self, message: str):
        super().__init__(terminal_safe(str(message)))


def field_path(loc: tuple) -> str:
    """``channels[0].filters[1].config.x`` for a pydantic location; a key that is not a plain word is
    shown quoted and escaped (it is user text: an unknown field's name)."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if _PLAIN_KEY.match(str(p)) else f".{shown(p, 40)}"
    return out.lstrip(".") or "(top level)"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}\Z")
_UNION_TAGS = ("function-after", "list[int]", "NightRange")  # pydantic's names of union members, not fields


def load_workflow(path: str | Path, limits: YamlLimits | None = None) -> Workflow:
    """The workflow in ``path``, validated; every problem is a :class:`WorkflowError` naming a line."""
    path = Path(path)
    try:
        data, lines = read_yaml(path, limits)
    except YamlFileError as exc:
        raise WorkflowError(str(exc)) from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}:{lines.get((), 1)}: a workflow is a mapping (name, archive, channels, ...)")
    try:
        with gc_paused():
            wf = Workflow.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
            line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
            problems.append(f"{path}:{line}: {field_path(loc)}: {e['msg']}" if line else f"{path}: {field_path(loc)}: {e['msg']}")
        raise WorkflowError("invalid workflow:\n" + "\n".join(problems)) from None
    wf._source, wf._lines = str(path), lines
    return wf
