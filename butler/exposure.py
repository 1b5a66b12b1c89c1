"""Exposures: image, mask and variance planes with their WCS, PSF, calibration and visit info.

Conventions
-----------
- ``image`` and ``variance`` are float32 (counts and counts^2); ``mask`` is int32 bit planes whose
  name->bit map (``mask_planes``) travels with the exposure.
- The arrays cover ``bbox``: pixel ``(x, y)`` of the parent frame is ``image[y - y0, x - x0]``.
  A coadd patch lives in its tract's frame, a sub-exposure keeps its parent's coordinates.
- ``wcs`` (astropy) maps *parent-frame* 0-based pixel coordinates to the sky.
- ``photo_calib`` converts counts to nJy.
"""

from __future__ import annotations

import copy as _copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from astropy.wcs import WCS

from . import masks as _masks
from .errors import DataModelError
from .geometry import Box
from .psf import Psf

__all__ = ["Exposure", "PhotoCalib", "VisitInfo"]

_log = logging.getLogger(__name__)

_NJY_AB_ZERO_POINT = 31.4  # AB magnitude of 1 nJy


@dataclass(frozen=True)
class PhotoCalib:
    """Photometric calibration: a constant scale from counts to nJy.

    Attributes
    ----------
    calibration : float
        nJy per count (> 0).
    calibration_err : float
        One-sigma uncertainty of ``calibration``, nJy per count.
    """

    calibration: float
    calibration_err: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.calibration) and self.calibration > 0):
            raise DataModelError(f"PhotoCalib.calibration must be positive nJy/count, got {self.calibration!r}")
        if not (np.isfinite(self.calibration_err) and self.calibration_err >= 0):
            raise DataModelError(f"PhotoCalib.calibration_err must be >= 0, got {self.calibration_err!r}")

    @classmethod
    def from_zero_point(cls, zero_point_mag: float) -> PhotoCalib:
        """Calibration for an AB zero point (the magnitude of 1 count)."""
        return cls(10.0 ** (-0.4 * (zero_point_mag - _NJY_AB_ZERO_POINT)))

    @property
    def zero_point(self) -> float:
        """AB magnitude of one count."""
        return _NJY_AB_ZERO_POINT - 2.5 * float(np.log10(self.calibration))

    def counts_to_njy(self, counts: Any) -> Any:
        """Convert instrumental flux (counts) to nJy."""
        return np.multiply(counts, self.calibration)

    def njy_to_counts(self, flux_njy: Any) -> Any:
        """Convert nJy to instrumental flux (counts)."""
        return np.divide(flux_njy, self.calibration)

    @staticmethod
    def njy_to_mag(flux_njy: Any) -> Any:
        """AB magnitude of a flux in nJy."""
        return _NJY_AB_ZERO_POINT - 2.5 * np.log10(flux_njy)

    @staticmethod
    def mag_to_njy(mag: Any) -> Any:
        """Flux in nJy of an AB magnitude."""
        return 10.0 ** (-0.4 * (np.asarray(mag) - _NJY_AB_ZERO_POINT))

    def to_dict(self) -> dict[str, float]:
        """Plain data."""
        return {"calibration": float(self.calibration), "calibration_err": float(self.calibration_err)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhotoCalib:
        """Inverse of :meth:`to_dict`."""
        return cls(float(data["calibration"]), float(data.get("calibration_err", 0.0)))


@dataclass(frozen=True)
class VisitInfo:
    """Observation metadata of one exposure.

    Attributes
    ----------
    exposure_time : float
        Seconds.
    mjd : float
        Modified Julian Date (TAI) of the exposure midpoint.
    airmass : float
        Airmass at the midpoint.
    seeing : float
        Delivered PSF FWHM, arcsec.
    boresight_ra, boresight_dec : float
        Telescope pointing, degrees.
    rotation_angle : float
        Sky position angle of the focal plane, degrees.
    visit_id : int or None
        The visit number, when known.
    """

    exposure_time: float = 0.0
    mjd: float = float("nan")
    airmass: float = float("nan")
    seeing: float = float("nan")
    boresight_ra: float = float("nan")
    boresight_dec: float = float("nan")
    rotation_angle: float = 0.0
    visit_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (NaN kept as ``None`` for JSON)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, float) and not np.isfinite(value):
                value = None
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisitInfo:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DataModelError(f"VisitInfo: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "visit_id":
                values[key] = None if value is None else int(value)
            else:
                values[key] = float("nan") if value is None else float(value)
        return cls(**values)


def _as_float32(array: Any, what: str, shape: tuple[int, ...] | None) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.kind not in "iuf":
        raise DataModelError(f"Exposure {what} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise DataModelError(f"Exposure {what} must be 2-D, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise DataModelError(f"Exposure {what} has shape {arr.shape}, but the image has shape {shape}")
    return arr if arr.dtype == np.float32 else arr.astype(np.float32)


def _as_mask(array: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.kind not in "iub":
        raise DataModelError(f"Exposure mask must hold integer bit planes, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise DataModelError(f"Exposure mask has shape {arr.shape}, but the image has shape {shape}")
    if arr.dtype == np.int32:
        return arr
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise DataModelError("Exposure mask values do not fit in int32 bit planes")
    return arr.astype(np.int32)


class Exposure:
    """An image with mask, variance and the metadata needed to interpret it.

    Parameters
    ----------
    image : array_like
        2-D real array (converted to float32), counts.
    mask : array_like, optional
        Integer bit planes, same shape (converted to int32); zeros by default.
    variance : array_like, optional
        Same shape (float32), counts^2; zeros by default.
    xy0 : tuple of int
        Parent-frame pixel of ``image[0, 0]``.
    wcs : astropy.wcs.WCS, optional
        Celestial WCS of the parent frame (0-based pixels).
    psf : Psf, optional
    photo_calib : PhotoCalib, optional
    visit_info : VisitInfo, optional
    band : str, optional
        Abstract filter name (e.g. ``"r"``).
    mask_planes : mapping of str to int, optional
        Mask plane name -> bit; LSST's defaults when omitted.
    metadata : mapping, optional
        Free-form JSON-able key/value pairs (FITS-header-like).
    """

    def __init__(
        self,
        image: Any,
        mask: Any = None,
        variance: Any = None,
        *,
        xy0: tuple[int, int] = (0, 0),
        wcs: WCS | None = None,
        psf: Psf | None = None,
        photo_calib: PhotoCalib | None = None,
        visit_info: VisitInfo | None = None,
        band: str | None = None,
        mask_planes: Mapping[str, int] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.image = _as_float32(image, "image", None)
        shape = self.image.shape
        self.mask = np.zeros(shape, np.int32) if mask is None else _as_mask(mask, shape)
        self.variance = (
            np.zeros(shape, np.float32) if variance is None else _as_float32(variance, "variance", shape)
        )
        self._bbox = Box.from_shape(shape, int(xy0[0]), int(xy0[1]))
        if wcs is not None and not isinstance(wcs, WCS):
            raise DataModelError(f"Exposure wcs must be an astropy.wcs.WCS, got {type(wcs).__name__}")
        if wcs is not None and not wcs.has_celestial:
            raise DataModelError("Exposure wcs has no celestial axes")
        self.wcs = wcs
        if psf is not None and not isinstance(psf, Psf):
            raise DataModelError(f"Exposure psf must be a butler.psf.Psf, got {type(psf).__name__}")
        self.psf = psf
        if photo_calib is not None and not isinstance(photo_calib, PhotoCalib):
            raise DataModelError(f"Exposure photo_calib must be a PhotoCalib, got {type(photo_calib).__name__}")
        self.photo_calib = photo_calib
        if visit_info is not None and not isinstance(visit_info, VisitInfo):
            raise DataModelError(f"Exposure visit_info must be a VisitInfo, got {type(visit_info).__name__}")
        self.visit_info = visit_info
        self.band = band
        planes = _masks.DEFAULT_MASK_PLANES if mask_planes is None else mask_planes
        self.mask_planes: dict[str, int] = _masks.validate_planes(planes)
        self.metadata: dict[str, Any] = dict(metadata or {})

    # ------------------------------------------------------------------ geometry
    @property
    def bbox(self) -> Box:
        """Parent-frame pixel box covered by the arrays."""
        return self._bbox

    @property
    def xy0(self) -> tuple[int, int]:
        """Parent-frame pixel of ``image[0, 0]``."""
        return (self._bbox.x0, self._bbox.y0)

    @property
    def shape(self) -> tuple[int, int]:
        """Numpy shape ``(height, width)``."""
        return self._bbox.shape

    @property
    def width(self) -> int:
        """Width in pixels."""
        return self._bbox.width

    @property
    def height(self) -> int:
        """Height in pixels."""
        return self._bbox.height

    def subexposure(self, bbox: Box, *, deep: bool = False) -> Exposure:
        """The part of the exposure inside ``bbox`` (parent-frame pixels).

        Parameters
        ----------
        bbox : Box
            Must lie inside :attr:`bbox`.
        deep : bool
            Copy the pixels; by default the arrays are views sharing memory with this exposure.
        """
        if not self._bbox.contains(bbox):
            raise DataModelError(f"sub-exposure {bbox} is not contained in the exposure's {self._bbox}")
        sl = bbox.slices(self._bbox)
        take = (lambda a: a[sl].copy()) if deep else (lambda a: a[sl])
        return self._replace(take(self.image), take(self.mask), take(self.variance), (bbox.x0, bbox.y0), deep)

    def __getitem__(self, bbox: Box) -> Exposure:
        return self.subexposure(bbox)

    def _replace(
        self, image: np.ndarray, mask: np.ndarray, variance: np.ndarray, xy0: tuple[int, int], deep: bool
    ) -> Exposure:
        meta = _copy.deepcopy(self.metadata) if deep else dict(self.metadata)
        return Exposure(
            image,
            mask,
            variance,
            xy0=xy0,
            wcs=self.wcs.deepcopy() if (deep and self.wcs is not None) else self.wcs,
            psf=self.psf,
            photo_calib=self.photo_calib,
            visit_info=self.visit_info,
            band=self.band,
            mask_planes=self.mask_planes,
            metadata=meta,
        )

    def copy(self) -> Exposure:
        """A deep copy (pixels, WCS, metadata); PSF and calibration objects are immutable and shared."""
        return self._replace(self.image.copy(), self.mask.copy(), self.variance.copy(), self.xy0, True)

    # ------------------------------------------------------------------ masks
    def get_plane_bitmask(self, names: str | Iterable[str]) -> int:
        """OR of the bits of the named mask planes; unknown names raise ``MaskPlaneError``."""
        return _masks.bitmask(self.mask_planes, names)

    def add_mask_plane(self, name: str) -> int:
        """Add a mask plane (if absent) and return its bit."""
        return _masks.add_plane(self.mask_planes, name)

    def set_mask(self, name: str, where: np.ndarray) -> None:
        """Set plane ``name`` on the pixels where the boolean array ``where`` is true."""
        self.mask[np.asarray(where, dtype=bool)] |= self.get_plane_bitmask(name)

    # ------------------------------------------------------------------ world <-> pixel
    def _require_wcs(self) -> WCS:
        if self.wcs is None:
            raise DataModelError("this exposure has no WCS; pixel<->sky conversion needs one")
        return self.wcs

    def pixel_to_sky(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Parent-frame pixel coordinates -> ``(ra, dec)`` in degrees."""
        ra, dec = self._require_wcs().all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return np.asarray(ra), np.asarray(dec)

    def sky_to_pixel(self, ra_deg: Any, dec_deg: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(ra, dec)`` in degrees -> parent-frame pixel coordinates."""
        x, y = self._require_wcs().all_world2pix(np.asarray(ra_deg, float), np.asarray(dec_deg, float), 0)
        return np.asarray(x), np.asarray(y)

    def sky_corners(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ra, dec)`` in degrees of the four outer pixel-edge corners, counter-clockwise."""
        xs, ys = zip(*self._bbox.corners(), strict=True)
        return self.pixel_to_sky(np.array(xs), np.array(ys))

    def pixel_scale(self) -> float:
        """Mean pixel scale at the bbox centre, arcsec per pixel."""
        wcs = self._require_wcs()
        cx, cy = self._bbox.center
        ra, dec = wcs.all_pix2world(np.array([cx, cx + 1, cx]), np.array([cy, cy, cy + 1]), 0)
        from astropy.coordinates import SkyCoord

        c = SkyCoord(ra, dec, unit="deg")
        return float((c[0].separation(c[1]).arcsec + c[0].separation(c[2]).arcsec) / 2.0)

    # ------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return (
            f"Exposure(bbox={self._bbox}, band={self.band!r}, psf={type(self.psf).__name__ if self.psf else None}, "
            f"wcs={'yes' if self.wcs is not None else 'no'})"
        )
