"""Cell-wise FFT convolution with a spatially varying kernel: exactness, seams, variance, masks, NaNs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from butler.exposure import Exposure
from butler.geometry import Box
from butler.psf import GaussianPsf
from tasks.psfmatch.basis import SIGMA_TO_FWHM, AlardLuptonBasis
from tasks.psfmatch.convolve import (
    convolve_exposure,
    convolve_image,
    convolve_variance,
    grow_mask,
    kernel_support,
)
from tasks.psfmatch.spatial import SpatialKernel
from tasks.psfmatch.testing import render_stars

XY0 = (100, 50)
SHAPE = (300, 340)


@pytest.fixture(scope="module")
def basis() -> AlardLuptonBasis:
    return AlardLuptonBasis.from_fwhm(1.2 * SIGMA_TO_FWHM, 1.8 * SIGMA_TO_FWHM, kernel_size=21)


@pytest.fixture(scope="module")
def varying(basis: AlardLuptonBasis) -> SpatialKernel:
    rng = np.random.default_rng(3)
    coeffs = rng.normal(scale=0.05, size=(basis.n_basis, 6))
    coeffs[0] = [1.1, 0, 0, 0, 0, 0]
    return SpatialKernel(basis, coeffs, [1.0, 0.5, -0.3], Box(XY0[0], XY0[1], SHAPE[1], SHAPE[0]), 2, 1)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(4)
    xs, ys, fluxes = rng.uniform(100, 440, 40), rng.uniform(50, 350, 40), rng.uniform(1e3, 1e5, 40)
    stars = render_stars(SHAPE, GaussianPsf(1.2), xs, ys, fluxes, XY0)
    return stars + 10.0 * rng.normal(size=SHAPE)


def _reference(image: np.ndarray, kernel: SpatialKernel) -> np.ndarray:
    """Direct full-image convolution: sum_t T_t(x, y) * fftconvolve(image, K_t)."""
    ys, xs = np.mgrid[XY0[1] : XY0[1] + SHAPE[0], XY0[0] : XY0[0] + SHAPE[1]]
    terms = kernel.kernel_functions.evaluate(xs, ys)
    return sum(terms[..., t] * fftconvolve(image, k, mode="same") for t, k in enumerate(kernel.term_kernels()))


def test_cell_fft_equals_direct_convolution_without_seams(image, varying) -> None:
    ref = _reference(image, varying)
    peak = np.abs(ref).max()
    out64 = convolve_image(image, varying, xy0=XY0, cell_size=64, dtype=np.float64)
    assert np.abs(out64 - ref).max() < 1e-12 * peak  # exact, edges included
    out32 = convolve_image(image, varying, xy0=XY0, cell_size=64)
    assert out32.dtype == np.float32
    err = np.abs(out32 - ref)
    assert err.max() < 2e-6 * peak  # float32 precision
    # no seams: rows and columns on either side of the cell boundaries are no worse than elsewhere
    for b in (64, 128, 192, 256):
        assert err[b - 1 : b + 1, :].max() < 2e-6 * peak
        assert err[:, b - 1 : b + 1].max() < 2e-6 * peak
    # the per-pixel kernel: brute force at a few pixels, including a cell corner
    h = varying.kernel_size // 2
    for py, px in [(64, 64), (63, 127), (150, 200), (h, SHAPE[1] - 1 - h)]:
        k = varying.kernel_image(px + XY0[0], py + XY0[1])
        patch = image[py - h : py + h + 1, px - h : px + h + 1][::-1, ::-1]
        assert out64[py, px] == pytest.approx(float((k * patch).sum()), rel=1e-10, abs=1e-9 * peak)


def test_constant_kernel_variance_is_exact(image, basis) -> None:
    coeffs = np.zeros((basis.n_basis, 1))
    coeffs[0, 0], coeffs[3, 0] = 1.0, 0.02
    kernel = SpatialKernel(basis, coeffs, [], Box(0, 0, 10, 10), 0, 0)
    var = np.abs(image) + 5.0
    k = kernel.kernel_image(0, 0)
    ref = fftconvolve(var, k**2, mode="same")
    out = convolve_variance(var, kernel, cell_size=100, dtype=np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12 * ref.max())


def _gauss(sigma: float, size: int = 21) -> np.ndarray:
    off = np.arange(size) - size // 2
    g = np.exp(-0.5 * (off[:, None] ** 2 + off[None, :] ** 2) / sigma**2)
    return g / g.sum()


def test_spatially_varying_variance(image) -> None:
    """A kernel whose width goes from 1.3 to 1.6 px across 340 px (a steep PSF gradient) and 64 px cells."""
    g1, g2 = _gauss(1.3), _gauss(1.6)
    coeffs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])  # a_1 = 0.5 + 0.5 u: g1 at the left, g2 at the right
    kernel = SpatialKernel(np.stack([g1, g2 - g1]), coeffs, [], Box(XY0[0], XY0[1], SHAPE[1], SHAPE[0]), 1, 0)
    ys, xs = np.mgrid[XY0[1] : XY0[1] + SHAPE[0], XY0[0] : XY0[0] + SHAPE[1]]
    f = kernel.kernel_functions.evaluate(xs, ys)
    kt = kernel.term_kernels()

    def exact(var: np.ndarray) -> np.ndarray:  # K(x)^2 = sum_ts f_t f_s K_t K_s
        pairs = [(t, s) for t in range(3) for s in range(3)]
        return sum(f[..., t] * f[..., s] * fftconvolve(var, kt[t] * kt[s], mode="same") for t, s in pairs)

    h = kernel.kernel_size // 2
    inner = (slice(h, -h), slice(h, -h))
    flat = np.full(SHAPE, 7.0)
    out = convolve_variance(flat, kernel, xy0=XY0, cell_size=64, dtype=np.float64)
    np.testing.assert_allclose(out[inner], exact(flat)[inner], rtol=1e-12)  # sky: exact, no seams
    rng = np.random.default_rng(7)
    xs, ys, fluxes = rng.uniform(100, 440, 40), rng.uniform(50, 350, 40), rng.uniform(1e3, 1e5, 40)
    stars = render_stars(SHAPE, GaussianPsf(1.2), xs, ys, fluxes, XY0)
    model = stars + 100.0  # a model variance plane: sky + stars
    rel = (convolve_variance(model, kernel, xy0=XY0, cell_size=64) / exact(model) - 1.0)[inner]
    assert np.abs(rel).max() < 0.03  # near stars: the kernel shape change across half a cell
    assert abs(rel.mean()) < 1e-3
    noisy = np.abs(image) + 5.0  # a noisy variance plane: per-pixel scatter, no bias
    rel = (convolve_variance(noisy, kernel, xy0=XY0, cell_size=64) / exact(noisy) - 1.0)[inner]
    assert abs(rel.mean()) < 1e-3


def test_mask_growth_matches_shifted_ors() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((80, 90), np.int32)
    mask[rng.integers(0, 80, 30), rng.integers(0, 90, 30)] |= 1 << rng.integers(0, 6, 30)
    support = (-3, 5, -4, 2)  # asymmetric box of offsets d: output p ORs input p - d
    grown = grow_mask(mask, support)
    expected = np.zeros_like(mask)
    padded = np.pad(mask, 10)
    for dy in range(-3, 6):
        for dx in range(-4, 3):
            expected |= padded[10 - dy : 90 - dy, 10 - dx : 100 - dx]
    np.testing.assert_array_equal(grown, expected)
    assert grow_mask(np.zeros((5, 5), np.int32), support).sum() == 0


def test_convolve_exposure_nans_masks_and_edges(image, varying) -> None:
    img = image.astype(np.float32).copy()
    img[100, 100] = np.nan
    img[200:203, 50:53] = 1e30  # garbage under NO_DATA
    mask = np.zeros(SHAPE, np.int32)
    exp = Exposure(img, mask, np.full(SHAPE, 100.0, np.float32), xy0=XY0, band="r")
    nodata = exp.get_plane_bitmask("NO_DATA")
    sat = exp.get_plane_bitmask("SAT")
    exp.mask[200:203, 50:53] |= nodata
    exp.mask[150, 150] |= sat
    before = exp.image.copy()
    out = convolve_exposure(exp, varying, cell_size=64)
    np.testing.assert_array_equal(exp.image, before)  # input untouched
    assert np.all(np.isfinite(out.image)) and np.all(np.isfinite(out.variance))
    assert out.bbox == exp.bbox and out.band == "r" and out.psf is None
    h = varying.kernel_size // 2
    # NO_DATA covers exactly the pixels the bad inputs reach
    reach = np.zeros(SHAPE, bool)
    reach[100 - h : 100 + h + 1, 100 - h : 100 + h + 1] = True
    reach[200 - h : 203 + h, 50 - h : 53 + h] = True
    np.testing.assert_array_equal((out.mask & nodata) != 0, reach)
    sat_out = (out.mask & sat) != 0
    assert sat_out[150 - h : 150 + h + 1, 150 - h : 150 + h + 1].all() and sat_out.sum() == (2 * h + 1) ** 2
    edge = (out.mask & out.get_plane_bitmask("EDGE")) != 0
    assert edge[:h].all() and edge[:, -h:].all() and not edge[h:-h, h:-h].any()
    # good pixels equal the convolution of the image with bad pixels zeroed
    clean = np.where((exp.mask & nodata) | ~np.isfinite(img), 0.0, img.astype(np.float64))
    ref = _reference(clean, varying)
    good = ~reach
    assert np.abs(out.image - ref)[good].max() < 2e-6 * np.abs(ref).max()
    assert kernel_support(varying, XY0, SHAPE, 0.0) == (-h, h, -h, h)
    narrow = SpatialKernel(_gauss(1.5)[None], [[1.0]], [], exp.bbox, 0, 0)
    # exp(-r^2 / 4.5) > 0.01 for |r| <= 4
    assert kernel_support(narrow, XY0, SHAPE, 0.01) == (-4, 4, -4, 4)
