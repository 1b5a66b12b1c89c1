"""The simulated survey: visits, their WCSs and PSFs, per visit-detector simulation, and the repository.

:func:`plan_survey` turns a :class:`~tasks.simulation.presets.SimulationConfig` into a
:class:`SurveyPlan`: the visits (pointing dithers and small rotations around the field centre,
MJDs, per-visit seeing, airmass, zero point and sky), the truth sky, and a one-tract skymap
covering every visit.  :func:`simulate_visit_detector` makes one calexp with its ``src`` and truth
tables; :func:`write_repository` does all of them and fills a butler repository.

Everything is deterministic by ``config.seed``: each visit-detector draws from its own random
stream (``numpy.random.default_rng([seed, 3, visit, detector])``), so results do not depend on the
order or the process in which visit-detectors are simulated.

Visits
------
For each band, ``n_template_visits`` good-seeing visits a day apart come first, then, after
``season_gap_days``, ``n_science_visits`` visits ``science_cadence_days`` apart.  Visit ids increase
with time from ``visit_id_start``.  Transients start only during the science visits.

WCS
---
TAN about the boresight; focal-plane pixels map to ``(east, north)`` by
``CD = scale * [[-cos r, -sin r], [-sin r, cos r]]`` (``r`` the visit's ``rotation_angle``, north up
and east left at ``r = 0``).  Each detector's WCS is the same projection with ``CRPIX`` at the
boresight's position in the detector's pixel frame.  No optical distortion.

Photometry
----------
``photo_calib`` is exact: ``calibration = 10**(-0.4 (zero_point - 31.4))`` nJy per count, with the
visit's zero point (the band's nominal one, minus extinction ``k (airmass - 1)``, plus a Gaussian
transparency jitter).  A source of ``F`` nJy has ``F / calibration`` counts in the calexp.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from numpy.typing import NDArray

from butler.butler import Butler
from butler.catalog import ColumnSpec, make_source_catalog
from butler.errors import DatasetExistsError
from butler.exposure import Exposure, PhotoCalib, VisitInfo
from butler.instrument import register_instrument
from butler.regions import SkyRegion
from butler.skymap import SkyMap
from butler.skymap_records import register_skymap
from tasks.instruments.simcam import DetectorGeometry, SimCam

from .measure import detect_and_measure
from .presets import SimulationConfig
from .psf_field import PsfField
from .render import (
    SceneSources,
    add_bad_columns,
    add_cosmic_rays,
    add_noise,
    apply_saturation,
    interpolate_rows,
    render_scene,
    sky_background,
)
from .sky import TruthSky, make_truth_sky, tangent_wcs

__all__ = [
    "VisitSpec",
    "SurveyPlan",
    "SimulatedExposure",
    "plan_survey",
    "simulate_visit_detector",
    "write_repository",
    "DATASET_TYPES",
    "TRUTH_COLUMNS",
    "INSTRUMENT_CLASS",
]

_log = logging.getLogger("tasks.simulation.survey")

#: Dotted name of the instrument class (what ``butler register-instrument`` takes).
INSTRUMENT_CLASS = "tasks.instruments.simcam.SimCam"

#: Dataset types written by :func:`write_repository`: name -> (dimensions, storage class).
DATASET_TYPES: dict[str, tuple[tuple[str, ...], str]] = {
    "calexp": (("instrument", "visit", "detector"), "Exposure"),
    "src": (("instrument", "visit", "detector"), "SourceCatalog"),
    "truth_sources": (("instrument", "visit", "detector"), "SourceCatalog"),
    "truth_transients": (("instrument", "visit", "detector"), "SourceCatalog"),
    "truth_sky": (("skymap", "tract"), "ArrowAstropy"),
}

#: Extra (non-conventional) columns of the truth tables, besides id, coord_ra, coord_dec, x, y.
TRUTH_COLUMNS: dict[str, ColumnSpec] = {
    "sourceType": ColumnSpec("U9", None, "star, variable, galaxy or transient"),
    "trueFlux": ColumnSpec("float64", "nJy", "True flux in this visit's band at its MJD"),
    "trueCounts": ColumnSpec("float64", None, "trueFlux in counts of this calexp (trueFlux / calibration)"),
    "trueMag": ColumnSpec("float64", "mag", "AB magnitude of trueFlux (inf when 0)"),
    "baseFlux": ColumnSpec("float64", "nJy", "Static flux: constant sources' flux, variables' mean, 0 for transients"),
    "peakFlux": ColumnSpec("float64", "nJy", "Transients: flux at mjdStart (0 otherwise)"),
    "isActive": ColumnSpec(
        "bool", None, "The source emits at this visit (false only for transients outside their interval)"
    ),
    "expectedSnr": ColumnSpec(
        "float32", None, "Expected S/N of a PSF flux on this calexp (point sources; NaN for galaxies)"
    ),
    "isSaturated": ColumnSpec("bool", None, "Expected raw level at the source centre (3x3) reaches saturation"),
    "neighborFluxFraction": ColumnSpec(
        "float32", None, "Other sources' model flux / own flux inside a circle of 2 PSF FWHM (noiseless)"
    ),
    "psfFwhm": ColumnSpec("float32", "pix", "True PSF FWHM at the source position"),
    "sersicIndex": ColumnSpec("float32", None, "Galaxy Sersic index (NaN for point sources)"),
    "halfLightRadius": ColumnSpec("float32", "arcsec", "Galaxy half-light radius along the major axis"),
    "axisRatio": ColumnSpec("float32", None, "Galaxy minor/major axis ratio"),
    "positionAngle": ColumnSpec("float32", "deg", "Galaxy major-axis position angle, east of north"),
    "mjdStart": ColumnSpec("float64", None, "Transient start MJD (NaN otherwise)"),
    "mjdEnd": ColumnSpec("float64", None, "Transient end MJD (inf: does not end in the survey)"),
    "hostId": ColumnSpec("int64", None, "Host galaxy id of a transient (0 for none)"),
}

#: Margin (pixels) around a detector within which sources are drawn (their light can fall in).
_POINT_MARGIN = 40
_GALAXY_MARGIN = 120


@dataclass(frozen=True)
class VisitSpec:
    """One simulated visit.

    Attributes
    ----------
    id : int
    band, physical_filter : str
    mjd : float
        Exposure midpoint.
    boresight_ra, boresight_dec : float
        Pointing, degrees.
    rotation_deg : float
        Sky rotation of the focal plane, degrees.
    seeing_arcsec : float
        Mean PSF FWHM over the mosaic, arcsec.
    airmass, zero_point, sky_counts : float
        Airmass; AB magnitude of one count; sky level at the boresight, counts per pixel.
    sky_gradient : (float, float)
        Fractional sky change from the boresight to the mosaic edge along X and Y.
    background_residual : (float, float, float)
        Residual background plane left in the calexp, ``a + b u + c v`` counts (u, v in [-1, 1]
        across the detector).
    is_template : bool
        One of the early good-seeing visits (no transients yet).
    psf_field : PsfField
    exposure_time : float
        Seconds.
    """

    id: int
    band: str
    physical_filter: str
    mjd: float
    boresight_ra: float
    boresight_dec: float
    rotation_deg: float
    seeing_arcsec: float
    airmass: float
    zero_point: float
    sky_counts: float
    sky_gradient: tuple[float, float]
    background_residual: tuple[float, float, float]
    is_template: bool
    psf_field: PsfField
    exposure_time: float = 30.0

    @property
    def photo_calib(self) -> PhotoCalib:
        """The visit's exact calibration (nJy per count)."""
        return PhotoCalib.from_zero_point(self.zero_point)


