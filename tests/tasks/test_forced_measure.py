"""tasks.measure: PSF and aperture photometry at given positions, pixel flags, the correlated-noise
error scale and the background model, on synthetic exposures with known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy import ndimage

from butler.exposure import Exposure, PhotoCalib
from butler.psf import GaussianPsf
from tasks.diffim.detect_measure import DetectAndMeasureTask
from tasks.measure import (
    aperture_flux,
    aperture_kernel,
    estimate_background,
    noise_scale,
    pixel_flags,
    psf_flux,
    psf_weights,
)
from tasks.psfmatch.testing import render_stars

SIGMA_PSF = 1.8
SKY_SIGMA = 5.0


def _wcs(shape: tuple[int, int]) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def _exposure(signal: np.ndarray, noise: np.ndarray, variance: float, xy0=(0, 0)) -> Exposure:
    shape = signal.shape
    return Exposure(
        signal + noise, None, np.full(shape, variance), xy0=xy0, wcs=_wcs(shape), psf=GaussianPsf(SIGMA_PSF),
        photo_calib=PhotoCalib(2.0), band="r",
    )


def _grid(n_side: int, start: float, step: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    g = start + step * np.arange(n_side)
    x, y = np.meshgrid(g, g)
    return x.ravel() + rng.uniform(-0.5, 0.5, x.size), y.ravel() + rng.uniform(-0.5, 0.5, y.size)


def test_psf_flux_is_unbiased_with_correct_errors_on_white_noise() -> None:
    rng = np.random.default_rng(1)
    xs, ys = _grid(12, 20.0, 38.0, rng)
    flux = rng.uniform(500.0, 5000.0, xs.size)
    psf = GaussianPsf(SIGMA_PSF)
    pulls, rel = [], []
    for seed in range(4):
        noise = np.random.default_rng(seed).normal(0.0, SKY_SIGMA, (460, 460))
        exposure = _exposure(render_stars((460, 460), psf, xs, ys, flux), noise, SKY_SIGMA**2, xy0=(100, 50))
        m = psf_flux(exposure, xs + 100, ys + 50)
        assert not m.flag.any() and not m.edge.any()
        expected_err = SKY_SIGMA / math.sqrt((psf.image(0, 0) ** 2).sum())
        np.testing.assert_allclose(m.flux_err, expected_err, rtol=0.02)
        pulls.append((m.flux - flux) / m.flux_err)
        rel.append((m.flux - flux) / flux)
    pulls = np.concatenate(pulls)
    assert abs(pulls.mean()) < 0.1
    assert 0.92 < pulls.std() < 1.08
    noiseless = psf_flux(_exposure(render_stars((460, 460), psf, xs, ys, flux), 0.0, SKY_SIGMA**2, xy0=(100, 50)), xs + 100, ys + 50)
    np.testing.assert_allclose(noiseless.flux, flux, rtol=1e-3)


def test_psf_flux_matches_detect_and_measure() -> None:
    """The same formula as detectAndMeasure's psfFlux: identical numbers at its own centroids."""
    rng = np.random.default_rng(7)
    xs, ys = _grid(6, 40.0, 70.0, rng)
    flux = rng.uniform(2000.0, 8000.0, xs.size)
    psf = GaussianPsf(SIGMA_PSF)
    exposure = _exposure(render_stars((440, 440), psf, xs, ys, flux), rng.normal(0, SKY_SIGMA, (440, 440)), SKY_SIGMA**2)
    catalog = DetectAndMeasureTask().run(None, None, exposure).diaSources
    assert len(catalog) == xs.size
    m = psf_flux(exposure, catalog["x"], catalog["y"])
    calib = exposure.photo_calib.calibration
    np.testing.assert_allclose(m.flux * calib, catalog["psfFlux"], rtol=1e-9)
    np.testing.assert_allclose(m.flux_err * calib, catalog["psfFluxErr"], rtol=1e-9)
    ap = aperture_flux(exposure, catalog["x"], catalog["y"], 12.0)
    np.testing.assert_allclose(ap.flux * calib, catalog["apFlux"], rtol=1e-9)


def test_psf_flux_masks_edges_and_bad_pixels() -> None:
    psf = GaussianPsf(SIGMA_PSF)
    xs = np.array([100.0, 2.0, 150.0, 60.0])
    ys = np.array([100.0, 100.0, 150.0, 60.0])
    flux = np.full(4, 1000.0)
    exposure = _exposure(render_stars((200, 200), psf, xs, ys, flux), 0.0, 1.0)
    exposure.mask[150, 152:154] |= exposure.get_plane_bitmask("SAT")  # a little of the PSF weight
    exposure.image[58:63, 58:63] = np.nan  # an unusable core: most of the PSF weight
    m = psf_flux(exposure, xs, ys)
    assert list(m.flag) == [False, True, False, True]
    assert list(m.edge) == [False, True, False, False]
    # Masked pixels are left out: the fit of the remaining pixels is still the flux.
    assert m.flux[2] == pytest.approx(1000.0, rel=1e-3)
    assert m.flux_err[2] > m.flux_err[0]
    off = psf_flux(exposure, [-50.0, np.nan], [10.0, 10.0])
    assert off.flag.all() and off.edge.all() and np.isnan(off.flux).all()


