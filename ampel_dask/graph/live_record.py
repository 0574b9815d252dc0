"""The record of what a live stream has processed, kept in the result store beside its results."""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..io.files import atomic_write
from ..keys import key_of
from .workflow import Workflow


class StreamRecord:
    """What a stream (group, topics, workflow) has processed: the archive parts whose run completed and
    the state names its T3 reads.

    Updated under a file lock and written durably after a batch's run and before its commit; merging is
    a set union, so a replayed batch changes nothing. A part listed here is not run again when a later
    batch re-sends its alerts (they are duplicates in the archive, and its results are complete).
    """

    def __init__(self, root: Path, group: str, topics: list[str], wf: Workflow):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", group)
        self.path = root / "live" / f"{safe}-{key_of(group, sorted(topics), wf.hash)}.json"
        self.head = {"group": group, "topics": sorted(topics), "workflow": wf.name, "workflow_hash": wf.hash}

    def load(self) -> dict:
        if self.path.exists():
            return json.loads(self.path.read_text())
        return {**self.head, "states": {}, "parts": [], "batches": 0, "alerts": 0}

    def states(self) -> dict[str, list[str]]:
        return self.load()["states"]

    def done_parts(self) -> set[str]:
        return set(self.load()["parts"])

    def add(self, state_names: dict[str, list[str]], parts: list[str], alerts: int) -> None:
        with self._updating() as rec:
            for ch, names in state_names.items():
                rec["states"][ch] = sorted(set(rec["states"].get(ch, [])) | set(names))
            rec["parts"] = sorted(set(rec["parts"]) | set(parts))
            rec["batches"] += 1
            rec["alerts"] += alerts

    def replace_states(self, states: dict[str, list[str]]) -> None:
        """The state names T3 reads, replaced by the ones that hold the same alerts now (see live)."""
        with self._updating() as rec:
            rec["states"] = {ch: sorted(set(names)) for ch, names in states.items()}

    @contextmanager
    def _updating(self) -> Iterator[dict]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rec = self.load()
            yield rec
            atomic_write(self.path, json.dumps(rec, sort_keys=True).encode(), durable=True)
