"""The Hierarchical Triangular Mesh (HTM): the registry's spatial index pixelization.

HTM (Kunszt, Szalay & Thakar 2001; the pixelization of ``lsst.sphgeom.HtmPixelization`` and of
LSST's registry overlap tables) cuts the sphere into the 8 octant triangles and then each
triangle into 4 by joining its edge midpoints, ``level`` times.  Trixel ids follow the standard
numbering: the roots are 8-15 (S0-S3, N0-N3), and child ``k`` of trixel ``t`` is ``4 t + k``
(children 0-2 at the parent's corners 0-2, child 3 in the middle).

Trixel edges are great circles, so a trixel is a convex spherical triangle and the exact
separating-plane test of :mod:`butler.regions` decides whether it touches a convex region: the
registry's index holds only the trixels a region really touches.  (HEALPix pixel edges are not
great circles; their covers must be padded, which at the same pixel size holds ~7x more index
rows here.)  Written with numpy, vectorized over regions, because it pays: the registry indexes
thousands of regions per insert, and this replaces ~1 s of astropy import and ~60k index rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .errors import DataModelError

if TYPE_CHECKING:
    from .regions import SkyRegion

__all__ = ["MAX_LEVEL", "htm_cover", "htm_index", "htm_triangles"]

#: Deepest level supported: ids stay below 2**63 and trixels stay far above rounding (~1e-10 rad).
MAX_LEVEL = 24

# Sine of the angle by which a trixel must lie beyond a plane to be rejected: far above the
# rounding of the computed trixel corners (~1e-16), far below any trixel (level 24: ~1e-7 rad).
_COVER_MARGIN = 1e-12

_V = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
# S0-S3 then N0-N3, each counter-clockwise seen from outside the sphere.
_ROOTS = _V[[[1, 5, 2], [2, 5, 3], [3, 5, 4], [4, 5, 1], [1, 0, 4], [4, 0, 3], [3, 0, 2], [2, 0, 1]]]


def _check_level(level: object) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= int(level) <= MAX_LEVEL:
        raise DataModelError(f"HTM level must be an integer from 0 to {MAX_LEVEL}, got {level!r}")
    return int(level)


def _dot(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Dot products over the last axis, broadcast (einsum cost ~10x more on these tiny axes)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _normalized(v: NDArray[np.float64]) -> NDArray[np.float64]:
    return v / np.sqrt(_dot(v, v))[..., None]


def _padded(regions: Sequence[SkyRegion]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Edge normals and vertices of the regions, ``(n, width, 3)`` each.

    Shorter polygons are padded by repeating their first normal and vertex (a repeat changes no
    separating-plane test).
    """
    counts = [len(r._xyz) for r in regions]
    width = max(counts)
    if min(counts) == width:
        shape = (len(regions), width, 3)
        return (
            np.concatenate([r._normals for r in regions]).reshape(shape),
            np.concatenate([r._xyz for r in regions]).reshape(shape),
        )
    pad = [np.zeros(width - c, dtype=np.int64) for c in counts]
    normals = np.stack([np.concatenate([r._normals, r._normals[p]]) for r, p in zip(regions, pad, strict=True)])
    vertices = np.stack([np.concatenate([r._xyz, r._xyz[p]]) for r, p in zip(regions, pad, strict=True)])
    return normals, vertices


def _children(tri: NDArray[np.float64], ids: NDArray[np.int64]) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """The 4 children of each ``(m, 3, 3)`` trixel, as ``(4 m, 3, 3)`` corners and ids."""
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    w0, w1, w2 = _normalized(v1 + v2), _normalized(v0 + v2), _normalized(v0 + v1)
    children = np.stack(
        [np.stack(c, axis=1) for c in ((v0, w2, w1), (v1, w0, w2), (v2, w1, w0), (w0, w1, w2))], axis=1
    )
    return children.reshape(-1, 3, 3), (ids[:, None] * 4 + np.arange(4, dtype=np.int64)).ravel()