@dataclass
class SurveyPlan:
    """Everything needed to simulate any visit-detector of a survey.

    Attributes
    ----------
    config : SimulationConfig
    camera : SimCam
    visits : list of VisitSpec
        In time order.
    sky : TruthSky
    skymap : SkyMap
        One tract covering every visit-detector.
    """

    config: SimulationConfig
    camera: SimCam
    visits: list[VisitSpec]
    sky: TruthSky
    skymap: SkyMap

    @property
    def detectors(self) -> list[DetectorGeometry]:
        """The simulated detectors."""
        return [self.camera.detector(d) for d in self.config.detector_ids]

    def visit(self, visit_id: int) -> VisitSpec:
        """A visit by id (KeyError when absent)."""
        for visit in self.visits:
            if visit.id == visit_id:
                return visit
        raise KeyError(f"no visit {visit_id} in this survey; visits are {[v.id for v in self.visits]}")

    def detector_wcs(self, visit: VisitSpec, detector: DetectorGeometry) -> WCS:
        """TAN WCS of one detector in one visit (0-based parent pixels)."""
        return _focal_plane_wcs(visit, self.camera.pixel_scale, detector.offset)

    def visit_region(self, visit: VisitSpec) -> SkyRegion:
        """Sky polygon around the simulated detectors of a visit (the focal-plane bounding box)."""
        x0, x1, y0, y1 = _detector_extent(self.detectors)
        wcs = _focal_plane_wcs(visit, self.camera.pixel_scale, (0.0, 0.0))
        ra, dec = wcs.all_pix2world(np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1]), 0)
        return SkyRegion.from_radec(ra, dec)

    def detector_region(self, visit: VisitSpec, detector: DetectorGeometry) -> SkyRegion:
        """Sky polygon of one visit-detector."""
        return SkyRegion.from_wcs_box(self.detector_wcs(visit, detector), detector.bbox)


