"""Cross-convolution (mode crossConvolve) and ZOGY's whitening filters (tasks.diffim.cross_convolve)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import fftconvolve

from butler.psf import GaussianPsf
from tasks.diffim.cross_convolve import zogy_filters
from tasks.diffim.detect_measure import DetectAndMeasureTask
from tasks.diffim.subtract import ImageDifferenceConfig, ImageDifferenceTask
from tasks.psfmatch.testing import make_psf_matching_pair, render_stars

from .test_diffim_subtract import _blank_and_near

#: The same elongated PSF at two position angles (a PSF no kernel turns into the other).
TEMPLATE_PSF = GaussianPsf(2.0, axis_ratio=0.6, theta_deg=0.0)
SCIENCE_PSF = GaussianPsf(2.0, axis_ratio=0.6, theta_deg=90.0)
SCALE = 1.2
TRANSIENT = (256.3, 300.7, 2.0e4)


def _psf(psf: GaussianPsf) -> np.ndarray:
    img = np.array(psf.image(0, 0), dtype=np.float64)
    return img / img.sum()


def test_zogy_filters_keep_the_flux_and_whiten_the_noise() -> None:
    p_s, p_t = _psf(SCIENCE_PSF), _psf(TEMPLATE_PSF)
    kernel = np.zeros((21, 21))
    kernel[10, 10] = SCALE
    s_s, s_t = 100.0, 25.0
    g_s, g_t = zogy_filters(p_s, p_t, kernel, s_s, s_t, 61)
    assert g_s.sum() == pytest.approx(1.0) and g_t.sum() == pytest.approx(SCALE)
    # the two sides have the same PSF: a static star cancels
    np.testing.assert_allclose(fftconvolve(p_s, g_s), fftconvolve(p_t, g_t) / SCALE, atol=2e-4 * p_s.max())
    rng = np.random.default_rng(3)
    n = 768
    noise = fftconvolve(rng.normal(size=(n, n)) * math.sqrt(s_s), g_s, mode="same") - fftconvolve(
        rng.normal(size=(n, n)) * math.sqrt(s_t), g_t, mode="same"
    )
    noise = noise[60:-60, 60:-60]
    white = s_s + SCALE**2 * s_t
    assert noise.std() == pytest.approx(math.sqrt(white), rel=0.02)
    # white: neighbouring pixels are uncorrelated, and a PSF matched filter sees the per-pixel noise
    assert abs(np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]) < 0.03
    psf_d = fftconvolve(p_s, g_s)
    psf_d /= psf_d.sum()
    filtered = fftconvolve(noise, psf_d[::-1, ::-1], mode="valid")
    assert filtered.std() == pytest.approx(math.sqrt(white * (psf_d**2).sum()), rel=0.05)


@pytest.fixture(scope="module")
def rotated_pair():
    pair = make_psf_matching_pair(
        shape=(512, 512), n_stars=250, scale=SCALE, template_psf=TEMPLATE_PSF, science_psf=SCIENCE_PSF,
        template_depth=4.0, seed=5,
    )
    tx, ty, tflux = TRANSIENT
    pair.science.image += render_stars((512, 512), SCIENCE_PSF, [tx], [ty], [tflux]).astype(np.float32)
    return pair


@pytest.mark.parametrize("mode", ["crossConvolve", "auto"])
def test_cross_convolution_subtracts_psfs_of_different_shapes(rotated_pair, mode) -> None:
    pair = rotated_pair
    tx, ty, tflux = TRANSIENT
    cfg = ImageDifferenceConfig()
    cfg.mode = mode
    task = ImageDifferenceTask(config=cfg)
    result = task.run(pair.template, pair.science, pair.sources)
    diff = result.subtractedExposure
    blank, _ = _blank_and_near(diff, np.r_[pair.star_x, tx], np.r_[pair.star_y, ty], fwhm=4.7)
    _, near = _blank_and_near(diff, pair.star_x, pair.star_y, fwhm=4.7)
    detect = DetectAndMeasureTask()
    cat = detect.run(pair.science, result.matchedExposure, diff).diaSources
    if mode == "auto":
        # one kernel cannot rotate the PSF: the stars stay in the difference (measured 4.2, 449 sources)
        assert near > 2.0 and len(cat) > 100
        return
    assert result.convolvedImage == "both" and task.metadata["convolvedImage"] == "both"
    assert diff.metadata["DIFFIM_CONVOLVED"] == "both"
    assert 0.98 <= blank <= 1.02 and near <= 1.03  # measured 1.001 and 1.000
    assert 0.95 < detect.metadata["snrStdBlankSky"] < 1.05  # whitened: measured 0.999
    assert task.makeKernel.metadata["kernelSumCentre"] == pytest.approx(SCALE, rel=0.01)
    assert len(cat) <= 2
    k = int(np.argmin(np.hypot(cat["x"] - tx, cat["y"] - ty)))
    assert math.hypot(cat["x"][k] - tx, cat["y"][k] - ty) < 0.5
    assert cat["psfFlux"][k] == pytest.approx(tflux, rel=0.03) and not cat["isNegative"][k]


def test_cross_convolution_without_decorrelation_keeps_the_cross_convolved_images(rotated_pair) -> None:
    cfg = ImageDifferenceConfig()
    cfg.mode = "crossConvolve"
    cfg.doDecorrelation = False
    result = ImageDifferenceTask(config=cfg).run(rotated_pair.template, rotated_pair.science, rotated_pair.sources)
    assert result.convolvedImage == "both" and result.decorrelationKernel is None
    # the difference's PSF is the product of the two PSFs: round, sigma 2 sqrt(1 + 0.6^2) px
    psf = result.subtractedExposure.psf.image(256, 256)
    yy, xx = np.mgrid[: psf.shape[0], : psf.shape[1]] - psf.shape[0] // 2
    ixx, iyy = float((psf * xx**2).sum()), float((psf * yy**2).sum())
    assert ixx == pytest.approx(iyy, rel=0.02)
    assert ixx == pytest.approx(4.0 * (1 + 0.36), rel=0.05)
