"""forcedPhotCoadd: forced PSF and aperture photometry on coadds, against truth.

Synthetic coadds (stars rendered with the coadd PSF on noise smoothed like a PSF-matched coadd's,
with the exact per-pixel variance plane) pin the algorithm: unbiased fluxes, errors that include
the noise correlations, positions transformed through ``refWcs``, flags, thread safety.  The
simulated ``tiny`` survey run through ``pipelines/DIA.yaml`` checks the pipeline's
``deepCoadd_forced_src`` against the simulator's truth: flux bias < 1% for S/N > 20 and a pull
standard deviation in [0.9, 1.2].
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from butler.butler import Butler
from butler.catalog import validate_source_catalog
from butler.exposure import Exposure, PhotoCalib
from butler.psf import GaussianPsf
from tasks.forced import ForcedPhotCoaddTask
from tasks.forced.coadd import ForcedPhotCoaddConfig
from tasks.forced.schemas import PIXEL_FLAG_COLUMNS, PSF_FLUX_COLUMNS, aperture_flux_columns
from tasks.psfmatch.testing import render_stars
from tests.integration.dia_survey import dia_repository, patch_table

SIGMA_PSF = 4.5 / 2.3548  # the coadds' model PSF
SMOOTH = 1.2  # noise correlation length of the synthetic coadds, pixels
SURVEY = {"variable_fraction": 0.25}


def _tract_wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [400.0, 400.0]
    w.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600
    return w


def _coadd(seed: int, xs: np.ndarray, ys: np.ndarray, flux: np.ndarray, xy0=(330, 330), size=370) -> Exposure:
    """A patch of a coadd in nJy: stars + correlated noise (per-pixel sigma 1 nJy) + a background slope."""
    rng = np.random.default_rng(seed)
    psf = GaussianPsf(SIGMA_PSF)
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (size, size)), SMOOTH, mode="wrap")
    noise *= 1.0 / noise.std()
    yy, xx = np.mgrid[0:size, 0:size]
    background = 0.5 + 0.002 * xx
    image = render_stars((size, size), psf, xs, ys, flux, xy0=xy0) + noise + background
    return Exposure(image, None, np.ones((size, size)), xy0=xy0, wcs=_tract_wcs(), psf=psf,
                    photo_calib=PhotoCalib(1.0), band="r")


def _stars(rng: np.random.Generator, n_side: int = 7, xy0=(330, 330), size=370) -> tuple[np.ndarray, ...]:
    step = (size - 60) / (n_side - 1)
    g = 30 + step * np.arange(n_side)
    x, y = np.meshgrid(g + xy0[0], g + xy0[1])
    xs = x.ravel() + rng.uniform(-0.5, 0.5, x.size)
    ys = y.ravel() + rng.uniform(-0.5, 0.5, y.size)
    return xs, ys, 10.0 ** rng.uniform(1.9, 3.6, xs.size)


def _ref(xs: np.ndarray, ys: np.ndarray, wcs: WCS) -> Table:
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    return Table({"id": np.arange(1, xs.size + 1, dtype=np.int64), "coord_ra": ra, "coord_dec": dec, "x": xs, "y": ys,
                  "parent": np.zeros(xs.size, np.int64), "detect_isPrimary": np.ones(xs.size, bool)})


def _measure(task: ForcedPhotCoaddTask, coadd: Exposure, ref: Table, ref_wcs: WCS) -> Table:
    meas = task.generateMeasCat({"tract": 0, "patch": 4, "band": "r"}, coadd, ref, ref_wcs)
    return task.run(meas, coadd, ref, ref_wcs).measCat


def test_schema_is_one_group_per_measurement() -> None:
    task = ForcedPhotCoaddTask()
    rng = np.random.default_rng(0)
    xs, ys, flux = _stars(rng, 3)
    cat = _measure(task, _coadd(0, xs, ys, flux), _ref(xs, ys, _tract_wcs()), _tract_wcs())
    validate_source_catalog(cat, where="deepCoadd_forced_src")
    groups = [PSF_FLUX_COLUMNS, aperture_flux_columns([3.0, 6.0, 9.0, 12.0]), PIXEL_FLAG_COLUMNS]
    for group in groups:
        for name, spec in group.items():
            assert cat[name].dtype == np.dtype(spec.dtype), name
    assert set(cat.colnames) == {"id", "coord_ra", "coord_dec", "x", "y", "parent", "detect_isPrimary"}.union(*groups)
    assert cat["psfFlux"].unit == "nJy" and cat["apFlux_6_0Err"].unit == "nJy"
    assert cat.meta["band"] == "r" and cat.meta["patch"] == 4
    assert cat.meta["psfFluxErrScale"] > 1.5 and cat.meta["apFlux_12_0ErrScale"] > cat.meta["psfFluxErrScale"]


def test_fluxes_are_unbiased_and_errors_include_noise_correlations() -> None:
    task = ForcedPhotCoaddTask()
    config = ForcedPhotCoaddConfig()
    config.measurement.doScaleErrors = False
    unscaled = ForcedPhotCoaddTask(config=config)
    rel, pulls, pulls_unscaled, ap_pulls = [], [], [], []
    frac6 = 1.0 - math.exp(-(6.0**2) / (2 * SIGMA_PSF**2))  # Gaussian PSF flux inside 6 px
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        xs, ys, flux = _stars(rng)
        coadd = _coadd(seed, xs, ys, flux)
        ref = _ref(xs, ys, _tract_wcs())
        cat = _measure(task, coadd, ref, _tract_wcs())
        assert not cat["psfFlux_flag"].any()
        snr = flux / cat["psfFluxErr"]
        rel.append(((cat["psfFlux"] - flux) / flux)[snr > 20])
        pulls.append((cat["psfFlux"] - flux) / cat["psfFluxErr"])
        pulls_unscaled.append((_measure(unscaled, coadd, ref, _tract_wcs())["psfFlux"] - flux) / (cat["psfFluxErr"] / cat.meta["psfFluxErrScale"]))
        ap_pulls.append((cat["apFlux_6_0"] - frac6 * flux) / cat["apFlux_6_0Err"])
    rel, pulls, pulls_unscaled, ap_pulls = map(np.concatenate, (rel, pulls, pulls_unscaled, ap_pulls))
    assert abs(np.median(rel)) < 0.005
    assert abs(pulls.mean()) < 0.2
    assert 0.9 < pulls.std() < 1.15
    assert pulls_unscaled.std() > 2.0  # the variance plane alone misses the correlations
    assert 0.85 < ap_pulls.std() < 1.2


def test_reference_positions_go_through_ref_wcs() -> None:
    rng = np.random.default_rng(4)
    xs, ys, flux = _stars(rng, 4)
    coadd = _coadd(4, xs, ys, flux)
    # References in another frame: shifted, rotated by 30 deg, finer pixels.
    ref_wcs = WCS(naxis=2)
    ref_wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    ref_wcs.wcs.crval = [150.1, 2.2]
    ref_wcs.wcs.crpix = [1000.0, -50.0]
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    ref_wcs.wcs.cd = np.array([[-c, s], [s, c]]) * 0.1 / 3600
    ra, dec = coadd.pixel_to_sky(xs, ys)
    rx, ry = ref_wcs.all_world2pix(ra, dec, 0)
    ref = Table({"id": np.arange(1, xs.size + 1), "x": rx, "y": ry, "coord_ra": np.zeros(xs.size), "coord_dec": np.zeros(xs.size),
                 "parent": np.zeros(xs.size, np.int64), "detect_isPrimary": np.ones(xs.size, bool)})
    cat = _measure(ForcedPhotCoaddTask(), coadd, ref, ref_wcs)
    np.testing.assert_allclose(cat["x"], xs, atol=1e-6)
    np.testing.assert_allclose(cat["y"], ys, atol=1e-6)
    np.testing.assert_allclose(cat["coord_ra"], ra, atol=1e-9)
    assert np.median(np.abs(cat["psfFlux"] - flux) / cat["psfFluxErr"]) < 1.5


def test_flags_edge_no_data_and_saturated_centre() -> None:
    xy0 = (330, 330)
    xs = np.array([335.0, 500.0, 600.0, 450.0])
    ys = np.array([500.0, 334.0, 600.0, 450.0])
    flux = np.full(4, 1000.0)
    coadd = _coadd(9, xs, ys, flux, xy0=xy0)
    coadd.image[250:, 250:] = np.nan  # no data in one corner (parent 580.., 580..)
    coadd.mask[250:, 250:] |= coadd.get_plane_bitmask("NO_DATA")
    coadd.mask[120, 120] |= coadd.get_plane_bitmask("SAT")  # parent (450, 450)
    cat = _measure(ForcedPhotCoaddTask(), coadd, _ref(xs, ys, _tract_wcs()), _tract_wcs())
    assert list(cat["pixelFlags_edge"]) == [True, True, False, False]
    assert list(cat["pixelFlags_nodata"]) == [False, False, True, False]
    assert list(cat["pixelFlags_saturated"]) == [False, False, False, True]
    assert list(cat["psfFlux_flag"]) == [True, True, True, False]
    assert list(cat["apFlux_6_0_flag"]) == [True, True, True, True]  # the last covers a SAT pixel


def test_run_is_thread_safe_and_leaves_its_inputs_alone() -> None:
    rng = np.random.default_rng(11)
    xs, ys, flux = _stars(rng, 5)
    coadd = _coadd(11, xs, ys, flux)
    ref = _ref(xs, ys, _tract_wcs())
    before = (coadd.image.copy(), coadd.variance.copy(), coadd.mask.copy(), ref.copy())
    task = ForcedPhotCoaddTask()
    serial = _measure(task, coadd, ref, _tract_wcs())
    results: list[Table] = [None] * 4  # type: ignore[list-item]
    barrier = threading.Barrier(4)

    def work(k: int) -> None:
        barrier.wait()
        results[k] = _measure(task, coadd, ref, _tract_wcs())

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        for name in serial.colnames:
            np.testing.assert_array_equal(result[name], serial[name])
    np.testing.assert_array_equal(coadd.image, before[0])
    np.testing.assert_array_equal(coadd.variance, before[1])
    np.testing.assert_array_equal(coadd.mask, before[2])
    assert all((ref[c] == before[3][c]).all() for c in ref.colnames)


def test_missing_copy_column_is_a_clear_error() -> None:
    rng = np.random.default_rng(2)
    xs, ys, flux = _stars(rng, 2)
    ref = _ref(xs, ys, _tract_wcs())
    del ref["detect_isPrimary"]
    with pytest.raises(ValueError, match="copyColumns names \\['detect_isPrimary'\\]"):
        ForcedPhotCoaddTask().generateMeasCat(None, _coadd(2, xs, ys, flux), ref, _tract_wcs())


# ---------------------------------------------------------------------------------- simulated survey
@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    repo = dia_repository(tmp_path_factory, **SURVEY)
    butler = Butler(repo, collections=["u/dia"])
    forced = patch_table(butler, "deepCoadd_forced_src")
    sky = butler.get("truth_sky", skymap="simcam_tiny", tract=0)
    wcs = butler.get("skyMap", skymap="simcam_tiny")[0].wcs
    return butler, forced, sky, wcs


def _truth_match(forced: Table, sky: Table, wcs: WCS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index of the nearest truth source (within 1 px) of each forced row, and its blend fraction:
    the other truth sources' flux in the row's PSF-weighted footprint relative to its own flux."""
    tx, ty = wcs.all_world2pix(sky["coord_ra"], sky["coord_dec"], 0)
    fx, fy = wcs.all_world2pix(forced["coord_ra"], forced["coord_dec"], 0)
    tree = cKDTree(np.column_stack([tx, ty]))
    dist, index = tree.query(np.column_stack([fx, fy]))
    flux = np.asarray(sky["baseFlux_r"])
    blend = np.zeros(len(forced))
    for k, neighbours in enumerate(tree.query_ball_point(np.column_stack([fx, fy]), 6 * SIGMA_PSF)):
        others = [j for j in neighbours if j != index[k]]
        d2 = (tx[others] - fx[k]) ** 2 + (ty[others] - fy[k]) ** 2
        blend[k] = float((flux[others] * np.exp(-d2 / (4 * SIGMA_PSF**2))).sum()) / max(flux[index[k]], 1e-9)
    return index, dist < 1.0, blend


