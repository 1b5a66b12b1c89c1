"""convolved_psf: a PSF convolved with a constant or spatially varying kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest

from butler.errors import PsfError
from butler.geometry import Box
from butler.psf import GaussianPsf, GridPsf, ImagePsf
from tasks.diffim.difference_psf import convolved_psf

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _gaussian(sigma: float, half: int = 15) -> np.ndarray:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    img = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return img / img.sum()


def test_constant_gaussians_add_in_quadrature() -> None:
    psf = convolved_psf(GaussianPsf(1.5), _gaussian(2.0), Box(0, 0, 100, 100))
    assert isinstance(psf, ImagePsf)
    img = psf.image(50, 50)
    assert img.sum() == pytest.approx(1.0)
    assert psf.fwhm(50, 50) == pytest.approx(2.5 * FWHM_PER_SIGMA, rel=0.02)


def test_spatially_varying_kernel_gives_a_grid_psf() -> None:
    bbox = Box(0, 0, 600, 400)

    def kernel(x: float, y: float) -> np.ndarray:
        return _gaussian(1.0 + 2.0 * x / 600.0)  # sigma 1 px on the left edge, 3 px on the right

    psf = convolved_psf(GaussianPsf(1.5), kernel, bbox, grid=5)
    assert isinstance(psf, GridPsf)
    xs, ys = psf.nodes
    assert len(xs) == 5 and len(ys) == 5 and xs[0] == 0 and xs[-1] == 599
    for x in (0.0, 599.0):
        sigma_k = 1.0 + 2.0 * x / 600.0
        assert psf.fwhm(x, 200) == pytest.approx(math.hypot(1.5, sigma_k) * FWHM_PER_SIGMA, rel=0.02)
    assert psf.fwhm(0, 200) < psf.fwhm(300, 200) < psf.fwhm(599, 200)


def test_grid_psf_keeps_its_nodes_and_a_kernel_shift_moves_the_centroid() -> None:
    base = convolved_psf(GaussianPsf(1.5), _gaussian(0.5), Box(0, 0, 100, 100), grid=3)
    assert isinstance(base, ImagePsf)
    grid = GridPsf(np.stack([np.stack([base.image(0, 0)] * 3)] * 2), [0.0, 50.0, 99.0], [0.0, 99.0])
    shift = np.zeros((7, 7))
    shift[3, 5] = 1.0  # moves light 2 px to +x
    psf = convolved_psf(grid, shift, Box(0, 0, 100, 100))
    assert isinstance(psf, GridPsf)
    assert [list(n) for n in psf.nodes] == [[0.0, 50.0, 99.0], [0.0, 99.0]]
    img = psf.image(50, 50)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]] - img.shape[0] // 2
    assert float((img * xx).sum()) == pytest.approx(2.0, abs=1e-6)
    assert float((img * yy).sum()) == pytest.approx(0.0, abs=1e-6)


def test_kernel_with_no_positive_sum_is_an_error() -> None:
    with pytest.raises(PsfError, match="non-positive sum"):
        convolved_psf(GaussianPsf(1.5), -_gaussian(1.0), Box(0, 0, 50, 50))
