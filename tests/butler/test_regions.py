"""Sky regions: containment, overlap and serialization.

The reference answers come from elsewhere than the code under test: a gnomonic (TAN) WCS made
here maps great circles to straight lines, so a polygon drawn in its pixel plane is exactly the
spherical polygon of its projected vertices, and planar geometry on it (written in this file)
is an independent truth.  spherical_geometry's own scalar tests are a second reference.
"""

from __future__ import annotations

import json
import math
import pickle

import astropy.units as u
import numpy as np
import pytest
from astropy.wcs import WCS
from spherical_geometry.polygon import SphericalPolygon

from butler.errors import DataModelError
from butler.geometry import Box
from butler.htm import htm_cover
from butler.regions import SkyRegion


# ------------------------------------------------------------------------------ helpers


def tan_wcs(ra: float, dec: float, scale_arcsec: float = 1.0, rotation_deg: float = 0.0) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [1.0, 1.0]  # 0-based pixel (0, 0) is the tangent point
    t = math.radians(rotation_deg)
    wcs.wcs.cd = scale_arcsec / 3600.0 * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])
    wcs.wcs.set()
    return wcs


def to_sky(wcs: WCS, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ra, dec = wcs.pixel_to_world_values(xy[:, 0], xy[:, 1])
    return np.mod(ra, 360.0), dec


def random_convex(rng: np.random.Generator, center, size: float, n: int = 4) -> np.ndarray:
    """A random convex polygon (pixel plane): points on an ellipse at well-separated angles."""
    while True:
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        gaps = np.diff(np.append(angles, angles[0] + 2 * np.pi))
        if gaps.min() > 0.3 and gaps.max() < np.pi - 0.1:
            break
    stretch = rng.uniform(0.4, 1.0)
    tilt = rng.uniform(0, np.pi)
    pts = np.stack([np.cos(angles), stretch * np.sin(angles)], axis=1) * size
    rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    return pts @ rot.T + np.asarray(center, dtype=float)


def planar_convex_overlap(p: np.ndarray, q: np.ndarray) -> bool:
    """Separating-axis test for two convex planar polygons (closed sets)."""
    for poly in (p, q):
        edges = np.roll(poly, -1, axis=0) - poly
        for ex, ey in edges:
            axis = np.array([-ey, ex])
            a, b = p @ axis, q @ axis
            if a.max() < b.min() or b.max() < a.min():
                return False
    return True


def random_star(rng: np.random.Generator, center, size: float, n: int) -> np.ndarray:
    """A random simple, usually non-convex polygon: a star of random radii around ``center``."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    while np.diff(np.append(angles, angles[0] + 2 * np.pi)).min() < 0.2:
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = size * rng.uniform(0.25, 1.0, n)
    return np.asarray(center, dtype=float) + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def planar_inside_simple(poly: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Even-odd ray casting for any simple planar polygon."""
    x, y = pts[:, 0], pts[:, 1]
    inside = np.zeros(len(pts), dtype=bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < at)
    return inside


def planar_simple_overlap(p: np.ndarray, q: np.ndarray) -> bool:
    """Whether two simple planar polygons share area: a vertex inside the other, or edges cross."""
    if planar_inside_simple(p, q).any() or planar_inside_simple(q, p).any():
        return True

    def orient(a, b, c):
        return (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])

    a, b = p[:, None, :], np.roll(p, -1, axis=0)[:, None, :]
    c, d = q[None, :, :], np.roll(q, -1, axis=0)[None, :, :]
    return bool(np.any(((orient(c, d, a) > 0) != (orient(c, d, b) > 0)) & ((orient(a, b, c) > 0) != (orient(a, b, d) > 0))))


