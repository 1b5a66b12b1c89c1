"""Unit tests of the simulator's building blocks: Gaussians, Sersic mixtures, PSF field, noise, defects."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from butler.psf import measure_fwhm
from tasks.instruments.simcam import SimCam
from tasks.simulation.gaussians import (
    add_gaussians,
    covariance_from_shape,
    gaussian_stamps,
    sersic_mixture,
)
from tasks.simulation.psf_field import PsfField
from tasks.simulation.render import (
    add_bad_columns,
    add_cosmic_rays,
    add_noise,
    apply_saturation,
    interpolate_rows,
)


def _brute_force(x: float, y: float, cov: tuple[float, float, float], half: int, sub: int = 40) -> np.ndarray:
    """Pixel integral of a normalized 2-D Gaussian by dense sub-sampling (no widening trick)."""
    cxx, cyy, cxy = cov
    inv = np.linalg.inv(np.array([[cxx, cxy], [cxy, cyy]]))
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    grid = (np.arange(-half, half + 1)[:, None] + offs[None, :]).ravel()
    ix, iy = round(x), round(y)
    dx = grid[None, :] + ix - x
    dy = grid[:, None] + iy - y
    q = inv[0, 0] * dx**2 + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy**2
    norm = 1.0 / (2 * math.pi * math.sqrt(np.linalg.det([[cxx, cxy], [cxy, cyy]])))
    vals = norm * np.exp(-0.5 * q) / sub**2
    size = 2 * half + 1
    return vals.reshape(size, sub, size, sub).sum(axis=(1, 3))


@pytest.mark.parametrize("sigma,q,theta", [(1.1, 1.0, 0.0), (1.4, 0.8, 30.0), (2.6, 0.9, -60.0), (0.6, 1.0, 0.0)])
def test_gaussian_stamps_are_pixel_integrals(sigma: float, q: float, theta: float) -> None:
    cov = tuple(float(c[0]) for c in covariance_from_shape(np.array([sigma]), np.array([q]), np.array([theta])))
    x, y = 10.37, -4.81
    half = int(math.ceil(6 * sigma)) + 1
    from tasks.simulation.gaussians import sampling_factor

    sub = int(sampling_factor(np.array([sigma * q]))[0])
    stamp, x0, y0 = gaussian_stamps(np.array([x]), np.array([y]), *(np.array([c]) for c in cov), half, sub)
    ref = _brute_force(x, y, cov, half)
    assert (x0[0], y0[0]) == (round(x) - half, round(y) - half)
    assert stamp[0].sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(stamp[0] - ref).max() < 2e-3 * ref.max()
    # First moments: the stamp is centred on (x, y).
    g = np.arange(-half, half + 1)
    cx = (stamp[0].sum(axis=0) * (g + x0[0] + half)).sum()
    cy = (stamp[0].sum(axis=1) * (g + y0[0] + half)).sum()
    assert (cx, cy) == (pytest.approx(x, abs=2e-3), pytest.approx(y, abs=2e-3))


def test_add_gaussians_conserves_flux_and_clips_at_edges() -> None:
    image = np.zeros((60, 80))
    flux = np.array([1000.0, 250.0, 40.0])
    cxx, cyy, cxy = covariance_from_shape(np.array([1.5, 2.0, 3.0]), np.array([1.0, 0.7, 0.5]), np.array([0, 45, 90]))
    ap = add_gaussians(image, [20.2, 50.7, 40.0], [30.1, 20.4, 30.5], flux, cxx, cyy, cxy, aperture_radius=[50.0] * 3)
    assert image.sum() == pytest.approx(flux.sum(), rel=1e-9)
    assert ap == pytest.approx(flux, rel=1e-9)
    edge = np.zeros((20, 20))
    add_gaussians(edge, [0.0], [10.0], [100.0], [4.0], [4.0], [0.0])
    # A star on the centre of the first column: the image holds the light right of x = -0.5.
    assert edge.sum() == pytest.approx(100.0 * 0.5 * (1 + erf(0.5 / (2.0 * math.sqrt(2)))), rel=1e-3)
    assert edge[:, 0].sum() > edge[:, 2].sum()


@pytest.mark.parametrize("n,expected_half_light", [(0.5, 1.0), (1.0, 1.0), (4.0, 0.75)])
def test_sersic_mixture_profiles(n: float, expected_half_light: float) -> None:
    mix = sersic_mixture(n)
    assert mix.weights.sum() == pytest.approx(1.0)
    r = np.linspace(0, 8, 8001)
    enclosed = sum(w * (1 - np.exp(-(r**2) / (2 * s**2))) for w, s in zip(mix.weights, mix.sigmas, strict=True))
    # n=4 is truncated at 4 r_e, which removes its outer light: the half-light radius shrinks.
    assert r[np.searchsorted(enclosed, 0.5)] == pytest.approx(expected_half_light, rel=0.05)
    if n == 4.0:  # a de Vaucouleurs profile is far more concentrated than an exponential
        assert (
            r[np.searchsorted(enclosed, 0.1)]
            < 0.5
            * r[
                np.searchsorted(
                    sum(
                        w * (1 - np.exp(-(r**2) / (2 * s**2)))
                        for w, s in zip(sersic_mixture(1.0).weights, sersic_mixture(1.0).sigmas, strict=True)
                    ),
                    0.1,
                )
            ]
        )


def _field(variation: float, ellipticity: float, seed: int = 4) -> tuple[PsfField, SimCam]:
    cam = SimCam(400)
    field = PsfField.random(np.random.default_rng(seed), 4.0, variation, cam.focal_plane_half_size(), ellipticity)
    return field, cam


def test_grid_psf_matches_the_analytic_psf() -> None:
    field, cam = _field(0.2, 0.08)
    rng = np.random.default_rng(0)
    for det_id in (4, 5, 8):
        det = cam.detector(det_id)
        psf = field.grid_psf(det, 7)
        for x, y in rng.uniform(0, 399, (6, 2)):
            model = psf.image(x, y)
            truth = field.kernel_image(det, x, y, model.shape[0])
            # PSF-weighted flux of the truth with the model as the weight: 1 when they agree.
            assert (model * truth).sum() / (model * model).sum() == pytest.approx(1.0, abs=1.5e-3)
            fwhm_truth = float(field.fwhm_at(*det.to_focal_plane(np.array([x]), np.array([y])))[0])
            assert psf.fwhm(x, y) == pytest.approx(fwhm_truth, rel=0.02)


def test_psf_varies_across_the_focal_plane_only_when_asked() -> None:
    corners = [(0, 0), (399, 0), (0, 399), (399, 399), (200, 200)]
    varying, cam = _field(0.2, 0.08)
    det = cam.detector(5)
    psf = varying.grid_psf(det, 7)
    widths = [psf.fwhm(x, y) for x, y in corners]
    assert max(widths) / min(widths) > 1.03
    constant, cam = _field(0.0, 0.0)
    psf = constant.grid_psf(det, 3)
    widths = [psf.fwhm(x, y) for x, y in corners]
    assert max(widths) / min(widths) < 1.002
    assert np.mean(widths) == pytest.approx(4.0, rel=0.01)


def test_mean_seeing_is_the_mosaic_average() -> None:
    field, cam = _field(0.25, 0.0)
    r = cam.focal_plane_half_size()
    u = np.linspace(-r, r, 201)
    xx, yy = np.meshgrid(u, u)
    assert field.fwhm_at(xx, yy).mean() == pytest.approx(4.0, rel=0.01)
    assert measure_fwhm(field.kernel_image(cam.detector(4), 200, 200, 25)) == pytest.approx(
        float(
            field.fwhm_at(np.array([200 + cam.detector(4).offset[0]]), np.array([200 + cam.detector(4).offset[1]]))[0]
        ),
        rel=0.01,
    )


@pytest.mark.parametrize("level", [5.0, 300.0, 1500.0, 20000.0])
def test_noise_has_the_expected_mean_and_variance(level: float) -> None:
    rng = np.random.default_rng(11)
    expected = np.full((400, 500), level)
    raw, variance = add_noise(expected, 1.5, 9.0, rng)
    assert raw.dtype == np.float32 and variance.dtype == np.float32
    assert variance[0, 0] == pytest.approx(level / 1.5 + (9.0 / 1.5) ** 2, rel=1e-5)
    pulls = (raw - expected) / np.sqrt(variance)
    assert abs(pulls.mean()) < 0.01
    assert pulls.std() == pytest.approx(1.0, abs=0.01)


def test_exact_poisson_below_the_threshold() -> None:
    rng = np.random.default_rng(2)
    raw, _ = add_noise(np.full((200, 200), 4.0), 1.0, 0.0, rng)
    assert np.allclose(raw, np.round(raw))  # integer electrons: Poisson, not Gaussian
    raw, _ = add_noise(np.full((200, 200), 4.0), 1.0, 0.0, np.random.default_rng(2), exact_poisson_below=0.0)
    assert not np.allclose(raw, np.round(raw))


@pytest.mark.parametrize("bleed", [True, False])
def test_saturation_clips_and_bleeds_conserving_charge(bleed: bool) -> None:
    raw = np.full((200, 50), 1000.0, dtype=np.float32)
    yy, xx = np.mgrid[0:200, 0:50]
    raw += 3e7 / (2 * np.pi * 4) * np.exp(-((xx - 25) ** 2 + (yy - 100) ** 2) / 8.0)
    original = raw.copy()
    before = float(raw.sum(dtype=np.float64))
    sat = apply_saturation(raw, 60000.0, bleed, grow=0)
    assert raw.max() <= 60000.0
    assert np.all(sat[raw >= 60000.0])
    assert np.array_equal(raw[~sat], original[~sat])  # only masked pixels changed
    rows = np.flatnonzero(sat.any(axis=1))
    cols = np.flatnonzero(sat.any(axis=0))
    if bleed:
        assert float(raw.sum(dtype=np.float64)) == pytest.approx(before, rel=1e-6)
        assert rows.size > 3 * cols.size  # a trail along the column
    else:
        assert float(raw.sum(dtype=np.float64)) < before
        assert rows.size < 2 * cols.size
    grown = apply_saturation(original.copy(), 60000.0, bleed, grow=1)
    assert grown.sum() > sat.sum() and np.all(grown[sat])


def test_interpolate_rows_reproduces_linear_rows() -> None:
    image = (np.arange(40, dtype=np.float32)[None, :] * 2.0 + np.arange(10, dtype=np.float32)[:, None]).copy()
    truth = image.copy()
    mask = np.zeros(image.shape, bool)
    mask[:, 7] = True
    mask[3, 20:24] = True
    mask[5, 0:3] = True  # a run touching the edge takes the nearest good value
    image[mask] = -999.0
    interpolate_rows(image, mask)
    inner = mask.copy()
    inner[5, 0:3] = False
    assert np.allclose(image[inner], truth[inner])
    assert np.allclose(image[5, 0:3], truth[5, 3])


def test_cosmic_rays_and_bad_columns_are_masked() -> None:
    rng = np.random.default_rng(5)
    raw = np.zeros((300, 300), dtype=np.float32)
    cr, n = add_cosmic_rays(raw, 200.0, 1.5, rng)
    assert n > 0 and cr.any()
    assert np.all(cr[raw > 0])  # every hit pixel is masked
    assert cr.sum() > (raw > 0).sum()  # grown by one pixel
    bad, defects = add_bad_columns(raw, 3, 9.0, 1.5, rng)
    for d in defects:
        assert bad[d["y0"] : d["y1"], d["x"]].all()
    assert bad.sum() == sum(d["y1"] - d["y0"] for d in defects)


def test_erf_reference_agrees_with_brute_force() -> None:
    """Guard the reference used above: a round Gaussian's pixel integral is a product of erfs."""
    sigma, x, y, half = 1.3, 0.3, -0.2, 6
    g = np.arange(-half, half + 1)
    fx = 0.5 * (erf((g + 0.5 - x) / (math.sqrt(2) * sigma)) - erf((g - 0.5 - x) / (math.sqrt(2) * sigma)))
    fy = 0.5 * (erf((g + 0.5 - y) / (math.sqrt(2) * sigma)) - erf((g - 0.5 - y) / (math.sqrt(2) * sigma)))
    assert np.allclose(_brute_force(x, y, (sigma**2, sigma**2, 0.0), half), fy[:, None] * fx[None, :], atol=2e-5)
