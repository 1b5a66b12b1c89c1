"""ImageDifferenceTask on synthetic pairs: residuals, modes, decorrelation, masks, PSFs, bad input, quanta."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from astropy.wcs import WCS

from butler.exposure import Exposure
from butler.geometry import Box
from butler.psf import GaussianPsf, GridPsf
from pipeline.errors import NoWorkFound
from pipeline.testing import run_quantum_in_temp_repo
from tasks.diffim.detect_measure import DetectAndMeasureTask, significance_image
from tasks.diffim.errors import BandMismatchError, MissingPsfError, TemplateGeometryError
from tasks.diffim.subtract import ImageDifferenceConfig, ImageDifferenceTask
from tasks.psfmatch.testing import corner_grid_psf, make_psf_matching_pair
from tests.tasks.diffim_pairs import SCALE, SHAPE, TRANSIENT, science_sharper_pair


def _blank_and_near(diff: Exposure, xs, ys, fwhm: float) -> tuple[float, float]:
    z = diff.image / np.sqrt(diff.variance)
    usable = np.isfinite(z) & (diff.mask == 0)
    yy, xx = np.mgrid[0 : diff.height, 0 : diff.width]
    near = np.zeros(diff.shape, bool)
    far = np.ones(diff.shape, bool)
    for x, y in zip(xs, ys, strict=True):
        ya, yb = max(int(y) - 25, 0), min(int(y) + 26, diff.height)
        xa, xb = max(int(x) - 25, 0), min(int(x) + 26, diff.width)
        d2 = (xx[ya:yb, xa:xb] - x) ** 2 + (yy[ya:yb, xa:xb] - y) ** 2
        far[ya:yb, xa:xb] &= d2 > (4 * fwhm) ** 2
        near[ya:yb, xa:xb] |= d2 <= (2 * fwhm) ** 2
    return float(np.std(z[usable & far])), float(np.std(z[usable & near]))


@pytest.fixture(scope="module")
def varying():
    psf = corner_grid_psf((1.8, 2.0, 1.9, 2.2), Box(0, 0, *SHAPE[::-1]))
    pair = make_psf_matching_pair(shape=SHAPE, n_stars=250, scale=SCALE, background=(3.0, 2e-3, -1e-3), science_psf=psf, seed=31)
    task = ImageDifferenceTask()
    return pair, task, task.run(pair.template, pair.science, pair.sources)


def test_residuals_and_kernel_sum(varying) -> None:
    pair, task, result = varying
    diff = result.subtractedExposure
    assert result.difference is diff and result.matchedExposure is result.matchedTemplate
    blank, near = _blank_and_near(diff, pair.star_x, pair.star_y, fwhm=4.7)
    assert 0.98 <= blank <= 1.02
    assert near <= 1.03
    md = task.metadata
    assert md["convolvedImage"] == "template" and md["mode"] == "auto"
    assert task.makeKernel.metadata["kernelSumCentre"] == pytest.approx(SCALE, rel=0.01)
    assert 0.98 < md["residualStdBlankSky"] < 1.02
    assert md["templateCoverage"] == 1.0
    assert "decorrelation" in md and md["decorrelation"]["varianceConvolved"] > 0
    assert diff.metadata["DIFFIM_CONVOLVED"] == "template"
    # exposure metadata: science WCS/calib/box, a PSF like the science one (decorrelated)
    assert diff.bbox == pair.science.bbox and diff.photo_calib == pair.science.photo_calib
    assert isinstance(diff.psf, GridPsf)
    for x, y in [(0, 0), (511, 511)]:
        assert diff.psf.fwhm(x, y) == pytest.approx(pair.science.psf.fwhm(x, y), rel=0.1)
    # the matched template is the convolved template plus the background
    matched = result.matchedExposure
    assert matched.psf is pair.science.psf
    assert np.nanmedian(matched.image - pair.science.image) == pytest.approx(0.0, abs=0.5)


def test_decorrelation_whitens_the_matched_filter() -> None:
    pair = make_psf_matching_pair(shape=SHAPE, n_stars=200, scale=SCALE, template_depth=1.0, seed=8)
    stds = {}
    for decorrelate in (False, True):
        cfg = ImageDifferenceConfig()
        cfg.doDecorrelation = decorrelate
        diff = ImageDifferenceTask(config=cfg).run(pair.template, pair.science, pair.sources).subtractedExposure
        blank, _ = _blank_and_near(diff, pair.star_x, pair.star_y, fwhm=4.2)
        assert 0.98 <= blank <= 1.02  # per-pixel variances are right either way
        snr, _, usable = significance_image(diff)
        far = np.ones(diff.shape, bool)
        for x, y in zip(pair.star_x, pair.star_y, strict=True):
            far[max(int(y) - 20, 0) : int(y) + 21, max(int(x) - 20, 0) : int(x) + 21] = False
        ok = usable & far & (diff.mask == 0)
        stds[decorrelate] = float(np.std(snr[ok]))
    # without decorrelation the convolved template noise survives the PSF filter
    assert stds[False] > 1.15
    assert 0.95 < stds[True] < 1.05


def test_science_sharper_convolves_the_science_image() -> None:
    pair = science_sharper_pair()
    tx, ty, tflux = TRANSIENT  # in the science image only (science counts)
    task = ImageDifferenceTask()
    result = task.run(pair.template, pair.science, pair.sources)
    assert task.metadata["convolvedImage"] == "science"
    assert result.convolvedImage == "science"
    kappa = task.makeKernel.metadata["kernelSumCentre"]
    assert kappa == pytest.approx(1.0 / SCALE, rel=0.01)  # science -> template
    diff = result.subtractedExposure
    blank, _ = _blank_and_near(diff, np.r_[pair.star_x, tx], np.r_[pair.star_y, ty], fwhm=4.7)
    _, near = _blank_and_near(diff, pair.star_x, pair.star_y, fwhm=4.7)
    assert 0.98 <= blank <= 1.02 and near <= 1.03
    # the difference keeps the science image's flux units and takes the convolved science image's
    # PSF (close to the template's), which the decorrelation sharpens (it undoes the kernel's
    # smoothing of the dominant science noise)
    assert pair.science.psf.fwhm(0, 0) < diff.psf.fwhm(256, 256) < pair.template.psf.fwhm(0, 0)
    cat = DetectAndMeasureTask().run(pair.science, result.matchedExposure, diff).diaSources
    k = int(np.argmin(np.hypot(cat["x"] - tx, cat["y"] - ty)))
    assert math.hypot(cat["x"][k] - tx, cat["y"][k] - ty) < 0.5
    assert cat["psfFlux"][k] == pytest.approx(tflux, rel=0.03)
    assert not cat["isNegative"][k]


@pytest.mark.parametrize("matched_psf", [True, False])
def test_convolved_science_transient_flux_does_not_depend_on_the_template_psf_model(matched_psf) -> None:
    """The template's PSF model is 10% too wide: its stars have sigma 2.0 px, the model says 2.2.

    The kernel is fit to the template's pixels, so transients on the difference have the profile
    science PSF (x) kernel; measured with that PSF their flux is right.  The template's model would
    overestimate a Gaussian's PSF flux by 2 * 2.2^2 / (2.2^2 + 2.0^2) - 1 = 9.5%.
    """
    pair = science_sharper_pair()
    template = pair.template.copy()
    template.psf = GaussianPsf(2.2)
    tx, ty, tflux = TRANSIENT
    cfg = ImageDifferenceConfig()
    cfg.doUseMatchedSciencePsf = matched_psf
    result = ImageDifferenceTask(config=cfg).run(template, pair.science, pair.sources)
    assert result.convolvedImage == "science"
    diff = result.subtractedExposure
    cat = DetectAndMeasureTask().run(pair.science, result.matchedExposure, diff).diaSources
    k = int(np.argmin(np.hypot(cat["x"] - tx, cat["y"] - ty)))
    assert math.hypot(cat["x"][k] - tx, cat["y"][k] - ty) < 0.5
    ratio = cat["psfFlux"][k] / tflux
    if matched_psf:
        assert ratio == pytest.approx(1.0, abs=0.03)
        # the matched science PSF is the template's true one (sigma 2.0), not its model's
        assert result.matchedScience.psf.fwhm(256, 256) == pytest.approx(2.0 * 2.3548, rel=0.03)
    else:
        assert ratio > 1.05


def test_mode_override_and_warning(varying, caplog) -> None:
    pair, _, _ = varying
    cfg = ImageDifferenceConfig()
    cfg.mode = "convolveTemplate"
    task = ImageDifferenceTask(config=cfg)
    task.run(pair.template, pair.science, pair.sources)
    assert task.metadata["convolvedImage"] == "template" and task.metadata["mode"] == "convolveTemplate"
    cfg = ImageDifferenceConfig()
    cfg.mode = "sideways"
    with pytest.raises(ValueError, match="mode must be"):
        cfg.validate()


def test_masks_and_missing_template_pixels() -> None:
    pair = make_psf_matching_pair(shape=(384, 384), n_stars=150, scale=SCALE, seed=14)
    template = pair.template.copy()
    template.image[:, 300:310] = np.nan  # a gap in the template (e.g. between coadd patches)
    bad = np.zeros(template.shape, bool)
    bad[:, 100] = True
    template.set_mask("BAD", bad)
    science = pair.science.copy()
    sat = np.zeros(science.shape, bool)
    sat[200:203, 50:53] = True
    science.set_mask("SAT", sat)
    result = ImageDifferenceTask().run(template, science, pair.sources)
    diff = result.subtractedExposure
    no_data = (diff.mask & diff.get_plane_bitmask("NO_DATA")) != 0
    assert no_data[:, 300:310].all() and np.isnan(diff.image[:, 305]).all()
    assert not no_data[:, 250].any() and np.isfinite(diff.image[50:-50, 250]).all()
    k = result.psfMatchingKernel.kernel_size // 2
    bad_bits = (diff.mask & diff.get_plane_bitmask("BAD")) != 0
    assert bad_bits[50:-50, 100 - k : 100 + k + 1].all() and not bad_bits[50:-50, 100 + k + 2].any()
    assert ((diff.mask & diff.get_plane_bitmask("SAT")) != 0)[201, 51]
    edge = (diff.mask & diff.get_plane_bitmask("EDGE")) != 0
    assert edge[0].all() and edge[:, -1].all() and not edge[192, 192]
    # inputs are not modified
    assert np.isnan(template.image[:, 300:310]).all() and not (pair.science.mask & pair.science.get_plane_bitmask("SAT")).any()


def test_bad_input(varying) -> None:
    pair, _, _ = varying
    task = ImageDifferenceTask()
    science = pair.science.copy()
    science.band = "g"
    with pytest.raises(BandMismatchError, match="template band 'r' differs from science band 'g'"):
        task.run(pair.template, science, pair.sources)
    template = pair.template.copy()
    template.psf = None
    with pytest.raises(MissingPsfError, match="template exposure has no PSF"):
        task.run(template, pair.science, pair.sources)
    far = pair.template.copy()
    far = Exposure(far.image, far.mask, far.variance, xy0=(5000, 5000), psf=far.psf, photo_calib=far.photo_calib, band="r")
    with pytest.raises(NoWorkFound, match="does not overlap"):
        task.run(far, pair.science, pair.sources)
    sparse = pair.template.copy()
    sparse.image[:, 20:] = np.nan
    with pytest.raises(NoWorkFound, match="requiredTemplateFraction"):
        task.run(sparse, pair.science, pair.sources)


def test_template_in_another_frame_needs_a_warp(varying) -> None:
    pair, _, _ = varying

    def wcs(crpix: float) -> WCS:
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0, 2.0]
        w.wcs.crpix = [crpix, crpix]
        w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
        return w

    template = pair.template.copy()
    science = pair.science.copy()
    science.wcs = wcs(256.0)
    template.wcs = wcs(256.5)
    cfg = ImageDifferenceConfig()
    cfg.doWarpTemplate = False
    with pytest.raises(TemplateGeometryError, match="not in the science image's pixel frame"):
        ImageDifferenceTask(config=cfg).run(template, science, pair.sources)


def test_thread_safety(varying) -> None:
    pair, _, reference = varying
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = ImageDifferenceTask().run(pair.template, pair.science, pair.sources).subtractedExposure

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:
        assert np.array_equal(res.image, reference.subtractedExposure.image, equal_nan=True)
        assert np.array_equal(res.mask, reference.subtractedExposure.mask)


DATA_ID = {"instrument": "TestCam", "visit": 1, "detector": 0}


def test_run_quantum_writes_outputs_and_names_the_data_id(varying) -> None:
    pair, _, _ = varying
    out = run_quantum_in_temp_repo(
        ImageDifferenceTask, {"template": pair.template, "science": pair.science, "sources": pair.sources}, DATA_ID
    )
    diff = out.outputs["subtractedExposure"]
    matched = out.outputs["matchedExposure"]
    assert diff.shape == pair.science.shape and matched.shape == pair.science.shape
    assert out.result.status == "succeeded"
    template = pair.template.copy()
    template.psf = None
    failed = run_quantum_in_temp_repo(
        ImageDifferenceTask, {"template": template, "science": pair.science, "sources": pair.sources}, DATA_ID,
        raise_errors=False,
    )
    assert failed.result.status == "failed"
    assert "MissingPsfError" in failed.result.error_type
    assert "visit: 1" in failed.result.error and "detector: 0" in failed.result.error
    assert failed.result.exit_code == 20  # RepeatableQuantumError: other quanta go on


def test_detect_and_measure_quantum(varying) -> None:
    pair, _, result = varying
    out = run_quantum_in_temp_repo(
        DetectAndMeasureTask,
        {"science": pair.science, "matchedTemplate": result.matchedExposure, "difference": result.subtractedExposure},
        DATA_ID,
    )
    cat = out.outputs["diaSources"]
    assert "psfFlux" in cat.colnames and np.all(cat["id"] > 1_000_000_000 - 1)
