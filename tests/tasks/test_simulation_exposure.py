"""Science tests of simulated calexps against the simulation truth (tiny preset)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.optimize import least_squares
from scipy.spatial import cKDTree
from scipy.special import erf

from tasks.simulation import get_preset, plan_survey, simulate_visit_detector
from tasks.simulation.render import sky_background


@pytest.fixture(scope="module")
def plan():
    return plan_survey(get_preset("tiny"))


@pytest.fixture(scope="module")
def sims(plan):
    """Every visit-detector of the tiny preset, with the noiseless model."""
    return {
        (v.id, d): simulate_visit_detector(plan, v.id, d, keep_model=True)
        for v in plan.visits
        for d in plan.config.detector_ids
    }


def _background_plane(exposure) -> np.ndarray:
    a, b, c = exposure.metadata["BG_RESIDUAL"]
    h, w = exposure.shape
    return a + b * np.linspace(-1, 1, w)[None, :] + c * np.linspace(-1, 1, h)[:, None]


def _clean_isolated_stars(sim, *, min_counts: float = 0.0, border: int = 25):
    t = sim.truth_sources
    h, w = sim.exposure.shape
    sel = (
        (t["sourceType"] == "star")
        & ~t["isSaturated"]
        & (t["neighborFluxFraction"] < 1e-3)
        & (t["trueCounts"] > min_counts)
        & (t["x"] > border)
        & (t["x"] < w - border)
        & (t["y"] > border)
        & (t["y"] < h - border)
    )
    return t[sel]


def _disc(shape, x, y, r):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= r * r


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_pixels_other_seed_other_pixels(plan, sims) -> None:
    visit = plan.visits[-1].id
    again = simulate_visit_detector(plan_survey(get_preset("tiny")), visit, 5)
    first = sims[(visit, 5)]
    assert np.array_equal(first.exposure.image, again.exposure.image)
    assert np.array_equal(first.exposure.mask, again.exposure.mask)
    assert np.array_equal(first.exposure.variance, again.exposure.variance)
    assert np.array_equal(np.asarray(first.src["psfFlux"]), np.asarray(again.src["psfFlux"]))
    assert np.array_equal(np.asarray(first.truth_sources["id"]), np.asarray(again.truth_sources["id"]))
    other = simulate_visit_detector(plan_survey(get_preset("tiny", seed=2)), visit, 5)
    assert not np.array_equal(first.exposure.image, other.exposure.image)


def test_truth_ids_are_stable_across_visits(plan, sims) -> None:
    positions: dict[int, tuple[float, float]] = {}
    for (_visit, _det), sim in sims.items():
        t = sim.truth_sources
        for row in t[t["sourceType"] == "star"]:
            ra, dec = float(row["coord_ra"]), float(row["coord_dec"])
            known = positions.setdefault(int(row["id"]), (ra, dec))
            assert known == (ra, dec)
    seen_twice = [i for i in positions if sum(i in set(s.truth_sources["id"]) for s in sims.values()) > 1]
    assert len(seen_twice) > 20


# ------------------------------------------------------------------------------ photometry


def test_rendered_star_fluxes_match_truth(sims) -> None:
    n_checked = 0
    pulls = []
    for sim in sims.values():
        e = sim.exposure
        bg = _background_plane(e)
        sources_only = sim.model - bg
        bad = e.mask & e.get_plane_bitmask(["BAD", "CR", "SAT"])
        for star in _clean_isolated_stars(sim):
            disc = _disc(e.shape, star["x"], star["y"], 5.0 * star["psfFwhm"] / 2.3548)
            if star["trueCounts"] > 2e4 and star["neighborFluxFraction"] < 1e-4:
                # Noiseless: the rendering puts the true counts into the pixels (5 sigma holds 1 - 4e-6;
                # faint neighbours' wings add < 0.1% for bright stars).
                assert sources_only[disc].sum() == pytest.approx(star["trueCounts"], rel=1e-3)
            if bad[disc].any():
                continue
            noisy = float((e.image - bg)[disc].sum())
            sigma = math.sqrt(float(e.variance[disc].sum()))
            pulls.append((noisy - star["trueCounts"]) / sigma)
            if sigma < 0.003 * star["trueCounts"]:  # bright: the pixel sum is within 1% of truth
                assert noisy == pytest.approx(star["trueCounts"], rel=0.01)
                n_checked += 1
    assert n_checked >= 10
    pulls = np.array(pulls)
    assert abs(pulls.mean()) < 0.4
    assert 0.7 < pulls.std() < 1.3


def test_calibration_converts_counts_to_njy(sims) -> None:
    for sim in sims.values():
        t = sim.truth_sources
        calib = sim.exposure.photo_calib
        assert np.allclose(t["trueCounts"] * calib.calibration, t["trueFlux"])
        assert calib.zero_point == pytest.approx(sim.exposure.metadata["ZEROPOINT"])
        assert 30.5 < calib.zero_point < 31.5


def test_noise_matches_the_variance_plane(sims) -> None:
    for sim in sims.values():
        e = sim.exposure
        sources = sim.model - _background_plane(e)
        free = (np.abs(sources) < 1e-3 * np.sqrt(e.variance)) & ((e.mask & ~e.get_plane_bitmask("DETECTED")) == 0)
        assert free.mean() > 0.3
        z = (e.image - sim.model)[free] / np.sqrt(e.variance[free])
        assert 0.97 <= z.std() <= 1.03
        assert abs(z.mean()) < 0.02
        # The variance plane is the expected one: sky / gain + (read noise / gain)^2 on blank sky.
        sky = sky_background(
            e.shape, _camera_detector(e), e.metadata["SKYLEVEL"], e.metadata["SKY_GRADIENT"], _radius(e)
        )
        expected = sky / e.metadata["GAIN"] + (e.metadata["RDNOISE"] / e.metadata["GAIN"]) ** 2
        assert np.allclose(e.variance[free], expected[free], rtol=1e-3)


def _camera_detector(exposure):
    from tasks.instruments.simcam import SimCam

    return SimCam(exposure.shape[0]).detector(exposure.metadata["DETECTOR"])


def _radius(exposure) -> float:
    from tasks.instruments.simcam import SimCam

    return SimCam(exposure.shape[0]).focal_plane_half_size()


# ------------------------------------------------------------------------------ PSF


def _fit_round_gaussian(
    stamp: np.ndarray, x0: float, y0: float, noise: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Fit a pixel-integrated round Gaussian with free centre; returns (x, y, fwhm)."""
    h, w = stamp.shape
    gx, gy = np.arange(w), np.arange(h)

    def model(p):
        amp, xc, yc, s = p
        fx = 0.5 * (erf((gx + 0.5 - xc) / (math.sqrt(2) * s)) - erf((gx - 0.5 - xc) / (math.sqrt(2) * s)))
        fy = 0.5 * (erf((gy + 0.5 - yc) / (math.sqrt(2) * s)) - erf((gy - 0.5 - yc) / (math.sqrt(2) * s)))
        return amp * fy[:, None] * fx[None, :]

    weight = 1.0 if noise is None else 1.0 / noise
    fit = least_squares(lambda p: ((model(p) - stamp) * weight).ravel(), [stamp.sum(), x0, y0, 1.5])
    return fit.x[1], fit.x[2], 2.3548 * abs(fit.x[3])


