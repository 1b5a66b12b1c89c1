"""Skymaps: tract/patch geometry, lookups and region queries against brute force.

Brute force works in each tract's pixel plane: the tract WCS is TAN, which maps great circles to
straight lines, so a sky polygon is exactly the planar polygon of its projected vertices there,
and a separating-axis test (written here) against each patch's outer box is the exact answer.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from butler.errors import SkyMapError
from butler.geometry import Box
from butler.regions import SkyRegion
from butler.skymap import PatchInfo, SkyMap, TractInfo

SMALL = dict(patch_inner_dimensions=[1000, 800], patch_border=40, pixel_scale=1.0, tract_overlap=0.05)


@pytest.fixture(scope="module")
def skymap() -> SkyMap:
    # two overlapping tracts (one rotated), one across RA = 0, one around the north pole
    return SkyMap.discrete(
        "test_map",
        [(150.0, 2.0, 0.5), (150.8, 2.3, 0.5), (0.1, -0.2, 0.4), (40.0, 89.6, 0.6)],
        **SMALL,
    )


def separation_deg(ra0, dec0, ra, dec):
    points = SkyCoord(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg)
    return SkyCoord(ra0 * u.deg, dec0 * u.deg).separation(points).deg


def random_points_in_cap(rng, ra0, dec0, radius_deg, n):
    """Uniform points within ``radius_deg`` of a centre (independent of the code under test)."""
    center = SkyCoord(ra0 * u.deg, dec0 * u.deg)
    cos_r = math.cos(math.radians(radius_deg))
    sep = np.degrees(np.arccos(rng.uniform(cos_r, 1.0, n)))
    pa = rng.uniform(0.0, 360.0, n)
    pts = center.directional_offset_by(pa * u.deg, sep * u.deg)
    return pts.ra.deg, pts.dec.deg


def rect(box: Box) -> np.ndarray:
    return np.array(box.corners())


def _segments_cross(p1, p2, q1, q2) -> bool:
    def orient(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])

    d1, d2 = orient(q1, q2, p1), orient(q1, q2, p2)
    d3, d4 = orient(p1, p2, q1), orient(p1, p2, q2)
    return (d1 > 0) != (d2 > 0) and (d3 > 0) != (d4 > 0)


def _inside_simple(poly: np.ndarray, x: float, y: float) -> bool:
    """Even-odd ray casting (planar, any simple polygon)."""
    inside = False
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def planar_overlap(poly: np.ndarray, box: np.ndarray) -> bool:
    """Whether a simple planar polygon and a rectangle share area (brute force, any shape)."""
    x0, y0 = box.min(axis=0)
    x1, y1 = box.max(axis=0)
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    if lo[0] >= x1 or hi[0] <= x0 or lo[1] >= y1 or hi[1] <= y0:
        return False  # bounding boxes apart (exact ties have probability zero here)
    if np.any((poly[:, 0] > x0) & (poly[:, 0] < x1) & (poly[:, 1] > y0) & (poly[:, 1] < y1)):
        return True
    if any(_inside_simple(poly, cx, cy) for cx, cy in box):
        return True
    edges = list(zip(poly, np.roll(poly, -1, axis=0), strict=True))
    sides = list(zip(box, np.roll(box, -1, axis=0), strict=True))
    return any(_segments_cross(a, b, c, d) for a, b in edges for c, d in sides)


def random_polygon(rng, center, size, n=4, convex=True):
    """Random simple polygon (pixel plane): a star around ``center``, convex on an ellipse."""
    while True:
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        gaps = np.diff(np.append(angles, angles[0] + 2 * np.pi))
        if gaps.min() > 0.3 and gaps.max() < np.pi - 0.1:
            break
    radii = np.ones(n) if convex else rng.uniform(0.3, 1.0, n)
    stretch, tilt = rng.uniform(0.3, 1.0), rng.uniform(0, np.pi)
    pts = np.stack([radii * np.cos(angles), stretch * radii * np.sin(angles)], axis=1) * size
    rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    return pts @ rot.T + np.asarray(center, dtype=float)


def brute_force_patches(tract: TractInfo, ra: np.ndarray, dec: np.ndarray) -> set[int]:
    if np.any(separation_deg(*tract.ctr_coord, ra, dec) > 60.0):
        return set()  # small test polygons this far off are nowhere near the tract (no TAN plane)
    x, y = tract.wcs.world_to_pixel_values(ra, dec)
    poly = np.column_stack([x, y])
    return {p.sequential_index for p in tract.patches() if planar_overlap(poly, rect(p.outer_bbox))}


# ------------------------------------------------------------------------------ tract geometry


def test_tract_layout_and_wcs(skymap):
    assert len(skymap) == 4 and skymap.tract_ids == [0, 1, 2, 3] and skymap.name == "test_map"
    tract = skymap[0]
    assert tract.tract_id == 0 and tract.ctr_coord == (150.0, 2.0)
    nx, ny = tract.num_patches
    assert tract.bbox == Box(0, 0, nx * 1000 + 80, ny * 800 + 80)
    # the grid holds the inner square grown by tract_overlap: tan(0.55 deg) / 1 arcsec each way
    need = 2 * math.degrees(math.tan(math.radians(0.55))) * 3600
    assert nx * 1000 >= need > (nx - 1) * 1000 and ny * 800 >= need > (ny - 1) * 800
    # the centre of the grid is the tract centre; the pixel scale is 1 arcsec there
    cx, cy = 40 - 0.5 + nx * 1000 / 2, 40 - 0.5 + ny * 800 / 2
    ra, dec = tract.wcs.pixel_to_world_values([cx, cx + 1, cx], [cy, cy, cy + 1])
    assert ra[0] == pytest.approx(150.0, abs=1e-10) and dec[0] == pytest.approx(2.0, abs=1e-10)
    assert separation_deg(ra[0], dec[0], ra[1:], dec[1:]) * 3600 == pytest.approx([1.0, 1.0], rel=1e-6)
    # rotation 0: +y is north, +x is west (RA decreases)
    assert dec[2] > dec[0] and ra[1] < ra[0]
    assert tract.wcs.pixel_shape == (tract.bbox.width, tract.bbox.height)


def test_rotation_turns_the_pixel_grid():
    rotated = SkyMap.discrete("rot", [(10.0, -30.0, 0.2)], rotation=90.0, **SMALL)[0]
    straight = SkyMap.discrete("rot0", [(10.0, -30.0, 0.2)], **SMALL)[0]
    cx, cy = straight.wcs.wcs.crpix - 1
    r0, d0 = rotated.wcs.pixel_to_world_values([cx, cx], [cy, cy + 100])
    s0, t0 = straight.wcs.pixel_to_world_values([cx, cx], [cy, cy + 100])
    def position_angle(ra, dec):
        start, end = SkyCoord(ra[0] * u.deg, dec[0] * u.deg), SkyCoord(ra[1] * u.deg, dec[1] * u.deg)
        return start.position_angle(end).deg

    assert min(position_angle(s0, t0), 360.0 - position_angle(s0, t0)) < 1e-6
    turned = position_angle(r0, d0)  # rotated by 90 deg: +y runs east-west
    assert min(abs(turned - 90.0), abs(turned - 270.0)) < 1e-6


def test_tract_overlap_extends_beyond_the_inner_region(skymap):
    tract = skymap[0]
    outer = tract.outer_region()
    # every point within radius + tract_overlap of the centre lies in the tract's bbox
    ra, dec = random_points_in_cap(np.random.default_rng(1), 150.0, 2.0, 0.55, 2000)
    assert np.all(tract.contains(ra, dec))
    assert np.all(outer.contains(ra, dec))
    # inner region: circumscribes the cone of the radius, not the overlap
    ra, dec = random_points_in_cap(np.random.default_rng(2), 150.0, 2.0, 0.5, 2000)
    assert np.all(tract.inner_region().contains(ra, dec)) and np.all(tract.contains(ra, dec, inner=True))
    assert not tract.inner_region().contains(150.0, 2.0 + 0.5 * 1.01)
    assert not tract.contains(150.0, 2.0 + 0.5 * 1.01, inner=True)
    assert not tract.contains(330.0, -2.0)  # far side of the sky: no TAN projection, not contained


# ------------------------------------------------------------------------------ patches


def test_patch_boxes_indices_and_errors(skymap):
    tract = skymap[1]
    nx, ny = tract.num_patches
    assert len(tract) == nx * ny == len(tract.patches())
    seen = np.zeros((tract.bbox.height, tract.bbox.width), dtype=np.int8)
    for k, patch in enumerate(tract):
        x, y = patch.index
        assert patch.sequential_index == k == y * nx + x
        assert tract.get_patch_info(k) is patch and tract.get_patch_info((x, y)) is patch
        assert patch.inner_bbox == Box(40 + x * 1000, 40 + y * 800, 1000, 800)
        assert patch.outer_bbox == patch.inner_bbox.grow(40)  # the tract bbox holds the border
        assert tract.bbox.contains(patch.outer_bbox)
        assert patch.tract_id == 1 and patch.wcs is tract.wcs
        seen[patch.inner_bbox.slices()] += 1
    grid = Box(40, 40, nx * 1000, ny * 800)
    assert np.all(seen[grid.slices()] == 1) and seen.sum() == grid.area  # inner boxes tile the grid
    assert tract.get_patch_info(np.int64(3)) == tract.get_patch_info((3 % nx, 3 // nx))
    message = f"patch {nx * ny} is not in tract 1: valid patches are 0..{nx * ny - 1}"
    with pytest.raises(SkyMapError, match=message):
        tract.get_patch_info(nx * ny)
    with pytest.raises(SkyMapError, match=r"patch index \(-1, 0\) is not in tract 1"):
        tract.get_patch_info((-1, 0))
    with pytest.raises(SkyMapError, match="an int .* or an \\(x, y\\) pair"):
        tract.get_patch_info("3")
    with pytest.raises(SkyMapError, match="has no tract 7: valid tracts are 0..3"):
        skymap[7]


def test_outer_boxes_are_clipped_to_the_tract_bbox():
    # patch_border 0: outer == inner; otherwise grown by the border and never off the tract
    tract = SkyMap.discrete(
        "b0", [(20.0, 20.0, 0.1)], patch_inner_dimensions=[300, 300], patch_border=0, pixel_scale=1.0
    )[0]
    for patch in tract:
        assert patch.outer_bbox == patch.inner_bbox
    assert tract.bbox == Box(0, 0, tract.num_patches[0] * 300, tract.num_patches[1] * 300)


@pytest.mark.parametrize("tract_id", [0, 1, 2, 3])
def test_every_inner_point_is_in_exactly_one_inner_box(skymap, tract_id):
    tract = skymap[tract_id]
    rng = np.random.default_rng(10 + tract_id)
    # 1. sky points within the tract radius of its centre (generated without the code under test)
    ra, dec = random_points_in_cap(rng, *tract.ctr_coord, tract.radius_deg, 2000)
    n_random = ra.size
    # 2. the corners of the inner square too: tan(radius) / scale pixels about the centre's pixel
    cx, cy = tract.wcs.world_to_pixel_values(*tract.ctr_coord)
    half = math.degrees(math.tan(math.radians(tract.radius_deg))) * 3600 / 1.0
    sx, sy = cx + rng.uniform(-half, half, 1000), cy + rng.uniform(-half, half, 1000)
    # 3. points straddling every inner-box edge of the grid by +-1e-3 pixel
    nx, ny = tract.num_patches
    edges_x = 40 - 0.5 + 1000 * np.arange(nx + 1)
    edges_y = 40 - 0.5 + 800 * np.arange(ny + 1)
    across_x = np.concatenate([edges_x - 1e-3, edges_x + 1e-3])
    across_y = np.concatenate([edges_y - 1e-3, edges_y + 1e-3])
    ex = np.concatenate([across_x, rng.uniform(edges_x[0], edges_x[-1], across_y.size)])
    ey = np.concatenate([rng.uniform(edges_y[0], edges_y[-1], across_x.size), across_y])
    keep = (ex > edges_x[0]) & (ex < edges_x[-1]) & (ey > edges_y[0]) & (ey < edges_y[-1])
    px, py = np.concatenate([sx, ex[keep]]), np.concatenate([sy, ey[keep]])
    pra, pdec = tract.wcs.pixel_to_world_values(px, py)
    ra, dec = np.concatenate([ra, pra]), np.concatenate([dec, pdec])

    x, y = tract.wcs.world_to_pixel_values(ra, dec)
    counts = np.zeros(len(ra), dtype=int)
    owner = np.full(len(ra), -1)
    for patch in tract.patches():
        b = patch.inner_bbox
        hit = (x >= b.x0 - 0.5) & (x < b.x1 - 0.5) & (y >= b.y0 - 0.5) & (y < b.y1 - 0.5)
        counts += hit
        owner[hit] = patch.sequential_index
    assert np.all(counts == 1)
    np.testing.assert_array_equal(tract.find_patch_indices(ra, dec), owner)
    assert np.all(tract.inner_region().contains(ra[:n_random], dec[:n_random]))
    for k in range(0, len(ra), 97):
        found = tract.find_patch(ra[k], dec[k])
        assert found.sequential_index == owner[k] and found.inner_bbox.contains_point(x[k], y[k])
        if k < n_random + 1000:  # not an edge-straddling point: the sky polygon agrees with the box
            assert found.inner_region().contains(ra[k], dec[k])


def test_find_patch_outside_the_grid(skymap):
    tract = skymap[0]
    message = r"position \(ra=160.000000, dec=2.000000\) deg is not in the patch grid of tract 0"
    with pytest.raises(SkyMapError, match=message):
        tract.find_patch(160.0, 2.0)
    border_ra, border_dec = tract.wcs.pixel_to_world_values(10.0, 500.0)  # in the bbox's border strip
    assert tract.contains(border_ra, border_dec)
    with pytest.raises(SkyMapError, match="not in the patch grid"):
        tract.find_patch(border_ra, border_dec)
    assert list(tract.find_patch_indices([160.0, 330.0], [2.0, -2.0])) == [-1, -1]


def test_patch_regions_match_their_boxes(skymap):
    tract = skymap[3]  # around the pole
    patch = tract.get_patch_info((1, 2))
    for region, box in ((patch.inner_region(), patch.inner_bbox), (patch.outer_region(), patch.outer_bbox)):
        ra, dec = region.vertices_radec()
        x, y = tract.wcs.world_to_pixel_values(ra, dec)
        np.testing.assert_allclose(np.column_stack([x, y]), box.corners(), atol=1e-6)
    assert patch.inner_region() is patch.inner_region()  # cached
    assert patch == tract.get_patch_info(patch.sequential_index)
    assert hash(patch) == hash(tract.get_patch_info((1, 2)))
    assert "PatchInfo(tract=3, index=(1, 2)" in repr(patch)


# ------------------------------------------------------------------------------ region queries


@pytest.mark.parametrize("tract_id", [0, 2, 3])
def test_find_patch_list_matches_brute_force_on_random_polygons(skymap, tract_id):
    tract = skymap[tract_id]
    rng = np.random.default_rng(20 + tract_id)
    w, h = tract.bbox.width, tract.bbox.height
    found_any = 0
    for trial in range(40):
        center = rng.uniform([-0.3 * w, -0.3 * h], [1.3 * w, 1.3 * h])
        size = rng.choice([150.0, 600.0, 2000.0])
        poly = random_polygon(rng, center, size, n=int(rng.integers(3, 8)), convex=bool(trial % 2))
        ra, dec = tract.wcs.pixel_to_world_values(poly[:, 0], poly[:, 1])
        expected = {p.sequential_index for p in tract.patches() if planar_overlap(poly, rect(p.outer_bbox))}
        got = tract.find_patch_list(ra, dec)
        assert [p.sequential_index for p in got] == sorted(expected), f"trial {trial}"
        found_any += bool(expected)
    assert 10 < found_any < 40


def test_find_tract_patch_list_matches_brute_force_on_sky_polygons(skymap):
    rng = np.random.default_rng(30)
    n_multi = 0
    for trial in range(45):
        # polygons drawn on the sky: near RA = 0, across the overlap of tracts 0 and 1, anywhere
        # around tracts 0 and 1; convex and not
        if trial % 3 == 0:
            ra0, dec0 = rng.uniform(-0.6, 0.8) % 360.0, rng.uniform(-0.8, 0.4)
        elif trial % 3 == 1:
            ra0, dec0 = rng.uniform(150.3, 150.5), rng.uniform(2.0, 2.3)
        else:
            ra0, dec0 = rng.uniform(149.2, 151.6), rng.uniform(1.3, 3.0)
        n = int(rng.integers(3, 7))
        while True:
            angles = np.sort(rng.uniform(0, 360, n))
            gaps = np.diff(np.append(angles, angles[0] + 360))
            if gaps.min() > 20 and gaps.max() < 170:
                break
        radii = rng.uniform(0.02, 0.3) * (rng.uniform(0.4, 1.0, n) if trial % 2 else np.ones(n))
        corners = SkyCoord(ra0 * u.deg, dec0 * u.deg).directional_offset_by(angles * u.deg, radii * u.deg)
        ra, dec = corners.ra.deg, corners.dec.deg
        region = SkyRegion.from_radec(ra, dec)
        expected = {}
        for tract in skymap:
            ids = brute_force_patches(tract, ra, dec)
            if ids:
                expected[tract.tract_id] = sorted(ids)
        got = skymap.find_tract_patch_list(region)
        assert {t.tract_id: [p.sequential_index for p in ps] for t, ps in got} == expected, f"trial {trial}"
        assert [t.tract_id for t, _ in got] == sorted(expected)
        assert skymap.find_tract_patch_list(ra, dec) == got  # vertex arrays work the same
        n_multi += len(expected) > 1
    assert n_multi >= 3  # polygons across tract overlaps were exercised


def test_find_tract_patch_list_edge_cases(skymap):
    tract = skymap[0]
    # a polygon holding the whole tract returns every patch
    ra, dec = np.array([148.5, 151.5, 151.5, 148.5]), np.array([0.5, 0.5, 3.5, 3.5])
    result = dict((t.tract_id, ps) for t, ps in skymap.find_tract_patch_list(ra, dec))
    assert [p.sequential_index for p in result[0]] == list(range(len(tract)))
    # far from every tract
    assert skymap.find_tract_patch_list([200.0, 201.0, 200.5], [-40.0, -40.0, -39.0]) == []
    # a polygon around the pole selects the middle patches of the pole tract only
    polar = SkyRegion.from_radec([0.0, 90.0, 180.0, 270.0], [89.99, 89.99, 89.99, 89.99])
    (pole_tract, patches), = skymap.find_tract_patch_list(polar)
    assert pole_tract.tract_id == 3
    expected = sorted(brute_force_patches(pole_tract, *polar.vertices_radec()))
    assert [p.sequential_index for p in patches] == expected
    x, y = pole_tract.wcs.world_to_pixel_values(0.0, 90.0)
    assert sum(p.inner_bbox.contains_point(float(x), float(y)) for p in patches) == 1
    assert 1 <= len(patches) <= 4
    with pytest.raises(TypeError, match="dec_deg is required"):
        skymap.find_tract_patch_list([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="not both"):
        skymap.find_tract_patch_list(polar, [1.0, 2.0])


# ------------------------------------------------------------------------------ tract lookup


def test_find_tract_picks_the_closest_centre_among_containing_tracts(skymap):
    rng = np.random.default_rng(40)
    ra = rng.uniform(149.3, 151.5, 3000)
    dec = rng.uniform(1.3, 3.0, 3000)
    ids = skymap.find_tract_ids(ra, dec)
    d0 = separation_deg(150.0, 2.0, ra, dec)
    d1 = separation_deg(150.8, 2.3, ra, dec)
    in0 = np.asarray(skymap[0].inner_region().contains(ra, dec))
    in1 = np.asarray(skymap[1].inner_region().contains(ra, dec))
    expected = np.where(in0 & in1, np.where(d0 <= d1, 0, 1), np.where(in0, 0, np.where(in1, 1, -1)))
    np.testing.assert_array_equal(ids, expected)
    assert np.sum(in0 & in1) > 50 and np.sum(in0 & in1 & (d1 < d0)) > 10  # overlap exercised
    # inside tract 0's inner region but closer to tract 1's centre -> tract 1
    k = int(np.flatnonzero(in0 & in1 & (d1 < d0))[0])
    assert skymap.find_tract(ra[k], dec[k]).tract_id == 1
    # positions only in the overlap border (outer, not inner) belong to no tract via find_tract
    assert skymap.find_tract(0.1, -0.2).tract_id == 2
    assert skymap.find_tract(359.8, -0.2).tract_id == 2  # across RA = 0
    assert skymap.find_tract(123.0, 90.0).tract_id == 3
    message = r"position \(ra=200.000000, dec=-40.000000\) deg is not in the inner region of any tract of skymap"
    with pytest.raises(SkyMapError, match=message + " 'test_map'"):
        skymap.find_tract(200.0, -40.0)


def test_find_all_tracts(skymap):
    both = skymap.find_all_tracts(150.45, 2.15)
    assert [t.tract_id for t in both] == [1, 0] or [t.tract_id for t in both] == [0, 1]
    d = separation_deg(150.45, 2.15, [150.0, 150.8], [2.0, 2.3])
    assert both[0].tract_id == int(np.argmin(d))
    assert [t.tract_id for t in skymap.find_all_tracts(150.0, 2.0)] == [0]
    assert skymap.find_all_tracts(200.0, -40.0) == []


# ------------------------------------------------------------------------------ config


def test_to_dict_from_config_round_trip(skymap):
    data = skymap.to_dict()
    assert data["name"] == "test_map" and data["skymap_type"] == "discrete"
    assert data["patch_inner_dimensions"] == [1000, 800] and data["patch_border"] == 40
    again = SkyMap.from_config(json.loads(json.dumps(data)))
    assert again == skymap and again.config_hash == skymap.config_hash and hash(again) == hash(skymap)
    assert [t.bbox for t in again] == [t.bbox for t in skymap]
    assert again[2] == skymap[2] and again[2].get_patch_info(3) == skymap[2].get_patch_info(3)
    assert pickle.loads(pickle.dumps(skymap)) == skymap
    other = SkyMap.from_config({**data, "patch_border": 41})
    assert other != skymap and other.config_hash != skymap.config_hash
    # defaults (LSST-like) and the mapping form of centres
    default = SkyMap.from_config({"name": "d", "centers": [{"ra": 10.0, "dec": 5.0, "radius": 0.1}]})
    assert default.to_dict()["patch_inner_dimensions"] == [4000, 4000]
    assert default.to_dict()["patch_border"] == 100 and default.to_dict()["pixel_scale"] == 0.2
    assert default[0].patch_border == 100 and default[0].pixel_scale == 0.2
    assert repr(default) == "SkyMap(name='d', skymap_type='discrete', tracts=1)"


def test_yaml_round_trip(skymap, tmp_path):
    path = tmp_path / "skymap.yaml"
    skymap.to_yaml(path)
    assert SkyMap.from_yaml(path) == skymap
    path.write_text(
        "name: hand_written\ncenters:\n  - [10.0, -5.0, 0.2]\n  - {ra: 11.0, dec: -5.0, radius: 0.2}\n"
        "patch_inner_dimensions: [2000, 2000]\npixel_scale: 0.4\n"
    )
    loaded = SkyMap.from_yaml(path)
    assert len(loaded) == 2 and loaded[1].ctr_coord == (11.0, -5.0)
    assert loaded[0].patch_inner_dimensions == (2000, 2000) and loaded[0].pixel_scale == 0.4


def test_yaml_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ncenters: [[10.0, 5.0, 0.1]]\npatch_size: [100, 100]\n")
    where = re.escape(str(path))
    with pytest.raises(SkyMapError, match=rf"{where}: unknown skymap config field\(s\) \['patch_size'\]"):
        SkyMap.from_yaml(path)
    path.write_text("name: x\ncenters: [[10.0, 95.0, 0.1]]\n")
    with pytest.raises(SkyMapError, match=rf"{where}: skymap config field 'centers\[0\].dec' must be within"):
        SkyMap.from_yaml(path)
    path.write_text("name: x\ncenters: [[10.0, 5.0, 0.1]\n")
    with pytest.raises(SkyMapError, match=rf"{where}: not valid YAML"):
        SkyMap.from_yaml(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(SkyMapError, match=rf"{where}: a skymap config must be a mapping"):
        SkyMap.from_yaml(path)
    with pytest.raises(SkyMapError, match="missing.yaml: cannot read skymap file"):
        SkyMap.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"patch_inner_dimensions": [0, 4000]}, "patch_inner_dimensions", "positive integer"),
        ({"patch_inner_dimensions": [4000]}, "patch_inner_dimensions", "two positive integers"),
        ({"patch_inner_dimensions": [4000.5, 4000]}, "patch_inner_dimensions", "integer number of pixels"),
        ({"patch_border": -1}, "patch_border", "non-negative integer"),
        ({"patch_border": 2.5}, "patch_border", "integer number of pixels"),
        ({"patch_border": True}, "patch_border", "integer number of pixels"),
        ({"pixel_scale": 0.0}, "pixel_scale", "> 0 arcsec/pixel"),
        ({"pixel_scale": "fine"}, "pixel_scale", "must be a number"),
        ({"tract_overlap": -0.1}, "tract_overlap", ">= 0 degrees"),
        ({"rotation": float("nan")}, "rotation", "must be finite"),
        ({"projection": "STG"}, "projection", "must be 'TAN'"),
        ({"name": ""}, "name", "non-empty string"),
        ({"skymap_type": "rings"}, "skymap_type", r"one of \['discrete'\]"),
        ({"centers": []}, "centers", "non-empty list"),
        ({"centers": [[10.0, 5.0]]}, "centers[0]", r"\[ra_deg, dec_deg, radius_deg\]"),
        ({"centers": [[10.0, 5.0, 0.1], [10.0, -91.0, 0.1]]}, "centers[1].dec", r"within \[-90, 90\] degrees"),
        ({"centers": [[10.0, 5.0, 0.0]]}, "centers[0].radius", "> 0 degrees"),
        ({"centers": [[10.0, 5.0, -1.0]]}, "centers[0].radius", "> 0 degrees"),
        ({"centers": [[10.0, 5.0, 85.0]]}, "centers[0].radius", "< 80.0 degrees"),
        ({"centers": [["a", 5.0, 0.1]]}, "centers[0].ra", "must be a number"),
        ({"centers": [{"ra": 1.0, "dec": 2.0}]}, "centers[0]", r"missing \['radius'\]"),
    ],
)
def test_bad_config_errors_name_the_field(change, field, message):
    config = {"name": "bad", "skymap_type": "discrete", "centers": [[10.0, 5.0, 0.1]], **change}
    with pytest.raises(SkyMapError) as info:
        SkyMap.from_config(config)
    text = str(info.value)
    assert f"'{field}'" in text
    assert re.search(message, text), text


def test_discrete_constructor_validates_like_from_config():
    with pytest.raises(SkyMapError, match="'centers\\[0\\].radius' must be > 0 degrees"):
        SkyMap.discrete("x", [(10.0, 5.0, 0.0)])
    with pytest.raises(SkyMapError, match="'pixel_scale' must be > 0"):
        SkyMap.discrete("x", [(10.0, 5.0, 0.1)], pixel_scale=-0.2)
    with pytest.raises(SkyMapError, match="unknown skymap config field"):
        SkyMap.from_config({"name": "x", "centers": [[1, 2, 0.1]], "tractOverlap": 1.0})


def test_lazy_package_exports():
    import butler

    assert butler.SkyMap is SkyMap and butler.TractInfo is TractInfo and butler.PatchInfo is PatchInfo
    assert butler.SkyRegion is SkyRegion


def test_queries_from_many_threads_match_serial_results():
    # lazily built regions and patch caches are shared: racing threads must still agree
    centers = [(150.0, 2.0, 0.5), (150.8, 2.3, 0.5)]
    regions = [
        SkyRegion.from_radec([ra, ra + 0.2, ra + 0.2, ra], [dec, dec, dec + 0.15, dec + 0.15])
        for ra, dec in [(149.7, 1.6), (150.3, 2.1), (150.5, 2.3), (151.0, 2.5), (149.9, 2.4), (150.6, 1.8)]
    ]

    def run(skymap: SkyMap, region: SkyRegion):
        found = skymap.find_tract_patch_list(region)
        ra, dec = region.interior_point()
        return [(t.tract_id, [p.sequential_index for p in ps]) for t, ps in found], skymap.find_tract(ra, dec).tract_id

    serial = [run(SkyMap.discrete("s", centers, **SMALL), r) for r in regions]
    shared = SkyMap.discrete("s", centers, **SMALL)
    barrier = threading.Barrier(8)

    def worker(k: int):
        barrier.wait()
        return [run(shared, regions[(k + i) % len(regions)]) for i in range(len(regions))]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(worker, range(8)))
    for k, result in enumerate(results):
        assert result == [serial[(k + i) % len(regions)] for i in range(len(regions))]
