"""How a history bucket is cut into pieces of objects (``graph/tasks.object_slices``); that the cut
changes no state and no T2 result is tested in test_graph.py (on its module's run)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ampel_dask.graph.tasks import object_slices


@settings(max_examples=300, deadline=None)
@given(stock=st.lists(st.integers(-(2**62), 2**62) | st.integers(0, 30), max_size=400), rows=st.integers(1, 60))
def test_object_slices_cover_every_object_once_and_stay_near_their_size(stock, rows):
    """Against plain Python: ranges ascending and disjoint; every value in exactly one; no object in two;
    a range holds fewer than ``rows`` values before its last object (else it would have ended there)."""
    ranges = object_slices(np.array(stock, dtype=np.int64), rows)
    count = Counter(stock)
    assert all(lo <= hi for lo, hi in ranges) and all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
    assert sorted(stock) == sorted(v for lo, hi in ranges for v in stock if lo <= v <= hi)
    for lo, hi in ranges:
        held = sorted(v for v in set(stock) if lo <= v <= hi)
        assert held and held[0] == lo and held[-1] == hi
        assert sum(count[v] for v in held[:-1]) < rows

