"""How much the variance plane under-predicts the error of a linear flux measurement.

A PSF or aperture flux is a weighted sum ``F = sum(w D)`` of pixels, and its error from the variance
plane is ``sqrt(sum(w^2 V))``.  That is exact only when the noise of neighbouring pixels is
independent.  Resampling (warps) and PSF matching (coadds built from PSF-matched warps, template
convolution) correlate the noise, and the true error of ``F`` is then larger -- by a factor that
depends on the weights: small for a PSF flux, large for a wide aperture.

:func:`noise_scale` measures that factor the way LSST's sky objects do, but at every position of
the image: the measurement is applied everywhere as a correlation (``F`` map and predicted error
map by FFT), and the spread of ``F / error`` over positions whose weights fall (almost) entirely
on usable pixels is compared with 1.  The spread is the distance between the median and the 15.87th percentile
(the lower half of the distribution, which sources -- positive by nature -- hardly reach).
Multiply the variance-plane errors by the returned factor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray
import scipy.fft
from scipy import ndimage, signal

from butler.exposure import Exposure

from .photometry import DEFAULT_BAD_PLANES, aperture_weights, plane_bits

__all__ = ["noise_scale", "noise_cross_correlation", "psf_weights", "aperture_kernel"]

_log = logging.getLogger(__name__)


def psf_weights(exposure: Exposure) -> NDArray[np.float64]:
    """The PSF kernel image at the exposure's centre (the weights of a PSF flux, up to a factor)."""
    if exposure.psf is None:
        raise ValueError(f"the exposure {exposure.bbox} has no PSF model")
    cx, cy = exposure.bbox.center
    return np.asarray(exposure.psf.image(cx, cy), dtype=np.float64)


def aperture_kernel(radius: float) -> NDArray[np.float64]:
    """Weights of a centred circular aperture of ``radius`` pixels (see :func:`aperture_weights`)."""
    half = int(math.ceil(radius)) + 1
    grid = np.arange(-half, half + 1, dtype=np.float64)
    return aperture_weights(radius, grid[None, :], grid[:, None])