def planar_inside_convex(poly: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points strictly inside a convex planar polygon (either orientation)."""
    edges = np.roll(poly, -1, axis=0) - poly
    rel = pts[:, None, :] - poly[None, :, :]
    cross = edges[None, :, 0] * rel[..., 1] - edges[None, :, 1] * rel[..., 0]
    return np.all(cross > 0, axis=1) | np.all(cross < 0, axis=1)


def sample_polygon(rng: np.random.Generator, poly: np.ndarray, n_inside: int, n_edge: int) -> np.ndarray:
    """Planar points inside a convex polygon (random barycentric fans) and on its edges."""
    k = len(poly)
    tri = rng.integers(1, k - 1, n_inside)
    w = rng.dirichlet([1, 1, 1], n_inside)
    inside = w[:, :1] * poly[0] + w[:, 1:2] * poly[tri] + w[:, 2:] * poly[tri + 1]
    t = np.linspace(0.0, 1.0, n_edge)[:, None]
    edges = [poly[i] + t * (poly[(i + 1) % k] - poly[i]) for i in range(k)]
    return np.concatenate([inside, *edges])


def region_from_plane(wcs: WCS, poly: np.ndarray) -> SkyRegion:
    return SkyRegion.from_radec(*to_sky(wcs, poly))


# ------------------------------------------------------------------------------ construction


def test_vertices_round_trip_and_basic_properties():
    region = SkyRegion.from_radec([10.0, 10.2, 10.2, 10.0], [20.0, 20.0, 20.2, 20.2])
    ra, dec = region.vertices_radec()
    np.testing.assert_array_equal(ra, [10.0, 10.2, 10.2, 10.0])
    np.testing.assert_array_equal(dec, [20.0, 20.0, 20.2, 20.2])
    assert region.num_vertices == 4 and region.is_convex
    # ~0.2 x 0.2 deg at dec 20: 0.04 * cos(20.1 deg) square degrees
    assert region.area_deg2() == pytest.approx(0.04 * math.cos(math.radians(20.1)), rel=1e-3)
    # a repeated closing vertex is dropped, reversed order describes the same area
    closed = SkyRegion.from_radec([10.0, 10.2, 10.2, 10.0, 10.0], [20.0, 20.0, 20.2, 20.2, 20.0])
    assert closed == region
    reverse = SkyRegion.from_radec([10.0, 10.2, 10.2, 10.0][::-1], [20.0, 20.0, 20.2, 20.2][::-1])
    assert reverse.contains(10.1, 20.1) and not reverse.contains(10.3, 20.1)
    assert "SkyRegion([(10.000000, 20.000000)" in repr(region)


def test_bounding_circle_holds_every_vertex_and_interior_point():
    rng = np.random.default_rng(1)
    wcs = tan_wcs(123.0, -45.0)
    for _ in range(20):
        poly = random_convex(rng, rng.uniform(-500, 500, 2), rng.uniform(50, 2000), n=int(rng.integers(3, 8)))
        region = region_from_plane(wcs, poly)
        ra_c, dec_c, radius = region.bounding_circle()
        pts = sample_polygon(rng, poly, 200, 50)
        ra, dec = to_sky(wcs, pts)
        sep = _separation_deg(ra_c, dec_c, ra, dec)
        assert np.all(sep <= radius + 1e-9)
        assert region.contains(*region.interior_point())


def _separation_deg(ra0, dec0, ra, dec):
    from astropy.coordinates import SkyCoord

    return SkyCoord(ra0 * u.deg, dec0 * u.deg).separation(SkyCoord(ra * u.deg, dec * u.deg)).deg


def test_from_wcs_box_uses_outer_pixel_edges():
    wcs = tan_wcs(200.0, 10.0, scale_arcsec=0.2, rotation_deg=17.0)
    box = Box(-300, 100, 400, 250)
    region = SkyRegion.from_wcs_box(wcs, box)
    ra, dec = region.vertices_radec()
    expected = to_sky(wcs, np.array(box.corners()))
    np.testing.assert_allclose(ra, expected[0], atol=1e-12)
    np.testing.assert_allclose(dec, expected[1], atol=1e-12)
    rng = np.random.default_rng(2)
    # pixel centres of the box (and anything in its outer half-pixel) are inside; beyond is not
    inside = np.column_stack(
        [rng.uniform(box.x0 - 0.49, box.x1 - 0.51, 300), rng.uniform(box.y0 - 0.49, box.y1 - 0.51, 300)]
    )
    assert np.all(region.contains(*to_sky(wcs, inside)))
    outside = np.array(
        [[box.x0 - 0.6, box.y0 + 10], [box.x1 - 0.4, box.y0 + 10], [box.x0 + 5, box.y1 - 0.4], [box.x0 + 5, box.y0 - 0.6]]
    )
    assert not np.any(region.contains(*to_sky(wcs, outside)))
    with pytest.raises(DataModelError, match="empty box"):
        SkyRegion.from_wcs_box(wcs, Box(0, 0, 0, 5))


@pytest.mark.parametrize(
    ("ra", "dec", "match"),
    [
        ([10.0, 11.0], [0.0, 1.0], "at least 3 distinct vertices, got 2"),
        ([10.0, 11.0, 10.0], [0.0, 1.0, 0.0], "at least 3 distinct vertices, got 2"),
        ([10.0, 11.0, np.nan], [0.0, 1.0, 2.0], "must be finite"),
        ([10.0, 11.0, np.inf], [0.0, 1.0, 2.0], "must be finite"),
        ([10.0, 11.0, 12.0], [0.0, 91.0, 2.0], r"within \[-90, 90\]"),
        ([10.0, 10.0, 10.2, 10.2], [20.0, 20.0, 20.2, 20.3], "vertices 0 .* and 1 .* coincide"),
        ([0.0, 45.0, 90.0], [0.0, 0.0, 0.0], "degenerate: all vertices lie on one great circle"),
        ([30.0, 30.0, 30.0, 30.0], [-10.0, 0.0, 5.0, 20.0], "degenerate"),
        ([10.0, 10.2, 10.0, 10.2], [20.0, 20.2, 20.2, 20.0], "edges 0-1 and 2-3 cross"),
        ([0.0, 120.0, 240.0], [0.0, 0.0, 0.0], "hemisphere"),
        ([0.0, 100.0, 200.0], [0.0, 10.0, 0.0], "too large"),
        ([0.0, 180.0, 90.0], [0.0, 0.0, 10.0], "antipodal"),
        ([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], "1-D ra and dec"),
        (["a", "b", "c"], [1.0, 2.0, 3.0], "must be numbers"),
    ],
)
def test_bad_vertices_raise_clear_errors(ra, dec, match):
    with pytest.raises(DataModelError, match=match):
        SkyRegion.from_radec(ra, dec)


def test_spikes_and_revisited_vertices_are_rejected():
    # out and back to the same vertex: no area on that side
    message = "vertices 1 .* and 3 .* coincide: a simple polygon visits each vertex once"
    with pytest.raises(DataModelError, match=message):
        SkyRegion.from_radec([10.0, 10.5, 11.0, 10.5], [0.0, 0.5, 1.0, 0.5])
    # a spike retracing part of an edge along a meridian
    with pytest.raises(DataModelError, match="edges 0-1 and 2-3 cross"):
        SkyRegion.from_radec([30.0, 30.0, 30.0, 31.0], [0.0, 10.0, 5.0, 5.0])


# ------------------------------------------------------------------------------ containment


def test_contains_agrees_with_planar_truth_and_library():
    rng = np.random.default_rng(3)
    wcs = tan_wcs(33.0, 61.0, rotation_deg=40.0)
    for _ in range(12):
        n = int(rng.integers(3, 7))
        poly = random_convex(rng, rng.uniform(-300, 300, 2), rng.uniform(100, 3000), n=n)
        region = region_from_plane(wcs, poly)
        pts = np.column_stack([rng.uniform(-4000, 4000, 400), rng.uniform(-4000, 4000, 400)])
        truth = planar_inside_convex(poly, pts)
        ra, dec = to_sky(wcs, pts)
        got = region.contains(ra, dec)
        assert got.shape == (400,) and got.dtype == bool
        np.testing.assert_array_equal(got, truth)
        library = SphericalPolygon.from_radec(*region.vertices_radec())
        for k in range(0, 400, 20):
            assert bool(library.contains_lonlat(ra[k], dec[k])) == truth[k]
    # scalar in, scalar out; broadcasting keeps the shape
    assert region.contains(float(ra[0]), float(dec[0])) in (True, False)
    assert isinstance(region.contains(float(ra[0]), float(dec[0])), bool)
    assert region.contains(np.full((2, 3), ra[0]), dec[0]).shape == (2, 3)
    assert not region.contains(np.nan, 0.0)


def test_ra_wrap_at_zero():
    region = SkyRegion.from_radec([359.9, 0.1, 0.1, 359.9], [-0.1, -0.1, 0.1, 0.1])
    assert region.is_convex
    assert region.area_deg2() == pytest.approx(0.04, rel=1e-3)  # not the 359.8-deg-wide complement
    inside = region.contains([359.95, 0.05, 0.0, 360.0, -0.05], [0.0, 0.05, -0.09, 0.0, 0.0])
    assert inside.all()
    assert not region.contains([0.2, 359.8, 180.0, 0.0], [0.0, 0.0, 0.0, 0.2]).any()
    ra_c, dec_c, radius = region.bounding_circle()
    assert min(ra_c, 360 - ra_c) < 1e-9 and abs(dec_c) < 1e-9 and radius == pytest.approx(0.1414, abs=1e-3)
    ra, _ = region.vertices_radec()
    assert np.all((ra >= 0) & (ra < 360))
    # negative and >360 right ascensions mean the same sky
    assert SkyRegion.from_radec([-0.1, 0.1, 0.1, -0.1], [-0.1, -0.1, 0.1, 0.1]) == region


def test_region_around_and_touching_a_pole():
    cap = SkyRegion.from_radec([0.0, 90.0, 180.0, 270.0], [89.0, 89.0, 89.0, 89.0])
    assert cap.contains(123.0, 90.0) and cap.contains(45.0, 89.5) and cap.contains(300.0, 89.3)
    assert not cap.contains(45.0, 88.9) and not cap.contains(0.0, -90.0)
    ra_c, dec_c, radius = cap.bounding_circle()
    assert dec_c == pytest.approx(90.0) and radius == pytest.approx(1.0)
    corner = SkyRegion.from_radec([0.0, 0.0, 90.0], [80.0, -90.0 + 180.0, 80.0])  # a vertex at the pole
    assert corner.contains(45.0, 85.0) and not corner.contains(200.0, 85.0)
    south = SkyRegion.from_radec([10.0, 130.0, 250.0], [-88.0, -88.0, -88.0])
    assert south.contains(0.0, -90.0) and not south.contains(0.0, 90.0)


# ------------------------------------------------------------------------------ overlaps


def test_overlaps_agrees_with_planar_truth_and_library():
    rng = np.random.default_rng(4)
    wcs = tan_wcs(0.0, 0.0, rotation_deg=10.0)  # straddles RA = 0
    results = []
    for _ in range(60):
        p = random_convex(rng, rng.uniform(-2000, 2000, 2), rng.uniform(100, 1500), n=int(rng.integers(3, 7)))
        q = random_convex(rng, rng.uniform(-2000, 2000, 2), rng.uniform(100, 1500), n=int(rng.integers(3, 7)))
        a, b = region_from_plane(wcs, p), region_from_plane(wcs, q)
        truth = planar_convex_overlap(p, q)
        assert a.overlaps(b) == truth and b.overlaps(a) == truth
        assert bool(a.polygon.intersects_poly(b.polygon)) == truth
        results.append(truth)
    assert 5 < sum(results) < 55  # both outcomes exercised


def test_overlaps_nested_identical_and_far_regions():
    outer = SkyRegion.from_radec([10.0, 11.0, 11.0, 10.0], [0.0, 0.0, 1.0, 1.0])
    inner = SkyRegion.from_radec([10.4, 10.6, 10.6, 10.4], [0.4, 0.4, 0.6, 0.6])
    assert outer.overlaps(inner) and inner.overlaps(outer)
    assert outer.overlaps(SkyRegion.from_radec(*outer.vertices_radec()))
    far = SkyRegion.from_radec([190.0, 191.0, 191.0], [0.0, 0.0, 1.0])
    assert not outer.overlaps(far)
    with pytest.raises(TypeError, match="needs a SkyRegion"):
        outer.overlaps((10.0, 0.0))


def test_non_convex_contains_and_overlaps_agree_with_planar_truth():
    rng = np.random.default_rng(8)
    wcs = tan_wcs(359.0, -20.0, rotation_deg=-25.0)
    n_nonconvex = 0
    for _ in range(10):
        star = random_star(rng, rng.uniform(-200, 200, 2), rng.uniform(300, 2000), int(rng.integers(4, 9)))
        region = region_from_plane(wcs, star)
        n_nonconvex += not region.is_convex
        pts = np.column_stack([rng.uniform(-2500, 2500, 150), rng.uniform(-2500, 2500, 150)])
        np.testing.assert_array_equal(region.contains(*to_sky(wcs, pts)), planar_inside_simple(star, pts))
        assert region.contains(*region.interior_point())
        other_poly = random_star(rng, rng.uniform(-2500, 2500, 2), rng.uniform(200, 1500), int(rng.integers(3, 7)))
        other = region_from_plane(wcs, other_poly)
        truth = planar_simple_overlap(star, other_poly)
        assert region.overlaps(other) == truth and other.overlaps(region) == truth
    assert n_nonconvex >= 5


def test_non_convex_region_uses_library_path():
    # an L shape: the square [0, 2] x [0, 2] (pixel plane) without its [1, 2] x [1, 2] corner
    wcs = tan_wcs(150.0, 30.0, scale_arcsec=360.0)  # 0.1 deg per pixel unit
    ell = np.array([[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2]], dtype=float)
    region = region_from_plane(wcs, ell)
    assert not region.is_convex
    pts = np.array([[0.5, 0.5], [1.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 0.5], [-0.1, 1.0]])
    np.testing.assert_array_equal(region.contains(*to_sky(wcs, pts)), [True, True, True, False, False, False])
    in_notch = region_from_plane(wcs, np.array([[1.2, 1.2], [1.8, 1.2], [1.8, 1.8], [1.2, 1.8]]))
    across = region_from_plane(wcs, np.array([[0.8, 1.2], [1.8, 1.2], [1.8, 1.8], [0.8, 1.8]]))
    assert not region.overlaps(in_notch) and not in_notch.overlaps(region)
    assert region.overlaps(across) and across.overlaps(region)


# ------------------------------------------------------------------------------ serialization


def test_to_dict_round_trip_json_pickle_and_hash():
    region = SkyRegion.from_radec([359.9, 0.1, 0.05], [-0.1, -0.1, 0.2])
    data = region.to_dict()
    assert data == {"type": "polygon", "vertices": [[359.9, -0.1], [0.1, -0.1], [0.05, 0.2]]}
    again = SkyRegion.from_dict(json.loads(json.dumps(data)))
    assert again == region and hash(again) == hash(region)
    assert pickle.loads(pickle.dumps(region)) == region
    assert region != SkyRegion.from_radec([359.9, 0.1, 0.06], [-0.1, -0.1, 0.2])
    assert region != "not a region"
    assert len({region, again}) == 1


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([[1, 2]], "must be a mapping"),
        ({"type": "circle", "vertices": []}, "unknown SkyRegion type 'circle'"),
        ({"vertices": [[1, 2], [3, 4], [5, 6]], "extra": 1}, r"unknown SkyRegion keys \['extra'\]"),
        ({"type": "polygon"}, "needs 'vertices'"),
        ({"vertices": [1, 2, 3]}, r"\[ra_deg, dec_deg\] pairs"),
        ({"vertices": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}, r"\[ra_deg, dec_deg\] pairs"),
        ({"vertices": [[1, 2], [1, 2], [1, 2]]}, "at least 3 distinct|coincide"),
    ],
)
def test_from_dict_errors(data, match):
    with pytest.raises(DataModelError, match=match):
        SkyRegion.from_dict(data)


# ------------------------------------------------------------------------------ many at once


def _slots_equal(a: SkyRegion, b: SkyRegion) -> None:
    for name in SkyRegion.__slots__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y), name
            assert not y.flags.writeable, name
        elif name != "_polygon":
            assert x == y, name


def test_from_radec_many_builds_the_same_regions_as_one_at_a_time():
    rng = np.random.default_rng(5)
    ras, decs = [], []
    for _ in range(200):
        ra0, dec0 = rng.uniform(0, 360), rng.uniform(-85, 85)
        w, h = rng.uniform(0.01, 2.0, 2)
        ras.append([ra0, ra0 + w, ra0 + w, ra0])
        decs.append([dec0, dec0, min(dec0 + h, 89.9), min(dec0 + h, 89.9)])
    ras += [[10.0, 11.0, 10.5], [10.0, 11.0, 10.5, 11.0, 10.0], [5.0, 6.0, 6.0, 5.0, 5.0], np.array([359.9, 0.1, 0.1])]
    decs += [[0.0, 0.0, 1.0], [-6.0, -6.0, -5.5, -5.0, -5.0], [1.0, 1.0, 2.0, 2.0, 1.0], np.array([0.0, 0.0, 0.2])]
    many = SkyRegion.from_radec_many(ras, decs)
    assert len(many) == len(ras)
    for r, d, region in zip(ras, decs, many, strict=True):
        one = SkyRegion(r, d)
        assert region == one
        _slots_equal(one, region)
    assert not many[-3].is_convex and many[-2].num_vertices == 4  # closing vertex dropped
    for region in many[:5]:
        assert htm_cover([region], 7)[1].tolist() == htm_cover([SkyRegion(*region.vertices_radec())], 7)[1].tolist()
    square = SkyRegion.from_radec_many(np.array([[1.0, 2.0, 2.0, 1.0]]), np.array([[0.0, 0.0, 1.0, 1.0]]))
    assert square == [SkyRegion([1.0, 2.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0])]
    assert SkyRegion.from_radec_many([], []) == []


@pytest.mark.parametrize(
    ("ra", "dec", "match"),
    [
        ([0.0, 1.0, float("nan"), 0.0], [0.0, 0.0, 1.0, 1.0], "must be finite"),
        ([0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 91.0, 1.0], "within \\[-90, 90\\]"),
        ([0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], "coincide"),
        ([0.0, 1.0], [0.0, 0.0], "at least 3"),
        ([0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], "cross"),
    ],
)
def test_from_radec_many_raises_as_the_constructor_does(ra, dec, match):
    good = ([10.0, 10.1, 10.1], [0.0, 0.0, 0.1])
    with pytest.raises(DataModelError, match=match):
        SkyRegion(ra, dec)
    with pytest.raises(DataModelError, match=match):
        SkyRegion.from_radec_many([good[0], ra], [good[1], dec])
    with pytest.raises(DataModelError, match="as many ra as dec"):
        SkyRegion.from_radec_many([ra], [])

