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
