"""Image subtraction against simulator truth, on the ``small`` preset's 1024x1024 detectors.

Every number is scored against the simulator's truth (:mod:`tasks.diffim.testing`), and the
transient numbers also against the same subtraction made with the *true* kernel
(:func:`~tasks.diffim.testing.subtract_with_true_kernel`: the simulator's exact kernel and
differential background in place of the fitted ones, everything else the task's own), which shows
what a perfect kernel achieves on the same noise.  The targets are the image-differencing issue's:

- ``difference / sqrt(variance)`` on source-free pixels: std in [0.98, 1.02]; within 2 FWHM of
  bright non-variable stars: std <= 1.03;
- kernel sum within 1% of the true photometric scale;
- transients: completeness >= 95% at S/N >= 10, at S/N 5-10 within 2 points of the true kernel's;
  no false positive on blank sky beyond the noise peaks the true-kernel subtraction also detects;
  saturated stars masked and flagged, not reported; PSF fluxes unbiased within 2%;
- the same with strongly varying PSFs and with a science PSF narrower than the template's.

Cases (each a few visit-detectors, template depth 1 -- a single good-seeing template visit, as
:func:`~tasks.diffim.testing.make_simulated_pair` makes by default):

- ``preset``: the ``small`` preset itself, the last science visit of each of its four detectors;
- ``transients``: the preset with three times its transients, peak magnitudes 21-23.5, so that a
  few visit-detectors hold enough transients at S/N 5-30 for completeness numbers (six pairs);
- ``varying``: ``transients`` with ``psf_variation=0.3`` (FWHMs changing by 15-20% across a detector);
- ``narrow``: ``transients`` with template seeing 0.9-1.0" and science seeing 0.6-0.7" (the science
  image is the one convolved).

The pairs are simulated, subtracted (fitted and true kernel) and measured once per case, on first
use; tests then read the summaries.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.diffim.detect_measure import DetectAndMeasureConfig, DetectAndMeasureTask
from tasks.diffim.subtract import ImageDifferenceConfig, ImageDifferenceTask
from tasks.diffim.testing import (
    SimulatedPair,
    make_simulated_pair,
    residual_statistics,
    subtract_with_true_kernel,
    transient_recovery,
    true_matching_kernel,
)
from tasks.simulation import SimulationConfig, get_preset

#: Science tests on simulated 1024x1024 pairs: ~40 s of CPU for the whole module.
pytestmark = pytest.mark.slow

SMALL = get_preset("small")
MORE_TRANSIENTS = replace(SMALL, transient_density=3 * SMALL.transient_density, transient_mag_range=(21.0, 23.5))
CASES: dict[str, tuple[SimulationConfig, tuple[tuple[int, int], ...]]] = {
    "preset": (SMALL, ((3, -1), (4, -1), (5, -1), (7, -1))),
    "transients": (MORE_TRANSIENTS, ((3, -2), (4, -2), (5, -2), (7, -2), (3, -3), (4, -3))),
    "varying": (replace(MORE_TRANSIENTS, psf_variation=0.3), ((5, -1), (7, -1))),
    "narrow": (replace(MORE_TRANSIENTS, seeing_template=(0.9, 1.0), seeing_science=(0.6, 0.7)), ((4, -1), (5, -1))),
}
#: The default-seeing cases, pooled for the transient numbers.
DEFAULT_SEEING = ("preset", "transients")

#: A blank-sky false positive is a noise peak when the true-kernel S/N there reaches the threshold.
DETECTION_THRESHOLD = DetectAndMeasureConfig().detectionThreshold
SHARED_PEAK_TOLERANCE = 0.2  # sigma; see test_no_false_positives_on_blank_sky


@dataclass
class Side:
    """Scores of one subtraction (fitted or true kernel) of one pair."""

    residuals: dict[str, Any]
    recovery: dict[str, Any]
    n_dia: int


@dataclass
class PairResult:
    """Everything the tests read about one simulated pair."""

    label: str
    convolved: str
    true_kernel_sum: float
    kernel_sums: list[float]
    spatial_order: int
    ours: Side
    true: Side
    eligible: np.ndarray
    blank_fp_true_snr: list[tuple[float, float]]
    saturation: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _saturation_summary(pair: SimulatedPair, result: Any, dia: Any, fwhm: float) -> dict[str, int]:
    """Saturated stars (either epoch, centre on the detector): masked? reported? flagged when kept?"""
    diff = result.subtractedExposure
    sat_bit = diff.get_plane_bitmask("SAT")
    cfg = DetectAndMeasureConfig()
    cfg.doRemoveBadSources = False
    kept = DetectAndMeasureTask(config=cfg).run(pair.science, result.matchedExposure, diff).diaSources
    xs, ys = [], []
    for table in (pair.truth_sources, pair.template_truth):
        sat = np.asarray(table["isSaturated"], dtype=bool)
        x, y = np.asarray(table["x"])[sat], np.asarray(table["y"])[sat]
        on = (x > -0.5) & (x < diff.width - 0.5) & (y > -0.5) & (y < diff.height - 0.5)
        for xx, yy in zip(x[on], y[on], strict=True):
            if not any(math.hypot(xx - a, yy - b) < 1.0 for a, b in zip(xs, ys, strict=True)):
                xs.append(float(xx))
                ys.append(float(yy))
    out = {"stars": len(xs), "masked": 0, "reported": 0, "kept_near": 0, "kept_flagged": 0}
    radius = 3.0 * fwhm
    for x, y in zip(xs, ys, strict=True):
        out["masked"] += int((diff.mask[int(round(y)), int(round(x))] & sat_bit) != 0)
        out["reported"] += int(np.count_nonzero(np.hypot(dia["x"] - x, dia["y"] - y) < radius))
        near = np.hypot(kept["x"] - x, kept["y"] - y) < radius
        out["kept_near"] += int(np.count_nonzero(near))
        out["kept_flagged"] += int(np.count_nonzero(near & np.asarray(kept["pixelFlags_saturated"], dtype=bool)))
    return out


def _score_pair(config: SimulationConfig, detector: int, science_index: int, with_saturation: bool) -> PairResult:
    """Simulate one pair, subtract it with the fitted and the true kernel, detect, and score both."""
    start = time.perf_counter()
    pair = make_simulated_pair(config, detector=detector, science_index=science_index)
    task = ImageDifferenceTask()
    ours = task.run(pair.template, pair.science, pair.sources)
    true = subtract_with_true_kernel(pair)
    convolved = task.metadata["convolvedImage"]
    truth = pair.true_scale if convolved == "template" else 1.0 / pair.true_scale
    md = task.makeKernel.metadata
    sides = {}
    dias = {}
    scores = {}
    for name, result in (("ours", ours), ("true", true)):
        detect = DetectAndMeasureTask()
        measured = detect.run(pair.science, result.matchedExposure, result.subtractedExposure)
        dias[name] = measured.diaSources
        scores[name] = measured.scoreExposure.image
        recovery = transient_recovery(
            measured.diaSources, pair, result.subtractedExposure, reference=true.subtractedExposure
        )
        sides[name] = Side(residual_statistics(result.subtractedExposure, pair), recovery, len(measured.diaSources))
    eligible = sides["ours"].recovery["eligible"] & sides["true"].recovery["eligible"]
    # blank-sky false positives of ours, with the true-kernel S/N at their place (same sign)
    blank_fp = []
    rec = sides["ours"].recovery
    dia = dias["ours"]
    x0, y0 = true.subtractedExposure.xy0
    h, w = scores["true"].shape
    for row, kind in zip(rec["false_positive_rows"], rec["false_positive_class"], strict=True):
        if kind != "blank":
            continue
        ix, iy = int(round(dia["x"][row] - x0)), int(round(dia["y"][row] - y0))
        patch = scores["true"][max(iy - 1, 0) : min(iy + 2, h), max(ix - 1, 0) : min(ix + 2, w)]
        sign = -1.0 if dia["isNegative"][row] else 1.0
        blank_fp.append((float(dia["snr"][row]) * sign, float((sign * patch).max())))
    label = f"{pair.science_visit}/{detector}"
    result = PairResult(
        label=label,
        convolved=convolved,
        true_kernel_sum=truth,
        kernel_sums=[md["kernelSumCentre"], *md["kernelSumCorners"]],
        spatial_order=md["spatialKernelOrder"],
        ours=sides["ours"],
        true=sides["true"],
        eligible=eligible,
        blank_fp_true_snr=blank_fp,
    )
    if with_saturation:
        fwhm = float(ours.subtractedExposure.psf.fwhm(*ours.subtractedExposure.bbox.center))
        result.saturation = _saturation_summary(pair, ours, dias["ours"], fwhm)
    result.seconds = time.perf_counter() - start
    return result


@functools.cache
def _case(name: str) -> list[PairResult]:
    config, pairs = CASES[name]
    return [_score_pair(config, det, index, with_saturation=name == "preset") for det, index in pairs]


@functools.cache
def _debug_pair() -> SimulatedPair:
    return make_simulated_pair(SMALL, detector=4, science_index=-1)


# ---------------------------------------------------------------------------------- pooling
def _pooled_completeness(results: list[PairResult], side: str, lo: float, hi: float) -> tuple[float, int, int]:
    found = n = 0
    for r in results:
        rec = getattr(r, side).recovery
        snr = np.abs(rec["snr"])
        sel = r.eligible & (snr >= lo) & (snr < hi)
        n += int(np.count_nonzero(sel))
        found += int(np.count_nonzero(sel & rec["found"]))
    return (found / n if n else float("nan")), found, n


def _pooled_flux_ratio(results: list[PairResult], side: str) -> tuple[float, int]:
    ratios = []
    for r in results:
        rec = getattr(r, side).recovery
        sel = r.eligible & rec["found"] & (np.abs(rec["snr"]) >= 10)
        ratios.append(rec["flux_ratio"][sel])
    values = np.concatenate(ratios)
    return float(np.median(values)), int(values.size)


def _pooled_near_star_std(results: list[PairResult], side: str) -> tuple[float, int, int]:
    n = s = s2 = 0.0
    stars = 0
    for r in results:
        res = getattr(r, side).residuals
        n += res["near_star_pixels"]
        s += res["near_star_sum"]
        s2 += res["near_star_sum_sq"]
        stars += res["n_bright_stars"]
    return math.sqrt(s2 / n - (s / n) ** 2), int(n), stars


def _default_seeing() -> list[PairResult]:
    return [r for name in DEFAULT_SEEING for r in _case(name)]


def _pooled(case: str) -> list[PairResult]:
    """The pairs of a case; ``"default seeing"`` pools the ``preset`` and ``transients`` cases."""
    return _default_seeing() if case == "default seeing" else _case(case)


# ---------------------------------------------------------------------------------- the yardstick
def test_the_true_kernel_maps_the_template_psf_onto_the_science_psf() -> None:
    """template PSF (x) K / scale == science PSF (the simulator's analytic PSFs), and sum(K) == scale."""
    from scipy.signal import fftconvolve

    from tasks.simulation import PsfField

    pair = _debug_pair()
    kernel = true_matching_kernel(pair.template, pair.science, pair.detector_geometry)
    field_t = PsfField(**pair.template.metadata["PSF_FIELD"])
    field_s = PsfField(**pair.science.metadata["PSF_FIELD"])
    for x, y in [(0, 0), (1023, 0), (400, 700), (1023, 1023)]:
        psf_t = field_t.kernel_image(pair.detector_geometry, x, y, 41)
        psf_s = field_s.kernel_image(pair.detector_geometry, x, y, 41)
        k = kernel.kernel_image(x, y)
        assert k.sum() == pytest.approx(pair.true_scale, rel=1e-9)
        matched = fftconvolve(psf_t, k, mode="same") / pair.true_scale
        assert np.abs(matched - psf_s).max() < 1e-3 * psf_s.max()


@pytest.mark.parametrize("case", ["default seeing", "varying", "narrow"])
def test_the_true_kernel_meets_the_targets(case: str) -> None:
    """The truth machinery itself: with the true kernel the targets are met (so they are attainable)."""
    results = _pooled(case)
    minimum = 100 if case == "default seeing" else 30
    for r in results:
        assert 0.98 <= r.true.residuals["blank_std"] <= 1.02, r.label
        assert abs(r.true.residuals["blank_mean"]) <= 0.01, r.label  # the true differential background
    near, pixels, stars = _pooled_near_star_std(results, "true")
    assert stars >= 10 and pixels > 2000
    assert near <= 1.03
    complete, _, n = _pooled_completeness(results, "true", 10.0, np.inf)
    assert n >= minimum and complete >= 0.95
    ratio, n_flux = _pooled_flux_ratio(results, "true")
    assert n_flux >= minimum and abs(ratio - 1.0) <= 0.02


# ---------------------------------------------------------------------------------- residuals
@pytest.mark.parametrize("case", ["preset", "transients", "varying", "narrow"])
def test_blank_sky_normalized_residual(case: str) -> None:
    """std of difference / sqrt(variance) on source-free pixels in [0.98, 1.02], every pair."""
    for r in _case(case):
        assert r.ours.residuals["blank_pixels"] > 300_000, r.label
        assert 0.98 <= r.ours.residuals["blank_std"] <= 1.02, (r.label, r.ours.residuals["blank_std"])


@pytest.mark.parametrize(
    "case",
    [
        # With the kernel's spatial variation from the PSF models (makeKernel.usePsfModelVariation):
        # preset 1.001 over 33 stars (1.044 without; true kernel 0.996), varying 1.009 over 12 (1.304
        # without; 0.998), narrow 1.009 over 25 (1.006 without; 1.010)
        "preset",
        "varying",
        "narrow",
    ],
)
def test_near_bright_star_normalized_residual(case: str) -> None:
    """std of difference / sqrt(variance) within 2 FWHM of bright static stars <= 1.03 (pooled pixels)."""
    results = _case(case)
    near, pixels, stars = _pooled_near_star_std(results, "ours")
    true_near, _, _ = _pooled_near_star_std(results, "true")
    assert stars >= 10 and pixels > 2000
    assert near <= 1.03, f"near-star std {near:.3f} over {stars} stars (true kernel {true_near:.3f})"


# ---------------------------------------------------------------------------------- kernel sum
@pytest.mark.parametrize("case", ["preset", "transients", "varying", "narrow"])
def test_kernel_sum_matches_the_photometric_scale(case: str) -> None:
    """The kernel sums to the true scale (template -> science counts, or the inverse) within 1%,
    at the centre and at the four corners."""
    for r in _case(case):
        errors = [k / r.true_kernel_sum - 1.0 for k in r.kernel_sums]
        assert max(abs(e) for e in errors) <= 0.01, (r.label, errors)


def test_the_convolved_image_is_the_sharper_one() -> None:
    """Mode auto: the narrow-science case convolves the science image, the others the template."""
    assert {r.convolved for r in _case("narrow")} == {"science"}
    assert {r.convolved for r in _case("preset")} == {"template"}


# ---------------------------------------------------------------------------------- transients
@pytest.mark.parametrize("case", ["default seeing", "varying", "narrow"])
def test_completeness_at_snr_above_10(case: str) -> None:
    """>= 95% of isolated transients with S/N >= 10 on clean pixels are found."""
    complete, found, n = _pooled_completeness(_pooled(case), "ours", 10.0, np.inf)
    assert n >= (100 if case == "default seeing" else 30)
    assert complete >= 0.95, f"{found}/{n}"


def test_completeness_at_snr_5_to_10_matches_the_true_kernel() -> None:
    """At S/N 5-10 the completeness is within 2 points of the true kernel's (same transients, same noise)."""
    results = _default_seeing()
    ours, found, n = _pooled_completeness(results, "ours", 5.0, 10.0)
    true, found_true, _ = _pooled_completeness(results, "true", 5.0, 10.0)
    assert n >= 60
    assert abs(ours - true) <= 0.02, f"ours {found}/{n} = {ours:.3f}, true kernel {found_true}/{n} = {true:.3f}"


@pytest.mark.parametrize("case", ["default seeing", "varying", "narrow"])
def test_psf_fluxes_are_unbiased(case: str) -> None:
    """Median measured / true difference flux of recovered S/N >= 10 transients within 2% of 1."""
    ratio, n = _pooled_flux_ratio(_pooled(case), "ours")
    assert n >= (100 if case == "default seeing" else 30)
    assert abs(ratio - 1.0) <= 0.02, f"median flux ratio {ratio:.4f} over {n} transients"


@pytest.mark.parametrize("case", ["default seeing", "varying", "narrow"])
def test_no_false_positives_on_blank_sky(case: str) -> None:
    """Every blank-sky DIA source without a changing source is a noise peak the true kernel shares.

    At a 5-sigma threshold a perfect subtraction still detects ~0.3 noise peaks per 1024x1024
    difference (Gaussian-field peak density); a false positive of ours is a noise peak when the
    true-kernel subtraction also reaches it there (its S/N, same sign, within a pixel), to within
    ``SHARED_PEAK_TOLERANCE`` sigma: two kernels filter the template's noise slightly differently,
    so one noise peak can be 4.92 sigma in one difference and 5.00 in the other.  A residual of a
    wrong kernel sits where the true kernel sees nothing.  None may be left.
    """
    unexplained = [
        (r.label, fp)
        for r in _pooled(case)
        for fp in r.blank_fp_true_snr
        if fp[1] < DETECTION_THRESHOLD - SHARED_PEAK_TOLERANCE
    ]
    assert unexplained == []


def test_saturated_stars_are_masked_flagged_and_not_reported() -> None:
    """Saturated stars (either epoch): SAT in the difference at their centre, no DIA source within
    3 FWHM; kept (doRemoveBadSources=False), the sources there carry pixelFlags_saturated."""
    results = _case("preset")
    total = {k: sum(r.saturation[k] for r in results) for k in results[0].saturation}
    assert total["stars"] >= 8
    assert total["masked"] == total["stars"]
    assert total["reported"] == 0
    assert total["kept_near"] >= total["stars"]  # the cores are detected: removal has work to do
    assert total["kept_flagged"] == total["kept_near"]


# ---------------------------------------------------------------------------------- debug displays
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_NAMES = ("kernel_basis", "kernel_mosaic", "candidates", "spatial_model")


def _png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_debug_plots_are_written_when_asked(tmp_path: Path) -> None:
    """doWriteDebugPlots: four valid, non-blank PNGs; the candidates display shows used and rejected ones."""
    from tasks.diffim.debug_plots import GOOD_FRAME, REJECTED_FRAME

    pair = _debug_pair()
    config = ImageDifferenceConfig()
    config.doWriteDebugPlots = True
    config.debugPlotDir = str(tmp_path / "plots")
    task = ImageDifferenceTask(config=config)
    result = task.run(pair.template, pair.science, pair.sources)
    statuses = [c.status for c in result.subtractRes.candidates]
    assert "good" in statuses and "rejected" in statuses  # both kinds are drawn
    written = sorted(Path(p) for p in task.metadata["debugPlots"])
    prefix = f"{pair.science_visit}_{pair.detector}"
    assert written == sorted(tmp_path / "plots" / f"{prefix}_{name}.png" for name in PLOT_NAMES)
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = _png_pixels(path)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 300, (path.name, pixels.shape)
        assert pixels.std() > 10, path.name  # not a blank canvas
    # the candidates display frames used candidates green and rejected ones red
    pixels = _png_pixels(tmp_path / "plots" / f"{prefix}_candidates.png").astype(int)
    for colour in (GOOD_FRAME, REJECTED_FRAME):
        target = np.rint(np.asarray(colour) * 255).astype(int)
        assert np.count_nonzero(np.abs(pixels - target).max(axis=-1) <= 8) > 500, colour


def test_no_debug_plots_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default nothing is written (not even the default debugPlotDir in the working directory)."""
    monkeypatch.chdir(tmp_path)
    pair = _debug_pair()
    task = ImageDifferenceTask()
    assert task.config.doWriteDebugPlots is False
    task.run(pair.template, pair.science, pair.sources)
    assert "debugPlots" not in task.metadata
    assert list(tmp_path.rglob("*")) == []
