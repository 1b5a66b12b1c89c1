"""Simulated template/science pairs with truth, for the diffim tests and benchmarks.

:func:`make_simulated_pair` renders, with :mod:`tasks.simulation`, one science visit-detector and a
template *on the same pixel grid*: a copy of a good-seeing template visit re-pointed at the
science visit's boresight and rotation (so no warping is involved and the true photometric scale
is exactly ``calib_template / calib_science``), optionally deeper (``template_depth`` times the
exposure: zero point and sky scaled, so its relative noise drops by ``sqrt(template_depth)``).
The template visit predates every transient; variables have their template-epoch flux.

:func:`subtract_with_true_kernel` runs ``ImageDifferenceTask`` with the simulator's exact kernel
(:func:`true_matching_kernel`: the PSFs are analytic Gaussians) and differential background in
place of the fitted ones: the yardstick of what a perfect kernel gives on the same noise.

:func:`match_truth` and :func:`transient_recovery` score a DIA source catalog against the truth
tables (completeness by difference-image S/N, false positives, PSF-flux bias);
:func:`residual_statistics` measures ``difference / sqrt(variance)`` on blank sky and near bright
stars.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from butler.exposure import Exposure
from pipeline.struct import Struct
from tasks.instruments.simcam import DetectorGeometry, SimCam
from tasks.psfmatch import SpatialKernel
from tasks.psfmatch.chebyshev import ChebyshevBasis2D
from tasks.simulation import PsfField, SimulationConfig, get_preset, plan_survey, simulate_visit_detector

from .make_kernel import BackgroundModel, MakeKernelTask
from .subtract import ImageDifferenceConfig, ImageDifferenceTask

_log = logging.getLogger(__name__)

__all__ = [
    "SimulatedPair",
    "make_simulated_pair",
    "true_matching_kernel",
    "TrueKernelTask",
    "subtract_with_true_kernel",
    "match_truth",
    "transient_recovery",
    "expected_difference_snr",
    "residual_statistics",
    "clean_around",
    "UNUSABLE_PLANES",
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

    @property
    def detector_geometry(self) -> DetectorGeometry:
        """The simulated detector's place in the focal plane (where the PSF fields are defined)."""
        return SimCam(self.config.detector_size).detector(self.detector)


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


def _simulated_psf_field(exposure: Exposure, role: str) -> PsfField:
    """The analytic PSF of a simulated exposure (``PSF_FIELD`` in its metadata)."""
    data = exposure.metadata.get("PSF_FIELD")
    if data is None:
        raise ValueError(
            f"the {role} exposure is not simulated (no PSF_FIELD in its metadata): its true PSF is unknown"
        )
    field = PsfField(**data)
    if field.wing_fraction > 0:
        raise ValueError(
            f"the {role} PSF has a wing component (wing_fraction={field.wing_fraction:g}): the true kernel "
            "between two Gaussian mixtures is not a Gaussian; simulate with psf_wing_fraction=0"
        )
    return field


def _sampled_gaussians(cxx: np.ndarray, cyy: np.ndarray, cxy: np.ndarray, size: int) -> np.ndarray:
    """Centred ``(n, size, size)`` Gaussians sampled at pixel centres, each summing to 1."""
    half = size // 2
    grid = np.arange(-half, half + 1, dtype=np.float64)
    det = cxx * cyy - cxy * cxy
    a = (cyy / det)[:, None, None]
    b = (-cxy / det)[:, None, None]
    c = (cxx / det)[:, None, None]
    dx = grid[None, None, :]
    dy = grid[None, :, None]
    images = np.exp(-0.5 * (a * dx * dx + 2.0 * b * dx * dy + c * dy * dy))
    return images / images.sum(axis=(1, 2), keepdims=True)


