"""PSF models: normalization, FWHM, spatial variation, serialization, bad input."""

import json
import math

import numpy as np
import pytest

from butler.errors import PsfError
from butler.geometry import Box
from butler.psf import (
    SIGMA_TO_FWHM,
    CoaddPsf,
    CoaddPsfInput,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    PolynomialPsf,
    measure_fwhm,
    psf_from_dict,
)


def _erf_gaussian(sigma, size):
    from scipy import special

    x = np.arange(size) - size // 2
    p = 0.5 * (special.erf((x + 0.5) / (math.sqrt(2) * sigma)) - special.erf((x - 0.5) / (math.sqrt(2) * sigma)))
    img = np.outer(p, p)
    return img / img.sum()


@pytest.mark.parametrize("sigma", [0.6, 1.0, 1.7, 3.2])
def test_gaussian_image_is_the_pixel_integrated_gaussian(sigma):
    psf = GaussianPsf(sigma)
    img = psf.image(10, 20)
    assert img.shape[0] % 2 == 1 and img.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(img - _erf_gaussian(sigma, img.shape[0])).max() < 1e-4 * img.max()
    assert psf.fwhm(0, 0) == pytest.approx(SIGMA_TO_FWHM * sigma, rel=1e-12)
    assert measure_fwhm(img) == pytest.approx(SIGMA_TO_FWHM * sigma, rel=2e-4)


def test_measure_fwhm_is_robust_to_wings():
    # A Moffat (beta=2.5) has heavy wings: its true half-maximum width is 2 alpha sqrt(2^(1/beta) - 1)
    # = 3.39 px, while plain second moments (sigma^2 = alpha^2 / (beta - 2) per axis) would say 7.1 px.
    # A Gaussian-equivalent width (LSST's convention) sits near the former, far from the latter.
    alpha, beta, size = 3.0, 2.5, 61
    y, x = np.mgrid[:size, :size] - size // 2
    img = (1 + (x**2 + y**2) / alpha**2) ** -beta
    img /= img.sum()
    half_max_width = 2 * alpha * math.sqrt(2 ** (1 / beta) - 1)
    moment_fwhm = SIGMA_TO_FWHM * math.sqrt((img * x**2).sum())
    measured = measure_fwhm(img, pixel_integrated=False)
    assert half_max_width < measured < 1.2 * half_max_width
    assert measured < 0.6 * moment_fwhm


def test_shifted_image_centroid_follows_subpixel_position():
    for psf in (GaussianPsf(1.3), ImagePsf(GaussianPsf(1.3, size=21).image(0, 0))):
        stamp, x0, y0 = psf.shifted_image(40.3, 17.8)
        yy, xx = np.mgrid[: stamp.shape[0], : stamp.shape[1]]
        cx = (stamp * (xx + x0)).sum() / stamp.sum()
        cy = (stamp * (yy + y0)).sum() / stamp.sum()
        assert stamp.sum() == pytest.approx(1.0, abs=1e-9)
        assert (cx, cy) == pytest.approx((40.3, 17.8), abs=0.01)


def test_elliptical_gaussian_orientation():
    psf = GaussianPsf(2.0, axis_ratio=0.5, theta_deg=90.0)
    img = psf.image(0, 0)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]] - img.shape[0] // 2
    assert (img * yy**2).sum() > 3 * (img * xx**2).sum()  # major axis along y


def test_image_psf_validation():
    good = GaussianPsf(1.5).image(0, 0)
    with pytest.raises(PsfError, match="sums to 2"):
        ImagePsf(2 * good)
    with pytest.raises(PsfError, match="odd"):
        ImagePsf(np.ones((4, 4)) / 16)
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(PsfError, match="NaN"):
        ImagePsf(bad)
    assert ImagePsf.normalized(3 * good).image(0, 0).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):  # read-only: callers cannot corrupt the model
        ImagePsf(good).image(0, 0)[0, 0] = 1.0


def test_grid_psf_interpolates_between_nodes():
    sigmas = np.array([[1.2, 1.6], [2.0, 2.4]])  # [y, x]
    images = np.array([[GaussianPsf(s, size=25).image(0, 0) for s in row] for row in sigmas])
    psf = GridPsf(images, [0.0, 1000.0], [0.0, 2000.0])
    for (x, y), sigma in {(0, 0): 1.2, (1000, 0): 1.6, (0, 2000): 2.0, (1000, 2000): 2.4}.items():
        assert psf.fwhm(x, y) == pytest.approx(SIGMA_TO_FWHM * sigma, rel=1e-3)
    mid = psf.fwhm(500, 1000)
    assert SIGMA_TO_FWHM * 1.2 < mid < SIGMA_TO_FWHM * 2.4
    assert psf.image(-50, 5000).sum() == pytest.approx(1.0)  # clamped outside the grid
    assert np.array_equal(psf.image(-50, 5000), psf.image(0, 2000))
    with pytest.raises(PsfError, match="shape"):
        GridPsf(images, [0.0], [0.0, 1.0])
    with pytest.raises(PsfError, match="strictly increasing"):
        GridPsf(images, [1.0, 0.0], [0.0, 1.0])


