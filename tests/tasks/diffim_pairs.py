"""Synthetic image pairs shared by the subtraction tests."""

from __future__ import annotations

import numpy as np

from butler.psf import GaussianPsf
from tasks.psfmatch.testing import SyntheticPair, make_psf_matching_pair, render_stars

#: Pixels of the pairs.
SHAPE = (512, 512)
#: Photometric scale, science counts per template count.
SCALE = 1.2
#: Position (pixels) and science counts of the transient of :func:`science_sharper_pair`.
TRANSIENT = (256.3, 300.7, 2.0e4)


def science_sharper_pair() -> SyntheticPair:
    """A 512x512 pair whose science PSF (sigma 1.4 px) is narrower than the template's (2.0 px),
    with one transient (:data:`TRANSIENT`) in the science image only."""
    pair = make_psf_matching_pair(
        shape=SHAPE, n_stars=250, scale=SCALE, template_psf=GaussianPsf(2.0), science_psf=GaussianPsf(1.4),
        template_depth=4.0, seed=12,
    )
    tx, ty, tflux = TRANSIENT
    pair.science.image += render_stars(SHAPE, pair.science.psf, [tx], [ty], [tflux]).astype(np.float32)
    return pair