def test_rendered_psf_matches_the_psf_model(sims) -> None:
    n = 0
    for sim in sims.values():
        e = sim.exposure
        sources = sim.model - _background_plane(e)
        for star in _clean_isolated_stars(sim, min_counts=5e3):
            half = e.psf.image(star["x"], star["y"]).shape[0] // 2
            ix, iy = int(round(star["x"])), int(round(star["y"]))
            stamp = sources[iy - half : iy + half + 1, ix - half : ix + half + 1]
            fx, fy, fwhm = _fit_round_gaussian(stamp, star["x"] - ix + half, star["y"] - iy + half)
            assert fwhm == pytest.approx(e.psf.fwhm(star["x"], star["y"]), rel=0.02)
            assert (fx + ix - half, fy + iy - half) == (
                pytest.approx(star["x"], abs=0.02),
                pytest.approx(star["y"], abs=0.02),
            )
            # The model realized at the star: PSF-weighted flux of the noiseless star = its counts.
            p, x0, y0 = e.psf.shifted_image(star["x"], star["y"])
            cut = sources[y0 : y0 + p.shape[0], x0 : x0 + p.shape[1]]
            assert (p * cut).sum() / (p * p).sum() == pytest.approx(star["trueCounts"], rel=4e-3)
            n += 1
    assert n >= 20


def test_noisy_star_widths_match_the_model(sims) -> None:
    ratios = []
    for sim in sims.values():
        e = sim.exposure
        image = e.image - _background_plane(e)
        for star in _clean_isolated_stars(sim, min_counts=5e4):
            half = e.psf.image(star["x"], star["y"]).shape[0] // 2
            ix, iy = int(round(star["x"])), int(round(star["y"]))
            sl = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
            if (e.mask[sl] & e.get_plane_bitmask(["BAD", "CR", "SAT"])).any():
                continue
            _, _, fwhm = _fit_round_gaussian(image[sl], half, half, np.sqrt(e.variance[sl]))
            ratios.append(fwhm / e.psf.fwhm(star["x"], star["y"]))
    assert len(ratios) >= 5
    assert np.median(ratios) == pytest.approx(1.0, abs=0.02)


