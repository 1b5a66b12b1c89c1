"""Make external exposures (ingested FITS images) ready for image differencing.

A calexp from the simulator (or LSST) has everything subtractImages needs: a variance plane, a
PSF model, masks, a calibration and a ``src`` catalog.  An image ingested from a plain FITS file
usually has only pixels and a WCS.  :func:`prepare_external_exposure` fills in:

- **variance** (when the plane is all zero): a robust sky variance (``0.7413 IQR`` of the pixels,
  squared, after clipping outliers; then measured again on the pixels away from the sources the
  first pass detects, since faint sources' wings inflate the IQR of all pixels -- by 1-4% in sigma
  on the DECam cutouts of ``bench_diffim.py``) plus the Poisson variance of the sources,
  ``max(image, 0) / gain``
  (``gain`` in e-/ADU from the argument or the ``GAIN`` keyword; an image that was resampled has a
  per-pixel sky variance below the raw one, which the robust estimate measures directly);
- **SAT** where the image reaches ``SATURATE`` (keyword or argument), grown by one pixel;
- **photo_calib** = 1 count per count when missing (fluxes then come out in image units);
- **PSF** (when missing): an empirical :class:`~butler.psf.ImagePsf` -- the median of normalized,
  re-centred stamps of bright, isolated, unsaturated stars -- or a Gaussian of the ``FWHM`` keyword
  when too few stars qualify;
- a **source catalog** (``src``-like: positions, PSF fluxes and errors, S/N, pixel flags) from the
  same PSF matched filter as :class:`~tasks.diffim.detect_measure.DetectAndMeasureTask`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from astropy.table import Table
from scipy import ndimage

from butler.exposure import Exposure, PhotoCalib
from butler.psf import GaussianPsf, ImagePsf, Psf

from .detect_measure import DetectAndMeasureConfig, DetectAndMeasureTask, significance_image
from .utils import robust_std

__all__ = ["prepare_external_exposure", "estimate_sky_variance", "empirical_psf", "detect_sources", "source_free_pixels"]

_log = logging.getLogger(__name__)


def estimate_sky_variance(image: np.ndarray, n_sigma: float = 3.0, iterations: int = 5) -> float:
    """Sky variance (counts^2) from the pixel distribution: robust std after clipping positive outliers."""
    values = np.asarray(image, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 10:
        raise ValueError("too few finite pixels to estimate the sky variance")
    for _ in range(iterations):
        med = float(np.median(values))
        sig = robust_std(values)
        keep = np.abs(values - med) < n_sigma * sig
        if keep.all():
            break
        values = values[keep]
    return float(robust_std(values) ** 2)


def _header_float(metadata: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = metadata.get(key)
        try:
            out = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(out) and out > 0:
            return out
    return None


def detect_sources(exposure: Exposure, threshold: float = 5.0) -> Table:
    """Positive sources of a direct image with the diffim matched filter (a ``src``-like catalog)."""
    cfg = DetectAndMeasureConfig()
    cfg.detectionThreshold = threshold
    cfg.detectNegative = False
    cfg.doMergeDipoles = False
    cfg.doRemoveBadSources = False
    # on a direct image faint sources, not correlated noise, widen the blank-sky S/N distribution
    cfg.doRescaleSignificance = False
    task = DetectAndMeasureTask(config=cfg)
    return task.run(None, None, exposure).diaSources


def empirical_psf(
    exposure: Exposure,
    sources: Table,
    *,
    size: int = 25,
    min_snr: float = 50.0,
    max_stars: int = 50,
    isolation: float | None = None,
    min_stars: int = 5,
) -> ImagePsf | None:
    """Median of re-centred, normalized stamps of bright isolated unflagged stars (None if too few).

    Stars: S/N above ``min_snr``, no other source within ``isolation`` pixels (default ``size``),
    no saturated/bad/edge flag, stamp inside the image and finite.  Each stamp is shifted to the
    central pixel by its sub-pixel centroid (cubic spline) and normalized by its sum.
    """
    if size % 2 == 0:
        size += 1
    half = size // 2
    iso = float(size) if isolation is None else float(isolation)
    x = np.asarray(sources["x"], dtype=float) - exposure.xy0[0]
    y = np.asarray(sources["y"], dtype=float) - exposure.xy0[1]
    snr = np.asarray(sources["snr"], dtype=float)
    ok = snr >= min_snr
    for flag in ("pixelFlags_saturated", "pixelFlags_saturatedAround", "pixelFlags_bad", "pixelFlags_edge",
                 "pixelFlags_nodata", "isNegative"):
        if flag in sources.colnames:
            ok &= ~np.asarray(sources[flag], dtype=bool)
    if len(x) > 1:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([x, y]))
        counts = np.asarray(tree.query_ball_point(np.column_stack([x, y]), r=iso, return_length=True))
        ok &= counts <= 1
    h, w = exposure.shape
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    ok &= (ix - half - 2 >= 0) & (iy - half - 2 >= 0) & (ix + half + 3 <= w) & (iy + half + 3 <= h)
    order = np.argsort(-snr)
    stamps = []
    for k in order:
        if not ok[k]:
            continue
        big = exposure.image[iy[k] - half - 2 : iy[k] + half + 3, ix[k] - half - 2 : ix[k] + half + 3].astype(float)
        if not np.all(np.isfinite(big)):
            continue
        shifted = ndimage.shift(big, (iy[k] - y[k], ix[k] - x[k]), order=3, mode="nearest")[2:-2, 2:-2]
        total = shifted.sum()
        if not total > 0:
            continue
        stamps.append(shifted / total)
        if len(stamps) >= max_stars:
            break
    if len(stamps) < min_stars:
        return None
    img = np.median(np.array(stamps), axis=0)
    # remove the residual pedestal (median of the stamp border) and negative noise
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    img = np.clip(img - np.median(border), 0.0, None)
    return ImagePsf.normalized(img)


def prepare_external_exposure(
    exposure: Exposure,
    *,
    gain: float | None = None,
    saturation: float | None = None,
    fwhm: float | None = None,
    psf: Psf | None = None,
    variance: np.ndarray | None = None,
    psf_size: int = 25,
    detection_threshold: float = 5.0,
) -> tuple[Exposure, Table]:
    """A copy of ``exposure`` with variance, SAT mask, calibration and PSF, and its source catalog.

    Parameters
    ----------
    exposure : Exposure
        Read from FITS (``butler.get`` of an ingested file, or ``read_exposure_fits``).
    gain : float, optional
        e-/ADU; default the ``GAIN`` keyword; without either no Poisson term is added.
    saturation : float, optional
        Saturation level, counts; default the ``SATURATE`` keyword.
    fwhm : float, optional
        PSF FWHM in pixels for the initial (Gaussian) PSF; default the ``FWHM`` keyword, else 4.
    psf : Psf, optional
        Use this PSF model instead of estimating one.
    variance : numpy.ndarray, optional
        Use this variance plane (e.g. a noise map squared).
    psf_size : int
        Size of the empirical PSF image, pixels (odd).
    detection_threshold : float
        Source detection threshold, sigma.

    Returns
    -------
    exposure : Exposure
    sources : astropy.table.Table
    """
    md = exposure.metadata
    out = exposure.copy()
    if out.photo_calib is None:
        out.photo_calib = PhotoCalib(1.0)
    g = gain if gain is not None else _header_float(md, "GAIN", "GAINA")
    sky_from_pixels = False
    if variance is not None:
        out.variance = np.asarray(variance, dtype=np.float32).copy()
    elif not np.any(out.variance):
        sky = estimate_sky_variance(out.image)
        out.variance = _sky_plus_poisson(out.image, sky, g)
        sky_from_pixels = True
        _log.info("variance from the sky (sigma %.2f counts, first estimate) and gain %s", math.sqrt(sky), g)
    sat = saturation if saturation is not None else _header_float(md, "SATURATE", "SATURATA")
    if sat is not None:
        hit = np.nan_to_num(out.image, nan=-np.inf) >= sat
        if hit.any():
            out.set_mask("SAT", ndimage.binary_dilation(hit, iterations=1))
    bad = ~np.isfinite(out.image) | ~np.isfinite(out.variance)
    if bad.any():
        out.set_mask("NO_DATA", bad)
    if psf is not None:
        out.psf = psf
    else:
        f = fwhm if fwhm is not None else (_header_float(md, "FWHM") or 4.0)
        out.psf = GaussianPsf.from_fwhm(f, size=max(psf_size, 2 * int(math.ceil(3 * f)) + 1))
    if sky_from_pixels:
        # the IQR of all pixels includes the wings of faint sources: measure the sky away from them
        free = source_free_pixels(out)
        if np.count_nonzero(free) >= 1000:
            sky = estimate_sky_variance(out.image[free])
            out.variance = _sky_plus_poisson(out.image, sky, g)
            _log.info("sky sigma %.2f counts on %.0f%% of the pixels, away from sources", math.sqrt(sky), 100 * free.mean())
    sources = detect_sources(out, detection_threshold)
    if psf is not None:
        return out, sources
    measured = empirical_psf(out, sources, size=psf_size)
    if measured is not None:
        out.psf = measured
        sources = detect_sources(out, detection_threshold)
        cx, cy = out.bbox.center
        _log.info("empirical PSF of FWHM %.2f px (Gaussian start %.2f px)", measured.fwhm(cx, cy), f)
    else:
        _log.info("too few PSF stars: Gaussian PSF of FWHM %.2f px", f)
    return out, sources


def _sky_plus_poisson(image: np.ndarray, sky: float, gain: float | None) -> np.ndarray:
    """``sky + max(image, 0) / gain`` (float32; no Poisson term without a gain)."""
    poisson = np.clip(np.nan_to_num(image), 0.0, None) / gain if gain else 0.0
    return (sky + poisson).astype(np.float32)


def source_free_pixels(exposure: Exposure, threshold: float = 5.0, grow_fwhm: float = 2.0) -> np.ndarray:
    """Finite pixels farther than ``grow_fwhm`` PSF FWHMs from every pixel of PSF matched-filter S/N >= ``threshold``.

    A high threshold keeps noise peaks out of the source mask, so that the pixels left are not
    selected on their own noise.
    """
    snr, _, usable = significance_image(exposure)
    cx, cy = exposure.bbox.center
    r = max(1, int(math.ceil(grow_fwhm * exposure.psf.fwhm(cx, cy))))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    occupied = ndimage.binary_dilation(snr >= threshold, structure=(xx * xx + yy * yy) <= r * r)
    return usable & ~occupied
