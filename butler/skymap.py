"""Sky maps: tracts with TAN WCSs, cut into grids of overlapping patches (like ``lsst.skymap``).

Geometry of one tract (all pixel coordinates 0-based, in the tract's parent pixel frame, pixel
centres at integers, as in :mod:`butler.geometry`)::

    +-------------------------------------------+  <- tract bbox = Box(0, 0, nx*W + 2B, ny*H + 2B)
    |  B                                        |
    |   +---------+---------+---------+         |     W, H = patch_inner_dimensions (pixels)
    |   | (0,1)   | (1,1)   | (2,1)   |         |     B    = patch_border (pixels)
    |   | patch 3 | patch 4 | patch 5 |         |
    |   +---------+---------+---------+         |     patch (x, y) inner box =
    |   | (0,0)   | (1,0)   | (2,0)   |         |        Box(B + x*W, B + y*H, W, H)
    |   | patch 0 | patch 1 | patch 2 |         |     outer box = inner grown by B, clipped to
    |   +---------+---------+---------+         |        the tract bbox (so never clipped here)
    +-------------------------------------------+

- The inner boxes tile the grid exactly: every position of the grid is in exactly one inner box.
- The sequential patch index (the butler's ``patch`` dimension) is ``y * nx + x``, as in LSST.
- The WCS is a TAN projection centred on the tract centre (its CRVAL) at the centre of the grid,
  with ``pixel_scale`` arcsec/pixel and the pixel grid rotated by ``rotation`` degrees (0: north
  up, east left).  TAN maps great circles to straight lines, so a pixel box's four corners give
  its exact sky polygon (:meth:`butler.regions.SkyRegion.from_wcs_box`) and a sky polygon's pixel
  bounding box is the box of its projected vertices.  That is why only ``projection="TAN"`` is
  accepted.
- The tract's *inner region* is the square (in the tract's pixel frame) circumscribing the cone
  of ``radius`` degrees around the centre; the grid is the smallest multiple of the patch size
  that holds the square grown by ``tract_overlap`` degrees on every side (like
  ``lsst.skymap``'s ``ExplicitTractInfo``).  Neighbouring tracts of a :meth:`SkyMap.discrete` map
  therefore overlap by at least ``tract_overlap`` when their inner regions touch.

Region queries (:meth:`TractInfo.find_patch_list`, :meth:`SkyMap.find_tract_patch_list`)
return the patches whose OUTER regions overlap the query polygon: those are the patches whose
coadds (which cover the outer box) receive pixels from, or provide pixels to, the polygon.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from astropy.wcs import WCS
from numpy.typing import ArrayLike, NDArray

from .errors import SkyMapError
from .geometry import Box
from .regions import SkyRegion

__all__ = ["SkyMap", "TractInfo", "PatchInfo"]

_LOG = logging.getLogger(__name__)

SKYMAP_TYPES = ("discrete",)
DEFAULT_CONFIG: dict[str, Any] = {
    "patch_inner_dimensions": [4000, 4000],
    "patch_border": 100,
    "tract_overlap": 1.0 / 60.0,
    "pixel_scale": 0.2,
    "rotation": 0.0,
    "projection": "TAN",
}
_CONFIG_KEYS = ("name", "skymap_type", "centers", *DEFAULT_CONFIG)
# Largest radius + tract_overlap (degrees) of a TAN tract; beyond that TAN pixels become absurd.
_MAX_TRACT_EXTENT_DEG = 80.0
# Points farther than acos(this) from a tract centre are never projected with its TAN WCS.
_MIN_FRONT_COSINE = 0.01


def _unit_vectors(ra_deg: ArrayLike, dec_deg: ArrayLike) -> NDArray[np.float64]:
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cos_dec = np.cos(dec)
    return np.stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1)


def _as_region(region_or_ra: SkyRegion | ArrayLike, dec_deg: ArrayLike | None) -> SkyRegion:
    if isinstance(region_or_ra, SkyRegion):
        if dec_deg is not None:
            raise TypeError("pass either a SkyRegion or ra_deg and dec_deg arrays, not both")
        return region_or_ra
    if dec_deg is None:
        raise TypeError("dec_deg is required when the region is given as vertex arrays")
    return SkyRegion.from_radec(region_or_ra, dec_deg)


# ---------------------------------------------------------------------------------- PatchInfo


class PatchInfo:
    """One patch of a tract: an inner box that tiles the tract, and an outer box with a border.

    Parameters
    ----------
    tract_id : int
        Id of the tract the patch belongs to.
    index : tuple of int
        ``(x, y)`` position of the patch in the tract's patch grid.
    sequential_index : int
        ``y * nx + x``; the butler's ``patch`` dimension value.
    inner_bbox, outer_bbox : Box
        Pixel boxes in the tract's pixel frame.
    wcs : astropy.wcs.WCS
        The tract's WCS (shared; do not modify it).
    """

    __slots__ = (
        "_tract_id",
        "_index",
        "_sequential_index",
        "_inner_bbox",
        "_outer_bbox",
        "_wcs",
        "_inner_region",
        "_outer_region",
    )

    def __init__(
        self,
        tract_id: int,
        index: tuple[int, int],
        sequential_index: int,
        inner_bbox: Box,
        outer_bbox: Box,
        wcs: WCS,
    ) -> None:
        self._tract_id = int(tract_id)
        self._index = (int(index[0]), int(index[1]))
        self._sequential_index = int(sequential_index)
        self._inner_bbox = inner_bbox
        self._outer_bbox = outer_bbox
        self._wcs = wcs
        self._inner_region: SkyRegion | None = None
        self._outer_region: SkyRegion | None = None

    @property
    def tract_id(self) -> int:
        """Id of the tract the patch belongs to."""
        return self._tract_id

    @property
    def index(self) -> tuple[int, int]:
        """``(x, y)`` position in the tract's patch grid."""
        return self._index

    @property
    def sequential_index(self) -> int:
        """``y * nx + x``: the integer used as the butler's ``patch`` dimension."""
        return self._sequential_index

    @property
    def inner_bbox(self) -> Box:
        """Inner pixel box (tract frame); the inner boxes of a tract tile its patch grid."""
        return self._inner_bbox

    @property
    def outer_bbox(self) -> Box:
        """Outer pixel box (tract frame): the inner box grown by the patch border, clipped."""
        return self._outer_bbox

    @property
    def wcs(self) -> WCS:
        """The tract's WCS (tract-frame pixels; shared, do not modify)."""
        return self._wcs

    def inner_region(self) -> SkyRegion:
        """Sky polygon of the inner box (exact for the tract's TAN WCS)."""
        if self._inner_region is None:
            self._inner_region = SkyRegion.from_wcs_box(self._wcs, self._inner_bbox)
        return self._inner_region

    def outer_region(self) -> SkyRegion:
        """Sky polygon of the outer box (exact for the tract's TAN WCS)."""
        if self._outer_region is None:
            self._outer_region = SkyRegion.from_wcs_box(self._wcs, self._outer_bbox)
        return self._outer_region

    def _key(self) -> tuple[Any, ...]:
        return (self._tract_id, self._index, self._inner_bbox, self._outer_bbox)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatchInfo):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"PatchInfo(tract={self._tract_id}, index={self._index}, patch={self._sequential_index}, "
            f"inner_bbox={self._inner_bbox}, outer_bbox={self._outer_bbox})"
        )


