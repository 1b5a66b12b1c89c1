"""Cross-convolution: each image convolved with the other's PSF model before the kernel fit.

When the two PSFs differ in *shape* -- a space telescope's diffraction spikes at two roll angles,
an elongated PSF against a round one -- no single kernel turns one into the other.  Convolving the
science image with the template's PSF and the template with the science image's PSF gives both
the PSF ``P_S (x) P_T`` (ZOGY's numerator, sfft's cross-convolution); the Alard-Lupton kernel then
only has to fix what the PSF models miss and the photometric scale ``K``.

The difference is then made from the *unconvolved* images with ZOGY's whitening filters
(:func:`zogy_filters`): ``D = S (x) g_S - T (x) g_T`` with

    g_S^ = P_T^ N / sqrt(s_S |P_T^|^2 + s_T |P_S^ K^|^2),    g_T^ = P_S^ K^ N / sqrt(...),
    N = sqrt(s_S + kappa^2 s_T),

whose noise is white with variance ``s_S + kappa^2 s_T`` (``g_S^(0) = 1``, ``g_T^(0) = kappa``,
so fluxes stay in science counts) and whose PSF is ``P_S (x) g_S``.  Whitening the
cross-convolved difference afterwards would divide by ``|P^|`` where it is ~1e-9 (a 5-px PSF at
the Nyquist frequency) and amplify float32 rounding; the filters themselves stay bounded.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from butler.exposure import Exposure
from butler.geometry import Box
from butler.psf import Psf
from tasks.psfmatch import SpatialKernel, convolve_exposure

from .decorrelate import centred_image, centred_transform, trim_kernel

__all__ = ["psf_image_at_centre", "convolve_with_image", "zogy_filters"]


def psf_image_at_centre(psf: Psf, bbox: Box, threshold: float = 1.0e-5) -> np.ndarray:
    """The PSF model's image at the centre of ``bbox``, trimmed where below ``threshold`` of its
    peak and normalized to unit sum (float64, odd size)."""
    cx, cy = bbox.center
    img = trim_kernel(np.asarray(psf.image(cx, cy), dtype=np.float64), threshold)
    return img / img.sum()


def convolve_with_image(
    exposure: Exposure,
    kernel: np.ndarray,
    *,
    cell_size: int = 512,
    workers: int | None = None,
    support_threshold: float = 1.0e-3,
) -> Exposure:
    """``exposure`` convolved with one constant kernel image (image, variance ``V (x) K^2``, mask).

    Mask bits spread only where the kernel exceeds ``support_threshold`` of its peak (a PSF
    image's faint wings would otherwise spread every bit over its whole box).  The result has no
    PSF (the caller sets it).
    """
    kern = SpatialKernel(np.asarray(kernel, dtype=np.float64)[None], [[1.0]], [], exposure.bbox, 0, 0)
    return convolve_exposure(
        exposure, kern, cell_size=cell_size, workers=workers, support_threshold=support_threshold
    )


def zogy_filters(
    psf_science: np.ndarray,
    psf_template: np.ndarray,
    kernel: np.ndarray,
    variance_science: float,
    variance_template: float,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """ZOGY's whitening filters ``g_S``, ``g_T`` for ``D = S (x) g_S - T (x) g_T`` (see the module docstring).

    Parameters
    ----------
    psf_science, psf_template : numpy.ndarray
        Odd-sized unit-sum PSF images.
    kernel : numpy.ndarray
        Odd-sized kernel matching the cross-convolved template to the cross-convolved science
        image (its sum ``kappa``: science counts per template count).
    variance_science, variance_template : float
        Typical per-pixel variances, each in its own image's counts^2.
    size : int
        Odd size of the returned filters, pixels.

    Returns
    -------
    g_science, g_template : numpy.ndarray
        float64 ``(size, size)`` filters, summing to 1 and ``kappa``.
    """
    if size % 2 == 0 or size < 1:
        raise ValueError(f"filter size must be odd and positive, got {size}")
    k = np.asarray(kernel, dtype=np.float64)
    kappa = float(k.sum())
    s_s, s_t = max(float(variance_science), 0.0), max(float(variance_template), 0.0)
    if not (np.isfinite(s_s) and np.isfinite(s_t)) or s_s + kappa**2 * s_t <= 0:
        raise ValueError(f"cannot whiten with variances {s_s:g} (science) and {s_t:g} (template)")
    largest = max(size, psf_science.shape[0] + k.shape[0], psf_template.shape[0])
    n = scipy.fft.next_fast_len(2 * largest + 1)
    p_s = centred_transform(psf_science, n)
    p_t = centred_transform(psf_template, n)
    p_sk = p_s * centred_transform(k, n)
    denominator = np.sqrt(s_s * np.abs(p_t) ** 2 + s_t * np.abs(p_sk) ** 2)
    # where both PSFs vanish to rounding the filters do too
    tiny = denominator <= 1e-12 * denominator.max()
    norm = np.sqrt(s_s + kappa**2 * s_t)
    g_s = np.where(tiny, 0.0, p_t * norm / np.where(tiny, 1.0, denominator))
    g_t = np.where(tiny, 0.0, p_sk * norm / np.where(tiny, 1.0, denominator))
    out_s = centred_image(g_s, size)
    out_t = centred_image(g_t, size)
    return out_s / out_s.sum(), out_t * (kappa / out_t.sum())
