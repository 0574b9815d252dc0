"""The Parquet store's cache of done T2 ids (``stores.parquet._DoneIds``) against plain Python sets: a
history bucket's stage skips the result files of the run's other buckets, and what it skips is read
when a later call does not skip it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from ampel_dask.io.stores.parquet import _DoneIds
from ampel_dask.keys import ID_DTYPE

ids16 = st.binary(min_size=16, max_size=16)
files_st = st.lists(st.lists(ids16, max_size=6), min_size=1, max_size=6)


def as_list(ids) -> list[bytes]:
    """The ids as sorted bytes (the cache's own order is by 64-bit lanes, for its lookups)."""
    return sorted(bytes(x) for x in ids)


def write(folder: Path, name: str, ids: list[bytes]) -> None:
    pq.write_table(pa.table({"state_id": pa.array(ids, pa.binary(16))}), folder / f"{name}.parquet")


@settings(max_examples=60, deadline=None)
@given(files=files_st, skipped=st.lists(st.booleans(), min_size=6, max_size=6), later=st.lists(ids16, max_size=4))
def test_skipped_files_are_left_unread_and_read_when_no_longer_skipped(files, skipped, later):
    with tempfile.TemporaryDirectory() as d:
        folder, cache = Path(d), _DoneIds()
        for i, ids in enumerate(files):
            write(folder, f"f{i}", ids)
        skip = frozenset(f"f{i}" for i in range(len(files)) if skipped[i])
        want = sorted({x for i, ids in enumerate(files) if f"f{i}" not in skip for x in ids})
        got = cache.ids(folder, "state_id", skip)
        assert got.dtype == ID_DTYPE and as_list(got) == want
        write(folder, "late", later)  # a file written since: read by the next call, skipped files still not
        want_late = sorted(set(want) | set(later))
        assert as_list(cache.ids(folder, "state_id", skip)) == want_late
        every = sorted({x for ids in [*files, later] for x in ids})
        assert as_list(cache.ids(folder, "state_id")) == every  # nothing skipped: all of them
        assert as_list(cache.ids(folder, "state_id", skip)) == every  # read once, kept