# ---------------------------------------------------------------------------------- TractInfo


class TractInfo:
    """One tract: a TAN WCS around a centre and a grid of patches.

    Normally built by :class:`SkyMap`; see the module docstring for the geometry.

    Parameters
    ----------
    tract_id : int
        Tract id.
    ra_deg, dec_deg : float
        Tract centre (degrees); the WCS's reference point.
    radius_deg : float
        Half-size of the tract's inner region (degrees).
    patch_inner_dimensions : tuple of int
        Patch inner size ``(W, H)`` in pixels.
    patch_border : int
        Patch border in pixels.
    tract_overlap : float
        Minimum sky (degrees) the tract extends beyond its inner region on every side.
    pixel_scale : float
        Pixel scale at the centre in arcsec/pixel.
    rotation : float
        Rotation of the pixel grid in degrees.
    """

    def __init__(
        self,
        tract_id: int,
        ra_deg: float,
        dec_deg: float,
        radius_deg: float,
        *,
        patch_inner_dimensions: tuple[int, int],
        patch_border: int,
        tract_overlap: float,
        pixel_scale: float,
        rotation: float = 0.0,
    ) -> None:
        self._tract_id = int(tract_id)
        self._ctr = (float(ra_deg) % 360.0, float(dec_deg))
        self._radius_deg = float(radius_deg)
        self._patch_dims = (int(patch_inner_dimensions[0]), int(patch_inner_dimensions[1]))
        self._border = int(patch_border)
        self._overlap = float(tract_overlap)
        self._pixel_scale = float(pixel_scale)
        self._rotation = float(rotation)

        scale_deg = self._pixel_scale / 3600.0
        # In the gnomonic (TAN) plane a point at angular distance t from the centre lands at
        # (180/pi) tan(t) degrees, i.e. that many degrees / scale_deg pixels.
        self._inner_half_px = math.degrees(math.tan(math.radians(self._radius_deg))) / scale_deg
        min_half_px = math.degrees(math.tan(math.radians(self._radius_deg + self._overlap))) / scale_deg
        width, height = self._patch_dims
        nx = max(1, math.ceil(2.0 * min_half_px / width))
        ny = max(1, math.ceil(2.0 * min_half_px / height))
        self._num_patches = (nx, ny)
        border = self._border
        self._bbox = Box(0, 0, nx * width + 2 * border, ny * height + 2 * border)
        # Continuous centre of the patch grid, whose pixel-edge extent is
        # [B - 0.5, B + nx*W - 0.5) x [B - 0.5, B + ny*H - 0.5).
        self._center_px = (border - 0.5 + nx * width / 2.0, border - 0.5 + ny * height / 2.0)

        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.radesys = "ICRS"
        wcs.wcs.crval = [self._ctr[0], self._ctr[1]]
        wcs.wcs.crpix = [self._center_px[0] + 1.0, self._center_px[1] + 1.0]  # FITS is 1-based
        theta = math.radians(self._rotation)
        cos_t, sin_t = math.cos(theta), math.sin(theta)
        wcs.wcs.cd = scale_deg * np.array([[-cos_t, sin_t], [sin_t, cos_t]])
        wcs.pixel_shape = (self._bbox.width, self._bbox.height)
        wcs.wcs.set()
        self._wcs = wcs
        self._ctr_xyz = _unit_vectors(self._ctr[0], self._ctr[1])
        self._patch_cache: dict[int, PatchInfo] = {}
        self._inner_region: SkyRegion | None = None
        self._outer_region: SkyRegion | None = None

    # ------------------------------------------------------------------ accessors

    @property
    def tract_id(self) -> int:
        """Tract id."""
        return self._tract_id

    @property
    def wcs(self) -> WCS:
        """TAN WCS of the tract frame (0-based pixels; shared, do not modify)."""
        return self._wcs

    @property
    def bbox(self) -> Box:
        """Tract pixel box ``Box(0, 0, nx*W + 2B, ny*H + 2B)``: the patch grid plus a border."""
        return self._bbox

    @property
    def ctr_coord(self) -> tuple[float, float]:
        """Tract centre ``(ra, dec)`` in degrees."""
        return self._ctr

    @property
    def radius_deg(self) -> float:
        """Half-size of the inner region in degrees."""
        return self._radius_deg

    @property
    def num_patches(self) -> tuple[int, int]:
        """Number of patches ``(nx, ny)``."""
        return self._num_patches

    @property
    def patch_inner_dimensions(self) -> tuple[int, int]:
        """Patch inner size ``(W, H)`` in pixels."""
        return self._patch_dims

    @property
    def patch_border(self) -> int:
        """Patch border in pixels."""
        return self._border

    @property
    def tract_overlap(self) -> float:
        """Minimum extension beyond the inner region, in degrees."""
        return self._overlap

    @property
    def pixel_scale(self) -> float:
        """Pixel scale at the tract centre, arcsec/pixel."""
        return self._pixel_scale

    @property
    def inner_bbox_corners(self) -> list[tuple[float, float]]:
        """Pixel corners of the inner region (a square around the centre; floats)."""
        cx, cy = self._center_px
        h = self._inner_half_px
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]

    def inner_region(self) -> SkyRegion:
        """The sky area the tract is responsible for: the square circumscribing its radius."""
        if self._inner_region is None:
            corners = np.asarray(self.inner_bbox_corners)
            ra, dec = self.pixel_to_sky(corners[:, 0], corners[:, 1])
            self._inner_region = SkyRegion.from_radec(ra, dec)
        return self._inner_region

    def outer_region(self) -> SkyRegion:
        """Sky polygon of the whole tract bbox."""
        if self._outer_region is None:
            self._outer_region = SkyRegion.from_wcs_box(self._wcs, self._bbox)
        return self._outer_region

    # ------------------------------------------------------------------ pixels <-> sky

    def sky_to_pixel(
        self, ra_deg: ArrayLike, dec_deg: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Tract-frame pixel positions of sky positions (degrees).

        Positions on the far side of the sky (more than ~89 degrees from the centre), where the
        TAN projection is undefined, give NaN.
        """
        ra, dec = np.broadcast_arrays(
            np.asarray(ra_deg, dtype=np.float64), np.asarray(dec_deg, dtype=np.float64)
        )
        x = np.full(ra.shape, np.nan)
        y = np.full(ra.shape, np.nan)
        with np.errstate(invalid="ignore"):
            front = (_unit_vectors(ra, dec) @ self._ctr_xyz) > _MIN_FRONT_COSINE
        if np.any(front):
            px, py = self._wcs.world_to_pixel_values(ra[front], dec[front])
            x[front] = px
            y[front] = py
        return x, y

    def pixel_to_sky(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Sky ``(ra, dec)`` in degrees of tract-frame pixel positions."""
        ra, dec = self._wcs.pixel_to_world_values(
            np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        )
        return np.mod(np.asarray(ra), 360.0), np.asarray(dec)

    # ------------------------------------------------------------------ patches

    def __len__(self) -> int:
        return self._num_patches[0] * self._num_patches[1]

    def __iter__(self) -> Iterator[PatchInfo]:
        return iter(self.patches())

    def patches(self) -> list[PatchInfo]:
        """All patches, in sequential-index order (x fastest)."""
        return [self.get_patch_info(i) for i in range(len(self))]

    def get_patch_info(self, index: int | tuple[int, int] | Sequence[int]) -> PatchInfo:
        """The patch with a sequential index ``y * nx + x`` or an ``(x, y)`` index.

        Raises
        ------
        SkyMapError
            If the index is malformed or out of range.
        """
        nx, ny = self._num_patches
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            sequential = int(index)
            if not 0 <= sequential < nx * ny:
                raise SkyMapError(
                    f"patch {sequential} is not in tract {self._tract_id}: valid patches are 0..{nx * ny - 1}"
                )
            x, y = sequential % nx, sequential // nx
        else:
            try:
                x, y = (int(v) for v in index)  # type: ignore[union-attr]
            except (TypeError, ValueError):
                raise SkyMapError(
                    f"a patch index is an int (y * nx + x) or an (x, y) pair, got {index!r}"
                ) from None
            if not (0 <= x < nx and 0 <= y < ny):
                raise SkyMapError(
                    f"patch index ({x}, {y}) is not in tract {self._tract_id}: x must be in 0..{nx - 1} "
                    f"and y in 0..{ny - 1}"
                )
            sequential = y * nx + x
        cached = self._patch_cache.get(sequential)
        if cached is not None:
            return cached
        width, height = self._patch_dims
        inner = Box(self._border + x * width, self._border + y * height, width, height)
        outer = inner.grow(self._border).intersection(self._bbox)
        patch = PatchInfo(self._tract_id, (x, y), sequential, inner, outer, self._wcs)
        return self._patch_cache.setdefault(sequential, patch)

    def find_patch_indices(self, ra_deg: ArrayLike, dec_deg: ArrayLike) -> NDArray[np.int64]:
        """Sequential index of the patch whose INNER box holds each position; -1 if none."""
        x, y = self.sky_to_pixel(ra_deg, dec_deg)
        width, height = self._patch_dims
        nx, ny = self._num_patches
        with np.errstate(invalid="ignore"):
            # Inner box i covers pixel edges [B + i*W - 0.5, B + (i+1)*W - 0.5).
            ix = np.floor((x + 0.5 - self._border) / width)
            iy = np.floor((y + 0.5 - self._border) / height)
            valid = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        result = np.full(np.shape(x), -1, dtype=np.int64)
        result[valid] = (iy[valid] * nx + ix[valid]).astype(np.int64)
        return result

    def find_patch(self, ra_deg: float, dec_deg: float) -> PatchInfo:
        """The patch whose INNER box contains a position (degrees).

        Raises
        ------
        SkyMapError
            If the position is outside the tract's patch grid.
        """
        found = int(self.find_patch_indices(float(ra_deg), float(dec_deg)))
        if found < 0:
            raise SkyMapError(
                f"position (ra={float(ra_deg):.6f}, dec={float(dec_deg):.6f}) deg is not in the patch grid "
                f"of tract {self._tract_id}"
            )
        return self.get_patch_info(found)

    def find_patch_list(
        self, region_or_ra: SkyRegion | ArrayLike, dec_deg: ArrayLike | None = None
    ) -> list[PatchInfo]:
        """Patches whose OUTER regions overlap a sky polygon.

        Parameters
        ----------
        region_or_ra : SkyRegion or array-like of float
            The polygon, or its vertex right ascensions in degrees.
        dec_deg : array-like of float, optional
            Vertex declinations in degrees, when ``region_or_ra`` holds right ascensions.

        Returns
        -------
        list of PatchInfo
            In sequential-index order; empty when nothing overlaps.

        Notes
        -----
        Candidates are the patches whose outer boxes meet the pixel bounding box of the
        polygon's projected vertices (exact for TAN: edges project to straight lines); each is
        confirmed with :meth:`SkyRegion.overlaps` on the patch's outer region.
        """
        region = _as_region(region_or_ra, dec_deg)
        if not self.outer_region().overlaps(region):
            return []
        nx, ny = self._num_patches
        ra, dec = region.vertices_radec()
        x, y = self.sky_to_pixel(ra, dec)
        if np.all(np.isfinite(x)) and np.all(np.isfinite(y)):
            width, height = self._patch_dims
            border = self._border
            # The outer box of patch i spans pixel edges [i*W - 0.5, (i+1)*W + 2B - 0.5]: it meets
            # [xmin, xmax] when (xmin + 0.5 - 2B)/W - 1 <= i <= (xmax + 0.5)/W.  One pixel of
            # slack absorbs rounding; the exact sky test follows.
            x_lo = max(0, math.ceil((x.min() - 1.0 + 0.5 - 2 * border) / width - 1))
            x_hi = min(nx - 1, math.floor((x.max() + 1.0 + 0.5) / width))
            y_lo = max(0, math.ceil((y.min() - 1.0 + 0.5 - 2 * border) / height - 1))
            y_hi = min(ny - 1, math.floor((y.max() + 1.0 + 0.5) / height))
        else:  # a polygon reaching the far side of the sky: test every patch
            x_lo, x_hi, y_lo, y_hi = 0, nx - 1, 0, ny - 1
        found = []
        for iy in range(y_lo, y_hi + 1):
            for ix in range(x_lo, x_hi + 1):
                patch = self.get_patch_info((ix, iy))
                if patch.outer_region().overlaps(region):
                    found.append(patch)
        return found

    def contains(
        self, ra_deg: ArrayLike, dec_deg: ArrayLike, *, inner: bool = False
    ) -> bool | NDArray[np.bool_]:
        """Whether positions (degrees) fall in the tract.

        Parameters
        ----------
        ra_deg, dec_deg : float or array-like
            Positions in degrees.
        inner : bool, optional
            If True test the inner region (the tract's own area); by default test the whole
            tract bbox (like ``lsst.skymap``'s ``TractInfo.contains``).
        """
        scalar = np.ndim(ra_deg) == 0 and np.ndim(dec_deg) == 0
        x, y = self.sky_to_pixel(ra_deg, dec_deg)
        with np.errstate(invalid="ignore"):
            if inner:
                cx, cy = self._center_px
                h = self._inner_half_px
                result = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
            else:
                b = self._bbox
                result = (x >= b.x0 - 0.5) & (x < b.x1 - 0.5) & (y >= b.y0 - 0.5) & (y < b.y1 - 0.5)
        return bool(result) if scalar else result

    # ------------------------------------------------------------------ dunder

    def _key(self) -> tuple[Any, ...]:
        return (
            self._tract_id,
            self._ctr,
            self._radius_deg,
            self._patch_dims,
            self._border,
            self._overlap,
            self._pixel_scale,
            self._rotation,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TractInfo):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        ra, dec = self._ctr
        nx, ny = self._num_patches
        return (
            f"TractInfo(id={self._tract_id}, ctr=({ra:.6f}, {dec:.6f}) deg, radius={self._radius_deg:g} deg, "
            f"bbox={self._bbox}, patches={nx}x{ny})"
        )


# ---------------------------------------------------------------------------------- config


def _fail(field: str, message: str, source: str | None) -> SkyMapError:
    where = f"{source}: " if source else ""
    return SkyMapError(f"{where}skymap config field {field!r} {message}")


def _real(value: Any, field: str, source: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _fail(field, f"must be a number, got {value!r}", source)
    result = float(value)
    if not math.isfinite(result):
        raise _fail(field, f"must be finite, got {value!r}", source)
    return result


def _integer(value: Any, field: str, source: str | None, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise _fail(field, f"must be an integer number of pixels, got {value!r}", source)
    value = int(value)
    if value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise _fail(field, f"must be a {kind} integer number of pixels, got {value}", source)
    return value


def _plain(value: Any) -> Any:
    """Tuples (and other sequences) as lists, so that configs compare and serialize alike."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return value


def _normalize_config(config: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
    """Validate a skymap config and return it as canonical plain data."""
    where = f"{source}: " if source else ""
    if not isinstance(config, Mapping):
        raise SkyMapError(f"{where}a skymap config must be a mapping, got {type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in _CONFIG_KEYS)
    if unknown:
        raise SkyMapError(
            f"{where}unknown skymap config field(s) {unknown}; valid fields are {list(_CONFIG_KEYS)}"
        )
    name = config.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail("name", f"must be a non-empty string, got {name!r}", source)
    skymap_type = config.get("skymap_type", "discrete")
    if skymap_type not in SKYMAP_TYPES:
        raise _fail("skymap_type", f"must be one of {list(SKYMAP_TYPES)}, got {skymap_type!r}", source)
    merged = {**DEFAULT_CONFIG, **{k: v for k, v in config.items() if k in DEFAULT_CONFIG}}

    dims = merged["patch_inner_dimensions"]
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) != 2:
        raise _fail(
            "patch_inner_dimensions", f"must be two positive integers [x, y] (pixels), got {dims!r}", source
        )
    dims = [_integer(v, "patch_inner_dimensions", source, minimum=1) for v in dims]
    border = _integer(merged["patch_border"], "patch_border", source, minimum=0)
    overlap = _real(merged["tract_overlap"], "tract_overlap", source)
    if overlap < 0:
        raise _fail("tract_overlap", f"must be >= 0 degrees, got {overlap}", source)
    scale = _real(merged["pixel_scale"], "pixel_scale", source)
    if scale <= 0:
        raise _fail("pixel_scale", f"must be > 0 arcsec/pixel, got {scale}", source)
    rotation = _real(merged["rotation"], "rotation", source)
    projection = merged["projection"]
    if projection != "TAN":
        raise _fail(
            "projection",
            f"must be 'TAN' (great circles must map to straight pixel lines), got {projection!r}",
            source,
        )

    if "centers" not in config:
        raise _fail("centers", "is required: a list of [ra_deg, dec_deg, radius_deg] tract centres", source)
    raw_centers = config["centers"]
    if (
        isinstance(raw_centers, (str, bytes, Mapping))
        or not isinstance(raw_centers, Sequence)
        or not raw_centers
    ):
        raise _fail(
            "centers",
            f"must be a non-empty list of [ra_deg, dec_deg, radius_deg], got {raw_centers!r}",
            source,
        )
    centers = []
    for i, entry in enumerate(raw_centers):
        field = f"centers[{i}]"
        if isinstance(entry, Mapping):
            missing = [k for k in ("ra", "dec", "radius") if k not in entry]
            extra = sorted(str(k) for k in entry if k not in ("ra", "dec", "radius"))
            if missing or extra:
                raise _fail(
                    field,
                    f"must have keys ra, dec, radius (degrees); missing {missing}, unknown {extra}",
                    source,
                )
            values = [entry["ra"], entry["dec"], entry["radius"]]
        elif isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)) and len(entry) == 3:
            values = list(entry)
        else:
            raise _fail(field, f"must be [ra_deg, dec_deg, radius_deg], got {entry!r}", source)
        ra = _real(values[0], f"{field}.ra", source) % 360.0
        dec = _real(values[1], f"{field}.dec", source)
        radius = _real(values[2], f"{field}.radius", source)
        if not -90.0 <= dec <= 90.0:
            raise _fail(f"{field}.dec", f"must be within [-90, 90] degrees, got {dec}", source)
        if radius <= 0:
            raise _fail(f"{field}.radius", f"must be > 0 degrees, got {radius}", source)
        if radius + overlap >= _MAX_TRACT_EXTENT_DEG:
            raise _fail(
                f"{field}.radius",
                f"plus tract_overlap must be < {_MAX_TRACT_EXTENT_DEG} degrees for a TAN tract, got "
                f"{radius} + {overlap}",
                source,
            )
        centers.append([ra, dec, radius])
    return {
        "name": name,
        "skymap_type": skymap_type,
        "centers": centers,
        "patch_inner_dimensions": dims,
        "patch_border": border,
        "tract_overlap": overlap,
        "pixel_scale": scale,
        "rotation": rotation,
        "projection": projection,
    }


# ---------------------------------------------------------------------------------- SkyMap


class SkyMap:
    """A list of tracts, each cut into patches; the sky pixelization of coadds.

    Build one with :meth:`discrete`, :meth:`from_config` or :meth:`from_yaml`.  Tract ids are
    ``0 .. len - 1`` in the order of the configured centres.  A SkyMap is immutable and
    thread-safe (lazily computed regions may be computed twice under a race, never wrongly).

    Parameters
    ----------
    config : mapping
        Validated like :meth:`from_config`.
    """

    def __init__(self, config: Mapping[str, Any], *, _source: str | None = None) -> None:
        self._config = _normalize_config(config, _source)
        cfg = self._config
        self._tracts = [
            TractInfo(
                tract_id,
                ra,
                dec,
                radius,
                patch_inner_dimensions=(cfg["patch_inner_dimensions"][0], cfg["patch_inner_dimensions"][1]),
                patch_border=cfg["patch_border"],
                tract_overlap=cfg["tract_overlap"],
                pixel_scale=cfg["pixel_scale"],
                rotation=cfg["rotation"],
            )
            for tract_id, (ra, dec, radius) in enumerate(cfg["centers"])
        ]
        self._ctr_xyz = np.array([t._ctr_xyz for t in self._tracts])
        self._inner_radius_rad: NDArray[np.float64] | None = None
        self._outer_radius_rad: NDArray[np.float64] | None = None
        _LOG.debug("built skymap %r with %d tracts", cfg["name"], len(self._tracts))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def discrete(
        cls,
        name: str,
        centers: Sequence[Sequence[float]],
        *,
        patch_inner_dimensions: Sequence[int] = (4000, 4000),
        patch_border: int = 100,
        tract_overlap: float = 1.0 / 60.0,
        pixel_scale: float = 0.2,
        rotation: float = 0.0,
        projection: str = "TAN",
    ) -> SkyMap:
        """A tract at each of the given centres (like ``lsst.skymap.DiscreteSkyMap``).

        Parameters
        ----------
        name : str
            Skymap name (the butler's ``skymap`` dimension value).
        centers : sequence of (ra_deg, dec_deg, radius_deg)
            Tract centres and inner half-sizes in degrees.
        patch_inner_dimensions : (int, int)
            Patch inner size in pixels.
        patch_border : int
            Patch border (overlap with each neighbour) in pixels.
        tract_overlap : float
            Minimum sky, in degrees, each tract covers beyond its inner region.
        pixel_scale : float
            Arcsec/pixel at the tract centres.
        rotation : float
            Rotation of the pixel grids in degrees.
        projection : str
            Must be ``"TAN"``.

        Raises
        ------
        SkyMapError
            Naming the invalid field.
        """
        return cls(
            {
                "name": name,
                "skymap_type": "discrete",
                "centers": [_plain(c) for c in centers],
                "patch_inner_dimensions": _plain(patch_inner_dimensions),
                "patch_border": patch_border,
                "tract_overlap": tract_overlap,
                "pixel_scale": pixel_scale,
                "rotation": rotation,
                "projection": projection,
            }
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SkyMap:
        """A skymap from plain data (the output of :meth:`to_dict`).

        Keys: ``name`` (required), ``skymap_type`` (``"discrete"``, the default), ``centers``
        (required: ``[[ra_deg, dec_deg, radius_deg], ...]`` or mappings with keys ``ra``,
        ``dec``, ``radius``), and optionally ``patch_inner_dimensions`` (pixels),
        ``patch_border`` (pixels), ``tract_overlap`` (degrees), ``pixel_scale``
        (arcsec/pixel), ``rotation`` (degrees), ``projection`` (``"TAN"``).

        Raises
        ------
        SkyMapError
            Naming the unknown or invalid field.
        """
        return cls(config)

    from_dict = from_config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SkyMap:
        """A skymap from a YAML file holding the keys of :meth:`from_config`.

        Raises
        ------
        SkyMapError
            If the file cannot be read or parsed, or a field is invalid; the message names the
            file and the field.
        """
        import yaml

        source = os.fspath(path)
        try:
            with open(source, encoding="utf-8") as stream:
                data = yaml.safe_load(stream)
        except OSError as exc:
            raise SkyMapError(f"{source}: cannot read skymap file: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise SkyMapError(f"{source}: not valid YAML: {exc}") from exc
        return cls(data, _source=source)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able config; :meth:`from_config` of it rebuilds an equal skymap."""
        return json.loads(json.dumps(self._config))

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` to a YAML file."""
        import yaml

        with open(os.fspath(path), "w", encoding="utf-8") as stream:
            yaml.safe_dump(self.to_dict(), stream, sort_keys=False)

    # ------------------------------------------------------------------ accessors

    @property
    def name(self) -> str:
        """Skymap name."""
        return self._config["name"]

    @property
    def skymap_type(self) -> str:
        """Kind of skymap (``"discrete"``)."""
        return self._config["skymap_type"]

    @property
    def config_hash(self) -> str:
        """SHA-1 hex digest of the canonical config: equal skymaps have equal hashes."""
        text = json.dumps(self._config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    @property
    def tract_ids(self) -> list[int]:
        """All tract ids."""
        return [t.tract_id for t in self._tracts]

    def __len__(self) -> int:
        return len(self._tracts)

    def __iter__(self) -> Iterator[TractInfo]:
        return iter(self._tracts)

    def __getitem__(self, tract_id: int) -> TractInfo:
        if isinstance(tract_id, (int, np.integer)) and not isinstance(tract_id, bool):
            if 0 <= int(tract_id) < len(self._tracts):
                return self._tracts[int(tract_id)]
        raise SkyMapError(
            f"skymap {self.name!r} has no tract {tract_id!r}: valid tracts are 0..{len(self._tracts) - 1}"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SkyMap):
            return NotImplemented
        return self._config == other._config

    def __hash__(self) -> int:
        return hash(self.config_hash)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SkyMap.from_config, (self.to_dict(),))

    def __repr__(self) -> str:
        return f"SkyMap(name={self.name!r}, skymap_type={self.skymap_type!r}, tracts={len(self)})"

    # ------------------------------------------------------------------ queries

    def _radii(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        if self._inner_radius_rad is None or self._outer_radius_rad is None:
            inner = []
            outer = []
            for tract in self._tracts:
                # Caps around the tract centre holding the inner region / the whole tract.
                for region, out in ((tract.inner_region(), inner), (tract.outer_region(), outer)):
                    ra, dec = region.vertices_radec()
                    cosines = _unit_vectors(ra, dec) @ tract._ctr_xyz
                    out.append(float(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
            self._inner_radius_rad = np.array(inner)
            self._outer_radius_rad = np.array(outer)
        return self._inner_radius_rad, self._outer_radius_rad

    def find_tract_ids(self, ra_deg: ArrayLike, dec_deg: ArrayLike) -> NDArray[np.int64]:
        """Vectorized :meth:`find_tract`: tract id per position, -1 where no tract owns it.

        Parameters
        ----------
        ra_deg, dec_deg : array-like
            Positions in degrees.

        Returns
        -------
        numpy.ndarray of int64
            The id of the tract with the closest centre among those whose inner region contains
            the position; -1 if none.
        """
        ra, dec = np.broadcast_arrays(
            np.asarray(ra_deg, dtype=np.float64), np.asarray(dec_deg, dtype=np.float64)
        )
        points = _unit_vectors(ra.ravel(), dec.ravel())
        inner_radius, _ = self._radii()
        cosines = self._ctr_xyz @ points.T  # (tracts, points)
        best = np.full(len(points), -1, dtype=np.int64)
        best_cos = np.full(len(points), -np.inf)
        for k, tract in enumerate(self._tracts):
            near = np.flatnonzero(cosines[k] >= math.cos(inner_radius[k]) - 1e-12)
            if near.size == 0:
                continue
            inside = np.asarray(tract.contains(ra.ravel()[near], dec.ravel()[near], inner=True), dtype=bool)
            hits = near[inside]
            closer = cosines[k, hits] > best_cos[hits]
            best[hits[closer]] = tract.tract_id
            best_cos[hits[closer]] = cosines[k, hits[closer]]
        return best.reshape(ra.shape)

    def find_tract(self, ra_deg: float, dec_deg: float) -> TractInfo:
        """The tract owning a position: among the tracts whose inner region contains it, the one
        whose centre is closest (LSST's rule).

        Raises
        ------
        SkyMapError
            If no tract's inner region contains the position.
        """
        tract_id = int(self.find_tract_ids(float(ra_deg), float(dec_deg)))
        if tract_id < 0:
            raise SkyMapError(
                f"position (ra={float(ra_deg):.6f}, dec={float(dec_deg):.6f}) deg is not in the inner region "
                f"of any tract of skymap {self.name!r}"
            )
        return self._tracts[tract_id]

    def find_all_tracts(self, ra_deg: float, dec_deg: float) -> list[TractInfo]:
        """All tracts whose bbox (outer region) contains a position, closest centre first."""
        point = _unit_vectors(float(ra_deg), float(dec_deg))
        _, outer_radius = self._radii()
        cosines = self._ctr_xyz @ point
        found = [
            (-cosines[k], tract.tract_id, tract)
            for k, tract in enumerate(self._tracts)
            if cosines[k] >= math.cos(outer_radius[k]) - 1e-12 and tract.contains(ra_deg, dec_deg)
        ]
        return [tract for _, _, tract in sorted(found, key=lambda item: (item[0], item[1]))]

    def find_tract_patch_list(
        self, region_or_ra: SkyRegion | ArrayLike, dec_deg: ArrayLike | None = None
    ) -> list[tuple[TractInfo, list[PatchInfo]]]:
        """Tracts and patches whose OUTER regions overlap a sky polygon.

        Parameters
        ----------
        region_or_ra : SkyRegion or array-like of float
            The polygon, or its vertex right ascensions in degrees.
        dec_deg : array-like of float, optional
            Vertex declinations in degrees, when ``region_or_ra`` holds right ascensions.

        Returns
        -------
        list of (TractInfo, list of PatchInfo)
            In tract-id order, patches in sequential-index order; tracts without an overlapping
            patch are left out.  Exact up to edges that only touch (see
            :meth:`SkyRegion.overlaps`).
        """
        region = _as_region(region_or_ra, dec_deg)
        ra, dec, radius = region.bounding_circle()
        center = _unit_vectors(ra, dec)
        _, outer_radius = self._radii()
        reach = outer_radius + math.radians(radius)
        cosines = self._ctr_xyz @ center
        result = []
        for k, tract in enumerate(self._tracts):
            if reach[k] < math.pi and cosines[k] < math.cos(reach[k]) - 1e-12:
                continue
            patches = tract.find_patch_list(region)
            if patches:
                result.append((tract, patches))
        return result
