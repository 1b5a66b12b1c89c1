"""MakeKernelTask: kernel fits against truth, candidate selection, robust clipping, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import vstack

from butler.geometry import Box
from butler.psf import GaussianPsf
from tasks.diffim.errors import InsufficientKernelSourcesError, KernelSolutionError, MissingPsfError
from tasks.diffim.make_kernel import MakeKernelConfig, MakeKernelTask, consensus_value, weighted_median
from tasks.psfmatch.testing import corner_grid_psf, make_psf_matching_pair, render_stars

SCALE = 1.15
PLANE = (4.0, 2e-3, -3e-3)
SHAPE = (512, 512)


@pytest.fixture(scope="module")
def varying_pair():
    """Template sigma 1.2 px; science PSF varying from sigma 1.8 to 2.2 px across the image."""
    psf = corner_grid_psf((1.8, 2.0, 1.9, 2.2), Box(0, 0, *SHAPE[::-1]))
    return make_psf_matching_pair(
        shape=SHAPE, n_stars=250, scale=SCALE, background=PLANE, science_psf=psf, seed=21
    )


def test_kernel_matches_truth_with_varying_psf(varying_pair) -> None:
    task = MakeKernelTask()
    result = task.run(varying_pair.template, varying_pair.science, varying_pair.sources)
    kernel = result.psfMatchingKernel
    for x, y in [(0, 0), (511, 0), (0, 511), (511, 511), (256, 256)]:
        assert kernel.kernel_sum(x, y) == pytest.approx(SCALE, rel=0.01)
        assert float(result.backgroundModel(x, y)) == pytest.approx(varying_pair.true_background(x, y), abs=0.5)
    # the kernel widens where the science PSF does (lower left sigma 1.8, upper right 2.2)
    def width(x: float, y: float) -> float:
        k = kernel.kernel_image(x, y)
        h = k.shape[0] // 2
        off = np.arange(-h, h + 1)
        return float(np.sqrt((k.sum(axis=0) * off**2).sum() / k.sum()))

    assert width(511, 511) > width(0, 0) + 0.3
    md = task.metadata
    assert md["n_used"] >= 100 and md["kernelSumConsistent"]
    # the PSF models' variation is order 2; the stars fit what is left, at the order cross-validation picks
    assert md["kernelSize"] == kernel.kernel_size and md["kernelOrder"] == kernel.kernel_order == 2
    assert md["psfModelVariation"] > 0.05 and md["spatialKernelOrder"] in (0, 1, 2)
    assert set(md["spatialOrderScores"]) == {"0", "1", "2"}
    assert md["fwhm_science"] > md["fwhm_template"]
    img = result.backgroundModel.image(Box(10, 20, 30, 40))
    assert img.shape == (40, 30) and img.dtype == np.float32
    assert np.allclose(img, kernel.background_image(Box(10, 20, 30, 40)), atol=1e-4)


def test_cross_validation_keeps_a_varying_kernel_without_the_psf_models(varying_pair) -> None:
    """From the stars alone (order 1 or 2; the bilinear PSF grid's cross term is small)."""
    cfg = MakeKernelConfig()
    cfg.usePsfModelVariation = False
    task = MakeKernelTask(config=cfg)
    kernel = task.run(varying_pair.template, varying_pair.science, varying_pair.sources).psfMatchingKernel
    assert task.metadata["spatialKernelOrder"] == task.metadata["kernelOrder"] == kernel.kernel_order >= 1
    assert task.metadata["psfModelVariation"] == 0.0
    for x, y in [(0, 0), (511, 511)]:
        assert kernel.kernel_sum(x, y) == pytest.approx(SCALE, rel=0.01)


def test_cross_validation_lowers_the_order_of_a_constant_kernel() -> None:
    """Constant PSFs: held-out candidates prefer a constant kernel; 'fixed' keeps the configured order."""
    pair = make_psf_matching_pair(
        shape=SHAPE, n_stars=250, scale=SCALE, background=PLANE, template_psf=GaussianPsf(1.3),
        science_psf=GaussianPsf(2.0), seed=4,
    )
    task = MakeKernelTask()
    result = task.run(pair.template, pair.science, pair.sources)
    scores = {int(k): v for k, v in task.metadata["spatialOrderScores"].items()}
    assert result.psfMatchingKernel.kernel_order == min(scores, key=scores.get) == 0
    for x, y in [(0, 0), (511, 511), (256, 256)]:
        assert result.psfMatchingKernel.kernel_sum(x, y) == pytest.approx(SCALE, rel=0.01)
    cfg = MakeKernelConfig()
    cfg.spatialOrderSelection = "fixed"
    fixed = MakeKernelTask(config=cfg)
    assert fixed.run(pair.template, pair.science, pair.sources).psfMatchingKernel.kernel_order == 2
    assert fixed.metadata["spatialOrderScores"] == {}
    cfg.spatialOrderSelection = "best"
    with pytest.raises(ValueError, match="spatialOrderSelection"):
        cfg.validate()


def test_sources_missing_from_the_template_are_not_kernel_candidates() -> None:
    """Transients (science only) in the source list: rejected before the fit, the scale and background kept."""
    pair = make_psf_matching_pair(shape=SHAPE, n_stars=200, scale=SCALE, background=PLANE, seed=8)
    rng = np.random.default_rng(3)
    n_new = 60
    xs, ys = rng.uniform(30, SHAPE[1] - 30, n_new), rng.uniform(30, SHAPE[0] - 30, n_new)
    fluxes = rng.uniform(2e4, 1e5, n_new)
    science = pair.science.copy()
    science.image += render_stars(SHAPE, science.psf, xs, ys, fluxes).astype(np.float32)
    extra = pair.sources[:n_new].copy()
    extra["id"] = 10_000 + np.arange(n_new)
    extra["x"], extra["y"], extra["psfFlux"] = xs, ys, fluxes
    sources = vstack([pair.sources, extra])
    task = MakeKernelTask()
    result = task.run(pair.template, science, sources)
    rejected = {c.source_id for c in result.candidates if c.reason.startswith("aperture")}
    new_ids = set(extra["id"])
    candidates_new = {c.source_id for c in result.candidates} & new_ids
    assert candidates_new and candidates_new <= rejected  # every transient candidate is rejected
    assert task.metadata["kernelSumCentre"] == pytest.approx(SCALE, rel=0.01)
    assert float(result.backgroundModel(256, 256)) == pytest.approx(pair.true_background(256, 256), abs=0.5)
    cfg = MakeKernelConfig()
    cfg.minStampSignalToNoise = 0.0
    unscreened = MakeKernelTask(config=cfg)
    unscreened.run(pair.template, science, sources)
    assert not any(r.startswith("aperture") for r in unscreened.metadata["rejected"])


def test_select_kernel_sources_returns_catalog_rows(varying_pair) -> None:
    task = MakeKernelTask()
    selected = task.selectKernelSources(varying_pair.template, varying_pair.science, varying_pair.sources)
    assert 0 < len(selected) < len(varying_pair.sources)
    assert set(selected["id"]) <= set(varying_pair.sources["id"])
    snr = selected["psfFlux"] / selected["psfFluxErr"]
    assert np.all(snr >= task.config.minSignalToNoise) and np.all(snr <= task.config.maxSignalToNoise)
    all_snr = varying_pair.sources["psfFlux"] / varying_pair.sources["psfFluxErr"]
    capped = MakeKernelConfig()
    capped.maxSignalToNoise = 200.0
    assert np.any(all_snr[np.isin(varying_pair.sources["id"], selected["id"])] > 200)
    fewer = MakeKernelTask(config=capped).selectKernelSources(
        varying_pair.template, varying_pair.science, varying_pair.sources
    )
    fewer_snr = fewer["psfFlux"] / fewer["psfFluxErr"]
    assert 0 < len(fewer) < len(selected) and np.all(fewer_snr <= 200)


def test_no_candidates_is_a_clear_error(varying_pair) -> None:
    sources = varying_pair.sources.copy()
    sources["pixelFlags_saturated"] = True
    with pytest.raises(InsufficientKernelSourcesError, match="flag pixelFlags_saturated") as info:
        MakeKernelTask().run(varying_pair.template, varying_pair.science, sources)
    assert info.value.rejected["flag pixelFlags_saturated"] == len(sources)
    with pytest.raises(InsufficientKernelSourcesError):
        MakeKernelTask().run(varying_pair.template, varying_pair.science, sources[:0])


def test_too_few_candidates_lower_the_spatial_order(varying_pair) -> None:
    few = varying_pair.sources[np.argsort(-varying_pair.sources["psfFlux"])][30:45]
    task = MakeKernelTask()
    result = task.run(varying_pair.template, varying_pair.science, few)
    assert task.metadata["spatialKernelOrder"] < 2
    # the kernel itself still varies as the PSF models say (order 2)
    assert result.psfMatchingKernel.kernel_order == task.metadata["kernelOrder"] == 2
    cfg = MakeKernelConfig()
    cfg.usePsfModelVariation = False
    result = MakeKernelTask(config=cfg).run(varying_pair.template, varying_pair.science, few)
    assert result.psfMatchingKernel.kernel_order < 2

    cfg = MakeKernelConfig()
    cfg.allowSpatialOrderFallback = False
    cfg.minCandidatesPerSpatialTerm = 0
    with pytest.raises(KernelSolutionError, match="cannot constrain a spatial kernel of order 2"):
        MakeKernelTask(config=cfg).run(varying_pair.template, varying_pair.science, few[:4])


def test_missing_psf_is_a_clear_error(varying_pair) -> None:
    template = varying_pair.template.copy()
    template.psf = None
    with pytest.raises(MissingPsfError, match="template exposure has no PSF"):
        MakeKernelTask().run(template, varying_pair.science, varying_pair.sources)


def test_preconvolved_widens_the_basis(varying_pair) -> None:
    task = MakeKernelTask()
    t, s = task.getFwhms(varying_pair.template, varying_pair.science)
    t2, s2 = task.getFwhms(varying_pair.template, varying_pair.science, preconvolved=True)
    assert t2 == t and s2 == pytest.approx(s * np.sqrt(2))


def test_consensus_ignores_one_precise_outlier() -> None:
    values = np.array([0.80, 0.78, 0.83, 0.79, 0.81, 1.53, 0.45, 0.30])
    errors = np.array([0.07, 0.11, 0.16, 0.17, 0.22, 0.046, 0.4, 0.5])
    assert weighted_median(values, 1 / errors**2) == pytest.approx(1.53)  # the trap
    assert consensus_value(values, errors) == pytest.approx(0.8, abs=0.03)


def test_weighted_reference_resists_faint_candidate_bias(varying_pair) -> None:
    """Kernel sums of noisy faint candidates are biased low; clipping must not throw out the bright ones."""
    pair = make_psf_matching_pair(
        shape=SHAPE, n_stars=300, scale=SCALE, template_depth=1.0, flux_range=(1.5e3, 3e5), seed=5,
        template_psf=GaussianPsf(1.5), science_psf=GaussianPsf(1.7),
    )
    task = MakeKernelTask()
    task.run(pair.template, pair.science, pair.sources)
    assert task.metadata["kernelSumCentre"] == pytest.approx(SCALE, rel=0.01)


def test_config_validation() -> None:
    cfg = MakeKernelConfig()
    cfg.kernelSumReference = "mean"
    with pytest.raises(ValueError, match="kernelSumReference"):
        cfg.validate()
    cfg = MakeKernelConfig()
    cfg.kernelSizeMin = 20
    with pytest.raises(ValueError, match="kernel_size_min"):
        cfg.validate()
    assert MakeKernelConfig().psfMatchConfig().spatial_kernel_order == 2
