"""Detect and measure the sources of a calexp: the ``src`` catalog.

A small stand-in for LSST's characterize/calibrate source measurement, good enough for selecting
kernel candidates in image differencing:

- **Detection** (photutils): the image is smoothed with a Gaussian ``g`` of the PSF's width (LSST's
  PSF-matched detection filter) and thresholded at ``threshold`` times the background noise
  ``sqrt(V_sky sum g^2)`` (``photutils.segmentation.detect_sources``; the footprints set the
  DETECTED mask plane).  Sources are the local maxima of the smoothed image within a box of about
  one FWHM (like ``photutils.detection.find_peaks``, but only footprint pixels are examined) whose
  exact significance ``snr = smoothed / sqrt(sum g^2 V)``, with the full variance plane ``V``
  around the peak, passes the threshold; on a saturated star only the highest peak is kept.
- **Centroid**: iterated Gaussian-windowed centroid (SExtractor's XWIN) with the PSF sigma.
- **psfFlux**: PSF-weighted flux at the centroid, ``sum(P I) / sum(P^2)`` with ``P`` the exposure's
  PSF model realized at the centroid; unbiased for point sources, error from the variance plane.
- **apFlux**: circular aperture (``photutils.aperture``, radius ``aperture_radius`` pixels, in the
  table meta ``apRadius``).
- **Shape**: Gaussian-weighted second moments, de-weighted to the source's own moments.
- **Flags**: ``pixelFlags_{saturated,bad,cr,interpolated}`` when the 3x3 pixels at the centroid have
  the mask bit, ``pixelFlags_edge`` when the PSF footprint runs off the image.

Fluxes are in nJy through the exposure's ``photo_calib``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from astropy.table import Table
from numpy.typing import NDArray
from scipy import ndimage

from butler.catalog import make_source_catalog
from butler.exposure import Exposure
from butler.psf import SIGMA_TO_FWHM

__all__ = ["detect_and_measure", "SRC_COLUMNS"]

_log = logging.getLogger("tasks.simulation.measure")

#: Conventional columns of the ``src`` catalog.
SRC_COLUMNS = (
    "id",
    "coord_ra",
    "coord_dec",
    "x",
    "y",
    "xErr",
    "yErr",
    "psfFlux",
    "psfFluxErr",
    "apFlux",
    "apFluxErr",
    "ixx",
    "iyy",
    "ixy",
    "snr",
    "parent",
    "pixelFlags_edge",
    "pixelFlags_saturated",
    "pixelFlags_bad",
    "pixelFlags_cr",
    "pixelFlags_interpolated",
    "psfFlux_flag",
    "apFlux_flag",
)


def _gather(image: NDArray, ix: NDArray[np.int64], iy: NDArray[np.int64], half: int) -> NDArray:
    """Stamps ``(n, 2 half + 1, 2 half + 1)`` centred on integer pixels (zero outside the image)."""
    height, width = image.shape
    offs = np.arange(-half, half + 1)
    rows = iy[:, None] + offs[None, :]
    cols = ix[:, None] + offs[None, :]
    out = image[np.clip(rows, 0, height - 1)[:, :, None], np.clip(cols, 0, width - 1)[:, None, :]]
    outside = ((rows < 0) | (rows >= height))[:, :, None] | ((cols < 0) | (cols >= width))[:, None, :]
    out[outside] = 0
    return out


def _local_maxima(snr: NDArray, candidates: NDArray[np.bool_], half: int) -> tuple[NDArray, NDArray]:
    """Pixels of ``candidates`` that are the maximum of their ``(2 half + 1)^2`` neighbourhood.

    Ties (flat tops) keep the first pixel in raster order.  Only candidate pixels are examined,
    so this costs a fraction of a full-image maximum filter.
    """
    iy, ix = np.nonzero(candidates)
    if iy.size == 0:
        return ix, iy
    height, width = snr.shape
    # The 4 direct neighbours first (cheap, removes most pixels), then the rest of the box.
    offsets = [(0, -1), (-1, 0), (0, 1), (1, 0)]
    offsets += [
        (dy, dx)
        for dy in range(-half, half + 1)
        for dx in range(-half, half + 1)
        if (dy, dx) not in offsets and (dy, dx) != (0, 0)
    ]
    for dy, dx in offsets:
        values = snr[iy, ix]
        yy, xx = iy + dy, ix + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        neighbour = np.full(iy.size, -np.inf, dtype=np.float64)
        neighbour[inside] = snr[yy[inside], xx[inside]]
        # Strictly greater neighbours win; equal ones win when they come earlier in raster order.
        earlier = dy < 0 or (dy == 0 and dx < 0)
        keep = (values > neighbour) | ((values == neighbour) & (not earlier))
        iy, ix = iy[keep], ix[keep]
    return ix, iy


def _windowed_centroids(
    image: NDArray, x: NDArray, y: NDArray, sigma: float, iterations: int = 8
) -> tuple[NDArray, NDArray, NDArray, NDArray, NDArray]:
    """Gaussian-windowed centroids and de-weighted second moments (ixx, iyy, ixy)."""
    half = int(math.ceil(3.0 * sigma)) + 3
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    stamps = _gather(image, ix, iy, half)
    grid = np.arange(-half, half + 1, dtype=np.float64)
    xc, yc = x.astype(np.float64).copy(), y.astype(np.float64).copy()
    s2 = sigma * sigma
    for _ in range(iterations):
        dx = grid[None, None, :] + (ix - xc)[:, None, None]
        dy = grid[None, :, None] + (iy - yc)[:, None, None]
        w = np.exp(-0.5 * (dx * dx + dy * dy) / s2) * stamps
        norm = w.sum(axis=(1, 2))
        ok = norm > 0
        shift_x = np.where(ok, 2.0 * (w * dx).sum(axis=(1, 2)) / np.where(ok, norm, 1.0), 0.0)
        shift_y = np.where(ok, 2.0 * (w * dy).sum(axis=(1, 2)) / np.where(ok, norm, 1.0), 0.0)
        xc += np.clip(shift_x, -1.0, 1.0)
        yc += np.clip(shift_y, -1.0, 1.0)
        # Keep the window on its stamp.
        xc = np.clip(xc, ix - 2.0, ix + 2.0)
        yc = np.clip(yc, iy - 2.0, iy + 2.0)
    dx = grid[None, None, :] + (ix - xc)[:, None, None]
    dy = grid[None, :, None] + (iy - yc)[:, None, None]
    w = np.exp(-0.5 * (dx * dx + dy * dy) / s2) * stamps
    norm = w.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mxx = (w * dx * dx).sum(axis=(1, 2)) / norm
        myy = (w * dy * dy).sum(axis=(1, 2)) / norm
        mxy = (w * dx * dy).sum(axis=(1, 2)) / norm
        # Weighted moments M_w of a Gaussian source M with a Gaussian window W: M_w^-1 = M^-1 + W^-1.
        det = mxx * myy - mxy * mxy
        inv_xx, inv_yy, inv_xy = myy / det - 1.0 / s2, mxx / det - 1.0 / s2, -mxy / det
        det2 = inv_xx * inv_yy - inv_xy * inv_xy
        good = (det > 0) & (det2 > 0) & (inv_xx > 0)
        ixx = np.where(good, inv_yy / det2, np.nan)
        iyy = np.where(good, inv_xx / det2, np.nan)
        ixy = np.where(good, -inv_xy / det2, np.nan)
    return xc, yc, ixx, iyy, ixy


def detect_and_measure(
    exposure: Exposure,
    *,
    threshold: float = 5.0,
    aperture_radius: float = 12.0,
    id_base: int = 0,
    set_detected_mask: bool = True,
) -> Table:
    """Detect sources above ``threshold`` sigma and measure them (see the module docstring).

    Parameters
    ----------
    exposure : Exposure
        A background-subtracted calexp with variance, PSF, WCS and photo_calib.
    threshold : float
        Detection threshold in sigma of the PSF-smoothed image.
    aperture_radius : float
        Aperture radius for ``apFlux``, pixels.
    id_base : int
        Source ids are ``id_base + 1, id_base + 2, ...``.
    set_detected_mask : bool
        Set the DETECTED mask plane on the exposure from the detection footprints.

    Returns
    -------
    astropy.table.Table
        A source catalog with the columns of :data:`SRC_COLUMNS` (see :mod:`butler.catalog`).

    Raises
    ------
    ValueError
        If the exposure lacks a PSF, WCS or photo_calib.
    """
    if exposure.psf is None or exposure.wcs is None or exposure.photo_calib is None:
        raise ValueError("detect_and_measure needs an exposure with a PSF, a WCS and a photo_calib")
    # photutils takes ~1 s to import: only when measuring.
    from photutils.aperture import CircularAperture, aperture_photometry
    from photutils.segmentation import detect_sources

    x0, y0 = exposure.xy0
    height, width = exposure.shape
    cx, cy = exposure.bbox.center
    sigma = exposure.psf.fwhm(cx, cy) / SIGMA_TO_FWHM
    image = exposure.image
    variance = exposure.variance
    if not (np.isfinite(image).all() and np.isfinite(variance).all()):
        bad = ~(np.isfinite(image) & np.isfinite(variance))
        image = np.where(bad, 0.0, image).astype(np.float32)
        variance = np.where(bad, np.float32(np.inf), variance).astype(np.float32)

    # Matched filter: a Gaussian g of the PSF sigma (sum 1).  Footprints: smoothed image above
    # threshold x the background noise sqrt(V_bg sum g^2), V_bg the sky variance (the minimum of the
    # variance plane in 32x32 blocks), as LSST thresholds against the background.  Peaks: local
    # maxima of the smoothed image, kept when their exact S/N, smoothed / sqrt(sum g^2 V) with the
    # full variance plane around the peak, passes the threshold.
    radius = int(3.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    kernel2 = np.outer(taps, taps) ** 2
    smoothed = ndimage.gaussian_filter(image, sigma, mode="constant", truncate=3.0)
    block = 32 if min(height, width) >= 128 else 1
    bh, bw = -(-height // block), -(-width // block)
    if (bh * block, bw * block) == (height, width):
        padded = variance
    else:
        padded = np.pad(variance, ((0, bh * block - height), (0, bw * block - width)), mode="edge")
    v_bg = padded.reshape(bh, block, bw, block).min(axis=(1, 3))
    noise_bg = np.sqrt(np.maximum(v_bg, 1e-30) * kernel2.sum()).astype(np.float32)
    noise_bg = np.repeat(np.repeat(noise_bg, block, axis=0), block, axis=1)[:height, :width]
    snr_bg = smoothed / noise_bg
    del noise_bg, padded

    segm = detect_sources(snr_bg, threshold, n_pixels=3)
    if set_detected_mask and segm is not None:
        exposure.set_mask("DETECTED", segm.data > 0)
    columns = list(SRC_COLUMNS)
    half_box = max(1, int(round(0.5 * SIGMA_TO_FWHM * sigma)))
    if segm is None:
        px = py = np.zeros(0, np.int64)
    else:
        candidates = (segm.data > 0) & (snr_bg > threshold)
        # As photutils.detection.find_peaks(border_width=2): no peaks within 2 px of the edge.
        candidates[:2, :] = candidates[-2:, :] = False
        candidates[:, :2] = candidates[:, -2:] = False
        px, py = _local_maxima(smoothed, candidates, half_box)
    del snr_bg
    if px.size:
        noise = np.sqrt((_gather(variance, px, py, radius) * kernel2[None]).sum(axis=(1, 2)))
        pval = smoothed[py, px].astype(np.float64) / noise
        keep = pval > threshold
        px, py, pval = px[keep], py[keep], pval[keep]
    del smoothed
    if px.size == 0:
        _log.info("no sources above %.1f sigma", threshold)
        return make_source_catalog(0, columns, meta={"apRadius": aperture_radius, "threshold": threshold})

    mask = exposure.mask
    sat_bit = exposure.get_plane_bitmask("SAT")
    # On saturated stars keep only the highest peak of each detection footprint near SAT pixels.
    if segm is not None and (mask & sat_bit).any():
        reach = max(2, int(2 * sigma))
        sat_near = (_gather(mask & sat_bit, px, py, reach) != 0).any(axis=(1, 2))
        labels = segm.data[py, px]
        on_sat = sat_near & (labels > 0)
        keep = np.ones(px.size, bool)
        for label in np.unique(labels[on_sat]):
            members = np.flatnonzero(on_sat & (labels == label))
            keep[members] = False
            keep[members[np.argmax(pval[members])]] = True
        px, py, pval = px[keep], py[keep], pval[keep]

    xc, yc, ixx, iyy, ixy = _windowed_centroids(image, px.astype(float), py.astype(float), sigma)
    n = xc.size

    # PSF flux with the PSF model at each centroid.
    psf_flux = np.full(n, np.nan)
    psf_err = np.full(n, np.nan)
    edge = np.zeros(n, bool)
    for k in range(n):
        stamp, sx0, sy0 = exposure.psf.shifted_image(xc[k] + x0, yc[k] + y0)
        sx0 -= x0
        sy0 -= y0
        sh, sw = stamp.shape
        xa, xb = max(sx0, 0), min(sx0 + sw, width)
        ya, yb = max(sy0, 0), min(sy0 + sh, height)
        if xa >= xb or ya >= yb:
            edge[k] = True
            continue
        edge[k] = (xa, ya, xb, yb) != (sx0, sy0, sx0 + sw, sy0 + sh)
        p = stamp[ya - sy0 : yb - sy0, xa - sx0 : xb - sx0]
        p2 = float((p * p).sum())
        psf_flux[k] = float((p * image[ya:yb, xa:xb]).sum()) / p2
        psf_err[k] = math.sqrt(float((p * p * variance[ya:yb, xa:xb]).sum())) / p2

    positions = np.column_stack([xc, yc])
    phot = aperture_photometry(image, CircularAperture(positions, r=aperture_radius), error=np.sqrt(variance))
    ap_flux = np.asarray(phot["aperture_sum"], dtype=np.float64)
    ap_err = np.asarray(phot["aperture_sum_err"], dtype=np.float64)
    ap_bad = (
        (xc - aperture_radius < -0.5)
        | (yc - aperture_radius < -0.5)
        | (xc + aperture_radius > width - 0.5)
        | (yc + aperture_radius > height - 0.5)
    )

    centre = _gather(mask, np.rint(xc).astype(np.int64), np.rint(yc).astype(np.int64), 1)
    centre_bits = np.bitwise_or.reduce(centre.reshape(n, -1), axis=1)

    def flag(plane: str) -> NDArray[np.bool_]:
        return (centre_bits & exposure.get_plane_bitmask(plane)) != 0

    calib = exposure.photo_calib.calibration
    table = make_source_catalog(n, columns, meta={"apRadius": aperture_radius, "threshold": threshold})
    table["id"][:] = id_base + 1 + np.arange(n, dtype=np.int64)
    ra, dec = exposure.pixel_to_sky(xc + x0, yc + y0)
    table["coord_ra"][:] = ra
    table["coord_dec"][:] = dec
    table["x"][:] = xc + x0
    table["y"][:] = yc + y0
    with np.errstate(invalid="ignore", divide="ignore"):
        pos_err = math.sqrt(2.0) * sigma * np.abs(psf_err / psf_flux)
    table["xErr"][:] = pos_err.astype(np.float32)
    table["yErr"][:] = pos_err.astype(np.float32)
    table["psfFlux"][:] = psf_flux * calib
    table["psfFluxErr"][:] = psf_err * calib
    table["apFlux"][:] = ap_flux * calib
    table["apFluxErr"][:] = ap_err * calib
    table["ixx"][:] = ixx.astype(np.float32)
    table["iyy"][:] = iyy.astype(np.float32)
    table["ixy"][:] = ixy.astype(np.float32)
    table["snr"][:] = pval.astype(np.float32)
    table["pixelFlags_edge"][:] = edge
    table["pixelFlags_saturated"][:] = flag("SAT")
    table["pixelFlags_bad"][:] = flag("BAD")
    table["pixelFlags_cr"][:] = flag("CR")
    table["pixelFlags_interpolated"][:] = flag("INTRP")
    table["psfFlux_flag"][:] = ~np.isfinite(psf_flux) | edge
    table["apFlux_flag"][:] = ap_bad | ~np.isfinite(ap_flux)
    _log.info("%d sources above %.1f sigma (%d saturated)", n, threshold, int(table["pixelFlags_saturated"].sum()))
    return table
