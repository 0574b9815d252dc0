"""What a scientist writes: one base class per unit kind, each with a pydantic config.

Units work on batches: a T0 filter sees an Arrow table of alerts and returns a verdict per alert; a T2
unit sees a table of states (nested light curves) and returns one result row per state; a T3 unit sees
the population selected by its channel. A unit's identity is its name, version, the hash of its
canonical config and the versions of the libraries it declares, so the same computation has the same
key on every machine and in every run, and another computation never has it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from ..keys import canonical_json, hash_text, key_of
from .labels import column_label


class UnitConfig(BaseModel):
    """Base of every unit config: unknown fields are errors (a typo must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def as_table(batch: pa.Table | Any) -> pa.Table:
    """A batch as an Arrow table: tables pass through, pandas frames are converted (index dropped)."""
    if isinstance(batch, pa.Table):
        return batch
    if hasattr(batch, "to_arrow") and not hasattr(batch, "iloc"):  # e.g. a polars frame
        return batch.to_arrow()
    return pa.Table.from_pandas(batch, preserve_index=False)


class UnitConfigError(ValueError):
    """A unit config that does not validate; the message names the unit and the fields."""

    def __init__(self, unit: str, error: ValidationError):
        lines = []
        for e in error.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(config)"
            lines.append(f"  {unit}.{loc}: {e['msg']}")
        super().__init__(f"invalid config for unit {unit}:\n" + "\n".join(lines))
        self.unit = unit
        self.errors = error.errors()


def shown(text: object, limit: int = 64) -> str:
    """User text (a name, a key, a variable) fit for an error message: quoted, with control characters
    escaped as ``repr`` does (no CR, ANSI escape or NUL reaches a terminal), cut after ``limit`` characters."""
    s = str(text)
    return repr(s) if len(s) <= limit else f"{s[:limit]!r}... ({len(s)} characters)"


def terminal_safe(message: str) -> str:
    """``message`` with every non-printable character but the line break escaped (``\\x1b``, ``\\r``):
    the last guard for error messages that may carry user text."""
    if message.replace("\n", "").isprintable():
        return message
    return "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in message)


def pinned_hash(owner: str, path: str, actual: str, expected: str | None) -> str:
    """The content hash of a file a unit reads, for the unit's config (so results follow the file's
    content, not its path); a config that names another hash is an error."""
    if expected is not None and expected != actual:
        raise ValueError(f"{owner}: {path} has content hash {actual}, config expects {expected}")
    return actual


@dataclass(frozen=True)
class UnitIdentity:
    """What a unit's results depend on, besides their input: its name, version, config (hash), the
    versions of the libraries that shape its results, and the identities of the units it reads."""

    name: str
    version: str
    config_hash: str
    libraries: tuple[tuple[str, str], ...] = ()  # (distribution, version), as installed when planned
    depends_on: tuple[str, ...] = ()  # keys of the units whose results it reads

    @property
    def key(self) -> str:
        """The unit's part of every result key (xxh3-128, 32 hex digits): a new version of the unit or
        of a declared library, another config, or a dependency that changed, gives a new key."""
        return key_of(self.name, self.version, self.config_hash, [list(p) for p in self.libraries], list(self.depends_on))


def library_versions(unit: str, names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Installed versions of the distributions a unit declares (``Unit.libraries``), read with
    ``importlib.metadata``; one that is not installed is an error naming the unit."""
    import importlib.metadata

    out = []
    for name in names:
        try:
            out.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(f"{unit} declares library {name!r}, which is not installed") from None
    return tuple(out)


class Unit:
    """Common part of all units: a validated config and a stable identity."""

    tier: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Config: ClassVar[type[UnitConfig]] = UnitConfig
    unit_name: ClassVar[str | None] = None  # registry name; defaults to the class name
    # distributions (PyPI names) whose versions shape the unit's results, e.g. ("light-curve",): their
    # installed versions, read when the unit is made (planning time), enter its identity, so upgrading
    # one recomputes the unit's results instead of reusing those of the old version
    libraries: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: UnitConfig | dict | None = None, **kwargs: Any):
        if isinstance(config, UnitConfig):
            if kwargs:
                config = config.model_copy(update=kwargs)
            self.config = config
        else:
            try:
                self.config = self.Config.model_validate({**(config or {}), **kwargs})
            except ValidationError as exc:
                raise UnitConfigError(self.name(), exc) from None
        self.library_versions = library_versions(self.name(), self.libraries)

    @classmethod
    def name(cls) -> str:
        return cls.unit_name or cls.__name__

    @property
    def config_hash(self) -> str:
        return hash_text(canonical_json(self.config.model_dump(mode="json")))

    @property
    def identity(self) -> UnitIdentity:
        deps = tuple(d.identity.key for d in self.dependencies()) if isinstance(self, T2StateUnit) else ()
        return UnitIdentity(self.name(), str(self.version), self.config_hash, self.library_versions, deps)

    def __repr__(self) -> str:
        return f"{self.name()}(v{self.version}, config={self.config_hash})"


# --- T0 -----------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """Per-alert T0 decision: code 0 = accepted, k > 0 = rejected for ``reasons[k - 1]``."""

    codes: np.ndarray
    reasons: list[str] = field(default_factory=list)

    @classmethod
    def accept_all(cls, n: int) -> Verdict:
        return cls(np.zeros(n, dtype=np.int16), [])

    @classmethod
    def from_mask(cls, mask: np.ndarray | pa.Array, reason: str = "rejected") -> Verdict:
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = np.asarray(mask.fill_null(False)) if hasattr(mask, "fill_null") else np.asarray(mask)
        v = cls.accept_all(len(mask))
        v.reject(~np.asarray(mask, dtype=bool), reason)
        return v

    def reject(self, mask: np.ndarray, reason: str) -> None:
        """Reject where ``mask`` holds and nothing rejected the alert earlier (first failing cut wins)."""
        if reason not in self.reasons:
            self.reasons.append(reason)
        code = self.reasons.index(reason) + 1
        new = np.asarray(mask, dtype=bool) & (self.codes == 0)
        self.codes[new] = code

    @property
    def accepted(self) -> np.ndarray:
        return self.codes == 0

    def reason_of(self) -> list[str | None]:
        names = [None, *self.reasons]
        return [names[c] for c in self.codes.tolist()]

    def counts(self) -> dict[str, int]:
        """Alerts per outcome: {'accepted': n, reason: n, ...}."""
        bins = np.bincount(self.codes, minlength=len(self.reasons) + 1)
        out = {"accepted": int(bins[0])}
        out.update({r: int(bins[i + 1]) for i, r in enumerate(self.reasons) if bins[i + 1]})
        return out

    def to_pandas(self) -> Any:
        """One row per alert: ``accepted`` and the rejecting ``reason`` (None where accepted)."""
        import pandas as pd

        return pd.DataFrame({"accepted": self.accepted, "reason": self.reason_of()})

    def __and__(self, other: Verdict) -> Verdict:
        """Chain two filters: the first rejection (in filter order) is the reason kept."""
        out = Verdict(self.codes.copy(), list(self.reasons))
        for i, r in enumerate(other.reasons):
            out.reject(other.codes == i + 1, r)
        return out


class T0Filter(Unit):
    """Selects alerts. Override :meth:`apply`: Arrow table of alerts -> :class:`Verdict` (or bool mask)."""

    tier = "T0"
    columns: ClassVar[Sequence[str] | None] = None  # alert columns the filter reads (None = all)
    # columns it cannot work without (checked against the selected surveys' alerts before a run)
    required_columns: ClassVar[Sequence[str]] = ()
    def apply(self, alerts: pa.Table) -> Verdict | np.ndarray:
        raise NotImplementedError

    def verdict(self, alerts: pa.Table | Any) -> Verdict:
        """Decisions for a batch: an Arrow table, or a pandas frame (a notebook's; converted once)."""
        alerts = as_table(alerts)
        out = self.apply(alerts)
        v = out if isinstance(out, Verdict) else Verdict.from_mask(out, f"{self.name()}")
        if len(v.codes) != alerts.num_rows:
            raise ValueError(f"{self.name()} returned {len(v.codes)} decisions for {alerts.num_rows} alerts")
        return v


# --- T1 -----------------------------------------------------------------------------------------


class T1Unit(Unit):
    """Builds states: which datapoints make an object's state at each alert.

    :meth:`states` gets the alerts that passed T0 (the columns a state takes from its alert, those of
    ``STATE_COLUMNS`` and ``programid``; with ``dps``, their packets' datapoints, unless the unit joins
    archived history) and the channel's access tags, and returns one state per alert: the
    columns of ``ampel_dask.tiers.states.STATE_COLUMNS``, ``dps`` holding the state's datapoints and
    ``state_id`` their content hash (``ampel_dask.keys``). Nothing the alert could not have known may
    enter (no datapoint observed or first published after it), nor anything the access tags forbid.
    """

    tier = "T1"

    @property
    def needs_history(self) -> bool:
        """Does :meth:`states` need each object's archived datapoints (``history``), beyond the packets?"""
        return False

    def states(self, alerts: pa.Table, access: list[str], history: pa.Table | None = None) -> pa.Table:
        raise NotImplementedError


# --- T2 -----------------------------------------------------------------------------------------


class T2StateUnit(Unit):
    """Computes one result per T1 state.

    :meth:`process` gets a table with one row per state (``state_id``, ``stock``, ``alert_id``,
    ``mjd``, ``ra``, ``dec``, ``dps`` = the state's datapoints, time-ordered) and returns a table (or
    list of dicts) with exactly one row per input row, in order. Columns are the unit's result body;
    a column ``code`` (int, 0 = ok) may report per-state failures.
    """

    tier = "T2"
    # what a report shows for each result column: {column: (label, unit)}, e.g. {"peak_mag": ("Peak
    # magnitude", "mag")}; keys may hold placeholders ("n_{band}": ("Points in {band}", "")), see
    # tiers/labels.py. Columns without an entry get a readable form of their name and no unit.
    column_labels: ClassVar[dict[str, tuple[str, str]]] = {}

    @classmethod
    def label(cls, column: str, config: UnitConfig | None = None) -> tuple[str, str]:
        """(label, unit) of a result column; ``config`` (None: the default) for units whose units of
        measure depend on it (override then)."""
        return column_label(cls.column_labels, column)

    def dependencies(self) -> list[T2StateUnit]:
        """Other T2 units whose results this one reads (computed first, passed to :meth:`process` as
        ``inputs``, keyed by unit name and by ``identity.key``: the key tells apart several
        dependencies of one kind, e.g. catalog matches against different catalogs)."""
        return []

    def process(self, states: pa.Table, inputs: dict[str, pa.Table] | None = None) -> pa.Table | list[dict]:
        raise NotImplementedError


class T2PointUnit(Unit):
    """Computes one result per datapoint.

    :meth:`process` gets a table of distinct datapoints, the fields of ``io.layout.DATAPOINT``
    (``dp_id``, ``mjd``, ``band``, ``kind``, ``flux``, ``flux_err``, ``mag`` ...), and returns a table
    (or list of dicts) with exactly one row per input row, in order; a column ``code`` (int, 0 = ok)
    may report per-datapoint failures. Results are keyed by (unit identity, the datapoint's content id,
    ``keys.point_ids``): a datapoint in many states, or reached by many channels, is computed once;
    a copy whose values differ from another's is computed apart. A channel lists it under ``t2`` like
    a state unit; it sees the datapoints of the channel's states (its T1 policy and data rights).
    """

    tier = "T2"

    def process(self, points: pa.Table) -> pa.Table | list[dict]:
        raise NotImplementedError


# --- T3 -----------------------------------------------------------------------------------------


@dataclass
class T3Context:
    """What a T3 unit may use besides the selection: where to write, which run and channel it serves."""

    out_dir: Path
    run_id: str
    channel: str
    archive: Any = None  # ampel_dask.io.archive.Archive, for light curves and cutouts
    # how ``map`` spreads work: set by the framework when the unit runs on a cluster; None = in turn, here
    mapper: Callable[[Callable[[Any], Any], list], list] | None = None
    # the store's delivery journal of this channel for a push unit's delivery key (``io.stores.Deliveries``):
    # what a webhook already delivered is not sent again; None = no journal (the unit used on its own)
    deliveries: Callable[[str], Any] | None = None

    def map(self, fn: Callable[[Any], Any], items: list) -> list:
        """``[fn(x) for x in items]``, spread over the cluster when the framework gives a mapper: for
        per-object work (figures, uploads) that would otherwise leave the other workers idle at the
        end of a run."""
        if len(items) < 2 or self.mapper is None:
            return [fn(x) for x in items]
        return self.mapper(fn, items)


class T3Unit(Unit):
    """Reacts to a population: :meth:`react` gets one row per selected object with its latest T2 results.

    Returns a list of output records (e.g. ``{"kind": "file", "path": ...}``) kept in the journal.
    """

    tier = "T3"

    @property
    def reads_dps(self) -> bool:
        """Does :meth:`react` read the selection's ``dps`` (each object's datapoints)? A unit that says
        no gets a selection without them, unless another T3 unit of its channel reads them: for a
        history channel they are each object's whole light curve, most of the selection's memory."""
        return True

    def dps_rows(self, selection: pa.Table) -> np.ndarray | None:
        """The rows of ``selection`` whose ``dps`` :meth:`react` reads, when it reads only some (a
        report draws its top objects' light curves): the selection is then made without datapoints,
        and this unit gets them for these rows alone (``dps`` null in the others). None: every row's
        (if :attr:`reads_dps`). A unit that reads some overrides this method."""
        return None

    @property
    def reads_all_dps(self) -> bool:
        """Does :meth:`react` read every row's ``dps`` (:attr:`reads_dps`, :meth:`dps_rows` not overridden)?"""
        return self.reads_dps and type(self).dps_rows is T3Unit.dps_rows

    def react(self, selection: pa.Table, context: T3Context) -> list[dict]:
        raise NotImplementedError

    def react_batches(self, batches: Iterator[pa.Table], context: T3Context) -> list[dict]:
        """:meth:`react` over a selection too large to be one table (``graph.selection.SELECTION_ROWS``
        objects), given in batches of whole objects with one schema. By default they are joined into
        one table; a unit that can work batch by batch (an export) overrides this to keep memory flat."""
        return self.react(pa.concat_tables(list(batches)), context)


TIER_BASES: dict[str, type[Unit]] = {"T0": T0Filter, "T1": T1Unit, "T2": T2StateUnit, "T3": T3Unit}