def true_matching_kernel(
    convolved: Exposure,
    reference: Exposure,
    detector: DetectorGeometry,
    *,
    kernel_size: int | None = None,
    spatial_order: int = 3,
    n_samples: int = 9,
) -> SpatialKernel:
    """The exact PSF-matching kernel and differential background between two simulated exposures.

    The simulator's PSFs are pixel-integrated elliptical Gaussians of covariance ``C(x, y)``
    (:mod:`tasks.simulation.psf_field`), so ``convolved (x) K = reference`` for the Gaussian ``K``
    of covariance ``C_reference - C_convolved`` (the pixel boxes cancel), scaled by
    ``calibration_convolved / calibration_reference`` (counts of one image into counts of the
    other).  ``K`` is sampled at pixel centres on an ``n_samples x n_samples`` grid of positions
    and each kernel pixel is fitted with a Chebyshev polynomial of ``spatial_order`` in position:
    the returned kernel has one basis image per Chebyshev term (its coefficients are the identity),
    so its sum is the true scale everywhere.  The background is the difference of the two calexps'
    residual background planes (``BG_RESIDUAL``: ``a + b u + c v`` with ``u, v`` in ``[-1, 1]``
    over the detector), ``reference - scale * convolved``: a first-order Chebyshev polynomial.

    Parameters
    ----------
    convolved, reference : Exposure
        Simulated exposures of one detector on its full pixel box (``PSF_FIELD``, ``BG_RESIDUAL``
        in their metadata): ``convolved (x) K + background ~= reference``.
    detector : DetectorGeometry
        The detector (maps its pixels to the focal plane, where the PSF fields are defined).
    kernel_size : int, optional
        Odd kernel size; at least 5 sigmas of the widest kernel either way (default: just that).
    spatial_order : int
        Chebyshev order of the kernel's spatial model.
    n_samples : int
        Sample positions per axis for the spatial fit.

    Returns
    -------
    SpatialKernel

    Raises
    ------
    ValueError
        If an exposure is not simulated, is not on the full detector box, has a two-component PSF,
        or if ``reference``'s PSF is not wider than ``convolved``'s in every direction (sigma
        of ``K`` below 0.5 px somewhere: the match would need a deconvolution).
    """
    bbox = detector.bbox
    for exposure, role in ((convolved, "convolved"), (reference, "reference")):
        if exposure.bbox != bbox:
            raise ValueError(f"the {role} exposure {exposure.bbox} is not on the detector box {bbox}")
    field_c = _simulated_psf_field(convolved, "convolved")
    field_r = _simulated_psf_field(reference, "reference")
    g = np.linspace(0.0, 1.0, n_samples)
    xs, ys = np.meshgrid(bbox.x0 + g * (bbox.width - 1), bbox.y0 + g * (bbox.height - 1))
    xs, ys = xs.ravel(), ys.ravel()
    fx, fy = detector.to_focal_plane(xs, ys)
    (_, cxx_c, cyy_c, cxy_c), = field_c.components_at(fx, fy)
    (_, cxx_r, cyy_r, cxy_r), = field_r.components_at(fx, fy)
    cxx, cyy, cxy = cxx_r - cxx_c, cyy_r - cyy_c, cxy_r - cxy_c
    mean = 0.5 * (cxx + cyy)
    spread = np.sqrt((0.5 * (cxx - cyy)) ** 2 + cxy**2)
    minor, major = mean - spread, mean + spread
    if float(minor.min()) < 0.25:
        raise ValueError(
            f"the reference PSF is not wider than the convolved one in every direction (smallest kernel variance "
            f"{float(minor.min()):.3f} px^2 < 0.25): no Gaussian matching kernel; convolve the other image"
        )
    size = 2 * int(math.ceil(5.0 * math.sqrt(float(major.max())))) + 1
    if kernel_size is not None:
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        size = max(size, int(kernel_size))
    scale = convolved.photo_calib.calibration / reference.photo_calib.calibration
    images = scale * _sampled_gaussians(cxx, cyy, cxy, size)
    funcs = ChebyshevBasis2D(bbox, spatial_order)
    design = funcs.evaluate(xs, ys)
    terms, *_ = np.linalg.lstsq(design, images.reshape(images.shape[0], -1), rcond=None)
    fit = (design @ terms).reshape(images.shape)
    peak = float(np.abs(images).max())
    _log.debug("true kernel: %d px, spatial order %d, largest fit residual %.2g of the peak",
               size, spatial_order, float(np.abs(fit - images).max()) / peak)
    bg_c = np.asarray(convolved.metadata.get("BG_RESIDUAL", (0.0, 0.0, 0.0)), dtype=np.float64)
    bg_r = np.asarray(reference.metadata.get("BG_RESIDUAL", (0.0, 0.0, 0.0)), dtype=np.float64)
    background = bg_r - scale * bg_c
    return SpatialKernel(
        terms.reshape(funcs.n_terms, size, size), np.eye(funcs.n_terms), background, bbox, spatial_order, 1
    )


