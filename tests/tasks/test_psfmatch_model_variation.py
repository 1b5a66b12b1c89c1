"""The kernel variation predicted by PSF models (tasks.psfmatch.model_variation) and its use in MakeKernelTask."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from butler.geometry import Box
from butler.psf import GaussianPsf
from tasks.diffim.make_kernel import MakeKernelConfig, MakeKernelTask
from tasks.psfmatch.basis import SIGMA_TO_FWHM
from tasks.psfmatch.fit import basis_for_fwhm
from tasks.psfmatch.model_variation import add_variation, model_kernel_variation, subtract_variation
from tasks.psfmatch.testing import corner_grid_psf, make_psf_matching_pair

BOX = Box(0, 0, 512, 512)
SIGMA_T = 1.2
#: Science PSF sigmas at the corners (lower-left, lower-right, upper-left, upper-right), pixels.
CORNERS = (1.8, 2.3, 2.0, 2.1)


def _gaussian(sigma: float, half: int) -> np.ndarray:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    img = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return img / img.sum()


@pytest.fixture(scope="module")
def setup():
    psf_t = GaussianPsf(SIGMA_T, size=41)
    psf_s = corner_grid_psf(CORNERS, BOX, size=41)
    basis = basis_for_fwhm(SIGMA_T * SIGMA_TO_FWHM, np.mean(CORNERS) * SIGMA_TO_FWHM)
    return psf_t, psf_s, basis, model_kernel_variation(psf_t, psf_s, basis, BOX)


def test_the_variation_vanishes_at_the_centre_and_keeps_the_flux(setup) -> None:
    _, _, basis, variation = setup
    delta = variation.kernel(basis)
    cx, cy = BOX.center
    assert np.abs(delta.kernel_image(cx, cy)).max() < 1e-10
    for x, y in [(0, 0), (511, 0), (0, 511), (511, 511)]:
        assert abs(delta.kernel_image(x, y).sum()) < 1e-8
    # the science PSF's sigma changes by 1.8 -> 2.3 px: a large change of the kernel
    assert variation.amplitude > 0.1


def test_the_centre_kernel_plus_the_variation_matches_the_corner_psfs(setup) -> None:
    """The exact kernel at a corner is a Gaussian of variance sigma_s^2 - sigma_t^2; at the centre (a
    bilinear mix of the corner PSFs) it is the same mix of the corner kernels."""
    psf_t, psf_s, basis, variation = setup
    half = basis.kernel_size // 2
    corner_kernels = [_gaussian(np.sqrt(s**2 - SIGMA_T**2), half) for s in CORNERS]
    centre_kernel = np.mean(corner_kernels, axis=0)
    delta = variation.kernel(basis)
    template_image = psf_t.image(0, 0)
    for (x, y), k_true in zip([(0, 0), (511, 0), (0, 511), (511, 511)], corner_kernels, strict=True):
        target = fftconvolve(template_image, k_true, mode="same")
        predicted = fftconvolve(template_image, centre_kernel + delta.kernel_image(x, y), mode="same")
        without = fftconvolve(template_image, centre_kernel, mode="same")
        error = np.abs(predicted - target).max() / target.max()
        assert error < 1e-3, (x, y, error)  # measured 1e-5..8e-5; without the variation 0.03-0.28
        assert error < 0.1 * np.abs(without - target).max() / target.max()


def test_subtract_and_add_are_inverse(setup) -> None:
    psf_t, psf_s, basis, variation = setup
    pair = make_psf_matching_pair(shape=(512, 512), n_stars=80, template_psf=psf_t, science_psf=psf_s, seed=4)
    task = MakeKernelTask()
    candidates = task.makeCandidateList(pair.template, pair.science, pair.sources, basis.kernel_size)[:5]
    moved = subtract_variation(candidates, variation, basis, 1.3)
    back = subtract_variation(moved, variation, basis, -1.3)
    for c, m, b in zip(candidates, moved, back, strict=True):
        assert np.abs(m.science - c.science).max() > 1e-3 * np.abs(c.science).max()
        np.testing.assert_allclose(b.science, c.science, atol=1e-9 * np.abs(c.science).max())
    kernel = variation.kernel(basis).with_coefficients(np.eye(basis.n_basis, 1), 0)
    combined = add_variation(kernel, variation, 1.3)
    assert combined.kernel_order == variation.order
    for x, y in [(0, 0), (300, 100)]:
        np.testing.assert_allclose(
            combined.kernel_image(x, y),
            kernel.kernel_image(x, y) + 1.3 * variation.kernel(basis).kernel_image(x, y),
            atol=1e-12,
        )


@pytest.mark.parametrize("use", [True, False])
def test_make_kernel_uses_the_psf_models_variation(setup, use) -> None:
    """Few stars on a strongly varying science PSF: the PSF models' variation keeps the kernel right."""
    psf_t, psf_s, _, _ = setup
    pair = make_psf_matching_pair(
        shape=(512, 512), n_stars=60, template_psf=psf_t, science_psf=psf_s, scale=1.1, seed=8, template_depth=4.0
    )
    config = MakeKernelConfig()
    config.usePsfModelVariation = use
    task = MakeKernelTask(config=config)
    kernel = task.run(pair.template, pair.science, pair.sources).psfMatchingKernel
    errors = []
    for (x, y), sigma in zip([(10, 10), (501, 10), (10, 501), (501, 501)], CORNERS, strict=True):
        matched = fftconvolve(psf_t.image(x, y), kernel.kernel_image(x, y), mode="same") / 1.1
        errors.append(np.abs(matched - psf_s.image(x, y)).max() / psf_s.image(x, y).max())
    # measured: largest corner error 0.020 with the variation, 0.07-0.13 without
    if use:
        assert task.metadata["psfModelVariation"] > 0.1
        assert max(errors) < 0.035, errors
    else:
        assert task.metadata["psfModelVariation"] == 0.0
        assert min(errors) > 0.05, errors


def test_constant_psfs_skip_the_model_variation() -> None:
    pair = make_psf_matching_pair(shape=(256, 256), n_stars=40, seed=2)
    task = MakeKernelTask()
    task.run(pair.template, pair.science, pair.sources)
    assert task.metadata["psfModelVariation"] == 0.0
    assert "psfModelVariationScale" not in task.metadata
