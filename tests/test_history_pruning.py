"""The history join skips an archive part (from its footer, then from its stock column) only when the
part holds no passing object."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from ampel_dask.graph.shuffle import _holds, _may_hold

STOCKS = st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(STOCKS, st.lists(st.integers(-(2**62), 2**62), max_size=20), st.integers(1, 7), st.booleans())
def test_a_part_holding_a_passing_object_is_never_skipped(part, passing, group_rows, stats):
    """Oracle: Python's set intersection of the part's stock column and the passing objects."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"stock": pa.array(part, pa.int64()), "mjd": np.zeros(len(part))}), buf, row_group_size=group_rows, write_statistics=stats)
    pf = pq.ParquetFile(pa.BufferReader(buf.getvalue()))
    holds = bool(set(part) & set(passing))
    may = _may_hold(pf, np.array(sorted(set(passing)), dtype=np.int64))
    assert may or not holds  # skipping is only ever right
    if passing:  # the stock column's check is exact
        assert _holds(pf, np.array(sorted(set(passing)), dtype=np.int64)) == holds
    if not stats:
        assert may == bool(passing)  # without statistics a part is read whenever something passed
    elif not passing:
        assert not may
    elif group_rows >= len(part) and not any(min(part) <= s <= max(part) for s in passing):
        assert not may  # one row group whose range holds no passing object: skipped