class TrueKernelTask(MakeKernelTask):
    """A drop-in ``makeKernel`` subtask that returns the simulator's true kernel instead of fitting one.

    :meth:`run` takes the same arguments as :meth:`MakeKernelTask.run` and returns a Struct with
    the same fields (``candidates`` empty, ``diagnostics`` and ``basis`` None); the kernel size is
    the one :class:`MakeKernelTask` would choose for the two PSFs (or larger when the true kernel
    needs it).  Set :attr:`detector` before running.
    """

    _DefaultName = "makeKernel"

    detector: DetectorGeometry | None = None

    def run(
        self,
        template: Exposure,
        science: Exposure,
        kernelSources: Table,  # noqa: N803
        preconvolved: bool = False,
    ) -> Struct:
        """The true kernel matching ``template`` to ``science`` (see :func:`true_matching_kernel`)."""
        if self.detector is None:
            raise ValueError("TrueKernelTask.detector is not set")
        fwhm_t, fwhm_s = self.getFwhms(template, science, preconvolved)
        size = self.makeKernelBasis(fwhm_t, fwhm_s).kernel_size
        kernel = true_matching_kernel(template, science, self.detector, kernel_size=size)
        cx, cy = science.bbox.center
        self.metadata["kernelSize"] = kernel.kernel_size
        self.metadata["kernelSumCentre"] = float(kernel.kernel_sum(cx, cy))
        self.metadata["backgroundCentre"] = float(kernel.background(cx, cy))
        return Struct(
            psfMatchingKernel=kernel,
            backgroundModel=BackgroundModel(kernel),
            diagnostics=None,
            basis=None,
            candidates=[],
        )


def subtract_with_true_kernel(pair: SimulatedPair, config: ImageDifferenceConfig | None = None) -> Struct:
    """Run :class:`ImageDifferenceTask` on a simulated pair with the true kernel (no kernel fit).

    Everything else -- the choice of the convolved image, convolution, masks, decorrelation, the
    difference's PSF -- is the task's own, so comparing its products with a normal run isolates
    the kernel fit.

    Parameters
    ----------
    pair : SimulatedPair
    config : ImageDifferenceConfig, optional

    Returns
    -------
    Struct
        ``ImageDifferenceTask.run``'s result.
    """
    task = ImageDifferenceTask(config=config)
    true_task = TrueKernelTask(config=task.config.makeKernel, name="makeKernel", parentTask=task)
    true_task.detector = pair.detector_geometry
    task.makeKernel = true_task
    return task.run(pair.template, pair.science, pair.sources)


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