def test_aperture_flux_of_a_flat_image_is_the_area() -> None:
    exposure = _exposure(np.ones((120, 120)), 0.0, 4.0)
    for radius in (3.0, 6.0, 12.0):
        m = aperture_flux(exposure, [60.3], [59.8], radius)
        assert m.flux[0] == pytest.approx(math.pi * radius**2, rel=0.015)
        assert m.flux_err[0] == pytest.approx(2.0 * math.sqrt((aperture_kernel(radius) ** 2).sum()), rel=0.05)
        assert not m.flag[0]
    exposure.mask[10, 10] = exposure.get_plane_bitmask("NO_DATA")
    edge = aperture_flux(exposure, [5.0, 12.0, 60.0], [60.0, 12.0, 60.0], 6.0)
    assert list(edge.edge) == [True, False, False]
    assert list(edge.flag) == [True, True, False]


def test_pixel_flags_read_the_mask_around_the_position() -> None:
    exposure = _exposure(np.zeros((50, 50)), 0.0, 1.0, xy0=(10, 20))
    exposure.mask[5, 5] = exposure.get_plane_bitmask("SAT")
    exposure.mask[30, 40] = exposure.get_plane_bitmask("NO_DATA")
    flags = pixel_flags(exposure, [16.0, 13.0, 50.0, 30.0], [26.0, 23.0, 50.0, 40.0],
                        {"sat": "SAT", "nodata": "NO_DATA", "none": "NOT_A_PLANE"}, radius=1)
    assert list(flags["sat"]) == [True, False, False, False]
    assert list(flags["nodata"]) == [False, False, True, False]
    assert not flags["none"].any()


def test_noise_scale_is_one_for_white_noise_and_measures_correlations() -> None:
    rng = np.random.default_rng(3)
    white = rng.normal(0.0, 1.0, (400, 400))
    exposure = _exposure(np.zeros((400, 400)), white, 1.0)
    assert noise_scale(exposure, psf_weights(exposure)) == pytest.approx(1.0, abs=0.04)
    assert noise_scale(exposure, aperture_kernel(6.0)) == pytest.approx(1.0, abs=0.05)
    # Smoothing with a Gaussian of sigma s correlates the noise; the variance plane below is the
    # exact per-pixel variance, so only the correlations make the errors too small.
    s = 1.2
    smooth = ndimage.gaussian_filter(white, s, mode="wrap")
    per_pixel = 1.0 / (4 * math.pi * s**2)
    correlated = _exposure(np.zeros((400, 400)), smooth, smooth.var())
    assert smooth.var() == pytest.approx(per_pixel, rel=0.05)
    g = psf_weights(correlated)
    # Exact factor for Gaussian weights of sigma p on white noise smoothed by s: the smoothed
    # PSF flux has variance ~ sum((g*k)^2), the prediction var * sum(g^2).
    p = SIGMA_PSF
    expected = math.sqrt((1.0 / (4 * math.pi * (p**2 + s**2))) / (per_pixel / (4 * math.pi * p**2)))
    assert noise_scale(correlated, g) == pytest.approx(expected, rel=0.06)
    assert noise_scale(correlated, aperture_kernel(9.0)) > noise_scale(correlated, g)
    # Unusable pixels are left out, not counted as zeros; too few positions give NaN.
    correlated.mask[:, :200] = correlated.get_plane_bitmask("NO_DATA")
    assert noise_scale(correlated, g) == pytest.approx(expected, rel=0.08)
    correlated.mask[:, :] = correlated.get_plane_bitmask("NO_DATA")
    assert math.isnan(noise_scale(correlated, g))


def test_background_follows_a_gradient_and_ignores_no_data() -> None:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:300, 0:300]
    plane = 3.0 + 0.01 * xx - 0.005 * yy
    exposure = _exposure(plane, rng.normal(0.0, 1.0, plane.shape), 1.0)
    exposure.image[:, :40] = np.nan
    exposure.mask[:, :40] = exposure.get_plane_bitmask("NO_DATA")
    background = estimate_background(exposure, box_size=50)
    assert background.dtype == np.float32 and background.shape == plane.shape
    # Boxes are 50 px: within ~2 boxes of the borders the model extrapolates a box median.
    inner = (slice(75, 225), slice(115, 225))
    assert np.abs(background[inner] - plane[inner]).max() < 0.3


def test_noise_cross_correlation_measures_shared_noise() -> None:
    from tasks.measure.noise import noise_cross_correlation

    rng = np.random.default_rng(11)
    shape = (400, 400)
    first = rng.normal(0.0, 2.0, shape)
    # The second image holds w = 0.4 of the first's noise smoothed by a unit-sum Gaussian k, plus
    # its own noise: rho must be w k at every lag.
    s, w = 1.0, 0.4
    shared = w * ndimage.gaussian_filter(first, s, mode="wrap")
    own = rng.normal(0.0, 0.5, shape)
    a = _exposure(np.zeros(shape), first, 4.0)
    b = _exposure(np.zeros(shape), shared + own, float((shared + own).var()))
    rho = noise_cross_correlation(a, b, 3)
    impulse = np.zeros((7, 7))
    impulse[3, 3] = 1.0
    expected = w * ndimage.gaussian_filter(impulse, s, mode="constant", truncate=10.0)
    np.testing.assert_allclose(rho, expected, atol=0.01)
    assert rho[2:5, 2:5].sum() == pytest.approx(expected[2:5, 2:5].sum(), rel=0.05)
    # independent images: no shared noise
    c = _exposure(np.zeros(shape), rng.normal(0.0, 1.0, shape), 1.0)
    assert np.abs(noise_cross_correlation(a, c, 3)).max() < 0.01
    with pytest.raises(ValueError, match="one shape"):
        noise_cross_correlation(a, _exposure(np.zeros((10, 10)), np.zeros((10, 10)), 1.0), 3)