def test_survey_forced_coadd_photometry_against_truth(survey) -> None:
    _, forced, sky, wcs = survey
    assert len(forced) > 100 and set(forced["patch"]) >= {3, 4, 5}
    index, matched, blend = _truth_match(forced, sky, wcs)
    true = np.asarray(sky["baseFlux_r"])[index]
    stars = (np.asarray(sky["sourceType"])[index] == "star") & matched & (blend < 0.01)
    stars &= np.asarray(forced["detect_isPrimary"]) & ~np.asarray(forced["psfFlux_flag"]) & ~np.asarray(forced["pixelFlags_saturated"])
    flux = np.asarray(forced["psfFlux"])
    err = np.asarray(forced["psfFluxErr"])
    snr = true / err
    bright = stars & (snr > 20)
    assert bright.sum() >= 20
    rel = (flux[bright] - true[bright]) / true[bright]
    assert abs(np.median(rel)) < 0.01
    assert abs(np.average(rel, weights=snr[bright] ** 2)) < 0.01
    sample = stars & (snr > 5)
    assert sample.sum() >= 40
    pull = (flux[sample] - true[sample]) / err[sample]
    assert 0.9 < pull.std() < 1.2
    # Apertures: the 6-pixel aperture holds the Gaussian PSF's enclosed fraction of the flux.
    frac6 = 1.0 - math.exp(-(6.0**2) / (2 * SIGMA_PSF**2))
    ok = bright & ~np.asarray(forced["apFlux_6_0_flag"])
    assert abs(np.median(np.asarray(forced["apFlux_6_0"])[ok] / (frac6 * true[ok]) - 1.0)) < 0.02


def test_survey_flags_follow_the_coadd_masks(survey) -> None:
    butler, forced, _, _ = survey
    for patch in (0, 4):
        coadd = butler.get("deepCoadd", skymap="simcam_tiny", tract=0, patch=patch, band="r")
        rows = forced[forced["patch"] == patch]
        ix = np.clip(np.rint(np.asarray(rows["x"]) - coadd.xy0[0]).astype(int), 0, coadd.width - 1)
        iy = np.clip(np.rint(np.asarray(rows["y"]) - coadd.xy0[1]).astype(int), 0, coadd.height - 1)
        no_data = (coadd.mask[iy, ix] & coadd.get_plane_bitmask("NO_DATA")) != 0
        assert np.all(np.asarray(rows["pixelFlags_nodata"])[no_data])
        assert np.all(np.asarray(rows["psfFlux_flag"])[no_data])
        assert rows.meta["psfFluxErrScale"] > 2.0  # coadds of PSF-matched warps: correlated noise