def _changing_sources(pair: SimulatedPair) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``pair.truth_transients`` that changed between the epochs, and their change in nJy.

    Returns
    -------
    changing : numpy.ndarray of bool
        Per truth-transient row: its flux differs between the template and science epochs.
    delta_njy : numpy.ndarray
        Science-epoch minus template-epoch flux, nJy.
    """
    tt = pair.truth_transients
    then = {int(i): f for i, f in zip(pair.template_truth["id"], pair.template_truth["trueFlux"], strict=True)}
    flux_then = np.array([then.get(int(i), 0.0) for i in tt["id"]], dtype=np.float64)
    delta_njy = np.asarray(tt["trueFlux"], dtype=np.float64) - flux_then
    return np.abs(delta_njy) > 0, delta_njy


def clean_around(
    exposure: Exposure, x: np.ndarray, y: np.ndarray, planes: tuple[str, ...], radius: int
) -> np.ndarray:
    """True where no pixel within ``radius`` (a square) of the parent positions has a bit of ``planes``."""
    bits = exposure.get_plane_bitmask([p for p in planes if p in exposure.mask_planes])
    x0, y0 = exposure.xy0
    ix = np.rint(np.asarray(x, dtype=np.float64) - x0).astype(np.int64)
    iy = np.rint(np.asarray(y, dtype=np.float64) - y0).astype(np.int64)
    inside = (ix >= 0) & (ix < exposure.width) & (iy >= 0) & (iy < exposure.height)
    clean = inside.copy()
    if not bits:
        return clean
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            jx = np.clip(ix + dx, 0, exposure.width - 1)
            jy = np.clip(iy + dy, 0, exposure.height - 1)
            clean &= (exposure.mask[jy, jx] & bits) == 0
    return clean


#: Mask planes that keep a transient out of the completeness sample (LSST's bad-source flags).
UNUSABLE_PLANES = ("SAT", "BAD", "NO_DATA", "EDGE")


def transient_recovery(
    dia: Table,
    pair: SimulatedPair,
    difference: Exposure,
    *,
    reference: Exposure | None = None,
    match_radius: float = 3.0,
    blend_radius_fwhm: float = 2.0,
    mask_radius: int = 2,
    snr_bins: tuple[float, ...] = (5.0, 10.0, np.inf),
) -> dict[str, Any]:
    """Score DIA sources against the truth of a simulated pair.

    *Changing sources* are the truth-transient rows (transients and variable stars) whose flux
    differs between the template and science epochs; their expected difference flux is
    ``trueFlux(science) - trueFlux(template)`` (nJy) and their S/N that of a PSF flux on the
    difference image (:func:`expected_difference_snr`).

    The completeness sample (``eligible``) holds the changing *transients* that

    - have no other changing source within ``blend_radius_fwhm`` PSF FWHMs (transients cluster on
      their hosts, up to several within a pixel of one another: blends are one DIA source);
    - have no ``SAT``, ``BAD``, ``NO_DATA`` or ``EDGE`` pixel within ``mask_radius`` pixels (a
      square) of their centre on the difference (and on ``reference``), and are not saturated:
      the detection drops sources flagged there.

    A DIA source within ``match_radius`` pixels of an eligible transient *finds* it.  A DIA source
    with no changing source (eligible or not) within ``match_radius`` is a false positive,
    classed as *near bright* (a saturated or S/N > 200 truth source, or a galaxy, within 4 FWHMs),
    *near a source* (any other truth source of either epoch within 2 FWHMs) or *blank* (neither).

    Parameters
    ----------
    dia : astropy.table.Table
        DIA sources (``x``, ``y``, ``psfFlux`` in nJy).
    pair : SimulatedPair
    difference : Exposure
        The difference image the DIA sources come from.
    reference : Exposure, optional
        Another difference of the same pair (e.g. made with the true kernel,
        :func:`subtract_with_true_kernel`): S/N are computed on it and the eligible sample also
        needs clean pixels there, so that two subtractions are scored on the same transients in
        the same S/N bins.
    match_radius : float
        Pixels.
    blend_radius_fwhm : float
        Isolation radius of an eligible transient, in FWHMs of the difference's PSF.
    mask_radius : int
        Half-size, pixels, of the square that must be free of unusable mask bits.
    snr_bins : tuple of float
        Edges of the S/N bins (on ``|S/N|``).

    Returns
    -------
    dict
        ``completeness``, ``n_expected``, ``n_found``: per S/N bin (keys ``"5-10"``,
        ``"10-inf"``); ``flux_ratio_median`` and ``flux_ratio_mean`` (measured ``psfFlux`` over the
        true difference flux, eligible found transients with ``|S/N| >= 10``; ``n_flux_matched``);
        ``false_positives`` with ``false_positives_blank``, ``false_positives_near_source``,
        ``false_positives_near_bright`` and the DIA row numbers ``false_positive_rows`` and their
        classes ``false_positive_class``; ``n_dia``, ``n_blended``; and per truth-transient row
        arrays for pooling several pairs: ``snr``, ``eligible``, ``found``, ``flux_ratio`` (NaN
        unless found).
    """
    tt = pair.truth_transients
    changing, delta_njy = _changing_sources(pair)
    calib_s = pair.science.photo_calib.calibration
    tx = np.asarray(tt["x"], dtype=np.float64)
    ty = np.asarray(tt["y"], dtype=np.float64)
    base = difference if reference is None else reference
    snr = expected_difference_snr(base, tx, ty, delta_njy / calib_s)
    cx, cy = difference.bbox.center
    fwhm = float(difference.psf.fwhm(cx, cy))

    blended = np.zeros(len(tt), dtype=bool)
    if np.count_nonzero(changing) > 1:
        idx = np.flatnonzero(changing)
        tree = cKDTree(np.column_stack([tx[idx], ty[idx]]))
        neighbours = tree.query_ball_point(np.column_stack([tx[idx], ty[idx]]), r=blend_radius_fwhm * fwhm)
        for k, hits in zip(idx, neighbours, strict=True):
            blended[k] = len(hits) > 1
    eligible = changing & (np.asarray(tt["sourceType"]) == "transient") & ~blended & np.isfinite(snr)
    eligible &= clean_around(difference, tx, ty, UNUSABLE_PLANES, mask_radius)
    if reference is not None:
        eligible &= clean_around(reference, tx, ty, UNUSABLE_PLANES, mask_radius)
    if "isSaturated" in tt.colnames:
        eligible &= ~np.asarray(tt["isSaturated"], dtype=bool)

    found = np.zeros(len(tt), dtype=bool)
    flux_ratio = np.full(len(tt), np.nan)
    if len(dia):
        tree = cKDTree(np.column_stack([np.asarray(dia["x"]), np.asarray(dia["y"])]))
        dist, j = tree.query(np.column_stack([tx, ty]), distance_upper_bound=match_radius)
        ok = np.isfinite(dist) & changing
        found[ok] = True
        with np.errstate(invalid="ignore", divide="ignore"):
            flux_ratio[ok] = np.asarray(dia["psfFlux"], dtype=np.float64)[j[ok]] / delta_njy[ok]
    out: dict[str, Any] = {"completeness": {}, "n_expected": {}, "n_found": {}}
    for lo, hi in zip(snr_bins[:-1], snr_bins[1:], strict=True):
        sel = eligible & (np.abs(snr) >= lo) & (np.abs(snr) < hi)
        key = f"{lo:g}-{hi:g}"
        n = int(np.count_nonzero(sel))
        out["n_expected"][key] = n
        out["n_found"][key] = int(np.count_nonzero(found & sel))
        out["completeness"][key] = float(np.count_nonzero(found & sel) / n) if n else float("nan")
    bright = eligible & found & (np.abs(snr) >= 10)
    ratio = flux_ratio[bright]
    out["flux_ratio_median"] = float(np.median(ratio)) if ratio.size else float("nan")
    out["flux_ratio_mean"] = float(np.mean(ratio)) if ratio.size else float("nan")
    out["n_flux_matched"] = int(ratio.size)

    # false positives: DIA sources with no changing source nearby
    fp_rows: list[int] = []
    fp_class: list[str] = []
    if len(dia):
        dx = np.asarray(dia["x"], dtype=np.float64)
        dy = np.asarray(dia["y"], dtype=np.float64)
        tree_c = cKDTree(np.column_stack([tx[changing], ty[changing]])) if changing.any() else None
        statics = [t for t in (pair.truth_sources, pair.template_truth) if len(t)]
        bright_xy, any_xy = [], []
        for t in statics:
            kind = np.asarray(t["sourceType"])
            snr_t = np.nan_to_num(np.asarray(t["expectedSnr"], dtype=float))
            loud = np.asarray(t["isSaturated"], dtype=bool) | (snr_t > 200) | (kind == "galaxy")
            bright_xy.append(np.column_stack([np.asarray(t["x"]), np.asarray(t["y"])])[loud])
            any_xy.append(np.column_stack([np.asarray(t["x"]), np.asarray(t["y"])]))
        tree_b = cKDTree(np.concatenate(bright_xy)) if bright_xy and sum(len(b) for b in bright_xy) else None
        tree_a = cKDTree(np.concatenate(any_xy)) if any_xy else None
        for k in range(len(dia)):
            point = [dx[k], dy[k]]
            if tree_c is not None and tree_c.query_ball_point(point, r=match_radius):
                continue
            fp_rows.append(k)
            if tree_b is not None and tree_b.query_ball_point(point, r=4.0 * fwhm):
                fp_class.append("near_bright")
            elif tree_a is not None and tree_a.query_ball_point(point, r=2.0 * fwhm):
                fp_class.append("near_source")
            else:
                fp_class.append("blank")
    out["false_positives"] = len(fp_rows)
    out["false_positives_blank"] = fp_class.count("blank")
    out["false_positives_near_source"] = fp_class.count("near_source")
    out["false_positives_near_bright"] = fp_class.count("near_bright")
    out["false_positive_rows"] = fp_rows
    out["false_positive_class"] = fp_class
    out["n_dia"] = len(dia)
    out["n_blended"] = int(np.count_nonzero(blended & changing & (np.asarray(tt["sourceType"]) == "transient")))
    out["snr"] = snr
    out["eligible"] = eligible
    out["found"] = found
    out["flux_ratio"] = flux_ratio
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
    expected S/N above ``bright_snr`` that are not saturated, whose neighbours add less than 5% to
    their flux within 2 FWHMs (``neighborFluxFraction``), and with no changing source (a transient
    or variable whose flux differs between the epochs) within ``blank_radius_fwhm`` FWHMs: what is
    left there is the subtraction's own residual.  Stars whose disc holds an unusable pixel are
    skipped.  ``std`` is the plain standard deviation of the normalized residual, ``mean`` its
    mean.

    Parameters
    ----------
    difference : Exposure
    pair : SimulatedPair
    blank_radius_fwhm, star_radius_fwhm : float
        Radii in FWHMs of the science PSF (median over the truth sources).
    bright_snr : float
        Smallest expected S/N of the stars of the near-star statistic.

    Returns
    -------
    dict
        ``blank_std``, ``blank_mean``, ``blank_pixels``, ``near_star_std``, ``near_star_mean``,
        ``near_star_pixels``, ``near_star_sum`` and ``near_star_sum_sq`` (to pool the near-star
        pixels of several pairs), ``n_bright_stars``, ``fwhm``.
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
    for x, y, radius in rows:
        r = int(math.ceil(radius))
        xa, xb = max(int(x) - r, 0), min(int(x) + r + 2, w)
        ya, yb = max(int(y) - r, 0), min(int(y) + r + 2, h)
        if xa >= xb or ya >= yb:
            continue
        gy, gx = np.ogrid[ya:yb, xa:xb]
        occupied[ya:yb, xa:xb] |= (gx - x) ** 2 + (gy - y) ** 2 <= radius**2
    blank = usable & ~occupied
    near = np.zeros((h, w), dtype=bool)
    kind = np.asarray(ts["sourceType"])
    snr = np.nan_to_num(np.asarray(ts["expectedSnr"], dtype=float))
    sat = np.asarray(ts["isSaturated"], dtype=bool)
    iso = np.asarray(ts["neighborFluxFraction"], dtype=float) < 0.05
    chosen = (kind == "star") & (snr > bright_snr) & ~sat & iso
    changing, _ = _changing_sources(pair)
    if changing.any() and chosen.any():
        tree = cKDTree(np.column_stack([np.asarray(pair.truth_transients["x"])[changing],
                                        np.asarray(pair.truth_transients["y"])[changing]]))
        dist, _ = tree.query(np.column_stack([np.asarray(ts["x"]), np.asarray(ts["y"])]))
        chosen &= dist > blank_radius_fwhm * fwhm
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
    zb = z[blank].astype(np.float64)
    zn = z[near & usable].astype(np.float64)
    return {
        "blank_std": float(np.std(zb)) if zb.size else float("nan"),
        "blank_mean": float(np.mean(zb)) if zb.size else float("nan"),
        "blank_pixels": int(zb.size),
        "near_star_std": float(np.std(zn)) if zn.size else float("nan"),
        "near_star_mean": float(np.mean(zn)) if zn.size else float("nan"),
        "near_star_pixels": int(zn.size),
        "near_star_sum": float(zn.sum()),
        "near_star_sum_sq": float((zn * zn).sum()),
        "n_bright_stars": n_stars,
        "fwhm": fwhm,
    }
