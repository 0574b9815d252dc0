"""The benchmark archives' replica ids (benchmarks/make_archive.shifted) against plain Python integers."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.make_archive import ID_STEP, shifted

INT64 = st.integers(-(2**63), 2**63 - 1)


def reference(i: int, shift: int) -> int:
    """Python's unbounded integers: away from zero by ``shift``, wrapped within the id's sign half."""
    return (i + shift) % 2**63 if i >= 0 else -((-i - 1 + shift) % 2**63) - 1


@settings(max_examples=200, deadline=None)
@given(st.lists(INT64, min_size=1, max_size=50, unique=True), st.integers(0, 10_000))
def test_replica_ids_keep_their_sign_and_stay_distinct(ids, k):
    """10 M alerts need ~4,000 replicas of the real sample: past ~900, plain int64 sums overflowed."""
    out = shifted(np.array(ids, dtype=np.int64), k * ID_STEP)
    assert out.tolist() == [reference(i, k * ID_STEP) for i in ids]
    assert [o >= 0 for o in out.tolist()] == [i >= 0 for i in ids]  # detections stay positive, upper limits negative
    assert len(set(out.tolist())) == len(ids)
