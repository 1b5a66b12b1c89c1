"""End-to-end kernel fits on synthetic pairs against truth: kernel sum, kernel, background, residuals."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np
import pytest
from scipy.signal import fftconvolve

from butler.geometry import Box
from butler.psf import GaussianPsf
from tasks.psfmatch import (
    NoKernelCandidatesError,
    PsfMatchConfig,
    PsfMatchError,
    convolve_exposure,
    fit_kernel_to_candidates,
    fit_psf_matching_kernel,
    make_candidate_list,
    model_psf_matching_candidates,
    psf_matching_basis,
)
from tasks.psfmatch.basis import AlardLuptonBasis
from tasks.psfmatch.fit import basis_for_fwhm
from tasks.psfmatch.testing import corner_grid_psf, make_psf_matching_pair, true_gaussian_kernel

SCALE = 1.25
PLANE = (5.0, 0.01, -0.005)
CORNERS = [(0, 0), (511, 0), (0, 511), (511, 511), (255.5, 255.5)]


def _fit(pair, config=None):
    cfg = config or PsfMatchConfig()
    basis, _, _ = psf_matching_basis(pair.template, pair.science, cfg)
    cands = make_candidate_list(pair.template, pair.science, pair.sources, basis.kernel_size, cfg)
    return fit_psf_matching_kernel(pair.template, pair.science, cands, cfg, basis=basis)


@pytest.fixture(scope="module")
def noise_free():
    pair = make_psf_matching_pair(shape=(512, 512), n_stars=150, scale=SCALE, background=PLANE, noise=False, seed=1)
    return pair, *_fit(pair)


@pytest.fixture(scope="module")
def noisy():
    pair = make_psf_matching_pair(shape=(512, 512), n_stars=200, scale=SCALE, background=PLANE, noise=True, seed=2)
    return pair, *_fit(pair)


def test_noise_free_fit_recovers_truth(noise_free) -> None:
    pair, kernel, diag = noise_free
    assert diag.n_used >= 50 and not diag.rejected
    true = true_gaussian_kernel(1.2, 1.8, kernel.kernel_size, SCALE)
    for x, y in CORNERS:
        assert kernel.kernel_sum(x, y) == pytest.approx(SCALE, rel=1e-3)
        assert np.abs(kernel.kernel_image(x, y) - true).max() < 0.01 * true.max()
        assert kernel.background(x, y) == pytest.approx(pair.true_background(x, y), abs=0.01)
    assert diag.spatial_condition_number < 1e10
    json.dumps(diag.to_dict())  # plain data for task metadata
    json.dumps(kernel.to_dict())


def _quality(pair, kernel) -> tuple[float, float, float]:
    """Std of (science - matched template - background) / sigma within 2 FWHM of stars with
    S/N > 20, and std and mean of it on blank sky (beyond 4 FWHM of every star)."""
    matched = convolve_exposure(pair.template, kernel)
    diff = pair.science.image - matched.image - kernel.background_image(pair.science.bbox)
    z = diff / np.sqrt(pair.science.variance + matched.variance)
    inside = (matched.mask & matched.get_plane_bitmask("EDGE")) == 0
    yy, xx = np.mgrid[0 : z.shape[0], 0 : z.shape[1]]
    near = np.zeros(z.shape, bool)
    far = np.ones(z.shape, bool)
    fwhm = 1.8 * 2.3548
    snr = pair.sources["psfFlux"] / pair.sources["psfFluxErr"]
    for x, y, s in zip(pair.star_x, pair.star_y, snr, strict=True):
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        if s > 20:
            near |= r2 < (2 * fwhm) ** 2
        far &= r2 > (4 * fwhm) ** 2
    return float(z[near & inside].std()), float(z[far & inside].std()), float(z[far & inside].mean())


def _passes(quality: tuple[float, float, float]) -> bool:
    near_std, sky_std, sky_mean = quality
    return 0.98 <= near_std <= 1.03 and 0.98 <= sky_std <= 1.02 and abs(sky_mean) < 0.02


def test_noisy_fit_kernel_sum_and_residuals(noisy) -> None:
    pair, kernel, diag = noisy
    for x, y in CORNERS:
        assert kernel.kernel_sum(x, y) == pytest.approx(SCALE, rel=0.01)
    cx, cy = pair.science.bbox.center
    assert kernel.background(cx, cy) == pytest.approx(pair.true_background(cx, cy), abs=0.5)
    quality = _quality(pair, kernel)
    assert _passes(quality), quality


def test_broken_models_fail_the_residual_check(noisy) -> None:
    """The quality check above fails for a 2% wrong kernel sum or a background of the wrong sign."""
    pair, kernel, _ = noisy
    from tasks.psfmatch.spatial import SpatialKernel

    wrong_sum = kernel.with_kernel_sum(1.02 * kernel.kernel_sum(256, 256))
    wrong_bg = SpatialKernel(kernel.basis, kernel.kernel_coefficients, -kernel.background_coefficients,
                             kernel.bbox, kernel.kernel_order, kernel.background_order)
    for bad in (wrong_sum, wrong_bg):
        quality = _quality(pair, bad)
        assert not _passes(quality), quality


def test_spatially_varying_psf_is_matched_at_corners_and_centre() -> None:
    bbox = Box(0, 0, 512, 512)
    science_psf = corner_grid_psf((1.6, 1.8, 1.9, 2.1), bbox)
    pair = make_psf_matching_pair(shape=(512, 512), n_stars=150, science_psf=science_psf, noise=False, seed=3)
    kernel, diag = _fit(pair)
    for x, y in CORNERS:
        matched = fftconvolve(pair.template.psf.image(x, y), kernel.kernel_image(x, y))
        target = science_psf.image(x, y)
        off = (matched.shape[0] - target.shape[0]) // 2
        core = matched[off : off + target.shape[0], off : off + target.shape[1]]
        assert np.abs(core - target).max() < 0.02 * target.max(), (x, y)
        assert kernel.kernel_sum(x, y) == pytest.approx(1.0, rel=1e-3)


def test_variable_star_is_rejected_by_kernel_sum_clipping() -> None:
    pair = make_psf_matching_pair(shape=(512, 512), n_stars=150, scale=SCALE, noise=False, seed=1)
    cfg = PsfMatchConfig()
    basis, _, _ = psf_matching_basis(pair.template, pair.science, cfg)
    cands = make_candidate_list(pair.template, pair.science, pair.sources, basis.kernel_size, cfg)
    brightest = int(np.argmax([c.snr for c in cands]))
    victim = cands[brightest]
    cands[brightest] = replace(victim, science=victim.science * 1.3)  # the star brightened by 30%
    kernel, diag = fit_kernel_to_candidates(cands, basis, pair.science.bbox, cfg)
    out = diag.candidates[brightest]
    assert out.status == "rejected" and "kernel sum" in out.reason
    assert kernel.kernel_sum(256, 256) == pytest.approx(SCALE, rel=1e-3)
    # without sigma clipping (ModelPsfMatchTask) the variable star pulls the kernel sum
    kernel, diag = fit_kernel_to_candidates(cands, basis, pair.science.bbox, cfg.replace(use_sigma_clipping=False))
    assert diag.candidates[brightest].status == "good"
    assert abs(kernel.kernel_sum(256, 256) / SCALE - 1) > 3e-3


def test_model_psf_matching_path() -> None:
    bbox = Box(0, 0, 1000, 800)
    psf_in = corner_grid_psf((1.3, 1.5, 1.4, 1.7), bbox, size=31)
    psf_ref = GaussianPsf(2.3, size=31)
    cfg = PsfMatchConfig.for_model_psf_matching()
    basis = basis_for_fwhm(psf_in.fwhm(500, 400), psf_ref.fwhm(0, 0), cfg)
    cands, size = model_psf_matching_candidates(psf_in, psf_ref, bbox, (6, 5), basis.kernel_size)
    assert size == 15  # 31 // 2 = 15: clamped from the 21+ px the widths ask for
    basis = AlardLuptonBasis(size, basis.sigmas, basis.degrees)
    kernel, diag = fit_kernel_to_candidates(cands, basis, bbox, cfg)
    assert diag.n_used == 30 and not diag.rejected
    assert kernel.background_coefficients.size == 0
    for x, y in [(0, 0), (999, 0), (0, 799), (999, 799), (500, 400)]:
        matched = fftconvolve(psf_in.image(x, y), kernel.kernel_image(x, y), mode="same")
        target = psf_ref.image(x, y)
        assert np.abs(matched - target).max() < 0.01 * target.max(), (x, y)
        assert kernel.kernel_sum(x, y) == pytest.approx(1.0, abs=2e-3)
    assert kernel.with_kernel_sum(1.0).kernel_sum(10, 10) == pytest.approx(1.0, abs=1e-12)


def test_errors() -> None:
    pair = make_psf_matching_pair(shape=(256, 256), n_stars=30, noise=False, seed=4)
    cfg = PsfMatchConfig(isolation_radius=0.0)
    basis, _, _ = psf_matching_basis(pair.template, pair.science, cfg)
    cands = make_candidate_list(pair.template, pair.science, pair.sources, basis.kernel_size, cfg)
    with pytest.raises(NoKernelCandidatesError, match="only 2 usable kernel candidates"):
        fit_psf_matching_kernel(pair.template, pair.science, cands[:2], cfg, basis=basis)
    pair.template.psf = None
    with pytest.raises(PsfMatchError, match="template exposure has no PSF"):
        fit_psf_matching_kernel(pair.template, pair.science, cands, cfg)


def test_thread_safety(noisy) -> None:
    """The fit and the convolution from 4 threads at once give the serial results (inputs shared)."""
    pair, kernel_serial, _ = noisy
    cfg = PsfMatchConfig()
    basis, _, _ = psf_matching_basis(pair.template, pair.science, cfg)
    cands = make_candidate_list(pair.template, pair.science, pair.sources, basis.kernel_size, cfg)
    conv_serial = convolve_exposure(pair.template, kernel_serial)
    n_threads = 4
    barrier = threading.Barrier(n_threads)
    results: list = [None] * n_threads
    errors: list = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            kernel, _ = fit_psf_matching_kernel(pair.template, pair.science, cands, cfg, basis=basis)
            results[i] = (kernel, convolve_exposure(pair.template, kernel))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for kernel, conv in results:
        np.testing.assert_allclose(kernel.kernel_coefficients, kernel_serial.kernel_coefficients, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            kernel.background_coefficients, kernel_serial.background_coefficients, rtol=1e-9, atol=1e-9
        )
        np.testing.assert_allclose(conv.image, conv_serial.image, rtol=1e-5, atol=1e-3)
    assert all(c.status == "unsolved" and c.solution is None for c in cands)


def test_config_round_trip_and_validation() -> None:
    from tasks.psfmatch.errors import PsfMatchConfigError

    cfg = PsfMatchConfig(kernel_size=25, basis_sigmas=[1.0, 2.0], basis_degrees=[2, 2])
    assert cfg.basis_sigmas == (1.0, 2.0)
    again = PsfMatchConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    model = PsfMatchConfig.for_model_psf_matching()
    assert not model.use_sigma_clipping and not model.fit_background
    for bad in ({"kernel_size": 20}, {"min_snr": 600.0}, {"basis_degrees": (4, 2)}, {"max_spatial_iterations": 0}):
        with pytest.raises(PsfMatchConfigError):
            PsfMatchConfig(**bad)
    with pytest.raises(PsfMatchConfigError, match="unknown fields"):
        PsfMatchConfig.from_dict({"kernelSize": 21})
