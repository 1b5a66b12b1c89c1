"""Per-candidate kernel solutions: kernel sum, kernel shape, background, conditioning."""

from __future__ import annotations

import numpy as np
import pytest

from butler.psf import GaussianPsf
from tasks.psfmatch.basis import SIGMA_TO_FWHM, AlardLuptonBasis
from tasks.psfmatch.errors import SingularKernelSolutionError
from tasks.psfmatch.solve import KernelCandidate, scaled_condition_number, solve_candidate, solve_candidates
from tasks.psfmatch.testing import render_stars, true_gaussian_kernel

S_T, S_S = 1.2, 1.8


@pytest.fixture(scope="module")
def basis() -> AlardLuptonBasis:
    return AlardLuptonBasis.from_fwhm(S_T * SIGMA_TO_FWHM, S_S * SIGMA_TO_FWHM)


def _stamps(basis: AlardLuptonBasis, scale: float, background: float, flux: float = 1e5):
    size = 2 * basis.kernel_size + 1
    c = size // 2 + 0.3
    tmpl = render_stars((size, size), GaussianPsf(S_T), [c], [c - 0.2], [flux])
    sci = render_stars((size, size), GaussianPsf(S_S), [c], [c - 0.2], [scale * flux]) + background
    return tmpl, sci, np.full((size, size), 4.0)


def test_noise_free_solution_is_the_true_kernel(basis: AlardLuptonBasis) -> None:
    tmpl, sci, var = _stamps(basis, 1.25, 3.0)
    sol = solve_candidate(tmpl, sci, var, basis)
    assert sol.kernel_sum == pytest.approx(1.25, rel=1e-4)
    assert sol.background == pytest.approx(3.0, abs=1e-3)
    kernel = np.tensordot(sol.kernel_coefficients, basis.images, axes=1)
    true = true_gaussian_kernel(S_T, S_S, basis.kernel_size, 1.25)
    assert np.abs(kernel - true).max() < 1e-3 * true.max()
    assert sol.residual_std < 1e-2
    assert sol.condition_number < 5e7
    # the generic FFT path (plain images) agrees with the separable one
    sol_fft = solve_candidate(tmpl, sci, var, basis.images)
    np.testing.assert_allclose(sol_fft.kernel_coefficients, sol.kernel_coefficients, rtol=1e-6, atol=1e-9)


def test_a_wrong_scale_or_background_is_detected(basis: AlardLuptonBasis) -> None:
    tmpl, sci, var = _stamps(basis, 0.8, -2.0)
    sol = solve_candidate(tmpl, sci, var, basis)
    assert sol.kernel_sum == pytest.approx(0.8, rel=1e-4)
    assert sol.background == pytest.approx(-2.0, abs=1e-3)


def test_noisy_candidate_residuals_are_unit_normal(basis: AlardLuptonBasis) -> None:
    rng = np.random.default_rng(5)
    tmpl, sci, var = _stamps(basis, 1.0, 0.0, flux=2e4)
    tv = np.full_like(var, 1.0)
    sv = var + np.maximum(sci, 0)
    noisy_tmpl = tmpl + rng.normal(size=tmpl.shape)
    noisy_sci = sci + rng.normal(size=sci.shape) * np.sqrt(sv)
    cand = KernelCandidate(50.0, 50.0, (0, 0), noisy_tmpl, noisy_sci, tv, sv)
    (solved,) = solve_candidates([cand], basis, background=None)
    assert solved.good
    assert solved.solution.kernel_sum == pytest.approx(1.0, abs=0.03)
    assert 0.9 < solved.solution.residual_std < 1.05
    assert abs(solved.solution.residual_mean) < 0.1
    # the input candidate is not modified
    assert cand.solution is None and cand.status == "unsolved"


def test_singular_and_bad_candidates(basis: AlardLuptonBasis) -> None:
    size = 2 * basis.kernel_size + 1
    zeros = np.zeros((size, size))
    ones = np.ones((size, size))
    with pytest.raises(SingularKernelSolutionError, match="singular"):
        solve_candidate(zeros, ones, ones, basis)
    tmpl, sci, var = _stamps(basis, 1.0, 0.0)
    bad = tmpl.copy()
    bad[3, 3] = np.nan
    small = KernelCandidate(0, 0, (0, 0), tmpl[:34, :34], sci[:34, :34], var[:34, :34], var[:34, :34])
    cands = [
        KernelCandidate(0, 0, (0, 0), zeros, ones, ones, ones),
        KernelCandidate(0, 0, (0, 0), bad, sci, var, var),
        KernelCandidate(0, 0, (0, 0), tmpl, sci, var, -var),
        small,
        KernelCandidate(0, 0, (0, 0), tmpl, sci, var, var),
    ]
    out = solve_candidates(cands, basis, background=None)
    reasons = [c.reason for c in out]
    assert "singular" in reasons[0]
    assert reasons[1] == "non-finite pixels"
    assert reasons[2] == "non-positive variance"
    assert "too small" in reasons[3]
    assert out[4].good