def test_psf_varies_across_the_detector_and_between_visits(plan, sims) -> None:
    corners = [(0, 0), (399, 0), (0, 399), (399, 399)]
    for (_visit, det), sim in sims.items():
        widths = [sim.exposure.psf.fwhm(x, y) for x, y in corners]
        if det == 5:  # off-centre detector: the radial PSF term changes a lot across it
            assert max(widths) / min(widths) > 1.03
    seeing = [sim.exposure.visit_info.seeing for sim in sims.values()]
    assert max(seeing) / min(seeing) > 1.3
    template = [v for v in plan.visits if v.is_template]
    science = [v for v in plan.visits if not v.is_template]
    assert max(v.seeing_arcsec for v in template) < min(v.seeing_arcsec for v in science)


def test_constant_psf_when_variation_is_off() -> None:
    config = replace(get_preset("tiny"), psf_variation=0.0, psf_ellipticity=0.0, n_science_visits=1)
    plan = plan_survey(config)
    sim = simulate_visit_detector(plan, plan.visits[0].id, 5, measure=False)
    widths = [sim.exposure.psf.fwhm(x, y) for x, y in [(0, 0), (399, 0), (200, 200), (399, 399)]]
    assert max(widths) / min(widths) < 1.002
    assert np.mean(widths) * 0.2 == pytest.approx(plan.visits[0].seeing_arcsec, rel=0.01)


# ------------------------------------------------------------------------------ transients


def test_transients_absent_before_their_start_and_present_after(plan, sims) -> None:
    for (visit_id, _det), sim in sims.items():
        visit = plan.visit(visit_id)
        tt = sim.truth_transients
        tr = tt[tt["sourceType"] == "transient"]
        assert np.array_equal(np.asarray(tr["isActive"]), (tr["mjdStart"] <= visit.mjd) & (visit.mjd < tr["mjdEnd"]))
        assert np.all(tr["trueFlux"][~tr["isActive"]] == 0)
        assert np.all(tr["trueFlux"][tr["isActive"]] > 0)
        if visit.is_template:
            assert not tr["isActive"].any()
            assert "transient" not in set(sim.truth_sources["sourceType"])
        active_ids = set(tr["id"][tr["isActive"]])
        assert active_ids == set(sim.truth_sources["id"][sim.truth_sources["sourceType"] == "transient"])
    late = [v.id for v in plan.visits if not v.is_template][-1]
    assert sum(int(sims[(late, d)].truth_transients["isActive"].sum()) for d in plan.config.detector_ids) >= 10


def test_transient_pixels_appear_only_when_active(plan, sims) -> None:
    """The same survey without transients differs exactly by the active transients' light."""
    quiet = plan_survey(replace(get_preset("tiny"), transient_density=0.0))
    assert len(quiet.sky) == int((plan.sky.kind != "transient").sum())
    checked = {True: 0, False: 0}
    for visit in (plan.visits[0], plan.visits[2], plan.visits[-1]):
        for det in plan.config.detector_ids:
            sim = sims[(visit.id, det)]
            diff = (
                sim.model.astype(np.float64)
                - simulate_visit_detector(quiet, visit.id, det, keep_model=True, measure=False).model
            )
            tr = sim.truth_transients[sim.truth_transients["sourceType"] == "transient"]
            if not tr["isActive"].any():
                assert np.abs(diff).max() < 1e-3
                continue
            active = tr[tr["isActive"]]
            h, w = diff.shape
            for row in tr:
                if not (12 < row["x"] < w - 12 and 12 < row["y"] < h - 12):
                    continue
                d = np.hypot(active["x"] - row["x"], active["y"] - row["y"])
                if np.any((d > 0) & (d < 6 * row["psfFwhm"])):
                    continue  # another active transient nearby
                disc = _disc(diff.shape, row["x"], row["y"], 2.5 * row["psfFwhm"])
                if row["isActive"]:
                    assert diff[disc].sum() == pytest.approx(row["trueCounts"], rel=2e-3)
                else:
                    assert np.abs(diff[disc]).max() < 1e-3
                checked[bool(row["isActive"])] += 1
    assert checked[True] >= 5 and checked[False] >= 5


