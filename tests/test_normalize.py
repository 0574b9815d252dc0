"""The normalisers' column extraction against plain Python on records of any shape.

``normalize.column`` takes one field of a batch of records (struct array), cast, with NaN made null;
a record that is null gives null. The oracle reads the same records with ``to_pylist``.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from ampel_dask.io.normalize import column

TYPE = pa.struct([("x", pa.float32()), ("n", pa.int32()), ("s", pa.string())])
value = st.one_of(st.none(), st.just(math.nan), st.floats(allow_nan=True, allow_infinity=True, width=32))  # NaN often
record = st.one_of(st.none(), st.fixed_dictionaries({"x": value, "n": st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)), "s": st.one_of(st.none(), st.text(max_size=3))}))


def expected(records: list, name: str, cast) -> list:
    out = []
    for r in records:
        v = None if r is None else r[name]
        out.append(None if v is None or (isinstance(v, float) and math.isnan(v)) else cast(v))
    return out


@given(st.lists(record, max_size=12), st.integers(0, 12), st.integers(0, 12))
def test_column_is_the_field_cast_with_nan_and_null_records_as_null(records, start, length):
    arr = pa.array(records, TYPE).slice(start, length)  # a slice too: a record retried alone is one
    recs = records[start : start + length]
    assert column(arr, ["nosuch", "x"], pa.float64()).to_pylist() == expected(recs, "x", lambda v: float(np.float32(v)))
    assert column(arr, ["x"], pa.float32()).to_pylist() == expected(recs, "x", lambda v: float(np.float32(v)))
    assert column(arr, ["n"], pa.float64()).to_pylist() == expected(recs, "n", float)
    assert column(arr, ["n"], pa.int64()).to_pylist() == expected(recs, "n", int)
    assert column(arr, ["s"], pa.string()).to_pylist() == expected(recs, "s", str)
    assert column(arr, ["nosuch"], pa.float64()).to_pylist() == [None] * len(recs)
    assert column(arr, ["x"], pa.float64()).type == pa.float64()