def _central_pixels(
    exposure: Exposure, bad_planes: Iterable[str], max_size: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Image and variance (float64) of the central ``max_size`` x ``max_size`` pixels at most, and
    which of them are usable: finite, in no plane of ``bad_planes``."""
    height, width = exposure.shape
    ya = max(0, (height - max_size) // 2)
    xa = max(0, (width - max_size) // 2)
    sl = (slice(ya, ya + min(height, max_size)), slice(xa, xa + min(width, max_size)))
    image = exposure.image[sl].astype(np.float64)
    variance = exposure.variance[sl].astype(np.float64)
    usable = np.isfinite(image) & np.isfinite(variance)
    bits = plane_bits(exposure.mask_planes, bad_planes)
    if bits:
        usable &= (exposure.mask[sl] & bits) == 0
    return image, variance, usable


def noise_scale(
    exposure: Exposure,
    weights: NDArray[np.float64],
    *,
    bad_planes: Iterable[str] = DEFAULT_BAD_PLANES,
    max_size: int = 1024,
    min_positions: int = 1000,
    min_weight_fraction: float = 0.9,
) -> float:
    """Ratio of the measured to the predicted scatter of ``sum(weights D)`` over blank positions.

    Parameters
    ----------
    exposure : Exposure
        Image and variance planes (units cancel).
    weights : numpy.ndarray
        Odd-sized 2-D weights of the measurement, centred.
    bad_planes : iterable of str
        Pixels of these planes (and non-finite ones) are left out of the measurement, as the flux
        measurements leave them out.
    max_size : int
        Larger images are measured on their central ``max_size`` x ``max_size`` pixels (the
        factor is a property of the noise, not of the position).
    min_positions : int
        Fewer usable positions than this give NaN.
    min_weight_fraction : float
        A position is used when its usable pixels carry at least this fraction of ``sum(w^2)``.

    Returns
    -------
    float
        The factor (1 for uncorrelated noise with a correct variance plane), or NaN when it cannot
        be measured.
    """
    kernel = np.asarray(weights, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"weights must be a 2-D array of odd dimensions, got shape {kernel.shape}")
    image, variance, usable = _central_pixels(exposure, bad_planes, max_size)
    weight2 = kernel**2
    # Usable pixels carry at least min_weight_fraction of sum(w^2) at a position (outside the image
    # counts as unusable); unusable pixels are left out of both the flux and its predicted error.
    covered = signal.fftconvolve(usable.astype(np.float64), weight2[::-1, ::-1], mode="same") / weight2.sum()
    good = covered >= min_weight_fraction
    if np.count_nonzero(good) < min_positions:
        _log.debug("only %d usable positions for the noise scale; need %d", np.count_nonzero(good), min_positions)
        return float("nan")
    flux = signal.fftconvolve(np.where(usable, image, 0.0), kernel[::-1, ::-1], mode="same")
    predicted = signal.fftconvolve(np.where(usable, variance, 0.0), weight2[::-1, ::-1], mode="same")
    good &= predicted > 0
    snr = flux[good] / np.sqrt(predicted[good])
    if snr.size < min_positions:
        return float("nan")
    spread = float(np.median(snr) - np.percentile(snr, 15.865))
    return spread if spread > 0 else float("nan")


def noise_cross_correlation(
    first: Exposure,
    second: Exposure,
    half: int,
    *,
    bad_planes: Iterable[str] = DEFAULT_BAD_PLANES,
    max_size: int = 1024,
    source_threshold: float = 5.0,
    source_grow: int = 4,
) -> NDArray[np.float64]:
    """How much of ``first``'s pixel noise reappears in ``second``, at lags up to ``half`` pixels.

    Two images of the same pixel grid share noise when one went into the other (a science visit
    inside its own coadd template).  Returns ``rho`` with ``rho[half + dy, half + dx] =
    E[n1(p) n2(p + (dy, dx))] / V1(p)``: for ``second = w (k (x) first) + independent noise``,
    ``rho = w k``.  Independent images give zero within the estimate's noise.

    Sources would correlate the images by their signal, so pixels above ``source_threshold``
    sigma in either image, grown by ``source_grow`` pixels, are left out (a threshold low enough
    to catch noise peaks would bias ``rho`` low: at 3 sigma by 6% on pure noise), with non-finite pixels
    and those of ``bad_planes``; each image's median is subtracted.  Larger images are measured on
    their central ``max_size`` x ``max_size`` pixels.

    Parameters
    ----------
    first, second : Exposure
        Same shape and pixel frame; image and variance planes.
    half : int
        Largest lag, pixels.

    Returns
    -------
    numpy.ndarray
        ``(2 half + 1, 2 half + 1)`` (zeros when no pixel is usable).
    """
    if first.shape != second.shape:
        raise ValueError(f"noise cross-correlation needs images of one shape, got {first.shape} and {second.shape}")
    planes = [_central_pixels(exp, bad_planes, max_size) for exp in (first, second)]
    usable = planes[0][2] & planes[1][2] & (planes[0][1] > 0) & (planes[1][1] > 0)
    if not usable.any():
        return np.zeros((2 * half + 1, 2 * half + 1))
    sources = np.zeros_like(usable)
    centred = []
    for image, variance, _ in planes:
        level = np.median(image[usable])
        residual = np.where(usable, image - level, 0.0)
        sources |= np.abs(residual) > source_threshold * np.sqrt(np.where(usable, variance, 1.0))
        centred.append(residual)
    if source_grow > 0:
        sources = ndimage.binary_dilation(sources, iterations=source_grow)
    usable &= ~sources
    a = np.where(usable, centred[0], 0.0)
    b = np.where(usable, centred[1], 0.0)
    v = np.where(usable, planes[0][1], 0.0)
    shape = [scipy.fft.next_fast_len(d + 2 * half + 1, real=True) for d in a.shape]

    def lagged(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
        # sum_p x(p) y(p + q) for |q| <= half
        full = scipy.fft.irfft2(np.conj(scipy.fft.rfft2(x, s=shape)) * scipy.fft.rfft2(y, s=shape), s=shape)
        lags = np.arange(-half, half + 1)
        return full[np.ix_(lags % shape[0], lags % shape[1])]

    numerator = lagged(a, b)
    denominator = lagged(v, usable.astype(np.float64))
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)