def test_src_detects_bright_transients_only_when_active(plan, sims) -> None:
    detected = total = 0
    for (_visit_id, _det), sim in sims.items():
        tr = sim.truth_transients[sim.truth_transients["sourceType"] == "transient"]
        bright = tr[(tr["expectedSnr"] > 20) & (tr["neighborFluxFraction"] < 0.05)]
        if len(bright) == 0 or len(sim.src) == 0:
            continue
        tree = cKDTree(np.column_stack([sim.src["x"], sim.src["y"]]))
        dist, _ = tree.query(np.column_stack([bright["x"], bright["y"]]))
        detected += int((dist < 1.0).sum())
        total += len(bright)
    assert total >= 5
    assert detected / total >= 0.9


def test_transient_population(plan) -> None:
    sky = plan.sky
    tr = sky.kind == "transient"
    template_end = max(v.mjd for v in plan.visits if v.is_template)
    assert tr.sum() > 20
    assert np.all(sky.mjd_start[tr] > template_end)
    assert 0 < np.count_nonzero(sky.host_id[tr]) < tr.sum()  # some on galaxies, some not
    assert np.isfinite(sky.mjd_end[tr]).any()  # some are short-lived
    hosts = sky.host_id[tr][sky.host_id[tr] > 0]
    assert set(hosts) <= set(sky.id[sky.kind == "galaxy"])


def test_variable_stars_follow_their_light_curves(plan, sims) -> None:
    sky = plan.sky
    var = np.flatnonzero(sky.kind == "variable")
    assert var.size > 0
    fluxes = np.array([sky.flux_njy("r", v.mjd)[var] for v in plan.visits])
    base = sky.base_flux_njy("r")[var]
    assert np.all(np.abs(fluxes / base - 1) <= sky.var_amplitude[var] + 1e-12)
    assert np.any(np.abs(fluxes / base - 1) > 0.02)


# ------------------------------------------------------------------------------ defects


def test_saturated_stars_are_clipped_and_masked(sims) -> None:
    n_sat = 0
    for sim in sims.values():
        e = sim.exposure
        sat_bit = e.get_plane_bitmask("SAT")
        sky = sky_background(
            e.shape, _camera_detector(e), e.metadata["SKYLEVEL"], e.metadata["SKY_GRADIENT"], _radius(e)
        )
        raw = e.image - _background_plane(e) + sky
        sat = (e.mask & sat_bit) != 0
        assert raw.max() <= e.metadata["SATURATE"] * (1 + 1e-5)
        # Pixels over the level were clipped to it; the SAT mask holds them, the partly filled ends
        # of bleed trails and a one-pixel border.
        clipped = np.isclose(raw, e.metadata["SATURATE"], rtol=1e-5) & ((e.mask & e.get_plane_bitmask("INTRP")) == 0)
        assert np.all(sat[clipped])
        assert clipped.sum() > 0.3 * sat.sum() or not sat.any()
        t = sim.truth_sources
        tree = cKDTree(np.column_stack([sim.src["x"], sim.src["y"]])) if len(sim.src) else None
        for star in t[t["isSaturated"]]:
            ix, iy = int(round(star["x"])), int(round(star["y"]))
            assert sat[max(iy - 1, 0) : iy + 2, max(ix - 1, 0) : ix + 2].any()
            if star["trueCounts"] > 1e6 and 20 < star["x"] < e.shape[1] - 20:
                # Bleed trail: the SAT region through a very bright star is longer along its column.
                assert _run_length(sat[:, ix], iy) > _run_length(sat[iy, :], ix)
            if tree is not None:
                dist, k = tree.query([star["x"], star["y"]])
                if dist < 3:
                    assert sim.src["pixelFlags_saturated"][k]
            n_sat += 1
    assert n_sat >= 5


def _run_length(line: np.ndarray, index: int) -> int:
    """Length of the run of True values through ``line[index]``."""
    if not line[index]:
        return 0
    lo = index
    while lo > 0 and line[lo - 1]:
        lo -= 1
    hi = index
    while hi < line.size - 1 and line[hi + 1]:
        hi += 1
    return hi - lo + 1


