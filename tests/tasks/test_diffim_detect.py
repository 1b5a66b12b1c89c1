"""detectAndMeasure on synthetic difference images: detection, measurement, dipoles, flags, bad sources."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.wcs import WCS

from butler.catalog import validate_source_catalog
from butler.exposure import Exposure, PhotoCalib, VisitInfo
from butler.psf import GaussianPsf
from tasks.diffim.detect_measure import DIA_COLUMNS, DetectAndMeasureConfig, DetectAndMeasureTask, significance_image
from tasks.diffim.errors import MissingPsfError
from tasks.psfmatch.testing import render_stars

SIGMA_PSF = 2.0
SKY_SIGMA = 10.0
CALIB = 2.5  # nJy per count


def _wcs(shape: tuple[int, int]) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def _difference(shape=(512, 512), xs=(), ys=(), fluxes=(), seed=0, noise=True) -> Exposure:
    rng = np.random.default_rng(seed)
    psf = GaussianPsf(SIGMA_PSF)
    signal = render_stars(shape, psf, np.asarray(xs, float), np.asarray(ys, float), np.asarray(fluxes, float))
    var = np.full(shape, SKY_SIGMA**2)  # background-limited: the formulas below are exact
    img = signal + (rng.normal(size=shape) * np.sqrt(var) if noise else 0.0)
    return Exposure(img, None, var, wcs=_wcs(shape), psf=psf, photo_calib=PhotoCalib(CALIB), band="r")


def _point_source_sigma() -> float:
    """PSF-flux error of a point source on flat noise: sigma * sqrt(4 pi sigma_psf^2) (counts)."""
    return SKY_SIGMA * math.sqrt(4 * math.pi * SIGMA_PSF**2)


def test_pure_noise_has_no_detections_and_unit_snr() -> None:
    task = DetectAndMeasureTask()
    for seed in range(3):
        result = task.run(None, None, _difference(seed=seed))
        assert len(result.diaSources) == 0
        assert 0.97 < task.metadata["snrStdBlankSky"] < 1.03


def test_positive_and_negative_sources_found_and_measured() -> None:
    rng = np.random.default_rng(5)
    n = 40
    xs = rng.uniform(30, 480, n)
    ys = rng.uniform(30, 480, n)
    # keep them apart so that each is one source
    keep = np.ones(n, bool)
    for i in range(n):
        for j in range(i):
            if keep[j] and math.hypot(xs[i] - xs[j], ys[i] - ys[j]) < 25:
                keep[i] = False
    xs, ys = xs[keep], ys[keep]
    err = _point_source_sigma()
    snr = rng.uniform(20, 60, xs.size)
    sign = np.where(np.arange(xs.size) % 3 == 0, -1.0, 1.0)
    fluxes = sign * snr * err
    diff = _difference(xs=xs, ys=ys, fluxes=fluxes, seed=11)
    result = DetectAndMeasureTask().run(None, None, diff, idBase=7_000_000)
    cat = result.diaSources
    validate_source_catalog(cat, where="diaSrc")
    assert set(DIA_COLUMNS) <= set(cat.colnames)
    assert len(cat) == xs.size
    assert np.all(cat["id"] > 7_000_000) and len(set(cat["id"])) == len(cat)
    order = [int(np.argmin(np.hypot(cat["x"] - x, cat["y"] - y))) for x, y in zip(xs, ys, strict=True)]
    matched = cat[order]
    assert np.all(np.hypot(matched["x"] - xs, matched["y"] - ys) < 0.5)
    assert np.array_equal(np.asarray(matched["isNegative"]), sign < 0)
    ratio = np.asarray(matched["psfFlux"]) / (fluxes * CALIB)
    assert abs(np.median(ratio) - 1) < 0.02
    pulls = (np.asarray(matched["psfFlux"]) - fluxes * CALIB) / np.asarray(matched["psfFluxErr"])
    assert 0.6 < np.std(pulls) < 1.5
    # the error is the matched-filter error of a point source on flat noise
    assert np.median(matched["psfFluxErr"]) == pytest.approx(err * CALIB, rel=0.02)
    assert np.median(np.abs(np.asarray(matched["apFlux"]) / (fluxes * CALIB) - 1)) < 0.1
    # second moments of a round Gaussian of sigma 2 px (plus pixelization)
    assert np.nanmedian(matched["ixx"]) == pytest.approx(SIGMA_PSF**2 + 1 / 12, rel=0.15)
    assert np.nanmedian(np.abs(matched["ixy"])) < 0.3
    assert np.all(~matched["isDipole"])
    ra, dec = diff.pixel_to_sky(matched["x"], matched["y"])
    assert np.allclose(matched["coord_ra"], ra) and np.allclose(matched["coord_dec"], dec)
    # no visit info: the epoch is unknown
    assert np.all(np.isnan(cat["midpointMjdTai"])) and cat["midpointMjdTai"].unit == "d"


def test_sources_carry_the_epoch_of_the_difference() -> None:
    diff = _difference(xs=[100.0, 300.0], ys=[200.0, 400.0], fluxes=[30 * _point_source_sigma()] * 2, seed=3)
    diff.visit_info = VisitInfo(exposure_time=30.0, mjd=60123.25)
    cat = DetectAndMeasureTask().run(None, None, diff).diaSources
    assert len(cat) == 2
    assert np.all(cat["midpointMjdTai"] == 60123.25)


def test_detection_threshold_is_five_sigma_matched_filter() -> None:
    err = _point_source_sigma()
    xs = np.array([100.0, 200.0, 300.0, 400.0])
    ys = np.full(4, 256.0)
    fluxes = np.array([3.0, 4.0, 8.0, 12.0]) * err
    diff = _difference(xs=xs, ys=ys, fluxes=fluxes, noise=False)
    cat = DetectAndMeasureTask().run(None, None, diff).diaSources
    found = sorted(round(float(x)) for x in cat["x"])
    assert found == [300, 400]
    assert cat["snr"][np.argmax(cat["x"])] == pytest.approx(12.0, rel=0.02)


def test_dipole_is_merged() -> None:
    err = _point_source_sigma()
    diff = _difference(xs=[200.0, 204.0, 350.0], ys=[200.0, 200.0, 350.0], fluxes=[40 * err, -40 * err, 30 * err], seed=2)
    cat = DetectAndMeasureTask().run(None, None, diff).diaSources
    assert len(cat) == 2
    dip = cat[np.asarray(cat["isDipole"])]
    assert len(dip) == 1
    assert dip["x"][0] == pytest.approx(202.0, abs=0.5)
    # lobe positions are matched-filter peaks, pushed apart where the lobes overlap (no dipole fit)
    assert 3.5 < dip["dipoleSeparation"][0] < 8.0
    assert dip["dipolePosFlux"][0] > 0 > dip["dipoleNegFlux"][0]
    single = cat[~np.asarray(cat["isDipole"])]
    assert math.isnan(single["dipoleSeparation"][0])
    cfg = DetectAndMeasureConfig()
    cfg.doMergeDipoles = False
    assert len(DetectAndMeasureTask(config=cfg).run(None, None, diff).diaSources) == 3


def test_sources_on_bad_pixels_are_flagged_and_removed() -> None:
    err = _point_source_sigma()
    xs = [100.0, 250.0, 400.0, 320.0, 2.0]
    ys = [100.0, 250.0, 400.0, 400.0, 300.0]
    diff = _difference(xs=xs, ys=ys, fluxes=[30 * err] * 5, seed=3)
    diff.set_mask("SAT", np.pad(np.ones((3, 3), bool), ((99, 410), (99, 410))))
    bad = np.zeros(diff.shape, bool)
    bad[:, 250] = True
    diff.set_mask("BAD", bad)
    nd = np.zeros(diff.shape, bool)
    nd[398:403, 398:403] = True
    diff.set_mask("NO_DATA", nd)
    diff.image[nd] = np.nan
    diff.variance[nd] = np.nan
    cr = np.zeros(diff.shape, bool)
    cr[400, 320] = True
    diff.set_mask("CR", cr)

    keep_cfg = DetectAndMeasureConfig()
    keep_cfg.doRemoveBadSources = False
    cat = DetectAndMeasureTask(config=keep_cfg).run(None, None, diff).diaSources

    def row(x: float, y: float):
        k = int(np.argmin(np.hypot(cat["x"] - x, cat["y"] - y)))
        assert math.hypot(cat["x"][k] - x, cat["y"][k] - y) < 2
        return cat[k]

    assert row(100, 100)["pixelFlags_saturated"]
    assert row(250, 250)["pixelFlags_bad"]
    assert row(320, 400)["pixelFlags_cr"] and not row(320, 400)["pixelFlags_bad"]
    assert row(2, 300)["pixelFlags_edge"]
    # the source on NO_DATA: its centre has no data, it is flagged if detected at all
    near_nd = cat[np.hypot(cat["x"] - 400, cat["y"] - 400) < 4]
    assert all(near_nd["pixelFlags_nodata"] | near_nd["psfFlux_flag"])

    task = DetectAndMeasureTask()
    kept = task.run(None, None, diff).diaSources
    assert not np.any(kept["pixelFlags_saturated"] | kept["pixelFlags_bad"] | kept["pixelFlags_nodata"] | kept["pixelFlags_edge"])
    assert task.metadata["nRemovedTotal"] >= 3
    assert task.metadata["nRemoved"]["pixelFlags_saturated"] >= 1
    assert np.any(np.hypot(kept["x"] - 320, kept["y"] - 400) < 2)  # the CR-flagged one stays


def test_sources_on_interpolated_pixels_are_removed() -> None:
    """pixelFlags_interpolatedCenterAll: every centre pixel interpolated (a repaired cosmic ray), not one of them."""
    err = _point_source_sigma()
    diff = _difference(xs=[100.0, 300.0], ys=[100.0, 300.0], fluxes=[30 * err] * 2, seed=6)
    intrp = np.zeros(diff.shape, bool)
    intrp[98:103, 97:104] = True  # the whole centre of the first source
    intrp[300, 301] = True  # one pixel next to the second
    diff.set_mask("INTRP", intrp)
    keep_cfg = DetectAndMeasureConfig()
    keep_cfg.doRemoveBadSources = False
    cat = DetectAndMeasureTask(config=keep_cfg).run(None, None, diff).diaSources
    assert len(cat) == 2
    flags = {round(float(x)): bool(f) for x, f in zip(cat["x"], cat["pixelFlags_interpolatedCenterAll"], strict=True)}
    assert flags == {100: True, 300: False}
    assert np.all(cat["pixelFlags_interpolated"])
    assert len(DetectAndMeasureTask().run(None, None, diff).diaSources) == 2  # not removed by default
    cfg = DetectAndMeasureConfig()
    cfg.badSourceFlags = [*cfg.badSourceFlags, "pixelFlags_interpolatedCenterAll"]
    task = DetectAndMeasureTask(config=cfg)
    kept = task.run(None, None, diff).diaSources
    assert len(kept) == 1 and abs(kept["x"][0] - 300) < 1
    assert task.metadata["nRemoved"]["pixelFlags_interpolatedCenterAll"] == 1



def test_interpolation_residuals_are_removed_and_sources_under_repairs_kept() -> None:
    """interpolationArtifact: signal confined to repaired (INTRP) pixels is a residual, not a source.

    A 3x13-pixel repaired track whose interpolated values are off by +-3 sigma together (row
    interpolation between two noisy end pixels errs coherently) passes the 5-sigma matched filter;
    a real source crossed by the same kind of track, or wholly under a large repaired area (where
    the test cannot tell), is kept.
    """
    err = _point_source_sigma()
    diff = _difference(xs=[100.0, 100.0], ys=[100.0, 300.0], fluxes=[8 * err, 15 * err], seed=11)
    intrp = np.zeros(diff.shape, bool)
    intrp[99:102, 94:107] = True  # a track across the centre of the source at (100, 100)
    intrp[280:321, 80:121] = True  # a large repaired area holding the whole source at (100, 300)
    for (y, x), offset in (((300, 300), 3.0), ((100, 400), -3.0)):
        intrp[y - 1 : y + 2, x - 6 : x + 7] = True
        diff.image[y - 1 : y + 2, x - 6 : x + 7] += offset * SKY_SIGMA
    diff.set_mask("INTRP", intrp)

    keep_cfg = DetectAndMeasureConfig()
    keep_cfg.doRemoveBadSources = False
    cat = DetectAndMeasureTask(config=keep_cfg).run(None, None, diff).diaSources
    found = {(round(float(x) / 100), round(float(y) / 100)): row for x, y, row in zip(cat["x"], cat["y"], cat, strict=True)}
    assert set(found) == {(1, 1), (1, 3), (3, 3), (4, 1)}
    assert found[(3, 3)]["snr"] > 6 and found[(4, 1)]["snr"] > 6  # the residuals pass the threshold
    assert found[(3, 3)]["interpolationArtifact"] and found[(4, 1)]["interpolationArtifact"]
    assert not found[(1, 1)]["interpolationArtifact"] and not found[(1, 3)]["interpolationArtifact"]
    assert all(found[k]["pixelFlags_interpolated"] for k in found)

    task = DetectAndMeasureTask()
    kept = task.run(None, None, diff).diaSources
    assert sorted(round(float(y)) for y in kept["y"]) == [100, 300]
    assert task.metadata["nRemoved"]["interpolationArtifact"] == 2
    crossed = kept[np.argmin(kept["y"])]
    assert abs(crossed["psfFlux"] / CALIB - 8 * err) < 3 * err

def test_masks_and_score_image() -> None:
    err = _point_source_sigma()
    diff = _difference(xs=[100.0, 300.0], ys=[100.0, 300.0], fluxes=[20 * err, -20 * err], seed=4)
    before = diff.mask.copy()
    result = DetectAndMeasureTask().run(None, None, diff)
    assert np.array_equal(diff.mask, before)  # the input is not modified
    measured = result.subtractedMeasuredExposure
    det = measured.mask & measured.get_plane_bitmask("DETECTED")
    neg = measured.mask & measured.get_plane_bitmask("DETECTED_NEGATIVE")
    assert det[100, 100] and not det[300, 300]
    assert neg[300, 300] and not neg[100, 100]
    score = result.scoreExposure.image
    assert score[100, 100] == pytest.approx(20, rel=0.15)
    assert score[300, 300] == pytest.approx(-20, rel=0.15)


def test_significance_image_matches_direct_sum() -> None:
    diff = _difference(shape=(64, 64), seed=9)
    snr, flux, usable = significance_image(diff)
    p = diff.psf.image(0, 0)
    h = p.shape[0] // 2
    y, x = 30, 33
    stamp = diff.image[y - h : y + h + 1, x - h : x + h + 1]
    vstamp = diff.variance[y - h : y + h + 1, x - h : x + h + 1]
    expected = (p * stamp).sum() / math.sqrt((p * p * vstamp).sum())
    assert snr[y, x] == pytest.approx(expected, rel=1e-4)
    assert flux[y, x] == pytest.approx((p * stamp).sum() / (p * p).sum(), rel=1e-4)
    assert usable.all()


def test_missing_psf_is_a_clear_error() -> None:
    diff = _difference(shape=(64, 64))
    diff.psf = None
    with pytest.raises(MissingPsfError, match="difference exposure has no PSF"):
        DetectAndMeasureTask().run(None, None, diff)


def test_config_validation() -> None:
    cfg = DetectAndMeasureConfig()
    cfg.detectionThreshold = -1
    with pytest.raises(ValueError, match="detectionThreshold"):
        cfg.validate()
    cfg = DetectAndMeasureConfig()
    cfg.badSourceFlags = ["pixelFlags_nonsense"]
    err = _point_source_sigma()
    with pytest.raises(ValueError, match="pixelFlags_nonsense"):
        DetectAndMeasureTask(config=cfg).run(None, None, _difference(xs=[50.0], ys=[50.0], fluxes=[30 * err]))


def _correlated_difference(seed: int, variance_factor: float = 1.0, xs=(), ys=(), fluxes=()) -> Exposure:
    """Noise smoothed by a sigma-1 px Gaussian (as resampling or a convolved coadd leaves it), with the
    right per-pixel variance times ``variance_factor`` in the variance plane."""
    from scipy.ndimage import gaussian_filter

    shape = (512, 512)
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.normal(size=shape), 1.0)
    noise *= SKY_SIGMA / noise.std()
    psf = GaussianPsf(SIGMA_PSF)
    signal = render_stars(shape, psf, np.asarray(xs, float), np.asarray(ys, float), np.asarray(fluxes, float))
    var = np.full(shape, variance_factor * SKY_SIGMA**2)
    return Exposure(noise + signal, None, var, wcs=_wcs(shape), psf=psf, photo_calib=PhotoCalib(CALIB), band="r")


def test_correlated_noise_rescales_the_significance() -> None:
    """Correlated noise: the variance plane is right per pixel but not for the matched filter."""
    diff = _correlated_difference(seed=4, xs=[150.0, 350.0], ys=[200.0, 300.0], fluxes=[3000.0, 3000.0])
    task = DetectAndMeasureTask()
    cat = task.run(None, None, diff).diaSources
    scale = task.metadata["snrStdBlankSky"]
    assert scale > 1.5 and task.metadata["significanceScale"] == scale
    cfg = DetectAndMeasureConfig()
    cfg.doRescaleSignificance = False
    plain = DetectAndMeasureTask(config=cfg)
    raw = plain.run(None, None, diff).diaSources
    assert plain.metadata["significanceScale"] == 1.0
    # at a nominal 5 sigma the unscaled S/N finds noise peaks (effectively ~5/scale sigma); rescaled, the
    # two sources and at most a stray peak
    assert len(raw) > 20
    assert 2 <= len(cat) <= 3
    compared = 0
    for x, y in [(150.0, 200.0), (350.0, 300.0)]:
        k = int(np.argmin(np.hypot(cat["x"] - x, cat["y"] - y)))
        assert math.hypot(cat["x"][k] - x, cat["y"][k] - y) < 0.5 and not cat["isDipole"][k]
        assert cat["psfFlux"][k] == pytest.approx(3000.0 * CALIB, rel=0.15)
        j = int(np.argmin(np.hypot(raw["x"] - x, raw["y"] - y)))
        if raw["isDipole"][j]:  # merged with a noise peak of the unscaled detection
            continue
        assert cat["psfFlux"][k] == pytest.approx(raw["psfFlux"][j])
        assert cat["psfFluxErr"][k] == pytest.approx(scale * raw["psfFluxErr"][j])
        assert cat["snr"][k] == pytest.approx(raw["snr"][j] / scale, rel=1e-4)
        compared += 1
    assert compared >= 1


def test_an_overestimated_variance_is_not_rescaled_down() -> None:
    """A blank-sky S/N std below 1 keeps the variance plane's (conservative) significance."""
    diff = _difference(seed=2)
    diff.variance[:] *= 2.0
    task = DetectAndMeasureTask()
    task.run(None, None, diff)
    assert task.metadata["snrStdBlankSky"] == pytest.approx(1 / math.sqrt(2), rel=0.05)
    assert task.metadata["significanceScale"] == 1.0