def _edge_normals(tri: NDArray[np.float64]) -> NDArray[np.float64]:
    """Inward unit normals of the edges of counter-clockwise ``(m, 3, 3)`` trixels."""
    following = tri[:, [1, 2, 0]]
    cross = np.stack(
        [
            tri[..., 1] * following[..., 2] - tri[..., 2] * following[..., 1],
            tri[..., 2] * following[..., 0] - tri[..., 0] * following[..., 2],
            tri[..., 0] * following[..., 1] - tri[..., 1] * following[..., 0],
        ],
        axis=-1,
    )
    return _normalized(cross)


def htm_triangles(ids: NDArray[np.int64] | Sequence[int], level: int) -> NDArray[np.float64]:
    """Corner unit vectors ``(m, 3, 3)`` of trixels of one level, counter-clockwise.

    Parameters
    ----------
    ids : array-like of int
        Trixel ids of level ``level`` (``8 * 4**level`` to ``16 * 4**level - 1``).
    level : int
        The level.
    """
    level = _check_level(level)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if np.any((ids < 8 << 2 * level) | (ids >= 16 << 2 * level)):
        raise DataModelError(f"HTM ids of level {level} lie in [{8 << 2 * level}, {16 << 2 * level}), got {ids.tolist()}")
    tri = _ROOTS[(ids >> 2 * level) - 8]
    for shift in range(2 * (level - 1), -1, -2):
        v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
        w0, w1, w2 = _normalized(v1 + v2), _normalized(v0 + v2), _normalized(v0 + v1)
        child = ((ids >> shift) & 3)[:, None, None]
        tri = np.where(
            child == 0,
            np.stack([v0, w2, w1], axis=1),
            np.where(
                child == 1,
                np.stack([v1, w0, w2], axis=1),
                np.where(child == 2, np.stack([v2, w1, w0], axis=1), np.stack([w0, w1, w2], axis=1)),
            ),
        )
    return tri


def htm_index(xyz: NDArray[np.float64], level: int) -> NDArray[np.int64]:
    """Trixel ids of unit vectors ``(m, 3)`` at one level.

    A point on an edge (to rounding) goes to one of the trixels that share it.
    """
    level = _check_level(level)
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    m = len(xyz)
    tri = np.broadcast_to(_ROOTS, (m, 8, 3, 3))
    ids = np.broadcast_to(np.arange(8, 16, dtype=np.int64), (m, 8))
    for depth in range(level + 1):
        side = np.einsum("mcei,mi->mce", _edge_normals(tri.reshape(-1, 3, 3)).reshape(tri.shape), xyz)
        # The child with the largest smallest edge distance: the one holding the point (with
        # rounding, a point on an edge is still assigned to exactly one trixel).
        pick = np.argmax(side.min(axis=2), axis=1)
        rows = np.arange(m)
        chosen, chosen_ids = tri[rows, pick], ids[rows, pick]
        if depth == level:
            return chosen_ids
        children, child_ids = _children(chosen, chosen_ids)
        tri, ids = children.reshape(m, 4, 3, 3), child_ids.reshape(m, 4)
    raise AssertionError("unreachable")


