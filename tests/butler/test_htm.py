"""The HTM pixelization of the registry's spatial index (butler.htm)."""

from __future__ import annotations

import numpy as np
import pytest

from butler.errors import DataModelError
from butler.htm import htm_cover, htm_index, htm_triangles
from butler.regions import RegionBatch, SkyRegion


def _xyz(ra_deg, dec_deg):
    ra, dec = np.radians(np.atleast_1d(ra_deg)), np.radians(np.atleast_1d(dec_deg))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _random_points(n, seed):
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1)[:, None]


@pytest.mark.parametrize(
    ("ra", "dec", "level", "expected"),
    # Reference ids from lsst.sphgeom.HtmPixelization(level).index (the standard numbering).
    [(150.0, 2.0, 7, 231869), (10.5, -45.25, 7, 145649), (359.9, 89.0, 10, 12845208)],
)
def test_htm_index_matches_the_standard_numbering(ra, dec, level, expected):
    assert htm_index(_xyz(ra, dec), level).tolist() == [expected]


def test_htm_index_children_and_triangles_hold_their_points():
    points = _random_points(3000, 1)
    parent = htm_index(points, 5)
    child = htm_index(points, 6)
    assert np.array_equal(child >> 2, parent)
    assert child.min() >= 8 * 4**6 and child.max() < 16 * 4**6
    tri = htm_triangles(child, 6)
    normals = np.cross(tri, np.roll(tri, -1, axis=1))
    normals /= np.linalg.norm(normals, axis=2, keepdims=True)
    side = np.einsum("mki,mi->mk", normals, points)
    assert side.min() > -1e-12  # every point is inside (or on the edge of) its trixel


def test_htm_levels_and_ids_are_checked():
    with pytest.raises(DataModelError, match="level"):
        htm_index(_xyz(0.0, 0.0), 25)
    with pytest.raises(DataModelError, match="level"):
        htm_cover([], -1)
    with pytest.raises(DataModelError, match="ids of level 2"):
        htm_triangles([8], 2)


def _regions():
    return [
        SkyRegion([150.0, 150.22, 150.22, 150.0], [2.0, 2.0, 2.22, 2.22]),  # a detector
        SkyRegion([10.0, 14.0, 12.0], [-46.0, -46.0, -43.0]),  # a large triangle
        SkyRegion([359.8, 0.3, 0.3, 359.8], [-0.2, -0.2, 0.25, 0.25]),  # across ra = 0 and dec = 0
        SkyRegion([45.0, 46.0, 45.5, 46.0, 45.0], [88.0, 88.0, 88.5, 89.0, 89.0]),  # non-convex, near the pole
    ]


def test_htm_cover_is_every_trixel_a_region_touches():
    """Against brute force: every level-5 trixel tested with the exact overlap test."""
    level = 5
    regions = _regions()
    owner, ids = htm_cover(regions, level)
    assert np.all(np.diff(owner) >= 0)
    all_ids = np.arange(8 * 4**level, 16 * 4**level)
    tri = htm_triangles(all_ids, level)
    ra = np.degrees(np.arctan2(tri[..., 1], tri[..., 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(tri[..., 2], -1.0, 1.0)))
    trixels = RegionBatch([np.stack([r, d], axis=1) for r, d in zip(ra, dec, strict=True)])
    for i, region in enumerate(regions):
        got = set(ids[owner == i].tolist())
        vertices = np.stack(region.vertices_radec(), axis=1)
        touched = trixels.overlaps(RegionBatch([vertices]), np.arange(len(all_ids)), np.zeros(len(all_ids), dtype=int))
        truth = set(all_ids[touched].tolist())
        assert truth <= got
        if region.is_convex:
            assert got == truth
        else:  # covered through the bounding circle: a superset, but not the whole sky
            assert len(got) < 4 * len(truth)


def test_htm_cover_holds_the_trixel_of_every_inside_point_and_matches_single_regions():
    regions = _regions()
    level = 9
    owner, ids = htm_cover(regions, level)
    rng = np.random.default_rng(2)
    for i, region in enumerate(regions):
        ra, dec, radius = region.bounding_circle()
        near = _xyz(ra, dec) + rng.uniform(-1.0, 1.0, size=(20_000, 3)) * np.radians(radius)
        near /= np.linalg.norm(near, axis=1)[:, None]
        inside = near[region._contains_xyz(near)]
        assert len(inside) > 100
        assert set(htm_index(inside, level).tolist()) <= set(ids[owner == i].tolist())
        single_owner, single_ids = htm_cover([region], level)
        assert np.all(single_owner == 0)
        assert np.array_equal(single_ids, ids[owner == i])
    empty_owner, empty_ids = htm_cover([], level)
    assert len(empty_owner) == len(empty_ids) == 0
