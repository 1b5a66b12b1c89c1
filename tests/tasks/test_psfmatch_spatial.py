"""Spatial kernel + background solved together: recovery, serialization, singular systems."""

from __future__ import annotations

import json

import numpy as np
import pytest

from butler.geometry import Box
from tasks.psfmatch.basis import SIGMA_TO_FWHM, AlardLuptonBasis
from tasks.psfmatch.chebyshev import ChebyshevBasis2D, chebyshev_1d
from tasks.psfmatch.errors import PsfMatchConfigError, SingularKernelSolutionError
from tasks.psfmatch.solve import solve_candidates
from tasks.psfmatch.spatial import SpatialKernel, fit_spatial_kernel
from tasks.psfmatch.testing import true_gaussian_kernel

from .test_psfmatch_solve import S_S, S_T, _stamps


@pytest.fixture(scope="module")
def basis() -> AlardLuptonBasis:
    return AlardLuptonBasis.from_fwhm(S_T * SIGMA_TO_FWHM, S_S * SIGMA_TO_FWHM)


def test_chebyshev_values() -> None:
    u = np.linspace(-1, 1, 7)
    t = chebyshev_1d(u, 3)
    np.testing.assert_allclose(t[:, 2], 2 * u**2 - 1)
    np.testing.assert_allclose(t[:, 3], 4 * u**3 - 3 * u)
    f = ChebyshevBasis2D(Box(10, 20, 101, 51), 2)
    assert f.terms == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    np.testing.assert_allclose(f.scale_x([10, 60, 110]), [-1, 0, 1])
    np.testing.assert_allclose(f.scale_y([20, 70]), [-1, 1])
    grid = f.evaluate_grid(np.arange(10, 111), np.arange(20, 71), np.arange(6.0))
    yy, xx = np.mgrid[20:71, 10:111]
    np.testing.assert_allclose(grid, f.evaluate(xx, yy) @ np.arange(6.0), atol=1e-12)


def _candidates_on_grid(basis, bbox, plane, scale=1.2, n=4):
    """Noise-free candidates at n x n positions; the science has the background plane added per pixel."""
    from tasks.psfmatch.solve import KernelCandidate

    out = []
    for y in np.linspace(bbox.y0 + 40, bbox.y1 - 41, n):
        for x in np.linspace(bbox.x0 + 40, bbox.x1 - 41, n):
            tmpl, sci, var = _stamps(basis, scale, 0.0)
            size = tmpl.shape[0]
            x0, y0 = int(round(x)) - size // 2, int(round(y)) - size // 2
            yy, xx = np.mgrid[y0 : y0 + size, x0 : x0 + size]
            sci = sci + plane[0] + plane[1] * xx + plane[2] * yy
            out.append(KernelCandidate(float(x), float(y), (x0, y0), tmpl, sci, var, var))
    return out


def test_spatial_fit_recovers_kernel_sum_and_tilted_background(basis: AlardLuptonBasis) -> None:
    bbox = Box(0, 0, 600, 500)
    plane = (4.0, 0.02, -0.01)
    cands = solve_candidates(_candidates_on_grid(basis, bbox, plane), basis, background=ChebyshevBasis2D(bbox, 1))
    assert all(c.good for c in cands)
    kernel, info = fit_spatial_kernel(cands, basis, bbox, kernel_order=2, background_order=1)
    assert info.n_parameters == 1 + 26 * 6 + 3
    true = true_gaussian_kernel(S_T, S_S, basis.kernel_size, 1.2)
    for x, y in [(0, 0), (599, 0), (0, 499), (599, 499), (300, 250)]:
        assert kernel.kernel_sum(x, y) == pytest.approx(1.2, rel=1e-4)
        assert np.abs(kernel.kernel_image(x, y) - true).max() < 1e-3 * true.max()
        expected = plane[0] + plane[1] * x + plane[2] * y
        assert kernel.background(x, y) == pytest.approx(expected, abs=1e-3)
    bg = kernel.background_image(Box(0, 0, 600, 500), dtype=np.float64)
    yy, xx = np.mgrid[0:500, 0:600]
    np.testing.assert_allclose(bg, plane[0] + plane[1] * xx + plane[2] * yy, atol=1e-3)


