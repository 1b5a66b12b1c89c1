"""Simulated template/science pairs with truth, for the diffim tests and benchmarks.

:func:`make_simulated_pair` renders, with :mod:`tasks.simulation`, one science visit-detector and a
template *on the same pixel grid*: a copy of a good-seeing template visit re-pointed at the
science visit's boresight and rotation (so no warping is involved and the true photometric scale
is exactly ``calib_template / calib_science``), optionally deeper (``template_depth`` times the
exposure: zero point and sky scaled, so its relative noise drops by ``sqrt(template_depth)``).
The template visit predates every transient; variables have their template-epoch flux.

:func:`match_truth` and :func:`transient_recovery` score a DIA source catalog against the truth
tables (completeness by difference-image S/N, false positives, PSF-flux bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from butler.exposure import Exposure
from tasks.simulation import SimulationConfig, get_preset, plan_survey, simulate_visit_detector

__all__ = [
    "SimulatedPair",
    "make_simulated_pair",
    "match_truth",
    "transient_recovery",
    "expected_difference_snr",
    "residual_statistics",
]


@dataclass
class SimulatedPair:
    """A simulated science exposure, a template on its pixel grid, and the truth.

    Attributes
    ----------
    template, science : Exposure
    sources : astropy.table.Table
        The science ``src`` catalog (kernel candidates).
    truth_sources, truth_transients : astropy.table.Table
        The science visit's truth tables (see :mod:`tasks.simulation.survey`).
    template_truth : astropy.table.Table
        Truth sources of the template epoch (fluxes of variables at the template's MJD).
    true_scale : float
        ``calib_template / calib_science``: the true kernel sum (template counts -> science counts).
    config : SimulationConfig
    science_visit, template_visit, detector : int
    science_model : numpy.ndarray or None
        Noiseless science image (counts) when asked for.
    """

    template: Exposure
    science: Exposure
    sources: Table
    truth_sources: Table
    truth_transients: Table
    template_truth: Table
    true_scale: float
    config: SimulationConfig
    science_visit: int
    template_visit: int
    detector: int
    science_model: np.ndarray | None = None


def make_simulated_pair(
    config: SimulationConfig | str = "tiny",
    *,
    detector: int | None = None,
    science_index: int = -1,
    template_index: int = 0,
    template_depth: float = 1.0,
    keep_model: bool = False,
) -> SimulatedPair:
    """Simulate a science visit-detector and a template on the same pixel grid.

    Parameters
    ----------
    config : SimulationConfig or str
        A preset or its name.
    detector : int, optional
        Detector id (default: the preset's first).
    science_index, template_index : int
        Which science visit (among the non-template visits, in time order) and which template
        visit to use.
    template_depth : float
        Template exposure relative to a single visit (>= 1 for a deeper template).
    keep_model : bool
        Also keep the noiseless science image.
    """
    cfg = get_preset(config) if isinstance(config, str) else config
    det = cfg.detector_ids[0] if detector is None else int(detector)
    plan = plan_survey(cfg)
    science_visits = [v for v in plan.visits if not v.is_template and v.band == cfg.bands[0]]
    template_visits = [v for v in plan.visits if v.is_template and v.band == cfg.bands[0]]
    if not science_visits or not template_visits:
        raise ValueError(f"preset {cfg.name!r} needs template and science visits")
    sv = science_visits[science_index]
    tv = template_visits[template_index]
    depth = float(template_depth)
    if depth <= 0:
        raise ValueError(f"template_depth must be positive, got {depth}")
    fake_id = max(v.id for v in plan.visits) + 1 + template_index
    fake = replace(
        tv,
        id=fake_id,
        boresight_ra=sv.boresight_ra,
        boresight_dec=sv.boresight_dec,
        rotation_deg=sv.rotation_deg,
        zero_point=tv.zero_point + 2.5 * math.log10(depth),
        sky_counts=tv.sky_counts * depth,
        exposure_time=tv.exposure_time * depth,
    )
    plan = replace(plan, visits=[*plan.visits, fake])
    sim_t = simulate_visit_detector(plan, fake.id, det, measure=False)
    sim_s = simulate_visit_detector(plan, sv.id, det, keep_model=keep_model)
    scale = sim_t.exposure.photo_calib.calibration / sim_s.exposure.photo_calib.calibration
    return SimulatedPair(
        template=sim_t.exposure,
        science=sim_s.exposure,
        sources=sim_s.src,
        truth_sources=sim_s.truth_sources,
        truth_transients=sim_s.truth_transients,
        template_truth=sim_t.truth_sources,
        true_scale=float(scale),
        config=cfg,
        science_visit=sv.id,
        template_visit=tv.id,
        detector=det,
        science_model=sim_s.model,
    )


def expected_difference_snr(difference: Exposure, x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """S/N of a PSF flux of ``counts`` at parent positions ``(x, y)`` on a difference image.

    ``counts / sigma_F`` with ``sigma_F = sqrt(sum(P^2 V)) / sum(P^2)`` (the PSF-fit error for the
    difference's PSF and variance plane): the significance an ideal detector would measure.
    """
    out = np.full(np.shape(x), np.nan)
    x0, y0 = difference.xy0
    h, w = difference.shape
    var = difference.variance
    for k, (xx, yy, c) in enumerate(zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(counts), strict=True)):
        stamp, sx0, sy0 = difference.psf.shifted_image(float(xx), float(yy))
        sx0 -= x0
        sy0 -= y0
        sh, sw = stamp.shape
        xa, xb = max(sx0, 0), min(sx0 + sw, w)
        ya, yb = max(sy0, 0), min(sy0 + sh, h)
        if xa >= xb or ya >= yb:
            continue
        p = stamp[ya - sy0 : yb - sy0, xa - sx0 : xb - sx0]
        v = var[ya:yb, xa:xb]
        if not np.all(np.isfinite(v)):
            continue
        p2 = float((p * p).sum())
        sigma = math.sqrt(float((p * p * v).sum())) / p2
        out[k] = c / sigma
    return out


def match_truth(catalog: Table, truth: Table, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest truth row within ``radius`` pixels of each catalog row (``-1`` when none) and distances."""
    if len(catalog) == 0 or len(truth) == 0:
        return np.full(len(catalog), -1), np.full(len(catalog), np.inf)
    tree = cKDTree(np.column_stack([np.asarray(truth["x"]), np.asarray(truth["y"])]))
    dist, idx = tree.query(np.column_stack([np.asarray(catalog["x"]), np.asarray(catalog["y"])]),
                           distance_upper_bound=radius)
    idx = np.where(np.isfinite(dist), idx, -1)
    return idx, dist


def transient_recovery(
    dia: Table,
    pair: SimulatedPair,
    difference: Exposure,
    *,
    match_radius: float = 3.0,
    snr_bins: tuple[float, ...] = (5.0, 10.0, np.inf),
) -> dict[str, Any]:
    """Score DIA sources against the truth of a simulated pair.

    Changing sources: transients active in the science visit and variables whose flux changed
    between the template and science epochs; the expected difference flux is
    ``trueCounts_science - scale^-1 ...`` computed in science counts.  A DIA source is a *true*
    detection when a changing source lies within ``match_radius`` pixels; otherwise it is a false
    positive (``false_positives``), split into those near a bright (saturated) star and those on
    blank sky (no truth source with S/N > 5 within 3 PSF FWHMs).

    Returns
    -------
    dict
        ``completeness`` per S/N bin (``"5-10"``, ``"10-inf"``: found / expected), ``n_expected``
        per bin, ``flux_ratio_median`` (measured / true difference flux for matched transients with
        S/N >= 10), ``false_positives``, ``false_positives_blank``, ``false_positives_bright``,
        ``n_dia``.
    """
    calib_s = pair.science.photo_calib.calibration
    tt = pair.truth_transients
    tmpl = {int(i): f for i, f in zip(pair.template_truth["id"], pair.template_truth["trueFlux"], strict=True)}
    flux_then = np.array([tmpl.get(int(i), 0.0) for i in tt["id"]])
    delta_njy = np.asarray(tt["trueFlux"], dtype=float) - flux_then
    delta_counts = delta_njy / calib_s
    changing = np.abs(delta_njy) > 0
    snr = expected_difference_snr(difference, np.asarray(tt["x"]), np.asarray(tt["y"]), delta_counts)
    transients = np.asarray(tt["sourceType"]) == "transient"
    # truth rows eligible for completeness: transients on good pixels
    mask = difference.mask
    x0, y0 = difference.xy0
    ix = np.clip(np.rint(np.asarray(tt["x"]) - x0).astype(int), 0, difference.width - 1)
    iy = np.clip(np.rint(np.asarray(tt["y"]) - y0).astype(int), 0, difference.height - 1)
    bad_bits = difference.get_plane_bitmask([p for p in ("SAT", "BAD", "NO_DATA", "EDGE") if p in difference.mask_planes])
    on_good = (mask[iy, ix] & bad_bits) == 0
    if "isSaturated" in tt.colnames:
        on_good &= ~np.asarray(tt["isSaturated"], dtype=bool)

    found = np.zeros(len(tt), dtype=bool)
    matched_flux = np.full(len(tt), np.nan)
    if len(dia):
        tree = cKDTree(np.column_stack([np.asarray(dia["x"]), np.asarray(dia["y"])]))
        dist, idx = tree.query(np.column_stack([np.asarray(tt["x"]), np.asarray(tt["y"])]), distance_upper_bound=match_radius)
        ok = np.isfinite(dist)
        found[ok] = True
        matched_flux[ok] = np.asarray(dia["psfFlux"])[idx[ok]]
    out: dict[str, Any] = {"completeness": {}, "n_expected": {}, "n_found": {}}
    for lo, hi in zip(snr_bins[:-1], snr_bins[1:], strict=True):
        sel = transients & changing & on_good & (np.abs(snr) >= lo) & (np.abs(snr) < hi)
        key = f"{lo:g}-{hi:g}"
        n = int(np.count_nonzero(sel))
        out["n_expected"][key] = n
        out["n_found"][key] = int(np.count_nonzero(found & sel))
        out["completeness"][key] = float(np.count_nonzero(found & sel) / n) if n else float("nan")
    bright = transients & changing & on_good & found & (np.abs(snr) >= 10)
    ratio = matched_flux[bright] / delta_njy[bright]
    out["flux_ratio_median"] = float(np.median(ratio)) if ratio.size else float("nan")
    out["flux_ratio_mean"] = float(np.mean(ratio)) if ratio.size else float("nan")
    out["n_flux_matched"] = int(ratio.size)

    # false positives: DIA sources with no changing truth source nearby
    ts = pair.truth_sources
    real = changing
    fp_idx = []
    if len(dia):
        tree_c = cKDTree(np.column_stack([np.asarray(tt["x"])[real], np.asarray(tt["y"])[real]])) if real.any() else None
        for k in range(len(dia)):
            if tree_c is not None and tree_c.query_ball_point([dia["x"][k], dia["y"][k]], r=match_radius):
                continue
            fp_idx.append(k)
    fp_idx = np.array(fp_idx, dtype=int)
    out["false_positives"] = int(fp_idx.size)
    n_bright = 0
    if fp_idx.size and len(ts):
        fwhm = float(np.nanmedian(np.asarray(ts["psfFwhm"]))) if "psfFwhm" in ts.colnames else 4.0
        brightish = (np.asarray(ts["isSaturated"], dtype=bool) | (np.nan_to_num(np.asarray(ts["expectedSnr"], dtype=float)) > 200)
                     | (np.asarray(ts["sourceType"]) == "galaxy"))
        tree_b = cKDTree(np.column_stack([np.asarray(ts["x"])[brightish], np.asarray(ts["y"])[brightish]])) if brightish.any() else None
        for k in fp_idx:
            if tree_b is not None and tree_b.query_ball_point([dia["x"][k], dia["y"][k]], r=4 * fwhm):
                n_bright += 1
    out["false_positives_near_bright"] = n_bright
    out["false_positives_blank"] = int(fp_idx.size - n_bright)
    out["false_positive_rows"] = fp_idx.tolist()
    out["n_dia"] = len(dia)
    return out


def residual_statistics(
    difference: Exposure,
    pair: SimulatedPair,
    *,
    blank_radius_fwhm: float = 4.0,
    star_radius_fwhm: float = 2.0,
    bright_snr: float = 100.0,
) -> dict[str, Any]:
    """``difference / sqrt(variance)`` statistics on blank sky and near bright static stars.

    *Blank sky*: unmasked pixels farther than ``blank_radius_fwhm`` PSF FWHMs from every truth
    source (galaxies: also beyond 4 half-light radii) of the science or template epoch.
    *Near stars*: unmasked pixels within ``star_radius_fwhm`` FWHMs of stars (not variables) with
    expected S/N above ``bright_snr`` that are not saturated and have no other source within
    ``blank_radius_fwhm`` FWHMs.  ``std`` is the plain standard deviation of the normalized
    residual, ``mean`` its mean.
    """
    x0, y0 = difference.xy0
    h, w = difference.shape
    z = difference.image / np.sqrt(difference.variance)
    bad_bits = difference.get_plane_bitmask([p for p in ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT")
                                             if p in difference.mask_planes])
    usable = np.isfinite(z) & ((difference.mask & bad_bits) == 0)
    ts = pair.truth_sources
    fwhm = float(np.nanmedian(np.asarray(ts["psfFwhm"]))) if len(ts) else 4.0
    pixel_scale = difference.pixel_scale() if difference.wcs is not None else 0.2
    occupied = np.zeros((h, w), dtype=bool)
    rows = []
    for table in (ts, pair.template_truth, pair.truth_transients):
        for row in table:
            radius = blank_radius_fwhm * fwhm
            if str(row["sourceType"]) == "galaxy" and np.isfinite(row["halfLightRadius"]):
                radius = max(radius, 4.0 * float(row["halfLightRadius"]) / pixel_scale)
            rows.append((float(row["x"]) - x0, float(row["y"]) - y0, radius))
    yy_cache: dict[int, np.ndarray] = {}
    for x, y, radius in rows:
        r = int(math.ceil(radius))
        xa, xb = max(int(x) - r, 0), min(int(x) + r + 2, w)
        ya, yb = max(int(y) - r, 0), min(int(y) + r + 2, h)
        if xa >= xb or ya >= yb:
            continue
        gy, gx = np.ogrid[ya:yb, xa:xb]
        occupied[ya:yb, xa:xb] |= (gx - x) ** 2 + (gy - y) ** 2 <= radius**2
    del yy_cache
    blank = usable & ~occupied
    near = np.zeros((h, w), dtype=bool)
    kind = np.asarray(ts["sourceType"])
    snr = np.nan_to_num(np.asarray(ts["expectedSnr"], dtype=float))
    sat = np.asarray(ts["isSaturated"], dtype=bool)
    iso = np.asarray(ts["neighborFluxFraction"], dtype=float) < 0.05
    chosen = (kind == "star") & (snr > bright_snr) & ~sat & iso
    radius = star_radius_fwhm * fwhm
    n_stars = 0
    for row in ts[chosen]:
        x, y = float(row["x"]) - x0, float(row["y"]) - y0
        r = int(math.ceil(radius))
        xa, xb = max(int(x) - r, 0), min(int(x) + r + 2, w)
        ya, yb = max(int(y) - r, 0), min(int(y) + r + 2, h)
        if xa >= xb or ya >= yb:
            continue
        gy, gx = np.ogrid[ya:yb, xa:xb]
        disc = (gx - x) ** 2 + (gy - y) ** 2 <= radius**2
        if not usable[ya:yb, xa:xb][disc].all():
            continue
        near[ya:yb, xa:xb] |= disc
        n_stars += 1
    zb = z[blank]
    zn = z[near & usable]
    return {
        "blank_std": float(np.std(zb)) if zb.size else float("nan"),
        "blank_mean": float(np.mean(zb)) if zb.size else float("nan"),
        "blank_pixels": int(zb.size),
        "near_star_std": float(np.std(zn)) if zn.size else float("nan"),
        "near_star_mean": float(np.mean(zn)) if zn.size else float("nan"),
        "near_star_pixels": int(zn.size),
        "n_bright_stars": n_stars,
        "fwhm": fwhm,
    }