@dataclass
class SimulatedExposure:
    """The products of one visit-detector.

    Attributes
    ----------
    exposure : Exposure
        The calexp (DETECTED mask set by the ``src`` detection).
    src : astropy.table.Table
        Detected sources.
    truth_sources : astropy.table.Table
        Every source active in this visit whose centre lies on the detector.
    truth_transients : astropy.table.Table
        Every transient (active or not) and variable star whose centre lies on the detector.
    model : numpy.ndarray or None
        The noiseless expectation of the calexp image (sources + residual background), counts, when
        asked for.
    data_id : dict
        ``{"instrument", "visit", "detector"}``.
    timings : dict
        Seconds spent per step.
    """

    exposure: Exposure
    src: Table
    truth_sources: Table
    truth_transients: Table
    model: NDArray[np.float32] | None
    data_id: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- geometry


def _focal_plane_wcs(visit: VisitSpec, pixel_scale: float, offset: tuple[float, float]) -> WCS:
    r = math.radians(visit.rotation_deg)
    s = pixel_scale / 3600.0
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [visit.boresight_ra, visit.boresight_dec]
    wcs.wcs.crpix = [1.0 - offset[0], 1.0 - offset[1]]
    wcs.wcs.cd = np.array([[-math.cos(r), -math.sin(r)], [-math.sin(r), math.cos(r)]]) * s
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.set()
    return wcs


def _detector_extent(detectors: Sequence[DetectorGeometry]) -> tuple[float, float, float, float]:
    """Focal-plane pixel-edge bounds ``(x0, x1, y0, y1)`` of a set of detectors."""
    xs, ys = [], []
    for det in detectors:
        for cx, cy in det.bbox.corners():
            fx, fy = det.to_focal_plane(cx, cy)
            xs.append(fx)
            ys.append(fy)
    return min(xs), max(xs), min(ys), max(ys)


def _field_extent_arcsec(
    config: SimulationConfig, camera: SimCam, margin_px: float
) -> tuple[float, float, float, float]:
    """Tangent-plane box (xi east, eta north; arcsec) that every visit's detectors stay inside."""
    x0, x1, y0, y1 = _detector_extent([camera.detector(d) for d in config.detector_ids])
    corner_radius = max(math.hypot(x, y) for x in (x0, x1) for y in (y0, y1))
    rot = math.radians(config.rotation_deg)
    grow = corner_radius * (math.sin(rot) + 1.0 - math.cos(rot)) + config.dither_arcsec / camera.pixel_scale + margin_px
    s = camera.pixel_scale
    # At rotation 0, xi = -X * scale (east left), eta = Y * scale.
    return (-(x1 + grow) * s, -(x0 - grow) * s, (y0 - grow) * s, (y1 + grow) * s)


def skymap_name(config: SimulationConfig) -> str:
    """Name of the preset's skymap (``simcam_<preset>``)."""
    return f"simcam_{config.name}"


def _make_skymap(config: SimulationConfig, camera: SimCam) -> SkyMap:
    xi0, xi1, eta0, eta1 = _field_extent_arcsec(config, camera, margin_px=2.0 * config.patch_border)
    frame = tangent_wcs(config.field_ra, config.field_dec)
    ra, dec = frame.all_pix2world(0.5 * (xi0 + xi1), 0.5 * (eta0 + eta1), 0)
    radius_deg = 0.5 * max(xi1 - xi0, eta1 - eta0) / 3600.0
    return SkyMap.discrete(
        skymap_name(config),
        [(float(ra) % 360.0, float(dec), radius_deg)],
        patch_inner_dimensions=(config.patch_inner, config.patch_inner),
        patch_border=config.patch_border,
        tract_overlap=0.0,
        pixel_scale=camera.pixel_scale,
    )


# ---------------------------------------------------------------------------------- planning