def test_bad_columns_and_cosmic_rays_are_masked_and_repaired(sims) -> None:
    n_cr = n_blank_cr = 0
    for sim in sims.values():
        e = sim.exposure
        bad = (e.mask & e.get_plane_bitmask("BAD")) != 0
        intrp = (e.mask & e.get_plane_bitmask("INTRP")) != 0
        cr = (e.mask & e.get_plane_bitmask("CR")) != 0
        defects = e.metadata["BAD_COLUMNS"]
        assert len(defects) == 1
        expected = np.zeros(e.shape, bool)
        for d in defects:
            expected[d["y0"] : d["y1"], d["x"]] = True
        assert np.array_equal(bad, expected)
        assert np.all(intrp[bad | cr])
        n_cr += e.metadata["N_COSMIC_RAYS"]
        # Repaired: the interpolated pixels follow the model, not the defect.
        z = (e.image - sim.model)[bad & ~cr & ((e.mask & e.get_plane_bitmask("SAT")) == 0)] / np.sqrt(
            e.variance[bad & ~cr & ((e.mask & e.get_plane_bitmask("SAT")) == 0)]
        )
        assert np.abs(np.median(z)) < 1.0
        # Cosmic rays deposit 400-4000 electrons (8-80 sigma) per pixel: after repair none of that
        # remains on blank sky (the interpolation of pure noise stays within a few sigma).
        blank_cr = cr & ~bad & (sim.model - _background_plane(e) < 0.5 * np.sqrt(e.variance))
        if blank_cr.any():
            assert np.abs((e.image - sim.model)[blank_cr] / np.sqrt(e.variance[blank_cr])).max() < 10.0
            n_blank_cr += 1
    assert n_cr > 0 and n_blank_cr > 0


def test_unrepaired_defects_stay_in_the_pixels() -> None:
    config = replace(
        get_preset("tiny"), repair_defects=False, cosmic_rays_per_megapixel=200.0, bad_columns_per_detector=2
    )
    plan = plan_survey(config)
    sim = simulate_visit_detector(plan, plan.visits[0].id, 4, keep_model=True, measure=False)
    e = sim.exposure
    z = (e.image - sim.model) / np.sqrt(e.variance)
    cr = (e.mask & e.get_plane_bitmask("CR")) != 0
    assert z[cr].max() > 20  # cosmic-ray charge left in place
    for d in e.metadata["BAD_COLUMNS"]:
        col = z[d["y0"] : d["y1"], d["x"]]
        assert abs(np.median(col)) > 10  # dead (-sky) or hot (+thousands)
    assert not (e.mask & e.get_plane_bitmask("INTRP")).any()


# ------------------------------------------------------------------------------ src


def test_src_recovers_bright_stars(sims) -> None:
    found = total = 0
    ratios, pulls = [], []
    for sim in sims.values():
        e, src, t = sim.exposure, sim.src, sim.truth_sources
        h, w = e.shape
        bright = t[
            (t["sourceType"] != "galaxy")
            & (t["expectedSnr"] > 50)
            & ~t["isSaturated"]
            & (t["neighborFluxFraction"] < 0.05)
            & (t["x"] > 5)
            & (t["x"] < w - 5)
            & (t["y"] > 5)
            & (t["y"] < h - 5)
        ]
        tree = cKDTree(np.column_stack([src["x"], src["y"]]))
        dist, k = tree.query(np.column_stack([bright["x"], bright["y"]]))
        ok = dist < 0.5
        found += int(ok.sum())
        total += len(bright)
        m = src[k[ok]]
        clean = ~(m["pixelFlags_bad"] | m["pixelFlags_cr"] | m["pixelFlags_interpolated"] | m["pixelFlags_edge"])
        ratios += list(m["psfFlux"][clean] / bright["trueFlux"][ok][clean])
        pulls += list((m["psfFlux"][clean] - bright["trueFlux"][ok][clean]) / m["psfFluxErr"][clean])
        ra, dec = e.pixel_to_sky(src["x"], src["y"])
        assert np.allclose(ra, src["coord_ra"]) and np.allclose(dec, src["coord_dec"])
        assert np.all(src["snr"] >= 5.0)
        assert src["id"].min() > 0 and len(set(src["id"])) == len(src)
    assert total > 50
    assert found / total >= 0.95
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)
    assert 0.6 < np.std(pulls) < 1.6


def test_src_detections_are_mostly_real(sims) -> None:
    spurious = total = 0
    for sim in sims.values():
        t = sim.truth_sources
        tree = cKDTree(np.column_stack([t["x"], t["y"]]))
        src = sim.src[~(sim.src["pixelFlags_cr"] | sim.src["pixelFlags_bad"] | sim.src["pixelFlags_saturated"])]
        dist, _ = tree.query(np.column_stack([src["x"], src["y"]]))
        spurious += int((dist > 3.0).sum())
        total += len(src)
        assert (sim.exposure.mask & sim.exposure.get_plane_bitmask("DETECTED")).any()
    assert spurious / total < 0.03
