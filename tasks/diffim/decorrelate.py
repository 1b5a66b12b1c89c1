"""Decorrelation of an Alard--Lupton difference image (LSST's "afterburner", DMTN-021).

Convolving one image with the matching kernel ``K`` correlates its noise: the difference
``D = U - C (x) K`` (``U`` the unconvolved image, ``C`` the convolved one, white noises of
variance ``s_u``, ``s_c``) has the noise power spectrum ``s_u + s_c |K^(k)|^2``.  Per-pixel
variances are still right (``V_u + V_c (x) K^2``), but everything that sums pixels -- the PSF
matched filter, PSF fluxes -- sees far more template noise than a white-noise model predicts
(for a smooth kernel nearly all of it survives the filter).  The decorrelation kernel

    phi^(k) = sqrt((s_u + kappa^2 s_c) / (s_u + s_c |K^(k)|^2)),     kappa = sum(K) = K^(0)

whitens it: ``phi (x) D`` has the flat power spectrum ``s_u + kappa^2 s_c``, ``phi^(0) = 1`` keeps
fluxes, and the PSF of the difference becomes ``P_u (x) phi``.  As in LSST, ``phi`` is computed
once, from the kernel at the image centre and the median variances of the two images; the
variance plane of the result is propagated exactly for that kernel:
``V_D = V_u (x) phi^2 + V_c (x) (phi (x) K)^2``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import scipy.fft

__all__ = ["decorrelation_kernel", "convolve_kernels", "trim_kernel", "centred_transform", "centred_image"]

_log = logging.getLogger(__name__)


def decorrelation_kernel(
    kernel: np.ndarray,
    variance_convolved: float,
    variance_unconvolved: float,
    size: int,
) -> np.ndarray:
    """The decorrelation kernel ``phi`` (real space, ``size x size``, summing to 1).

    Parameters
    ----------
    kernel : numpy.ndarray
        Odd-sized matching kernel image (not normalized: its sum ``kappa`` is the photometric
        scale from the convolved image to the unconvolved one).
    variance_convolved, variance_unconvolved : float
        Typical (median) per-pixel variances of the convolved and the unconvolved image, each in
        its own units (counts^2).
    size : int
        Odd output size, pixels.

    Returns
    -------
    numpy.ndarray
        float64 ``(size, size)`` kernel centred on the central pixel.
    """
    if size % 2 == 0 or size < 1:
        raise ValueError(f"decorrelation kernel size must be odd and positive, got {size}")
    k = np.asarray(kernel, dtype=np.float64)
    kappa = float(k.sum())
    s_c = max(float(variance_convolved), 0.0)
    s_u = max(float(variance_unconvolved), 0.0)
    if not (math.isfinite(s_c) and math.isfinite(s_u)) or s_u + kappa**2 * s_c <= 0:
        _log.warning("no usable variances (%.3g, %.3g): decorrelation kernel is a delta function", s_c, s_u)
        out = np.zeros((size, size))
        out[size // 2, size // 2] = 1.0
        return out
    n = scipy.fft.next_fast_len(2 * max(size, k.shape[0]) + 1)
    power = np.abs(centred_transform(k, n)) ** 2
    phi_hat = np.sqrt((s_u + kappa**2 * s_c) / (s_u + s_c * power))
    phi = centred_image(phi_hat, size)
    total = phi.sum()
    return phi / total


def centred_transform(kernel: np.ndarray, n: int) -> np.ndarray:
    """The 2-D FFT of an odd kernel placed with its centre on pixel (0, 0) of an ``n x n`` grid
    (with wrap-around, so the transform of a symmetric kernel has no phase ramp)."""
    k = np.asarray(kernel, dtype=np.float64)
    padded = np.zeros((n, n))
    padded[: k.shape[0], : k.shape[1]] = k
    return scipy.fft.fft2(np.roll(padded, (-(k.shape[0] // 2), -(k.shape[1] // 2)), axis=(0, 1)))


def centred_image(transform: np.ndarray, size: int) -> np.ndarray:
    """The real ``size x size`` (odd, at most the grid's size) kernel centred on the central pixel whose
    transform on a centred grid (:func:`centred_transform`) is ``transform``."""
    full = np.real(scipy.fft.ifft2(transform))
    return np.roll(full, (size // 2, size // 2), axis=(0, 1))[:size, :size]


def convolve_kernels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full 2-D convolution of two small kernels (odd sizes in, odd size out), float64.

    Plain ``scipy.fft`` (``scipy.signal.fftconvolve`` would do the same, but importing
    ``scipy.signal`` costs ~5 s of CPU in a fresh process here).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    shape = (a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1)
    fshape = tuple(scipy.fft.next_fast_len(n, real=True) for n in shape)
    out = scipy.fft.irfft2(scipy.fft.rfft2(a, fshape) * scipy.fft.rfft2(b, fshape), fshape)
    return out[: shape[0], : shape[1]]


def trim_kernel(kernel: np.ndarray, threshold: float = 1.0e-5, min_size: int = 3) -> np.ndarray:
    """Crop a centred odd kernel symmetrically to the box where ``|K| > threshold * max|K|``."""
    arr = np.asarray(kernel, dtype=np.float64)
    ny, nx = arr.shape
    cy, cx = ny // 2, nx // 2
    above = np.abs(arr) > threshold * np.abs(arr).max()
    rows = np.flatnonzero(above.any(axis=1))
    cols = np.flatnonzero(above.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return arr
    half = max(cy - rows[0], rows[-1] - cy, cx - cols[0], cols[-1] - cx, min_size // 2)
    half = min(half, cy, cx)
    return arr[cy - half : cy + half + 1, cx - half : cx + half + 1]