def plan_survey(config: SimulationConfig) -> SurveyPlan:
    """Visits, truth sky and skymap of a simulated survey (no pixels yet).

    Parameters
    ----------
    config : SimulationConfig
        A preset (see :func:`tasks.simulation.presets.get_preset`).
    """
    camera = SimCam(config.detector_size)
    rng = np.random.default_rng([config.seed, 1])
    frame = tangent_wcs(config.field_ra, config.field_dec)
    radius_px = camera.focal_plane_half_size()
    last_template = config.mjd_start + max(config.n_template_visits - 1, 0) * config.template_cadence_days
    science_start = last_template + config.season_gap_days
    raw_visits: list[dict[str, Any]] = []
    for b_index, band in enumerate(config.bands):
        spec = camera.filter_for_band(band)
        for k in range(config.n_visits_per_band):
            is_template = k < config.n_template_visits
            if is_template:
                mjd = config.mjd_start + k * config.template_cadence_days
                seeing = rng.uniform(*config.seeing_template)
            else:
                mjd = science_start + (k - config.n_template_visits) * config.science_cadence_days
                seeing = rng.uniform(*config.seeing_science)
            mjd += 0.02 * b_index
            d_xi, d_eta = rng.uniform(-config.dither_arcsec, config.dither_arcsec, 2)
            ra, dec = frame.all_pix2world(d_xi, d_eta, 0)
            airmass = rng.uniform(*config.airmass_range)
            zp = spec.zero_point - spec.extinction * (airmass - 1.0) + rng.normal(0.0, config.zero_point_jitter)
            sky = spec.sky_counts * rng.uniform(1.0 - config.sky_jitter, 1.0 + config.sky_jitter)
            g_angle = rng.uniform(0.0, 2.0 * math.pi)
            g_amp = config.sky_gradient * rng.uniform(0.5, 1.0)
            resid = tuple(float(v) for v in rng.uniform(-1.0, 1.0, 3) * config.background_residual)
            psf_field = PsfField.random(
                rng,
                seeing_px=seeing / camera.pixel_scale,
                variation=config.psf_variation,
                radius_px=radius_px,
                ellipticity=config.psf_ellipticity,
                wing_fraction=config.psf_wing_fraction,
            )
            raw_visits.append(
                {
                    "band": band,
                    "physical_filter": spec.name,
                    "mjd": float(mjd),
                    "boresight_ra": float(ra) % 360.0,
                    "boresight_dec": float(dec),
                    "rotation_deg": float(rng.uniform(-config.rotation_deg, config.rotation_deg)),
                    "seeing_arcsec": float(seeing),
                    "airmass": float(airmass),
                    "zero_point": float(zp),
                    "sky_counts": float(sky),
                    "sky_gradient": (g_amp * math.cos(g_angle), g_amp * math.sin(g_angle)),
                    "background_residual": resid,
                    "is_template": is_template,
                    "psf_field": psf_field,
                    "exposure_time": camera.exposure_time,
                }
            )
    raw_visits.sort(key=lambda v: v["mjd"])
    visits = [VisitSpec(id=config.visit_id_start + i, **v) for i, v in enumerate(raw_visits)]

    science_mjds = np.unique(np.round([v.mjd for v in visits if not v.is_template and v.band == config.bands[0]], 6))
    det_area = (config.detector_size * camera.pixel_scale / 3600.0) ** 2
    sky = make_truth_sky(
        config,
        _field_extent_arcsec(config, camera, margin_px=_GALAXY_MARGIN),
        science_mjds,
        det_area,
        rng=np.random.default_rng([config.seed, 2]),
    )
    return SurveyPlan(config=config, camera=camera, visits=visits, sky=sky, skymap=_make_skymap(config, camera))


# ---------------------------------------------------------------------------------- one visit-detector


