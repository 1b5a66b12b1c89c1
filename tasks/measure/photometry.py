"""Photometry at given positions: PSF flux, circular-aperture flux and pixel flags.

These are the measurement formulas of ``detectAndMeasure`` (:mod:`tasks.diffim.detect_measure`),
exposed as functions of an exposure and parent-frame positions so that detection-free (forced)
measurement uses exactly the same numbers:

- **PSF flux** -- ``sum(P D) / sum(P^2)`` with ``P`` the exposure's PSF model realized at the
  position (:meth:`butler.psf.Psf.shifted_image`) and restricted to usable pixels (finite image
  and variance, none of ``bad_planes``); error ``sqrt(sum(P^2 V)) / sum(P^2)``.  That is the
  maximum-likelihood amplitude of a point source for background-limited, uncorrelated noise.
  The measurement is flagged when the stamp runs off the image, or when more than
  ``max_masked_fraction`` of ``sum(P^2)`` falls on unusable pixels.
- **Aperture flux** -- the sum over a circle of radius ``r`` pixels, each pixel weighted by
  ``clip(r + 0.5 - d, 0, 1)`` with ``d`` the distance of its centre (exact for pixels wholly in or
  out; the boundary ring is within ~1% of the exact area for r >= 3 px); error from the variance
  plane.  Flagged when the circle runs off the image or covers an unusable pixel.
- **Pixel flags** -- a mask plane set in the ``(2 radius + 1)^2`` pixels around the position.

Positions are in the exposure's parent frame (``x`` along columns); fluxes in counts (multiply
by ``photo_calib.calibration`` for nJy).  Nothing here mutates its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from butler.exposure import Exposure

__all__ = [
    "FluxMeasurement",
    "psf_flux",
    "aperture_flux",
    "pixel_flags",
    "plane_bits",
    "aperture_weights",
    "DEFAULT_BAD_PLANES",
]

#: Mask planes whose pixels a flux measurement does not use.
DEFAULT_BAD_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT")


@dataclass(frozen=True)
class FluxMeasurement:
    """Fluxes measured at a set of positions.

    Attributes
    ----------
    flux, flux_err : numpy.ndarray
        Flux and its 1-sigma error, counts (NaN where nothing could be measured).
    flag : numpy.ndarray of bool
        The measurement is unreliable (see the function that made it).
    edge : numpy.ndarray of bool
        The PSF stamp or the aperture runs off the image.
    """

    flux: NDArray[np.float64]
    flux_err: NDArray[np.float64]
    flag: NDArray[np.bool_]
    edge: NDArray[np.bool_]


def plane_bits(planes: Mapping[str, int], names: Iterable[str]) -> int:
    """OR of the bits of the named mask planes present in ``planes`` (absent names are skipped)."""
    value = 0
    for name in names:
        if name in planes:
            value |= 1 << planes[name]
    return value


def _positions(x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D arrays of the same length, got shapes {xs.shape} and {ys.shape}")
    return xs, ys


def psf_flux(
    exposure: Exposure,
    x: ArrayLike,
    y: ArrayLike,
    *,
    bad_planes: Iterable[str] = DEFAULT_BAD_PLANES,
    max_masked_fraction: float = 0.2,
) -> FluxMeasurement:
    """PSF fluxes at parent-frame positions (see the module docstring).

    Parameters
    ----------
    exposure : Exposure
        With a PSF model; image in counts, variance in counts^2.
    x, y : array_like
        Parent-frame positions, pixels.
    bad_planes : iterable of str
        Mask planes whose pixels are not used.
    max_masked_fraction : float
        Flag a measurement when more than this fraction of ``sum(P^2)`` falls on unusable pixels.

    Returns
    -------
    FluxMeasurement
        ``flag`` is set for stamps off the image, too many unusable pixels, or a non-finite flux.

    Raises
    ------
    ValueError
        If the exposure has no PSF.
    """
    if exposure.psf is None:
        raise ValueError(f"PSF photometry needs a PSF model; the exposure {exposure.bbox} has none")
    xs, ys = _positions(x, y)
    psf = exposure.psf
    x0, y0 = exposure.xy0
    height, width = exposure.shape
    image, variance, mask = exposure.image, exposure.variance, exposure.mask
    unusable = plane_bits(exposure.mask_planes, bad_planes)
    n = xs.size
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    flag = np.zeros(n, dtype=bool)
    edge = np.zeros(n, dtype=bool)
    for k in range(n):
        if not (math.isfinite(xs[k]) and math.isfinite(ys[k])):
            flag[k] = edge[k] = True
            continue
        stamp, sx0, sy0 = psf.shifted_image(float(xs[k]), float(ys[k]))
        sx0 -= x0
        sy0 -= y0
        sh, sw = stamp.shape
        xa, xb = max(sx0, 0), min(sx0 + sw, width)
        ya, yb = max(sy0, 0), min(sy0 + sh, height)
        if xa >= xb or ya >= yb:
            flag[k] = edge[k] = True
            continue
        edge[k] = (xa, ya, xb, yb) != (sx0, sy0, sx0 + sw, sy0 + sh)
        p = stamp[ya - sy0 : yb - sy0, xa - sx0 : xb - sx0]
        d = image[ya:yb, xa:xb]
        v = variance[ya:yb, xa:xb]
        ok = np.isfinite(d) & np.isfinite(v)
        if unusable:
            ok &= (mask[ya:yb, xa:xb] & unusable) == 0
        w = np.where(ok, p, 0.0)
        p2 = float((w * w).sum())
        full = float((stamp * stamp).sum())
        if p2 <= 0 or full <= 0:
            flag[k] = True
            continue
        flux[k] = float((w * np.where(ok, d, 0.0)).sum()) / p2
        err[k] = math.sqrt(float((w * w * np.where(ok, v, 0.0)).sum())) / p2
        flag[k] = edge[k] or (1.0 - p2 / full) > max_masked_fraction
    flag |= ~np.isfinite(flux)
    return FluxMeasurement(flux, err, flag, edge)


def aperture_weights(radius: float, dx: NDArray[np.float64], dy: NDArray[np.float64]) -> NDArray[np.float64]:
    """Pixel weights of a circular aperture: ``clip(radius + 0.5 - hypot(dx, dy), 0, 1)``.

    ``dx``, ``dy`` are the offsets of pixel centres from the aperture centre, pixels.
    """
    return np.clip(radius + 0.5 - np.hypot(dx, dy), 0.0, 1.0)


def _gather(image: NDArray, ix: NDArray[np.int64], iy: NDArray[np.int64], half: int, fill: float) -> NDArray:
    """Stamps ``(n, 2 half + 1, 2 half + 1)`` centred on integer pixels, ``fill`` outside the image."""
    height, width = image.shape
    offs = np.arange(-half, half + 1)
    rows = iy[:, None] + offs[None, :]
    cols = ix[:, None] + offs[None, :]
    out = image[np.clip(rows, 0, height - 1)[:, :, None], np.clip(cols, 0, width - 1)[:, None, :]]
    outside = ((rows < 0) | (rows >= height))[:, :, None] | ((cols < 0) | (cols >= width))[:, None, :]
    if outside.any():
        out = out.astype(np.result_type(out.dtype, np.asarray(fill).dtype), copy=True)
        out[np.broadcast_to(outside, out.shape)] = fill
    return out


def aperture_flux(
    exposure: Exposure,
    x: ArrayLike,
    y: ArrayLike,
    radius: float,
    *,
    bad_planes: Iterable[str] = ("NO_DATA",),
) -> FluxMeasurement:
    """Circular-aperture fluxes at parent-frame positions (see the module docstring).

    Parameters
    ----------
    exposure : Exposure
        Image in counts, variance in counts^2.
    x, y : array_like
        Parent-frame positions, pixels.
    radius : float
        Aperture radius, pixels (> 0).
    bad_planes : iterable of str
        Mask planes that make a pixel unusable (as non-finite pixels are).

    Returns
    -------
    FluxMeasurement
        Sums over the usable pixels; ``flag`` when the circle runs off the image, covers an
        unusable pixel, or the flux is not finite.
    """
    if not radius > 0:
        raise ValueError(f"aperture radius must be positive, got {radius}")
    xs, ys = _positions(x, y)
    x0, y0 = exposure.xy0
    height, width = exposure.shape
    lx, ly = xs - x0, ys - y0
    n = xs.size
    flux = np.full(n, np.nan)
    err = np.full(n, np.nan)
    bad = np.zeros(n, dtype=bool)
    finite = np.isfinite(lx) & np.isfinite(ly)
    edge = (lx - radius < -0.5) | (ly - radius < -0.5) | (lx + radius > width - 0.5) | (ly + radius > height - 0.5)
    edge |= ~finite
    unusable_bits = plane_bits(exposure.mask_planes, bad_planes)
    half = int(math.ceil(radius)) + 1
    grid = np.arange(-half, half + 1, dtype=np.float64)
    index = np.flatnonzero(finite)
    for start in range(0, index.size, 256):
        sel = index[start : start + 256]
        ix = np.rint(lx[sel]).astype(np.int64)
        iy = np.rint(ly[sel]).astype(np.int64)
        img = _gather(exposure.image, ix, iy, half, np.nan).astype(np.float64)
        var = _gather(exposure.variance, ix, iy, half, np.nan).astype(np.float64)
        usable = np.isfinite(img) & np.isfinite(var)
        if unusable_bits:
            usable &= (_gather(exposure.mask, ix, iy, half, 0) & unusable_bits) == 0
        dx = grid[None, None, :] + (ix - lx[sel])[:, None, None]
        dy = grid[None, :, None] + (iy - ly[sel])[:, None, None]
        weight = aperture_weights(radius, dx, dy)
        bad[sel] = ((weight > 0) & ~usable).any(axis=(1, 2))
        flux[sel] = (weight * np.where(usable, img, 0.0)).sum(axis=(1, 2))
        err[sel] = np.sqrt((weight**2 * np.where(usable, np.maximum(var, 0.0), 0.0)).sum(axis=(1, 2)))
    return FluxMeasurement(flux, err, edge | bad | ~np.isfinite(flux), edge)


def pixel_flags(
    exposure: Exposure, x: ArrayLike, y: ArrayLike, planes: Mapping[str, str], *, radius: int = 1
) -> dict[str, NDArray[np.bool_]]:
    """Whether each mask plane is set within ``radius`` pixels of each position.

    Parameters
    ----------
    exposure : Exposure
    x, y : array_like
        Parent-frame positions, pixels.
    planes : mapping of str to str
        ``{output name: mask plane}``; a plane the exposure does not have gives all False.
    radius : int
        The ``(2 radius + 1)^2`` pixels around the nearest pixel are examined (positions off the
        image examine the nearest pixels on it).

    Returns
    -------
    dict of str to numpy.ndarray of bool
    """
    xs, ys = _positions(x, y)
    x0, y0 = exposure.xy0
    height, width = exposure.shape
    n = xs.size
    if n == 0:
        return {name: np.zeros(0, dtype=bool) for name in planes}
    lx = np.nan_to_num(xs - x0, nan=-1e9)
    ly = np.nan_to_num(ys - y0, nan=-1e9)
    ix = np.clip(np.rint(lx), 0, width - 1).astype(np.int64)
    iy = np.clip(np.rint(ly), 0, height - 1).astype(np.int64)
    bits = np.bitwise_or.reduce(_gather(exposure.mask, ix, iy, int(radius), 0).reshape(n, -1), axis=1)
    out = {}
    for name, plane in planes.items():
        bit = plane_bits(exposure.mask_planes, (plane,))
        out[name] = (bits & bit) != 0 if bit else np.zeros(n, dtype=bool)
    return out