def test_scaled_condition_number() -> None:
    m = np.diag([1e6, 1.0, 1e-3])  # badly scaled but perfectly conditioned after scaling
    assert scaled_condition_number(m) == pytest.approx(1.0)
    degenerate = np.array([[1.0, 1.0], [1.0, 1.0]])
    assert scaled_condition_number(degenerate) > 1e12
    assert scaled_condition_number(np.diag([1.0, 0.0])) == np.inf


def test_noise_matrix_is_the_exact_expected_noise_power(basis: AlardLuptonBasis) -> None:
    # E[sum_p w_p (B_i (x) n)(p) (B_j (x) n)(p)] for independent pixel noise of variance V, by brute
    # force: the valid convolution as a matrix A_i (rows: fitted pixels), E = tr(W A_i V A_j^T).
    from tasks.psfmatch.solve import _BasisConvolver

    rng = np.random.default_rng(8)
    tmpl, sci, var = _stamps(basis, 1.1, 0.0, flux=5e3)
    size = tmpl.shape[0]
    tv = rng.uniform(1.0, 9.0, tmpl.shape)
    cand = KernelCandidate(30.0, 30.0, (0, 0), tmpl, sci, tv, var)
    (solved,) = solve_candidates([cand], basis, background=None, noise_bias_scale=2.0)
    impulses = np.eye(size * size).reshape(size * size, size, size)
    conv = _BasisConvolver(basis, size, None)(impulses)  # (N^2, n_basis, n, n)
    a = conv.reshape(size * size, basis.n_basis, -1).transpose(1, 2, 0)  # (n_basis, n^2, N^2)
    n = conv.shape[-1]
    h = basis.kernel_size // 2
    weight = 1.0 / np.median(var[h : h + n, h : h + n] + tv[h : h + n, h : h + n])
    expected = weight * np.einsum("ipk,k,jpk->ij", a, tv.ravel(), a)
    nb = basis.n_basis
    np.testing.assert_allclose(solved.solution.noise_matrix[:nb, :nb], 2.0 * expected, rtol=1e-8, atol=1e-12 * expected.max())
    assert not solved.solution.noise_matrix[nb:].any() and not solved.solution.noise_matrix[:, nb:].any()
    (plain,) = solve_candidates([cand], basis, background=None)
    assert plain.solution.noise_matrix is None


def test_errors_in_variables_correction_removes_the_kernel_shrinkage(basis: AlardLuptonBasis) -> None:
    # Faint stars (S/N ~ 40) in a noisy image to convolve, matched to a nearly noise-free one:
    # least squares shrinks the kernel (4-6% over seeds); removing the expected noise power undoes
    # most of it (0.5-2.4% left: the correction is first order in the noise fraction).
    from butler.geometry import Box
    from tasks.psfmatch.fit import fit_kernel_to_candidates
    from tasks.psfmatch.config import PsfMatchConfig

    rng = np.random.default_rng(21)
    scale, sky = 1.3, 25.0
    cands = []
    for k in range(150):
        tmpl, sci, _ = _stamps(basis, scale, 0.0, flux=1.0)
        flux = 40.0 * 5.0 * 2 * np.sqrt(np.pi) * S_T  # S/N ~ 40 for PSF photometry on sky sigma 5
        tv = np.full(tmpl.shape, sky)
        sv = np.full(tmpl.shape, 0.01)
        noisy = flux * tmpl + rng.normal(0.0, 5.0, tmpl.shape)
        target = flux * sci + rng.normal(0.0, 0.1, tmpl.shape)
        cands.append(KernelCandidate(10.0 + k, 20.0 + (7 * k) % 150, (0, 0), noisy, target, tv, sv))
    box = Box(0, 0, 200, 200)
    base = PsfMatchConfig(spatial_kernel_order=0, fit_background=False, use_sigma_clipping=False)
    plain, _ = fit_kernel_to_candidates(cands, basis, box, base)
    corrected, _ = fit_kernel_to_candidates(cands, basis, box, base.replace(noise_bias_scale=1.0))
    plain_err = plain.kernel_sum(100.0, 100.0) / scale - 1.0
    corrected_err = corrected.kernel_sum(100.0, 100.0) / scale - 1.0
    assert plain_err < -0.03
    assert abs(corrected_err) < 0.5 * abs(plain_err)