def test_serialization_round_trip(basis: AlardLuptonBasis) -> None:
    rng = np.random.default_rng(1)
    bbox = Box(5, 7, 300, 200)
    coeffs = rng.normal(size=(basis.n_basis, 6))
    kernel = SpatialKernel(basis, coeffs, [1.0, 2.0, 3.0], bbox, 2, 1)
    data = json.loads(json.dumps(kernel.to_dict()))
    again = SpatialKernel.from_dict(data)
    np.testing.assert_array_equal(again.kernel_image(40.5, 80.0), kernel.kernel_image(40.5, 80.0))
    assert again.background(10, 20) == kernel.background(10, 20)
    # a basis given as plain images serializes as an encoded array
    plain = SpatialKernel(basis.images, coeffs, [], bbox, 2, 0)
    again = SpatialKernel.from_dict(json.loads(json.dumps(plain.to_dict())))
    np.testing.assert_array_equal(again.kernel_image(100, 100), plain.kernel_image(100, 100))
    assert again.background(3, 4) == 0.0
    # with_kernel_sum makes the sum constant
    fixed = kernel.with_kernel_sum(1.0)
    assert fixed.kernel_sum(5, 7) == pytest.approx(1.0) and fixed.kernel_sum(304, 206) == pytest.approx(1.0)
    with pytest.raises(PsfMatchConfigError, match="shape"):
        SpatialKernel(basis, coeffs[:, :3], [], bbox, 2, 1)
    with pytest.raises(PsfMatchConfigError, match="malformed"):
        SpatialKernel.from_dict({"type": "SpatialKernel"})


def test_singular_spatial_systems_raise_clear_errors(basis: AlardLuptonBasis) -> None:
    bbox = Box(0, 0, 600, 500)
    cands = solve_candidates(_candidates_on_grid(basis, bbox, (0, 0, 0)), basis, background=ChebyshevBasis2D(bbox, 1))
    # every candidate at one position: no spatial information at all
    from dataclasses import replace

    same = [replace(c, x=100.0, y=100.0) for c in cands]
    with pytest.raises(SingularKernelSolutionError, match="distinct kernel-candidate positions"):
        fit_spatial_kernel(same, basis, bbox)
    # candidates on one row: the y terms of the spatial model are unconstrained
    row = [replace(c, x=40.0 + 30.0 * n, y=250.0) for n, c in enumerate(cands)]
    with pytest.raises(SingularKernelSolutionError, match="condition number") as info:
        fit_spatial_kernel(row, basis, bbox)
    assert info.value.condition_number > 1e10
    # ... which a constant spatial model does not need
    kernel, _ = fit_spatial_kernel(row, basis, bbox, kernel_order=0, background_order=1)
    assert kernel.kernel_sum(0, 0) == pytest.approx(1.2, rel=1e-3)
    with pytest.raises(PsfMatchConfigError, match="background terms"):
        fit_spatial_kernel(cands, basis, bbox, background_order=2)


def test_spatially_varying_kernel_sum_needs_a_varying_first_term(basis: AlardLuptonBasis) -> None:
    """A photometric scale that changes across the image (a transparency gradient)."""
    from tasks.psfmatch.solve import KernelCandidate

    bbox = Box(0, 0, 600, 500)
    cands = []
    for y in np.linspace(40, 459, 4):
        for x in np.linspace(40, 559, 4):
            scale = 1.0 + 0.1 * x / 599.0
            tmpl, sci, var = _stamps(basis, scale, 0.0)
            size = tmpl.shape[0]
            cands.append(KernelCandidate(float(x), float(y), (int(round(x)) - size // 2, int(round(y)) - size // 2),
                                         tmpl, sci, var, var))
    solved = solve_candidates(cands, basis, background=ChebyshevBasis2D(bbox, 1))
    varying, _ = fit_spatial_kernel(solved, basis, bbox, constant_first_term=False)
    constant, _ = fit_spatial_kernel(solved, basis, bbox, constant_first_term=True)
    for x in (0.0, 300.0, 599.0):
        assert varying.kernel_sum(x, 250.0) == pytest.approx(1.0 + 0.1 * x / 599.0, rel=1e-4)
    assert constant.kernel_sum(0.0, 250.0) == pytest.approx(constant.kernel_sum(599.0, 250.0), rel=1e-12)


def test_remove_noise_caps_each_direction_and_stays_positive_definite() -> None:
    from tasks.psfmatch.spatial import MAX_NOISE_FRACTION, remove_noise

    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    matrix = q @ np.diag([4.0, 3.0, 2.0, 1.0]) @ q.T
    lower = np.linalg.cholesky(matrix)
    # noise fractions 0.1 and 0.3 are removed in full; 0.8 and 1.5 are capped
    mu = np.array([0.1, 0.3, 0.8, 1.5])
    v, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    noise = lower @ v @ np.diag(mu) @ v.T @ lower.T
    corrected = remove_noise(matrix, noise)
    whitened = np.linalg.solve(lower, np.linalg.solve(lower, corrected).T).T
    kept = np.sort(np.linalg.eigvalsh(whitened))
    np.testing.assert_allclose(kept, np.sort(1.0 - np.minimum(mu, MAX_NOISE_FRACTION)), atol=1e-10)
    assert np.linalg.eigvalsh(corrected).min() > 0
    # a small noise part is simply subtracted
    small = 1e-3 * matrix
    np.testing.assert_allclose(remove_noise(matrix, small), matrix - small, rtol=1e-10, atol=1e-12)
