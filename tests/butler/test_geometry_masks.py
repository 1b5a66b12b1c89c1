"""Boxes and mask planes."""

import numpy as np
import pytest

from butler.errors import DataModelError, MaskPlaneError
from butler.geometry import Box
from butler.masks import DEFAULT_MASK_PLANES, add_plane, bitmask, validate_planes


def test_box_edges_and_shape():
    box = Box(3, -2, 10, 4)
    assert (box.x1, box.y1) == (13, 2)
    assert box.shape == (4, 10)
    assert box.area == 40
    assert box.center == (7.5, -0.5)
    assert box.corners()[0] == (2.5, -2.5) and box.corners()[2] == (12.5, 1.5)


def test_box_intersection_and_contains():
    a, b = Box(0, 0, 10, 10), Box(5, 8, 10, 10)
    assert a.intersection(b) == Box(5, 8, 5, 2)
    assert a.overlaps(b)
    assert not a.overlaps(Box(10, 0, 3, 3))  # half-open: touching edges share no pixel
    assert a.intersection(Box(20, 20, 1, 1)).is_empty
    assert a.contains(Box(2, 2, 8, 8)) and not a.contains(Box(2, 2, 9, 8))
    assert a.contains_point(-0.5, 9.49) and not a.contains_point(9.5, 0)


def test_box_slices_select_the_same_pixels():
    parent = Box(100, 200, 50, 40)
    data = np.arange(parent.area).reshape(parent.shape)
    sub = Box(110, 215, 7, 5)
    rows, cols = sub.slices(parent)
    assert data[rows, cols][0, 0] == data[215 - 200, 110 - 100]
    assert data[rows, cols].shape == sub.shape
    with pytest.raises(DataModelError, match="not contained"):
        Box(140, 200, 20, 5).slices(parent)


def test_box_validation():
    with pytest.raises(DataModelError, match="non-negative"):
        Box(0, 0, -1, 3)
    with pytest.raises(DataModelError, match="integer"):
        Box(0.5, 0, 1, 3)
    assert Box(np.int64(2), 0, 1, 1).x0 == 2
    assert Box.from_list(Box(1, 2, 3, 4).to_list()) == Box(1, 2, 3, 4)


def test_mask_planes():
    planes = dict(DEFAULT_MASK_PLANES)
    assert bitmask(planes, ["BAD", "SAT"]) == 0b11
    bit = add_plane(planes, "STREAK")
    assert bit not in DEFAULT_MASK_PLANES.values() and add_plane(planes, "STREAK") == bit
    with pytest.raises(MaskPlaneError, match="unknown mask plane 'NOPE'.*known planes: BAD"):
        bitmask(planes, "NOPE")
    with pytest.raises(DataModelError, match="share bit"):
        validate_planes({"A": 1, "B": 1})
    with pytest.raises(DataModelError, match=r"bits must be in \[0, 31\)"):
        validate_planes({"A": 31})
    full = {f"P{i}": i for i in range(31)}
    with pytest.raises(MaskPlaneError, match="all 31 bits"):
        add_plane(full, "ONE_MORE")
