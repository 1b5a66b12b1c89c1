"""The kernel-fit driver: per-candidate solutions, sigma clipping, and the spatial fit.

The steps (LSST's ``PsfMatchTask._solve``):

1. solve every candidate (:func:`.solve.solve_candidates`), rejecting singular or ill-conditioned
   systems;
2. with sigma clipping: reject candidates whose own difference is bad (normalized residual mean
   or std above the limits), then candidates whose kernel sum is more than ``max_ksum_sigma``
   sigmas from the median (variable stars, mismatched sources), iterated to convergence.  Each
   deviation is divided by the candidate's own kernel-sum uncertainty (propagated from its pixel
   variances, with a floor of ``ksum_sigma_floor`` times the median), scaled up by the robust
   spread of these normalized deviations when that exceeds 1.  LSST divides by the spread of the
   kernel sums themselves, which faint candidates dominate: on our simulations that rejected
   20-40% of perfectly good faint candidates, this rule ~2-3%, and a bright variable star is
   rejected either way;
3. solve the spatial kernel and background together (:func:`.spatial.fit_spatial_kernel`);
4. with sigma clipping: assess every used candidate under the *spatial* model, reject those over
   the residual limits, and refit, at most ``max_spatial_iterations`` times.

Typical use (MakeKernelTask)::

    basis = psf_matching_basis(template, science, config)
    candidates = make_candidate_list(template, science, sources, basis.kernel_size, config)
    kernel, diagnostics = fit_psf_matching_kernel(template, science, candidates, config, basis=basis)
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from butler.exposure import Exposure
from butler.geometry import Box
from butler.psf import Psf

from .basis import AlardLuptonBasis
from .chebyshev import ChebyshevBasis2D
from .config import PsfMatchConfig
from .errors import NoKernelCandidatesError, PsfMatchError, format_rejections
from .solve import GOOD, KernelCandidate, solve_candidates
from .spatial import SpatialKernel, fit_spatial_kernel, local_parameters

__all__ = [
    "PsfMatchConfig",
    "KernelFitDiagnostics",
    "fit_psf_matching_kernel",
    "fit_kernel_to_candidates",
    "psf_matching_basis",
    "basis_for_fwhm",
    "mean_psf_fwhm",
]

_log = logging.getLogger(__name__)


@dataclass
class KernelFitDiagnostics:
    """What happened in a kernel fit (for logs, task metadata and debug plots).

    Attributes
    ----------
    basis : AlardLuptonBasis
        The basis used.
    candidates : list of KernelCandidate
        Every candidate with its final status, rejection reason and solution.
    n_used : int
        Candidates in the final spatial fit.
    rejected : dict of str to int
        Rejected candidates per reason.
    kernel_sum_median, kernel_sum_sigma : float
        Median and robust sigma (0.741 IQR) of the per-candidate kernel sums used.
    spatial_condition_number : float
        Scaled condition number of the final global normal matrix.
    n_parameters : int
        Free parameters of the spatial model.
    spatial_iterations : int
        Spatial fit rounds.
    residual_mean, residual_std : float
        Median over used candidates of their normalized-residual mean and std under the spatial model.
    fwhm_template, fwhm_science : float
        PSF FWHMs (pixels) the basis was scaled with (NaN when not known).
    elapsed : float
        Wall time of the fit, seconds.
    """

    basis: AlardLuptonBasis
    candidates: list[KernelCandidate] = field(repr=False)
    n_used: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    kernel_sum_median: float = float("nan")
    kernel_sum_sigma: float = float("nan")
    spatial_condition_number: float = float("nan")
    n_parameters: int = 0
    spatial_iterations: int = 0
    residual_mean: float = float("nan")
    residual_std: float = float("nan")
    fwhm_template: float = float("nan")
    fwhm_science: float = float("nan")
    elapsed: float = 0.0

    @property
    def used(self) -> list[KernelCandidate]:
        """Candidates in the final fit."""
        return [c for c in self.candidates if c.status == GOOD]

    def to_dict(self, *, include_candidates: bool = True) -> dict[str, Any]:
        """Plain, JSON-able data (no pixels), e.g. for task metadata."""

        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        out: dict[str, Any] = {
            "basis": self.basis.to_dict(),
            "n_candidates": len(self.candidates),
            "n_used": self.n_used,
            "rejected": dict(self.rejected),
            "kernel_sum_median": num(self.kernel_sum_median),
            "kernel_sum_sigma": num(self.kernel_sum_sigma),
            "spatial_condition_number": num(self.spatial_condition_number),
            "n_parameters": self.n_parameters,
            "spatial_iterations": self.spatial_iterations,
            "residual_mean": num(self.residual_mean),
            "residual_std": num(self.residual_std),
            "fwhm_template": num(self.fwhm_template),
            "fwhm_science": num(self.fwhm_science),
            "elapsed": self.elapsed,
        }
        if include_candidates:
            out["candidates"] = [c.summary() for c in self.candidates]
        return out


def mean_psf_fwhm(psf: Psf, bbox: Box, grid: int = 3, buffer: float = 0.05) -> float:
    """Mean PSF FWHM (pixels) over a ``grid x grid`` grid of positions inside ``bbox``.

    ``buffer`` is the fraction of the box left out on every side (LSST's ``fwhmExposureBuffer``).
    """
    grid = max(int(grid), 1)
    if grid == 1:
        cx, cy = bbox.center
        return float(psf.fwhm(cx, cy))
    fx = np.linspace(buffer, 1.0 - buffer, grid)
    xs = bbox.x0 + fx * (bbox.width - 1)
    ys = bbox.y0 + fx * (bbox.height - 1)
    return float(np.mean([psf.fwhm(float(x), float(y)) for y in ys for x in xs]))


def basis_for_fwhm(fwhm_template: float, fwhm_science: float, config: PsfMatchConfig | None = None) -> AlardLuptonBasis:
    """The Alard--Lupton basis for two PSF FWHMs (pixels) under ``config``."""
    cfg = config or PsfMatchConfig()
    if not cfg.scale_by_fwhm:
        size = cfg.kernel_size if cfg.kernel_size is not None else cfg.kernel_size_min
        return AlardLuptonBasis(size, cfg.basis_sigmas, cfg.basis_degrees, orthonormalize=cfg.orthonormalize_basis)
    return AlardLuptonBasis.from_fwhm(
        fwhm_template,
        fwhm_science,
        kernel_size=cfg.kernel_size,
        scaling=cfg.kernel_size_fwhm_scaling,
        min_size=cfg.kernel_size_min,
        max_size=cfg.kernel_size_max,
        orthonormalize=cfg.orthonormalize_basis,
        n_gauss=len(cfg.basis_sigmas),
        default_sigmas=cfg.basis_sigmas,
        default_degrees=cfg.basis_degrees,
        gauss_beta=cfg.gauss_beta,
        min_sigma=cfg.min_sigma,
        deconvolution_degree=cfg.deconvolution_degree,
    )


def _require_psf(exposure: Exposure, role: str) -> Psf:
    if exposure.psf is None:
        raise PsfMatchError(f"the {role} exposure has no PSF; PSF matching needs PSF models on both images")
    return exposure.psf


def psf_matching_basis(
    template: Exposure, science: Exposure, config: PsfMatchConfig | None = None
) -> tuple[AlardLuptonBasis, float, float]:
    """Basis for matching ``template`` to ``science`` from their mean PSF FWHMs over the science box.

    Returns
    -------
    basis : AlardLuptonBasis
    fwhm_template, fwhm_science : float
        The mean FWHMs, pixels.
    """
    cfg = config or PsfMatchConfig()
    fwhm_t = mean_psf_fwhm(_require_psf(template, "template"), science.bbox, cfg.fwhm_grid)
    fwhm_s = mean_psf_fwhm(_require_psf(science, "science"), science.bbox, cfg.fwhm_grid)
    return basis_for_fwhm(fwhm_t, fwhm_s, cfg), fwhm_t, fwhm_s


def fit_psf_matching_kernel(
    template: Exposure,
    science: Exposure,
    candidates: Sequence[KernelCandidate],
    config: PsfMatchConfig | None = None,
    *,
    basis: AlardLuptonBasis | None = None,
) -> tuple[SpatialKernel, KernelFitDiagnostics]:
    """Fit the spatially varying kernel and background matching ``template`` to ``science``.

    Parameters
    ----------
    template, science : Exposure
        The image to convolve and the image to match (same pixel frame); their PSFs scale the
        basis unless ``basis`` is given.  The spatial model spans the science box.
    candidates : sequence of KernelCandidate
        From :func:`.candidates.make_candidate_list` with the basis's kernel size.  Not modified.
    config : PsfMatchConfig, optional
    basis : AlardLuptonBasis, optional
        Use this basis instead of deriving it from the PSFs.

    Returns
    -------
    kernel : SpatialKernel
        ``template (x) kernel + kernel.background ~= science``.
    diagnostics : KernelFitDiagnostics

    Raises
    ------
    NoKernelCandidatesError
        Fewer than ``min_candidates`` candidates survive solving and clipping.
    SingularKernelSolutionError
        The spatial system is singular or ill-conditioned.
    """
    cfg = config or PsfMatchConfig()
    fwhm_t = fwhm_s = float("nan")
    if basis is None:
        basis, fwhm_t, fwhm_s = psf_matching_basis(template, science, cfg)
    kernel, diag = fit_kernel_to_candidates(candidates, basis, science.bbox, cfg)
    diag.fwhm_template, diag.fwhm_science = fwhm_t, fwhm_s
    return kernel, diag


def _robust_sigma(values: np.ndarray) -> float:
    q75, q25 = np.percentile(values, [75.0, 25.0])
    return float(0.7413 * (q75 - q25))


def fit_diagnostics(
    basis: AlardLuptonBasis,
    candidates: list[KernelCandidate],
    used: list[KernelCandidate],
    stats: np.ndarray,
    info: Any,
    iterations: int,
    start: float,
) -> KernelFitDiagnostics:
    """The diagnostics of a finished spatial fit.

    ``used`` are the candidates kept, ``stats`` their residual (mean, std) against the spatial
    model (one row each), ``info`` the spatial solution's condition number and parameter count,
    ``start`` the fit's ``time.perf_counter()`` start.
    """
    ksums = np.array([c.solution.kernel_sum for c in used])  # type: ignore[union-attr]
    return KernelFitDiagnostics(
        basis=basis,
        candidates=candidates,
        n_used=len(used),
        rejected=dict(Counter(c.reason for c in candidates if c.reason)),
        kernel_sum_median=float(np.median(ksums)),
        kernel_sum_sigma=_robust_sigma(ksums) if ksums.size > 1 else 0.0,
        spatial_condition_number=info.condition_number,
        n_parameters=info.n_parameters,
        spatial_iterations=iterations,
        residual_mean=float(np.median(stats[:, 0])),
        residual_std=float(np.median(stats[:, 1])),
        elapsed=time.perf_counter() - start,
    )


def fit_kernel_to_candidates(
    candidates: Sequence[KernelCandidate],
    basis: AlardLuptonBasis,
    bbox: Box,
    config: PsfMatchConfig | None = None,
) -> tuple[SpatialKernel, KernelFitDiagnostics]:
    """Exposure-free core of :func:`fit_psf_matching_kernel` (ModelPsfMatchTask calls this directly).

    Parameters
    ----------
    candidates : sequence of KernelCandidate
        Unsolved (or solved) candidates; not modified.
    basis : AlardLuptonBasis
    bbox : Box
        Box of the spatial model, parent pixels.
    config : PsfMatchConfig, optional
    """
    cfg = config or PsfMatchConfig()
    start = time.perf_counter()
    bg_model = ChebyshevBasis2D(bbox, cfg.spatial_background_order) if cfg.fit_background else None
    solved = solve_candidates(
        candidates,
        basis,
        background=bg_model,
        fit_background=cfg.fit_background,
        constant_variance_weighting=cfg.constant_variance_weighting,
        noise_bias_scale=cfg.noise_bias_scale,
        max_condition_number=cfg.max_condition_number,
        workers=cfg.workers,
    )
    cands = list(solved)

    def good_indices() -> list[int]:
        return [i for i, c in enumerate(cands) if c.status == GOOD]

    if cfg.use_sigma_clipping:
        for i in good_indices():
            sol = cands[i].solution
            assert sol is not None
            if abs(sol.residual_mean) > cfg.candidate_residual_mean_max:
                cands[i] = cands[i].rejected(f"residual mean above {cfg.candidate_residual_mean_max:g}")
            elif sol.residual_std > cfg.candidate_residual_std_max:
                cands[i] = cands[i].rejected(f"residual std above {cfg.candidate_residual_std_max:g}")
        for _ in range(10):
            idx = good_indices()
            if len(idx) < 3:
                break
            ksums = np.array([cands[i].solution.kernel_sum for i in idx])  # type: ignore[union-attr]
            errors = np.array([cands[i].solution.kernel_sum_error for i in idx])  # type: ignore[union-attr]
            median = float(np.median(ksums))
            errors = np.sqrt(np.where(np.isfinite(errors), errors, 0.0) ** 2 + (cfg.ksum_sigma_floor * median) ** 2)
            deviation = (ksums - median) / errors
            scale = max(1.0, _robust_sigma(deviation))
            outliers = [i for i, d in zip(idx, deviation, strict=True) if abs(d) > cfg.max_ksum_sigma * scale]
            if not outliers:
                break
            for i in outliers:
                cands[i] = cands[i].rejected(f"kernel sum outlier (> {cfg.max_ksum_sigma:g} sigma)")

    kernel: SpatialKernel | None = None
    info = None
    iterations = 0
    while True:
        idx = good_indices()
        if len(idx) < cfg.min_candidates:
            rejected = Counter(c.reason for c in cands if c.reason)
            raise NoKernelCandidatesError(
                f"only {len(idx)} usable kernel candidates of {len(cands)} (need {cfg.min_candidates}): "
                f"{format_rejections(rejected)}",
                rejected=rejected,
                n_input=len(cands),
            )
        kernel, info = fit_spatial_kernel(
            [cands[i] for i in idx],
            basis,
            bbox,
            kernel_order=cfg.spatial_kernel_order,
            background_order=cfg.spatial_background_order,
            fit_background=cfg.fit_background,
            constant_first_term=cfg.constant_first_term,
            max_condition_number=cfg.max_spatial_condition_number,
        )
        iterations += 1
        if not cfg.use_sigma_clipping or iterations >= cfg.max_spatial_iterations:
            break
        n_rejected = 0
        for i in idx:
            sol = cands[i].solution
            assert sol is not None
            mean, std, _ = sol.residual_stats(local_parameters(kernel, cands[i]))
            if abs(mean) > cfg.candidate_residual_mean_max:
                cands[i] = cands[i].rejected(f"spatial model residual mean above {cfg.candidate_residual_mean_max:g}")
                n_rejected += 1
            elif std > cfg.candidate_residual_std_max:
                cands[i] = cands[i].rejected(f"spatial model residual std above {cfg.candidate_residual_std_max:g}")
                n_rejected += 1
        if n_rejected == 0:
            break
        _log.debug("spatial iteration %d rejected %d candidates; refitting", iterations, n_rejected)

    assert kernel is not None and info is not None
    used = [cands[i] for i in good_indices()]
    stats = np.array(
        [c.solution.residual_stats(local_parameters(kernel, c))[:2] for c in used]  # type: ignore[union-attr]
    )
    diag = fit_diagnostics(basis, cands, used, stats, info, iterations, start)
    cx, cy = bbox.center
    _log.info(
        "PSF-matching kernel: %d px, %d basis images, %d of %d candidates used (rejected: %s), "
        "kernel sum %.5f at the centre, spatial condition number %.3g, %.2f s",
        basis.kernel_size, basis.n_basis, diag.n_used, len(cands), format_rejections(diag.rejected),
        kernel.kernel_sum(cx, cy), info.condition_number, diag.elapsed,
    )
    return kernel, diag
