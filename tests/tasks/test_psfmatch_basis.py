"""Alard-Lupton basis: shapes, LSST renormalization, FWHM scaling of widths and kernel size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.psfmatch.basis import (
    SIGMA_TO_FWHM,
    AlardLuptonBasis,
    alard_lupton_basis,
    basis_sigmas_from_fwhm,
    kernel_size_from_fwhm,
    kernel_size_from_sigmas,
)
from tasks.psfmatch.errors import PsfMatchConfigError


def test_default_basis_shape_and_renormalization() -> None:
    basis = alard_lupton_basis(21)
    # degrees 4/2/2 -> 15 + 6 + 6 images
    assert basis.shape == (27, 21, 21)
    sums = basis.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0, abs=1e-14)
    assert np.abs(sums[1:]).max() < 1e-12
    norms = (basis[1:] ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(norms, 1.0, atol=1e-12)
    # the first image is the narrowest Gaussian, centred and symmetric
    assert np.unravel_index(np.argmax(basis[0]), basis[0].shape) == (10, 10)
    np.testing.assert_allclose(basis[0], basis[0].T, atol=1e-15)
    np.testing.assert_allclose(basis[0], basis[0][::-1, ::-1], atol=1e-15)


def test_raw_basis_is_gaussian_times_monomial() -> None:
    raw = alard_lupton_basis(11, (1.5,), (1,), renormalize=False)
    off = np.arange(-5, 6, dtype=float)
    g = np.exp(-0.5 * (off[None, :] ** 2 + off[:, None] ** 2) / 1.5**2)
    np.testing.assert_allclose(raw[0], g)
    np.testing.assert_allclose(raw[1], g * off[None, :] / 5.0)  # u = x / half-width
    np.testing.assert_allclose(raw[2], g * off[:, None] / 5.0)


def test_orthonormalized_basis_keeps_kernel_sum_in_first_coefficient() -> None:
    basis = alard_lupton_basis(23, orthonormalize=True)
    flat = basis[1:].reshape(basis.shape[0] - 1, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(flat.shape[0]), atol=1e-10)
    assert basis[0].sum() == pytest.approx(1.0)
    assert np.abs(basis[1:].sum(axis=(1, 2))).max() < 1e-10


def test_sigmas_scale_with_fwhm_like_lsst() -> None:
    # narrow template -> wide science: the kernel width sqrt(s_s^2 - s_t^2)
    s_t, s_s = 1.2, 1.8
    sig, deg = basis_sigmas_from_fwhm(s_t * SIGMA_TO_FWHM, s_s * SIGMA_TO_FWHM)
    sk = math.sqrt(s_s**2 - s_t**2)  # 1.342; sk / 2 < 0.7, so it is the first width
    assert sig == pytest.approx((sk, 2 * sk, 4 * sk))
    assert deg == (4, 2, 2)
    # a wider kernel: the first width is sk / beta and the kernel width is the second
    sig, _ = basis_sigmas_from_fwhm(1.0 * SIGMA_TO_FWHM, 3.0 * SIGMA_TO_FWHM)
    sk = math.sqrt(8.0)
    assert sig == pytest.approx((sk / 2, sk, 2 * sk))
    # tiny kernels are floored at min_sigma
    sig, _ = basis_sigmas_from_fwhm(1.5 * SIGMA_TO_FWHM, 1.55 * SIGMA_TO_FWHM)
    assert sig[0] == pytest.approx(0.7)
    # equal PSFs: defaults
    assert basis_sigmas_from_fwhm(3.0, 3.0) == ((0.7, 1.5, 3.0), (4, 2, 2))


def test_deconvolution_sigmas() -> None:
    sig, deg = basis_sigmas_from_fwhm(2.0 * SIGMA_TO_FWHM, 1.2 * SIGMA_TO_FWHM)
    s0 = math.sqrt(2.0**2 - 1.2**2)
    s1, s2 = 2 * s0, 4 * s0
    expected = sorted(
        [math.sqrt(s1**2 - 2 * s0**2), math.sqrt(2 * s1**2 - 3 * s0**2), math.sqrt(s1**2 + s2**2 - 3 * s0**2)]
    )
    assert sig == pytest.approx(tuple(expected))
    assert deg == (3, 3, 3)


def test_kernel_size_clipped_and_odd() -> None:
    assert kernel_size_from_sigmas((1.0, 2.0, 3.0)) == 21  # 18 -> 19 -> clipped to 21
    assert kernel_size_from_sigmas((1.0, 2.0, 5.37)) == 33  # int(32.2) = 32 -> 33
    assert kernel_size_from_sigmas((1.0, 2.0, 9.0)) == 35  # clipped
    assert kernel_size_from_sigmas((1.0, 2.0, 9.0), max_size=41) == 41  # int(54) -> 55 -> clipped
    assert kernel_size_from_fwhm(1.2 * SIGMA_TO_FWHM, 1.8 * SIGMA_TO_FWHM) == 33
    with pytest.raises(PsfMatchConfigError):
        kernel_size_from_sigmas((1.0,), min_size=20)


def test_basis_object_round_trip_and_errors() -> None:
    basis = AlardLuptonBasis.from_fwhm(1.2 * SIGMA_TO_FWHM, 1.8 * SIGMA_TO_FWHM)
    assert basis.kernel_size == 33 and basis.n_basis == 27
    again = AlardLuptonBasis.from_dict(basis.to_dict())
    np.testing.assert_array_equal(again.images, basis.images)
    assert not basis.images.flags.writeable
    with pytest.raises(PsfMatchConfigError, match="odd"):
        alard_lupton_basis(20)
    with pytest.raises(PsfMatchConfigError, match="one polynomial degree per Gaussian"):
        alard_lupton_basis(21, (1.0, 2.0), (2,))
    with pytest.raises(PsfMatchConfigError, match="positive"):
        basis_sigmas_from_fwhm(-1.0, 2.0)