def test_polynomial_psf_varies_with_position():
    narrow, wide = GaussianPsf(1.0, size=21).image(0, 0), GaussianPsf(2.5, size=21).image(0, 0)
    bbox = Box(0, 0, 2001, 2001)
    # weight of the narrow component 1 - (u+1)/2, wide (u+1)/2: linear in x only (terms 1, u, v)
    coeffs = np.array([[0.5, -0.5, 0.0], [0.5, 0.5, 0.0]])
    psf = PolynomialPsf(np.stack([narrow, wide]), coeffs, bbox, order=1)
    assert np.allclose(psf.image(0, 700), narrow)
    assert np.allclose(psf.image(2000, 300), wide)
    assert psf.fwhm(0, 0) < psf.fwhm(1000, 0) < psf.fwhm(2000, 0)
    with pytest.raises(PsfError, match="coefficients must have shape"):
        PolynomialPsf(np.stack([narrow, wide]), coeffs[:, :2], bbox, order=1)


def test_coadd_psf_is_weighted_mean_and_respects_boxes():
    a, b = GaussianPsf(1.5, size=21), GaussianPsf(2.5, size=21)
    left = CoaddPsfInput(a, 3.0, Box(0, 0, 100, 100))
    both = CoaddPsfInput(b, 1.0, Box(50, 0, 100, 100))
    coadd = CoaddPsf([left, both])
    assert np.allclose(coadd.image(10, 10), a.image(0, 0))
    expected = (3 * a.image(0, 0) + b.image(0, 0)) / 4
    assert np.allclose(coadd.image(75, 10), expected)
    with pytest.raises(PsfError, match="no input covering"):
        coadd.image(500, 500)


def test_coadd_psf_applies_input_rotation():
    elongated = GaussianPsf(3.0, size=31, axis_ratio=0.4, theta_deg=0.0)  # major axis along x_in
    rot90 = ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0))  # x_in = y, y_in = -x
    coadd = CoaddPsf([CoaddPsfInput(elongated, 1.0, Box(-100, -100, 200, 200), rot90)])
    img = coadd.image(0, 0)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]] - img.shape[0] // 2
    assert (img * yy**2).sum() > 3 * (img * xx**2).sum()  # major axis now along y
    assert img.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "psf",
    [
        GaussianPsf(1.7, axis_ratio=0.8, theta_deg=20),
        ImagePsf(GaussianPsf(2.2).image(0, 0)),
        GridPsf(np.array([[GaussianPsf(s, size=15).image(0, 0) for s in (1.0, 1.5)]]), [0, 10], [5]),
        PolynomialPsf(
            np.stack([GaussianPsf(1.0, size=15).image(0, 0), GaussianPsf(2.0, size=15).image(0, 0)]),
            np.array([[1.0, 0.1, 0.2], [0.5, 0.0, -0.1]]),
            Box(0, 0, 100, 100),
            1,
        ),
        CoaddPsf([CoaddPsfInput(GaussianPsf(1.0), 2.0, Box(0, 0, 100, 100), ((1, 0, 5), (0, 1, -3)))]),
    ],
    ids=lambda p: type(p).__name__,
)
def test_round_trip_through_json(psf):
    data = json.loads(json.dumps(psf.to_dict()))
    back = psf_from_dict(data)
    assert type(back) is type(psf)
    for x, y in [(0, 0), (3, 7), (50, 60), (99, 1)]:
        assert np.array_equal(back.image(x, y), psf.image(x, y))
        assert back.fwhm(x, y) == psf.fwhm(x, y)


def test_psf_from_dict_errors():
    with pytest.raises(PsfError, match="unknown PSF type 'Moffat'; known types: .*GaussianPsf"):
        psf_from_dict({"type": "Moffat"})
    with pytest.raises(PsfError, match="malformed GaussianPsf"):
        psf_from_dict({"type": "GaussianPsf", "sigma": 1.0, "colour": "red"})
    with pytest.raises(PsfError, match="'type' key"):
        psf_from_dict([1, 2])
