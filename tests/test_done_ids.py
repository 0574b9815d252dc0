"""The Parquet store's cache of done T2 ids (``stores.parquet._DoneIds``) against plain Python sets: a
history bucket's stage skips the result files of the run's other buckets, and what it skips is read
when a later call does not skip it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
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


@settings(max_examples=80, deadline=None)
@given(files=st.lists(st.lists(st.tuples(st.booleans(), st.integers(-5, 5)), max_size=12), min_size=1, max_size=4),
       want_bits=st.lists(st.booleans(), min_size=48, max_size=48), shares=st.integers(1, 5))  # fmt: skip
def test_result_files_with_a_lead_row_group_give_the_rows_a_plain_filter_gives(files, want_bits, shares):
    """``write_t2(lead=mask)`` puts the masked rows first, in a row group of their own, and a reader that
    wants some ids (``t2_pieces``, ``read_t2``) reads whole only the groups holding one: whatever the
    mask and the wanted ids (in the lead group, the other, both, none, or absent from every file), the
    rows read equal a plain-Python filter of the rows written; the shares of ``t2_pieces`` are disjoint
    and together every file. Oracle: Python sets over the rows as written."""
    from ampel_dask.io.stores import ParquetStore

    with tempfile.TemporaryDirectory() as d:
        store = ParquetStore(Path(d))
        rows, n = [], 0
        for f, spec in enumerate(files):
            ids = [n + i for i in range(len(spec))]
            n += len(spec)
            table = pa.table({"state_id": pa.array([i.to_bytes(16, "big") for i in ids], pa.binary(16)),
                              "stock": pa.array([v for _, v in spec], pa.int64()), "value": pa.array([float(i) for i in ids])})  # fmt: skip
            lead = [b for b, _ in spec]
            store.write_t2("U", "k", f"f{f}", table, lead=np.array(lead, dtype=bool))
            rows += [(i.to_bytes(16, "big"), v, float(i)) for i, (_, v) in zip(ids, spec)]
            groups = pq.ParquetFile(store.t2_files("U", "k")[-1]).metadata.num_row_groups
            assert groups == (2 if 0 < sum(lead) < len(lead) else 1)
            first = pq.ParquetFile(store.t2_files("U", "k")[-1]).read_row_group(0).column("state_id").to_pylist() if spec else []
            assert first == ([i.to_bytes(16, "big") for i, b in zip(ids, lead) if b] if 0 < sum(lead) < len(lead) else [i.to_bytes(16, "big") for i in ids])
        want = sorted({i.to_bytes(16, "big") for i in range(48) if want_bits[i]})  # some beyond the rows written
        query = np.frombuffer(b"".join(want), dtype=ID_DTYPE) if want else np.empty(0, ID_DTYPE)
        expected = sorted(r for r in rows if r[0] in set(want))
        pieces = [list(store.t2_pieces("U", "k", query, share=(i, shares))) for i in range(shares)]
        got = sorted(r for share in pieces for t in share for r in zip(*(t.column(c).to_pylist() for c in ("state_id", "stock", "value"))))
        assert got == expected
        assert sum(len(s) for s in pieces) == len(store.t2_files("U", "k"))  # each file once over the shares
        whole = store.read_t2("U", "k", query)
        got = sorted(zip(*(whole.column(c).to_pylist() for c in ("state_id", "stock", "value")))) if whole is not None else []
        assert got == expected
