"""Unit tests of the pure batching helpers."""

from __future__ import annotations

import numpy as np
import pytest

from server.core.errors import ServingError
from server.scheduling import batching


def test_cut_size_takes_what_fits():
    assert batching.cut_size([1, 1, 1], 8, ()) == 3
    assert batching.cut_size([4, 4, 4], 8, ()) == 2
    assert batching.cut_size([9], 8, ()) == 0


def test_cut_size_prefers_the_longest_prefix_at_a_preferred_size():
    assert batching.cut_size([1, 1, 1, 1, 1], 8, (2, 4)) == 4
    assert batching.cut_size([3, 3], 8, (4,)) == 2  # no prefix hits 4: all that fit
    assert batching.cut_size([2, 2, 2, 2, 2], 10, (4, 8)) == 4


def test_batch_key_separates_shapes_and_dtypes():
    a = {"x": np.zeros((1, 3), np.float32)}
    b = {"x": np.zeros((5, 3), np.float32)}
    c = {"x": np.zeros((1, 4), np.float32)}
    d = {"x": np.zeros((1, 3), np.float64)}
    assert batching.batch_key(a) == batching.batch_key(b)
    assert batching.batch_key(a) != batching.batch_key(c)
    assert batching.batch_key(a) != batching.batch_key(d)


def test_concat_and_split_round_trip():
    parts = [{"x": np.full((n, 2), n, np.int32)} for n in (1, 3, 2)]
    joined = batching.concat(parts)
    assert joined["x"].shape == (6, 2)
    outs = batching.split({"y": joined["x"] * 10}, [1, 3, 2], [["y"]] * 3, batched=True)
    for n, out in zip((1, 3, 2), outs):
        np.testing.assert_array_equal(out["y"], np.full((n, 2), n * 10))


def test_split_rejects_wrong_batch_dimension_and_missing_outputs():
    with pytest.raises(ServingError, match="batch dimension"):
        batching.split({"y": np.zeros((5, 2))}, [1, 3], [["y"], ["y"]], batched=True)
    with pytest.raises(ServingError, match="no output 'z'"):
        batching.split({"y": np.zeros((4, 2))}, [1, 3], [["z"], ["y"]], batched=True)
