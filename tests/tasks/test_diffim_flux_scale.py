"""The difference image's photometric scale, measured on the kernel sources (tasks.diffim.flux_scale)."""

from __future__ import annotations

import numpy as np
import pytest

from butler.exposure import Exposure
from butler.psf import GaussianPsf
from pipeline.struct import Struct
from tasks.diffim.detect_measure import DetectAndMeasureTask
from tasks.diffim.flux_scale import kernel_source_flux_scale
from tasks.diffim.subtract import ImageDifferenceConfig, ImageDifferenceTask
from tasks.measure.photometry import psf_flux
from tasks.psfmatch.testing import make_psf_matching_pair, render_stars
from tests.tasks.diffim_pairs import SCALE, SHAPE, TRANSIENT, science_sharper_pair


def _star_field(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray, GaussianPsf]:
    rng = np.random.default_rng(seed)
    psf = GaussianPsf(1.8)
    x = rng.uniform(30, SHAPE[1] - 30, n)
    y = rng.uniform(30, SHAPE[0] - 30, n)
    flux = 10 ** rng.uniform(3.5, 5.5, n)
    return x, y, flux, psf


def test_scale_recovered_and_variable_clipped() -> None:
    x, y, flux, psf = _star_field(3)
    rng = np.random.default_rng(4)
    matched = render_stars(SHAPE, psf, x, y, flux).astype(np.float32)
    truth = 1.025
    science_flux = truth * flux
    science_flux[0] *= 1.4  # a variable star among the kernel sources
    sky = 10.0
    science = render_stars(SHAPE, psf, x, y, science_flux) + rng.normal(0.0, sky, SHAPE)
    variance = np.full(SHAPE, sky**2, dtype=np.float32) + np.clip(science, 0, None).astype(np.float32)
    diff = Exposure((science - matched).astype(np.float32), None, variance, psf=psf)
    m = Exposure(matched, None, np.zeros(SHAPE, np.float32), psf=psf)
    result = kernel_source_flux_scale(diff, m, x, y)
    assert result.measured
    assert result.n_used < result.n_input  # the variable (at least) is clipped
    assert 0 < result.error < 0.003
    assert abs(result.scale - truth) < 3 * result.error
    # without the clipping the variable would drag the scale far off
    assert abs(kernel_source_flux_scale(diff, m, x, y, clip_sigma=1e9).scale - truth) > 5 * result.error


def test_too_few_sources_is_not_measured() -> None:
    x, y, flux, psf = _star_field(5, n=3)
    image = render_stars(SHAPE, psf, x, y, flux).astype(np.float32)
    exp = Exposure(image, None, np.ones(SHAPE, np.float32), psf=psf)
    result = kernel_source_flux_scale(exp, exp, x, y)
    assert not result.measured and result.scale == 1.0 and result.n_used == 3


def _mis_scaled(task: ImageDifferenceTask, factor: float) -> None:
    """Make the task's kernel fit return a kernel whose sum is off by ``factor`` (shape kept)."""
    run = task.makeKernel.run

    def wrong(*args, **kwargs):
        res = run(*args, **kwargs)
        return Struct(**{**res.getDict(), "psfMatchingKernel": res.psfMatchingKernel.scaled(factor)})

    task.makeKernel.run = wrong


@pytest.mark.parametrize("apply", [True, False])
def test_convolved_template_kernel_sum_error_is_removed(apply: bool) -> None:
    pair = make_psf_matching_pair(shape=SHAPE, n_stars=250, scale=SCALE, background=(3.0, 0.0, 0.0), seed=21)
    cfg = ImageDifferenceConfig()
    cfg.doScaleToKernelSources = apply
    task = ImageDifferenceTask(config=cfg)
    _mis_scaled(task, 0.97)
    result = task.run(pair.template, pair.science, pair.sources)
    ksum = result.psfMatchingKernel.kernel_sum(256, 256)
    stars = psf_flux(result.subtractedExposure, pair.star_x, pair.star_y)
    bright = ~stars.flag & (pair.star_flux > 3e4)
    residual = np.median(stars.flux[bright] / (SCALE * pair.star_flux[bright]))
    if apply:
        assert task.metadata["fluxScaleCorrection"] == pytest.approx(1 / 0.97, abs=0.005)
        assert ksum == pytest.approx(SCALE, rel=0.005)
        assert abs(residual) < 0.003
        # the matched template carries the corrected scale
        assert np.nanmedian(result.matchedExposure.image - pair.science.image) == pytest.approx(0.0, abs=0.5)
    else:
        assert ksum == pytest.approx(0.97 * SCALE, rel=0.005)
        assert residual == pytest.approx(0.03, abs=0.005)


def test_convolved_science_normalization_is_corrected() -> None:
    pair = science_sharper_pair()
    tx, ty, tflux = TRANSIENT  # in the science image only (science counts)
    task = ImageDifferenceTask()
    _mis_scaled(task, 1.04)
    result = task.run(pair.template, pair.science, pair.sources)
    assert result.convolvedImage == "science"
    # the kernel (science -> template) sums to 1 / SCALE again, and so does the normalization
    assert result.psfMatchingKernel.kernel_sum(256, 256) == pytest.approx(1 / SCALE, rel=0.005)
    assert result.subtractedExposure.metadata["DIFFIM_NORM"] == pytest.approx(1 / SCALE, rel=0.005)
    stars = psf_flux(result.subtractedExposure, pair.star_x, pair.star_y)
    bright = ~stars.flag & (pair.star_flux > 3e4)
    assert abs(np.median(stars.flux[bright] / (SCALE * pair.star_flux[bright]))) < 0.003
    cat = DetectAndMeasureTask().run(pair.science, result.matchedExposure, result.subtractedExposure).diaSources
    k = int(np.argmin(np.hypot(cat["x"] - tx, cat["y"] - ty)))
    assert cat["psfFlux"][k] == pytest.approx(tflux, rel=0.03)