def _disc_sums(image: NDArray[np.float64], x: NDArray, y: NDArray, radius: NDArray) -> NDArray[np.float64]:
    """Sum of image pixels whose centres lie within ``radius`` of ``(x, y)`` (pixels)."""
    out = np.zeros(x.size)
    if x.size == 0:
        return out
    half = int(math.ceil(float(radius.max()))) + 1
    height, width = image.shape
    offs = np.arange(-half, half + 1)
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    step = max(1, 2_000_000 // (2 * half + 1) ** 2)
    for start in range(0, x.size, step):
        sl = slice(start, start + step)
        rows = iy[sl, None] + offs[None, :]
        cols = ix[sl, None] + offs[None, :]
        stamps = image[np.clip(rows, 0, height - 1)[:, :, None], np.clip(cols, 0, width - 1)[:, None, :]]
        valid = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        dx = (ix[sl] - x[sl])[:, None, None] + offs[None, None, :]
        dy = (iy[sl] - y[sl])[:, None, None] + offs[None, :, None]
        inside = (dx * dx + dy * dy <= (radius[sl] ** 2)[:, None, None]) & valid
        out[sl] = (stamps * inside).sum(axis=(1, 2))
    return out


def _pixel_position_angle(wcs: WCS, pa_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Sky position angles (east of north) -> angles in the pixel frame (from +x towards +y)."""
    cd = wcs.wcs.cd if wcs.wcs.has_cd() else np.diag(wcs.wcs.cdelt)
    inv = np.linalg.inv(cd)
    pa = np.radians(pa_deg)
    east, north = np.sin(pa), np.cos(pa)
    vx = inv[0, 0] * east + inv[0, 1] * north
    vy = inv[1, 0] * east + inv[1, 1] * north
    return np.degrees(np.arctan2(vy, vx))


def simulate_visit_detector(
    plan: SurveyPlan,
    visit_id: int,
    detector_id: int,
    *,
    measure: bool = True,
    keep_model: bool = False,
) -> SimulatedExposure:
    """Simulate one calexp with its ``src`` and truth tables.

    Parameters
    ----------
    plan : SurveyPlan
    visit_id, detector_id : int
    measure : bool
        Run source detection and measurement (``src``); otherwise ``src`` is empty and the
        DETECTED mask is not set.
    keep_model : bool
        Also return the noiseless model of the calexp image.

    Returns
    -------
    SimulatedExposure
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    config, camera = plan.config, plan.camera
    visit = plan.visit(visit_id)
    if detector_id not in config.detector_ids:
        raise KeyError(f"detector {detector_id} is not simulated in preset {config.name!r}: {config.detector_ids}")
    det = camera.detector(detector_id)
    rng = np.random.default_rng([config.seed, 3, visit.id, det.id])
    wcs = plan.detector_wcs(visit, det)
    height, width = det.bbox.shape
    calib = visit.photo_calib
    gain, read_noise = camera.gain, camera.read_noise

    # ---- sources on (or near) the detector
    sky_cat = plan.sky
    xs, ys = wcs.all_world2pix(sky_cat.ra, sky_cat.dec, 0)
    is_point = sky_cat.is_point
    margin = np.where(is_point, _POINT_MARGIN, _GALAXY_MARGIN)
    near = (xs > -margin) & (xs < width - 1 + margin) & (ys > -margin) & (ys < height - 1 + margin)
    flux_all = sky_cat.flux_njy(visit.band, visit.mjd)
    idx = np.flatnonzero(near)
    sub = sky_cat.select(idx)
    x, y = xs[idx], ys[idx]
    flux = flux_all[idx]
    counts = np.asarray(calib.njy_to_counts(flux), dtype=np.float64)
    fx, fy = det.to_focal_plane(x, y)
    fwhm = visit.psf_field.fwhm_at(fx, fy)
    ap_radius = 2.0 * fwhm
    scene = SceneSources(
        x=x,
        y=y,
        counts=counts,
        is_point=sub.is_point,
        sersic_n=np.nan_to_num(sub.sersic_n, nan=1.0),
        r_eff_px=np.nan_to_num(sub.r_eff_arcsec, nan=0.0) / camera.pixel_scale,
        axis_ratio=np.nan_to_num(sub.axis_ratio, nan=1.0),
        theta_deg=_pixel_position_angle(wcs, np.nan_to_num(sub.pa_deg, nan=0.0)),
    )
    t0 = time.perf_counter()
    model, own_ap = render_scene((height, width), scene, visit.psf_field, det, ap_radius)
    timings["render"] = time.perf_counter() - t0

    # ---- sky, noise, saturation, cosmic rays, bad columns
    t0 = time.perf_counter()
    total_ap = _disc_sums(model, x, y, ap_radius)
    u = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    v = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    a, b, c = visit.background_residual
    residual = np.float32(a) + np.float32(b) * u + np.float32(c) * v
    sky = sky_background((height, width), det, visit.sky_counts, visit.sky_gradient, camera.focal_plane_half_size())
    model_out = (model + residual).astype(np.float32) if keep_model else None
    expected = model
    expected += sky  # the model array now holds the expected raw image
    del model
    raw, variance = add_noise(expected, gain, read_noise, rng)
    sat_mask = apply_saturation(raw, camera.saturation, config.bleed_trails)
    cr_mask, n_cr = add_cosmic_rays(raw, config.cosmic_rays_per_megapixel, gain, rng)
    bad_mask, defects = add_bad_columns(raw, config.bad_columns_per_detector, read_noise, gain, rng)
    raw -= sky.astype(np.float32)
    raw += residual
    image = raw
    del sky
    if config.repair_defects:
        interpolate_rows(image, cr_mask | bad_mask)
    timings["noise"] = time.perf_counter() - t0

    exposure = Exposure(
        image,
        variance=variance,
        wcs=wcs,
        psf=visit.psf_field.grid_psf(det, config.psf_grid),
        photo_calib=calib,
        visit_info=VisitInfo(
            exposure_time=visit.exposure_time,
            mjd=visit.mjd,
            airmass=visit.airmass,
            seeing=visit.seeing_arcsec,
            boresight_ra=visit.boresight_ra,
            boresight_dec=visit.boresight_dec,
            rotation_angle=visit.rotation_deg,
            visit_id=visit.id,
        ),
        band=visit.band,
        metadata={
            "SIMULATED": True,
            "SIM_PRESET": config.name,
            "SIM_SEED": config.seed,
            "INSTRUMENT": camera.name,
            "DETECTOR": det.id,
            "DETNAME": det.name,
            "FILTER": visit.physical_filter,
            "ZEROPOINT": visit.zero_point,
            "GAIN": gain,
            "RDNOISE": read_noise,
            "SATURATE": camera.saturation,
            "SKYLEVEL": visit.sky_counts,
            "SKY_GRADIENT": list(visit.sky_gradient),
            "BG_RESIDUAL": list(visit.background_residual),
            "N_COSMIC_RAYS": n_cr,
            "BAD_COLUMNS": defects,
            "REPAIRED": bool(config.repair_defects),
            "TEMPLATE_VISIT": visit.is_template,
            "PSF_FIELD": visit.psf_field.to_dict(),
        },
    )
    exposure.set_mask("SAT", sat_mask)
    exposure.set_mask("CR", cr_mask)
    exposure.set_mask("BAD", bad_mask)
    if config.repair_defects:
        exposure.set_mask("INTRP", cr_mask | bad_mask)

    # ---- truth tables
    t0 = time.perf_counter()
    with np.errstate(invalid="ignore", divide="ignore"):
        neighbor = np.where(own_ap > 0, np.clip(total_ap - own_ap, 0.0, None) / own_ap, np.nan)
    on_chip = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    ixc = np.clip(np.rint(x).astype(np.int64), 0, width - 1)
    iyc = np.clip(np.rint(y).astype(np.int64), 0, height - 1)
    peak = np.zeros(x.size)
    for dy_ in (-1, 0, 1):
        for dx_ in (-1, 0, 1):
            peak = np.maximum(peak, expected[np.clip(iyc + dy_, 0, height - 1), np.clip(ixc + dx_, 0, width - 1)])
    radius_fp = camera.focal_plane_half_size()
    sky_at = visit.sky_counts * (1.0 + (visit.sky_gradient[0] * fx + visit.sky_gradient[1] * fy) / radius_fp)
    saturated = on_chip & (peak >= camera.saturation)
    # Expected PSF-flux S/N of a point source: Var = V_bg * n_eff + (4/3) F / gain (Gaussian PSF).
    comps = visit.psf_field.components_at(fx, fy)
    _, cxx, cyy, cxy = comps[0]
    widen = 1.0 / 12.0
    n_eff = 4.0 * np.pi * np.sqrt((cxx + widen) * (cyy + widen) - cxy * cxy)
    local = sky_at + np.clip(total_ap - own_ap, 0.0, None) / (np.pi * ap_radius**2)
    v_bg = local / gain + (read_noise / gain) ** 2
    with np.errstate(invalid="ignore"):
        snr = np.where(sub.is_point, counts / np.sqrt(v_bg * n_eff + (4.0 / 3.0) * np.abs(counts) / gain), np.nan)
    active = sub.active(visit.mjd)
    peak_flux = np.where(sub.kind == "transient", PhotoCalib.mag_to_njy(sub.base_mag(visit.band)), 0.0)
    ra, dec = sub.ra, sub.dec
    columns = {
        "id": sub.id,
        "coord_ra": ra,
        "coord_dec": dec,
        "x": x,
        "y": y,
        "sourceType": sub.kind,
        "trueFlux": flux,
        "trueCounts": counts,
        "trueMag": np.where(flux > 0, PhotoCalib.njy_to_mag(np.where(flux > 0, flux, 1.0)), np.inf),
        "baseFlux": sub.base_flux_njy(visit.band),
        "peakFlux": peak_flux,
        "isActive": active,
        "expectedSnr": snr,
        "isSaturated": saturated,
        "neighborFluxFraction": neighbor,
        "psfFwhm": fwhm,
        "sersicIndex": sub.sersic_n,
        "halfLightRadius": sub.r_eff_arcsec,
        "axisRatio": sub.axis_ratio,
        "positionAngle": sub.pa_deg,
        "mjdStart": sub.mjd_start,
        "mjdEnd": sub.mjd_end,
        "hostId": sub.host_id,
    }
    meta = {
        "visit": visit.id,
        "detector": det.id,
        "band": visit.band,
        "mjd": visit.mjd,
        "calibration": calib.calibration,
        "apertureRadiusFwhm": 2.0,
    }
    src_rows = on_chip & active
    tr_rows = on_chip & ((sub.kind == "transient") | (sub.kind == "variable"))
    truth_sources = _truth_table(columns, src_rows, meta)
    truth_transients = _truth_table(columns, tr_rows, meta)
    timings["truth"] = time.perf_counter() - t0

    src = make_source_catalog(0)
    if measure:
        t0 = time.perf_counter()
        src = detect_and_measure(
            exposure,
            threshold=config.detection_threshold,
            id_base=(visit.id * 1000 + det.id) * 1_000_000,
        )
        timings["measure"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    _log.info(
        "visit %d detector %d: %d sources drawn, %d truth, %d transients/variables, %d src, %.2f s",
        visit.id,
        det.id,
        idx.size,
        len(truth_sources),
        len(truth_transients),
        len(src),
        timings["total"],
    )
    return SimulatedExposure(
        exposure=exposure,
        src=src,
        truth_sources=truth_sources,
        truth_transients=truth_transients,
        model=model_out,
        data_id={"instrument": camera.name, "visit": visit.id, "detector": det.id},
        timings=timings,
    )


def _truth_table(columns: dict[str, NDArray], rows: NDArray[np.bool_], meta: dict[str, Any]) -> Table:
    n = int(rows.sum())
    table = make_source_catalog(n, extra=TRUTH_COLUMNS, meta=meta)
    for name, values in columns.items():
        table[name][:] = np.asarray(values)[rows].astype(table[name].dtype)
    return table


# ---------------------------------------------------------------------------------- the repository


def _register(butler: Butler, plan: SurveyPlan) -> None:
    config, camera = plan.config, plan.camera
    register_instrument(butler, camera.to_config(), class_name=INSTRUMENT_CLASS)
    register_skymap(butler, plan.skymap)
    for name, (dims, storage_class) in DATASET_TYPES.items():
        butler.register_dataset_type(name, dims, storage_class)
    visit_records, vdr_records = [], []
    for visit in plan.visits:
        visit_records.append(
            {
                "instrument": camera.name,
                "id": visit.id,
                "physical_filter": visit.physical_filter,
                "name": f"{config.name}-{visit.id}",
                "exposure_time": visit.exposure_time,
                "mjd": visit.mjd,
                "seeing": visit.seeing_arcsec,
                "airmass": visit.airmass,
                "boresight_ra": visit.boresight_ra,
                "boresight_dec": visit.boresight_dec,
                "rotation_angle": visit.rotation_deg,
                "region": plan.visit_region(visit),
            }
        )
        for det in plan.detectors:
            vdr_records.append(
                {
                    "instrument": camera.name,
                    "visit": visit.id,
                    "detector": det.id,
                    "region": plan.detector_region(visit, det),
                }
            )
    existing = {
        r["id"]: r for r in butler.query_dimension_records("visit", where="instrument = :i", bind={"i": camera.name})
    }
    for rec in visit_records:
        old = existing.get(rec["id"])
        if old is not None and (
            old.get("physical_filter") != rec["physical_filter"] or abs(float(old.get("mjd") or 0) - rec["mjd"]) > 1e-9
        ):
            raise ValueError(
                f"visit {rec['id']} already exists in this repository with different properties "
                f"(another seed or preset?); use a new repository or another visit_id_start"
            )
    butler.insert_dimension_records("visit", visit_records, skip_existing=True)
    butler.insert_dimension_records("visit_detector_region", vdr_records, skip_existing=True)


def _simulate_task(args: tuple[SurveyPlan, int, int]) -> SimulatedExposure:
    plan, visit_id, detector_id = args
    return simulate_visit_detector(plan, visit_id, detector_id)


def default_run(config: SimulationConfig) -> str:
    """Default RUN collection of a preset: ``SimCam/sim/<preset>``."""
    return f"SimCam/sim/{config.name}"


def write_repository(
    repo: str | Path,
    config: SimulationConfig,
    *,
    run: str | None = None,
    jobs: int = 1,
    visits: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Create (or fill) a butler repository with a simulated survey.

    Registers SimCam, the preset's skymap (``simcam_<preset>``, run ``skymaps``), the visit and
    visit_detector_region records and the dataset types of :data:`DATASET_TYPES`; puts ``calexp``,
    ``src``, ``truth_sources`` and ``truth_transients`` for every visit-detector and ``truth_sky``
    for the tract, into ``run``; and points the CHAINED collection ``SimCam/defaults`` at
    ``[run, ..., skymaps]``.

    Parameters
    ----------
    repo : str or Path
        Repository folder; created when it does not exist.
    config : SimulationConfig
    run : str, optional
        RUN collection; default ``SimCam/sim/<preset>``.
    jobs : int
        Worker processes simulating visit-detectors in parallel (the registry is written by this
        process only).
    visits : iterable of int, optional
        Only these visit ids (all by default).

    Returns
    -------
    dict
        Summary: run, skymap, visits, detectors, datasets written, seconds, per-step timings.

    Raises
    ------
    butler.errors.DatasetExistsError
        If the run already holds these datasets.
    """
    t_start = time.perf_counter()
    repo = Path(repo)
    Butler.create(repo, exist_ok=True)
    run = run or default_run(config)
    plan = plan_survey(config)
    wanted = set(visits) if visits is not None else {v.id for v in plan.visits}
    tasks = [(v.id, d) for v in plan.visits if v.id in wanted for d in config.detector_ids]
    steps: dict[str, float] = {}
    n_written = 0
    with Butler(repo, run=run) as butler:
        _register(butler, plan)
        done = {
            (ref.data_id["visit"], ref.data_id["detector"])
            for ref in butler.query_datasets("calexp", collections=run, instrument=plan.camera.name)
        }
        clash = sorted(set(tasks) & done)
        if clash:
            raise DatasetExistsError(
                f"run {run!r} of {repo} already holds calexp for {len(clash)} visit-detector(s), e.g. visit "
                f"{clash[0][0]} detector {clash[0][1]}; write to another run (--run) or remove it first "
                f"(butler remove-runs {repo} {run})"
            )
        tract = plan.skymap[plan.skymap.tract_ids[0]]
        truth_id = {"skymap": plan.skymap.name, "tract": tract.tract_id}
        if butler.find_dataset("truth_sky", truth_id, collections=run) is None:
            butler.put(plan.sky.to_table(), "truth_sky", truth_id)
            n_written += 1

        def store(result: SimulatedExposure) -> None:
            nonlocal n_written
            for name, obj in (
                ("calexp", result.exposure),
                ("src", result.src),
                ("truth_sources", result.truth_sources),
                ("truth_transients", result.truth_transients),
            ):
                butler.put(obj, name, result.data_id)
                n_written += 1
            for key, value in result.timings.items():
                steps[key] = steps.get(key, 0.0) + value

        t_write = 0.0
        if jobs > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                for result in pool.map(_simulate_task, [(plan, v, d) for v, d in tasks]):
                    t0 = time.perf_counter()
                    store(result)
                    t_write += time.perf_counter() - t0
        else:
            for v, d in tasks:
                result = simulate_visit_detector(plan, v, d)
                t0 = time.perf_counter()
                store(result)
                t_write += time.perf_counter() - t0
        steps["write"] = t_write
        chain = [run]
        existing = [name for name, kind in butler.query_collections("SimCam/defaults") if kind == "CHAINED"]
        if existing:
            chain += [c for c in butler.registry.get_collection_chain("SimCam/defaults") if c not in (run, "skymaps")]
        butler.set_collection_chain("SimCam/defaults", [*chain, "skymaps"])
    seconds = time.perf_counter() - t_start
    _log.info(
        "simulated %d visit-detectors of preset %s into %s (%s) in %.1f s", len(tasks), config.name, repo, run, seconds
    )
    return {
        "repo": str(repo),
        "run": run,
        "skymap": plan.skymap.name,
        "visits": sorted({v for v, _ in tasks}),
        "detectors": list(config.detector_ids),
        "datasets_written": n_written,
        "seconds": seconds,
        "steps": steps,
    }