def htm_cover(regions: Sequence[SkyRegion], level: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The trixels of one level that touch each of many regions.

    Parameters
    ----------
    regions : sequence of SkyRegion
        The regions.
    level : int
        HTM level (0 to :data:`MAX_LEVEL`); level 7 trixels are ~0.6 degrees across.

    Returns
    -------
    region_index, trixels : numpy.ndarray of int64
        One entry per (region, trixel) pair, sorted by region index then trixel id.

    Notes
    -----
    Descends the hierarchy for all regions at once, keeping at each level the children that
    are not provably disjoint from their region: a trixel is dropped when all its corners lie
    beyond one edge plane of a convex region (by more than a 1e-12 margin) or when all the
    region's vertices lie beyond one of its edge planes; for a non-convex region, when it is
    outside the region's bounding circle.  Two convex polygons in one hemisphere that no such
    plane separates intersect, so for convex regions the cover is exact up to the margin: every
    trixel the region touches, and at most a hair more.  Arrays are kept as one contiguous row
    per coordinate (numpy's per-call overhead dominates on ``(m, 3)`` arrays here).
    """
    level = _check_level(level)
    n = len(regions)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    normals, vertices = _padded(regions)
    normals, vertices = normals.transpose(1, 2, 0).copy(), vertices.transpose(1, 2, 0).copy()  # (width, 3, n)
    convex = np.array([r._convex for r in regions])
    centers = np.stack([r._center_xyz for r in regions]).T.copy()
    cos_radius = np.cos([r._radius_rad for r in regions])
    sin_radius = np.sqrt(1.0 - cos_radius * cos_radius)

    owner, ids = _root_candidates(centers, np.sqrt(1.0 - cos_radius * cos_radius))
    tri = _ROOTS.transpose(1, 2, 0)[:, :, ids - 8]  # (corner, xyz, m)
    for depth in range(level + 1):
        reject = np.zeros(len(ids), dtype=bool)
        region_normals, region_vertices = normals[:, :, owner], vertices[:, :, owner]
        for plane in region_normals:  # all three corners beyond one edge plane of the region
            reject |= np.maximum(np.maximum(_dot3(plane, tri[0]), _dot3(plane, tri[1])), _dot3(plane, tri[2])) < -_COVER_MARGIN
        reject &= convex[owner]
        for k in range(3):  # every region vertex beyond one edge plane of the trixel
            plane = _normalized3(_cross3(tri[k], tri[(k + 1) % 3]))
            farthest = _dot3(plane, region_vertices[0])
            for vertex in region_vertices[1:]:
                farthest = np.maximum(farthest, _dot3(plane, vertex))
            reject |= farthest < -_COVER_MARGIN
        if not convex.all():  # outside the bounding circle (about the corners' mean)
            mean = _normalized3(tri[0] + tri[1] + tri[2])
            cos_t = np.minimum(np.minimum(_dot3(mean, tri[0]), _dot3(mean, tri[1])), _dot3(mean, tri[2]))
            sin_t = np.sqrt(np.maximum(0.0, 1.0 - cos_t * cos_t))
            # Radii below 90 (regions) and 55 degrees (trixels): their sum is below 180 degrees.
            cos_reach = cos_t * cos_radius[owner] - sin_t * sin_radius[owner]
            reject |= ~convex[owner] & (_dot3(mean, centers[:, owner]) < cos_reach - _COVER_MARGIN)
        keep = ~reject
        owner, tri, ids = owner[keep], tri[:, :, keep], ids[keep]
        if depth == level:
            break
        v0, v1, v2 = tri
        w0, w1, w2 = _normalized3(v1 + v2), _normalized3(v0 + v2), _normalized3(v0 + v1)
        tri = np.concatenate(
            [np.stack(c) for c in ((v0, w2, w1), (v1, w0, w2), (v2, w1, w0), (w0, w1, w2))], axis=2
        )
        ids = np.concatenate([ids * 4 + k for k in range(4)])
        owner = np.tile(owner, 4)
    order = np.lexsort((ids, owner))
    return owner[order], ids[order]


def _root_candidates(centers: NDArray[np.float64], sin_radius: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(region index, root id)`` of the octants each bounding circle may touch.

    A root trixel is an octant: a circle about ``c`` of radius ``r`` (below 90 degrees) reaches
    the other side of a coordinate plane only if ``|c_i| < sin r``.  Replaces testing all 8 roots
    for every region, the costliest level of the descent.
    """
    n = centers.shape[1]
    # Octant of each root, as (x >= 0, y >= 0, z >= 0).
    root_signs = (_ROOTS.sum(axis=1) > 0)
    allowed = np.ones((n, 8), dtype=bool)
    for axis in range(3):
        positive = centers[axis] >= 0.0
        crosses = np.abs(centers[axis]) < sin_radius + _COVER_MARGIN
        allowed &= crosses[:, None] | (positive[:, None] == root_signs[None, :, axis])
    owner, root = np.nonzero(allowed)
    return owner.astype(np.int64), root.astype(np.int64) + 8


def _dot3(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Dot products of ``(3, m)`` coordinate rows."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross3(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Cross products of ``(3, m)`` coordinate rows."""
    return np.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _normalized3(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Unit vectors of ``(3, m)`` coordinate rows."""
    return a / np.sqrt(_dot3(a, a))
