"""A smooth background model of an exposure (photutils ``Background2D``), for measurement.

Coadds keep what is left of each visit's sky subtraction; forced photometry subtracts a smooth
background first, as LSST measures on background-subtracted ``deepCoadd_calexp`` images.  The model
is the sigma-clipped median in boxes of ``box_size`` pixels (at most a third of the image), median
filtered over 3x3 boxes and interpolated; ``NO_DATA`` and non-finite pixels are ignored.  When too
few boxes have data, one sigma-clipped median of the whole image is used instead.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import NDArray

from butler.exposure import Exposure

from .photometry import plane_bits

__all__ = ["estimate_background", "subtract_background"]

_log = logging.getLogger(__name__)


def estimate_background(exposure: Exposure, box_size: int = 128) -> NDArray[np.float32]:
    """The smooth background of ``exposure.image`` (same units and shape; 0 where nothing has data).

    Parameters
    ----------
    exposure : Exposure
    box_size : int
        Background box size, pixels (capped at a third of the image, at least 16).

    Returns
    -------
    numpy.ndarray
        float32 background image.
    """
    from astropy.stats import SigmaClip, sigma_clipped_stats
    from photutils.background import Background2D, MedianBackground

    height, width = exposure.shape
    box = int(max(16, min(box_size, height // 3, width // 3)))
    no_data = ~np.isfinite(exposure.image)
    bits = plane_bits(exposure.mask_planes, ("NO_DATA",))
    if bits:
        no_data |= (exposure.mask & bits) != 0
    if no_data.all():
        return np.zeros(exposure.shape, np.float32)
    data = np.where(no_data, 0.0, exposure.image)
    try:
        bkg = Background2D(
            data, box, filter_size=3, mask=no_data, sigma_clip=SigmaClip(sigma=3.0),
            bkg_estimator=MedianBackground(), exclude_percentile=50.0,
        )
    except ValueError as exc:
        level = float(sigma_clipped_stats(exposure.image[~no_data], sigma=3.0)[1])
        _log.info("Background2D failed (%s); using a constant background of %.3g instead", exc, level)
        return np.full(exposure.shape, level, np.float32)
    return np.asarray(bkg.background, dtype=np.float32)


def subtract_background(exposure: Exposure, box_size: int = 128) -> tuple[Exposure, NDArray[np.float32]]:
    """A copy of ``exposure`` with :func:`estimate_background` subtracted, and the background.

    The input is not modified; the copy shares the mask and variance planes' values (copied).
    """
    background = estimate_background(exposure, box_size)
    out = exposure.copy()
    out.image -= background
    return out, background
