"""MakeKernelTask: the PSF-matching kernel between two exposures, from kernel-candidate stars.

A thin task around :mod:`tasks.psfmatch` (the Alard--Lupton machinery shared with
ModelPsfMatchTask), after ``lsst.ip.diffim.MakeKernelTask``:

1. the basis: three Gaussians (LSST's ``alardSigGauss`` 0.7/1.5/3.0 px, degrees 4/2/2) whose widths
   are scaled from the two PSFs' mean FWHMs over the science box (``scaleByFwhm``); kernel size
   ``kernelSizeFwhmScaling`` times the largest width, clipped to ``[kernelSizeMin, kernelSizeMax]``;
2. :meth:`MakeKernelTask.selectKernelSources` / :meth:`MakeKernelTask.makeCandidateList`:
   isolated, unflagged stars within an S/N range whose stamps (grown by the kernel size) are
   unmasked and finite in both images; an empty list raises
   :class:`~tasks.diffim.errors.InsufficientKernelSourcesError` with the count per reason;
3. per-candidate variance-weighted least squares with kernel-sum and residual sigma clipping,
   then the spatially varying kernel (Chebyshev order ``spatialKernelOrder``) and differential
   background (order ``spatialBgOrder``) solved together, with condition-number checks
   (:class:`~tasks.diffim.errors.KernelSolutionError`).

The image that is convolved is called ``template`` here whatever it is: ImageDifferenceTask
passes the science image as ``template`` when it convolves the science image.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.linalg
from astropy.table import Table

from butler.exposure import Exposure
from butler.geometry import Box
from butler.errors import PsfError
from butler.psf import Psf
from pipeline.config import Config, Field
from pipeline.struct import Struct
from pipeline.task import Task
from tasks.psfmatch import (
    AlardLuptonBasis,
    KernelCandidate,
    KernelFitDiagnostics,
    NoKernelCandidatesError,
    PsfMatchConfig,
    SingularKernelSolutionError,
    SpatialKernel,
    basis_for_fwhm,
    fit_psf_matching_kernel,
    make_candidate_list,
)
from tasks.psfmatch.chebyshev import ChebyshevBasis2D, chebyshev_1d
from tasks.psfmatch.errors import PsfMatchConfigError, PsfMatchError, format_rejections
from tasks.psfmatch.model_variation import KernelVariation, add_variation, model_kernel_variation, subtract_variation
from tasks.psfmatch.solve import GOOD, solve_candidates
from tasks.psfmatch.fit import fit_diagnostics
from tasks.psfmatch.spatial import fit_spatial_kernel, local_parameters, remove_noise

from tasks.measure.noise import noise_cross_correlation, noise_scale

from .errors import InsufficientKernelSourcesError, KernelSolutionError, MissingPsfError
from .utils import convolve_constant

__all__ = [
    "MakeKernelConfig",
    "MakeKernelTask",
    "BackgroundModel",
    "psf_fwhm_over_box",
    "require_psf",
    "fit_kernel_weighted_clipping",
    "weighted_median",
    "consensus_value",
    "select_spatial_order",
    "stamp_fluxes",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackgroundModel:
    """The differential background fitted with the kernel (science minus convolved template).

    Attributes
    ----------
    kernel : SpatialKernel
        The kernel whose background coefficients define the model.
    """

    kernel: SpatialKernel

    def __call__(self, x: Any, y: Any) -> Any:
        """Background at parent-frame pixel positions, counts."""
        return self.kernel.background(x, y)

    def image(self, bbox: Box) -> np.ndarray:
        """The background realized on every pixel of ``bbox`` (float32, counts).

        Separable and in float32: ``sum_j T_j(v) (sum_i c_ij T_i(u))``, one pass over the image
        per y order (``SpatialKernel.background_image`` builds float64 outer products per term,
        ~7x slower on 4096x4096).
        """
        coeffs = self.kernel.background_coefficients
        if coeffs.size == 0:
            return np.zeros(bbox.shape, dtype=np.float32)
        funcs = ChebyshevBasis2D(self.kernel.bbox, self.kernel.background_order)
        xs = np.arange(bbox.x0, bbox.x1, dtype=np.float64)
        ys = np.arange(bbox.y0, bbox.y1, dtype=np.float64)
        tx = chebyshev_1d(funcs.scale_x(xs), funcs.order)
        ty = chebyshev_1d(funcs.scale_y(ys), funcs.order)
        rows: dict[int, np.ndarray] = {}
        for c, (i, j) in zip(coeffs, funcs.terms, strict=True):
            rows[j] = rows.get(j, 0.0) + c * tx[:, i]
        out = np.zeros(bbox.shape, dtype=np.float32)
        for j, row in rows.items():
            out += ty[:, j].astype(np.float32)[:, None] * np.asarray(row, dtype=np.float32)[None, :]
        return out

    @property
    def order(self) -> int:
        """Chebyshev order."""
        return self.kernel.background_order

    @property
    def coefficients(self) -> np.ndarray:
        """Chebyshev coefficients, counts (empty when no background was fitted)."""
        return self.kernel.background_coefficients

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "order": self.order,
            "bbox": self.kernel.bbox.to_list(),
            "coefficients": [float(c) for c in self.coefficients],
        }


def require_psf(exposure: Exposure, role: str) -> Psf:
    """The exposure's PSF, or :class:`MissingPsfError` naming the image's role."""
    if exposure.psf is None:
        visit = exposure.visit_info.visit_id if exposure.visit_info is not None else None
        where = f" (visit {visit})" if visit is not None else ""
        raise MissingPsfError(
            f"the {role} exposure{where} has no PSF model; PSF matching and detection need a PSF on every "
            "image (a calexp from characterization, a coadd with a CoaddPsf)"
        )
    return exposure.psf


def psf_fwhm_over_box(psf: Psf, bbox: Box, grid: int = 3, buffer: float = 0.05) -> float:
    """Mean PSF FWHM (pixels) over a ``grid x grid`` grid of positions inside ``bbox``.

    Positions where the model is undefined (a CoaddPsf outside its inputs) are skipped; the
    model's value at the box centre is the last resort.

    Raises
    ------
    MissingPsfError
        If the PSF is defined nowhere on the grid.
    """
    grid = max(int(grid), 1)
    if grid == 1:
        fx = np.array([0.5])
    else:
        fx = np.linspace(buffer, 1.0 - buffer, grid)
    xs = bbox.x0 + fx * (bbox.width - 1)
    ys = bbox.y0 + fx * (bbox.height - 1)
    values = []
    for y in ys:
        for x in xs:
            try:
                values.append(float(psf.fwhm(float(x), float(y))))
            except PsfError:
                continue
    if not values:
        raise MissingPsfError(f"the PSF model {type(psf).__name__} is not defined anywhere on {bbox}")
    return float(np.mean(values))


class MakeKernelConfig(Config):
    """Configuration of :class:`MakeKernelTask` (LSST's field names where they exist)."""

    kernelSize: int | None = Field(None, description="Odd kernel size, pixels; None derives it from the PSF FWHMs")
    scaleByFwhm: bool = Field(True, description="Scale the basis widths and the kernel size by the two PSF FWHMs")
    kernelSizeFwhmScaling: float = Field(6.0, description="Kernel size = this times the largest basis sigma")
    kernelSizeMin: int = Field(21, description="Smallest derived kernel size, pixels (odd)")
    kernelSizeMax: int = Field(35, description="Largest derived kernel size, pixels (odd)")
    alardSigGauss: list[float] = Field([0.7, 1.5, 3.0], description="Unscaled Gaussian widths of the basis, pixels")
    alardDegGauss: list[int] = Field([4, 2, 2], description="Polynomial degree of each Gaussian")
    alardGaussBeta: float = Field(2.0, description="Ratio of successive basis widths when scaled by FWHM")
    alardMinSig: float = Field(0.7, description="Smallest basis sigma, pixels")
    alardDegGaussDeconv: int = Field(3, description="Degree of the deconvolution Gaussians")
    spatialKernelOrder: int = Field(2, description="Chebyshev order of the kernel's spatial variation")
    spatialBgOrder: int = Field(1, description="Chebyshev order of the differential background")
    fitForBackground: bool = Field(True, description="Fit the differential background with the kernel")
    constantVarianceWeighting: bool = Field(
        True, description="Weight stamp pixels by 1/median(variance) (LSST default) rather than 1/variance"
    )
    noiseBiasCorrection: bool = Field(
        True,
        description="Remove the expected noise power of the convolved image from the spatial fit's normal "
        "equations (errors in the variables: uncorrected, faint candidates shrink and smooth the kernel); "
        "applied only when that image's noise is measured to be uncorrelated between pixels",
    )
    sharedNoiseThreshold: float = Field(
        0.05,
        description="Refit with the errors-in-variables correction scaled by 1 - w when more than this fraction "
        "w of the convolved image's noise is measured in the image it is matched to (a science visit that "
        "went into its own template)",
    )
    noiseCorrelationTolerance: float = Field(
        0.15,
        description="The convolved image's noise counts as uncorrelated when the scatter of its sums weighted "
        "by the narrowest basis Gaussian is within this fraction of the scatter of single pixels "
        "(relative to their variance-plane predictions)",
    )
    maxConditionNumber: float = Field(1.0e10, description="Largest scaled condition number of a candidate's system")
    maxSpatialConditionNumber: float = Field(1.0e10, description="Largest scaled condition number of the spatial system")
    useSigmaClipping: bool = Field(True, description="Reject outlying candidates (kernel sum, residuals)")
    maxKsumSigma: float = Field(3.0, description="Kernel-sum clipping threshold, sigma")
    kernelSumReference: str = Field(
        "weighted",
        description="Reference of the kernel-sum clipping: 'weighted' (inverse-variance weighted median of the "
        "candidates' kernel sums) or 'median' (their plain median, tasks.psfmatch's rule); see "
        "fit_kernel_weighted_clipping",
    )
    candidateResidualMeanMax: float = Field(0.25, description="Largest |mean| of a candidate's normalized residual")
    candidateResidualStdMax: float = Field(1.5, description="Largest std of a candidate's normalized residual")
    maxSpatialIterations: int = Field(3, description="Spatial fit / reject rounds")
    minCandidatesPerSpatialTerm: int = Field(
        15,
        description="Use spatial kernel order k only with at least this many good candidates per Chebyshev term "
        "((k+1)(k+2)/2 terms: order 2 needs 90, order 1 45, order 0 15); otherwise the order is lowered "
        "(logged).  With fewer, an order-2 model overfits and its extrapolation to the image corners fails "
        "(measured on 1024x1024 simulations: near-star residual std 1.06-1.08 at order 2 with ~50 candidates, "
        "1.005 at order 1; with the science image convolved, transients near corners lost 15-20% of their "
        "flux at order 2 with ~80 candidates).  0 disables the rule",
    )
    spatialOrderSelection: str = Field(
        "crossValidation",
        description="'crossValidation': use the spatial kernel order (0 .. spatialKernelOrder, after the "
        "minCandidatesPerSpatialTerm cap) whose kernel best predicts held-out candidates (k-fold, summed chi^2 "
        "of the held-out stamps; see select_spatial_order); 'fixed': always spatialKernelOrder (lowered only by "
        "the cap or a singular system).  Measured with benchmarks/bench_diffim.py: with the science image "
        "convolved, order 2 fitted on ~250 candidates gave a near-star normalized residual std of 1.18 and 19 "
        "false positives on a 2048x2048 pair, the selected order 0 gave 1.03 and 4 (true kernel: 1.01 and 4)",
    )
    spatialOrderFolds: int = Field(
        10,
        description="Folds of the spatial-order cross-validation.  Measured on the demo survey (science sharper "
        "than the coadd template, ~60-75 candidates per 1024x1024 detector, science PSF FWHM varying by 7% across "
        "it): with two folds each fit saw half the candidates, order 1 lost to order 0 on every detector and bright "
        "stars kept PSF-flux residuals of 2-2.5% rms; with ten folds order 1 won where the PSF varies and the "
        "residuals fell to 1.2-1.6%",
    )
    allowSpatialOrderFallback: bool = Field(
        True,
        description="When the spatial system is singular or ill-conditioned (too few, badly spread candidates), "
        "retry with lower spatial kernel orders down to 0 (logged) instead of failing",
    )
    usePsfModelVariation: bool = Field(
        True,
        description="Take the kernel's spatial variation from the two PSF models (the model-to-model matching "
        "kernel on the same basis, minus its value at the centre; tasks.psfmatch.model_variation), remove it from "
        "the candidates before the fit to stars and add it back after: the stars then only fit the kernel at the "
        "centre and what the models miss.  Measured on the small preset's 1024x1024 pairs with a single-visit "
        "template (tests/tasks/test_diffim_truth.py): see the README",
    )
    psfModelVariationOrder: int = Field(2, description="Chebyshev order of the PSF-model kernel variation")
    psfModelVariationGrid: int = Field(5, description="Cells per axis where the PSF models are realized for it")
    minPsfModelVariation: float = Field(
        1.0e-3,
        description="Ignore a PSF-model variation whose largest sum |dK| (centre, corners, edge midpoints) is "
        "below this fraction of the kernel's sum |K|",
    )
    minKernelSources: int = Field(3, description="Fewest usable kernel candidates")
    maxKernelSources: int = Field(1000, description="Most kernel candidates (evenly spread, brightest per cell first)")
    minSignalToNoise: float = Field(10.0, description="Lowest S/N of a kernel source (psfFlux/psfFluxErr)")
    minStampSignalToNoise: float = Field(
        3.0,
        description="Lowest aperture S/N (radius: the larger PSF FWHM) of a kernel candidate in *each* image; "
        "candidates whose aperture flux ratio is off the candidates' weighted median by more than 10% and 5 sigma "
        "are rejected too; 0 disables both.  A source absent from one image or changed -- a transient, when the "
        "candidates come from the science image -- constrains no kernel, but its stamp still pulls on the "
        "background fitted with the kernel.  Measured with benchmarks/bench_diffim.py on a 4096x4096 pair holding "
        "~1300 transients and variables: 243 of 900 candidates were transients; the background came out 2.3 "
        "counts high, the kernel sum 0.9% low, with 11 negative false positives on blank sky (true kernel: none); "
        "with the screening 0.5 counts, 0.2% and 2",
    )
    maxSignalToNoise: float = Field(
        2000.0,
        description="Highest S/N of a kernel source.  LSST's 500 leaves the brightest unsaturated stars out, and "
        "they are the ones that pin the kernel's shape down: measured on the small preset's 1024x1024 pairs "
        "with a single-visit template (tests/tasks/test_diffim_truth.py), the near-star normalized residual "
        "std went from 1.182 to 1.006 (science convolved) and from 1.073 to 1.044 (template convolved) with "
        "the cap raised to 1000-3000.  Saturated candidates stay out through the mask checks",
    )
    candidateStampSize: int | None = Field(
        None, description="Kernel-candidate stamp size, pixels (None: 2 x kernel size + 1, as LSST)"
    )
    isolationRadius: float | None = Field(None, description="No other source within this many pixels (None: half the kernel size)")
    badMaskPlanes: list[str] = Field(
        ["BAD", "SAT", "NO_DATA", "EDGE", "CR"], description="Mask planes that disqualify a candidate stamp in either image"
    )
    badSourceFlags: list[str] = Field(
        [
            "pixelFlags_saturated",
            "pixelFlags_bad",
            "pixelFlags_edge",
            "pixelFlags_nodata",
            "pixelFlags_cr",
            "pixelFlags_interpolated",
            "psfFlux_flag",
        ],
        description="Catalog flag columns that disqualify a kernel source",
    )
    fwhmExposureGrid: int = Field(3, description="PSF FWHMs are averaged over a grid of this many positions per axis")
    fwhmExposureBuffer: float = Field(0.05, description="Fraction of the box left out on each side for the FWHM grid")
    fftWorkers: int | None = Field(None, description="Threads for scipy.fft in the candidate solutions (None: scipy default)")

    def validate(self) -> None:
        super().validate()
        if self.spatialOrderFolds < 2:
            raise ValueError(f"spatialOrderFolds must be >= 2, not {self.spatialOrderFolds}")
        if self.spatialOrderSelection not in ("crossValidation", "fixed"):
            raise ValueError(
                f"spatialOrderSelection must be 'crossValidation' or 'fixed', not {self.spatialOrderSelection!r}"
            )
        if self.kernelSumReference not in ("weighted", "median"):
            raise ValueError(f"kernelSumReference must be 'weighted' or 'median', not {self.kernelSumReference!r}")
        try:
            self.psfMatchConfig()
        except PsfMatchConfigError as exc:
            raise ValueError(str(exc)) from None

    def psfMatchConfig(self) -> PsfMatchConfig:  # noqa: N802 - LSST-style method name
        """The equivalent :class:`tasks.psfmatch.PsfMatchConfig`."""
        return PsfMatchConfig(
            kernel_size=self.kernelSize,
            scale_by_fwhm=self.scaleByFwhm,
            kernel_size_fwhm_scaling=self.kernelSizeFwhmScaling,
            kernel_size_min=self.kernelSizeMin,
            kernel_size_max=self.kernelSizeMax,
            basis_sigmas=tuple(self.alardSigGauss),
            basis_degrees=tuple(self.alardDegGauss),
            gauss_beta=self.alardGaussBeta,
            min_sigma=self.alardMinSig,
            deconvolution_degree=self.alardDegGaussDeconv,
            spatial_kernel_order=self.spatialKernelOrder,
            spatial_background_order=self.spatialBgOrder,
            fit_background=self.fitForBackground,
            constant_variance_weighting=self.constantVarianceWeighting,
            max_condition_number=self.maxConditionNumber,
            max_spatial_condition_number=self.maxSpatialConditionNumber,
            use_sigma_clipping=self.useSigmaClipping,
            max_ksum_sigma=self.maxKsumSigma,
            candidate_residual_mean_max=self.candidateResidualMeanMax,
            candidate_residual_std_max=self.candidateResidualStdMax,
            max_spatial_iterations=self.maxSpatialIterations,
            min_candidates=self.minKernelSources,
            min_snr=self.minSignalToNoise,
            max_snr=self.maxSignalToNoise,
            max_candidates=self.maxKernelSources,
            isolation_radius=self.isolationRadius,
            stamp_size=self.candidateStampSize,
            bad_mask_planes=tuple(self.badMaskPlanes),
            bad_flags=tuple(self.badSourceFlags),
            fwhm_grid=self.fwhmExposureGrid,
            workers=self.fftWorkers,
        )


class MakeKernelTask(Task):
    """Fit the spatially varying PSF-matching kernel that maps ``template`` onto ``science``.

    ``template (x) psfMatchingKernel + backgroundModel ~= science`` on the science image's box.
    Both exposures must share one pixel frame (warp the template first).
    """

    ConfigClass = MakeKernelConfig
    _DefaultName = "makeKernel"

    # ------------------------------------------------------------------ pieces
    def measureNoiseBiasScale(self, exposure: Exposure, sigma: float) -> float:  # noqa: N802
        """Multiple of the variance plane's white-noise power to remove from the spatial fit (see ``noise_bias_scale``).

        The errors-in-the-variables correction models the convolved image's noise as independent
        pixels.  That holds when sums weighted by a Gaussian of the narrowest basis width scatter
        as the variance plane predicts, relative to single pixels: calexps (measured 1.01-1.02
        on the demo survey) but not coadds of PSF-matched warps (2.3-3.2), whose noise the
        correction would over-subtract at high spatial frequencies until the system is singular.

        Parameters
        ----------
        exposure : Exposure
            The image that will be convolved.
        sigma : float
            Width of the narrowest basis Gaussian, pixels.

        Returns
        -------
        float
            ``s**2`` where ``s`` is the single-pixel noise scale (the variance plane's calibration),
            or 0 when the noise is correlated or cannot be measured.
        """
        half = max(1, int(math.ceil(3.0 * sigma)))
        offsets = np.arange(-half, half + 1, dtype=np.float64)
        gauss = np.exp(-0.5 * (offsets[:, None] ** 2 + offsets[None, :] ** 2) / sigma**2)
        pixel = noise_scale(exposure, np.ones((1, 1)))
        smoothed = noise_scale(exposure, gauss)
        if not (math.isfinite(pixel) and math.isfinite(smoothed)):
            self.log.info("noise of the convolved image not measurable: no errors-in-variables correction")
            return 0.0
        ratio = smoothed / pixel
        self.metadata["convolvedNoiseCorrelation"] = ratio
        if abs(ratio - 1.0) > self.config.noiseCorrelationTolerance:
            self.log.info(
                "convolved image's noise is correlated (Gaussian-weighted / single-pixel noise scale %.2f): "
                "no errors-in-variables correction", ratio,
            )
            return 0.0
        return pixel**2

    def measureSharedNoiseFraction(self, template: Exposure, science: Exposure, kernel: SpatialKernel) -> float:  # noqa: N802
        """Fraction ``w`` of the convolved image's noise that reappears, PSF-matched, in the other image.

        When the science visit went into the coadd template, the template holds ``w`` times the
        science noise matched by nearly the true kernel ``K``.  The noise of the convolved image
        ``T`` and of the difference ``D = S - K (x) T`` then correlate as ``(w - 1) K``
        (:func:`tasks.measure.noise.noise_cross_correlation`; ``-K`` alone for independent
        images).  The difference, not ``S``, is correlated with ``T`` because the sky's faint
        sources, common to both images, would correlate ``S`` and ``T`` by their signal.  ``w``
        is ``1 +`` the correlation summed over the central 5 x 5 lags over the same sum of ``K``,
        measured on the central 1024 x 1024 pixels with the kernel and background of their centre.
        That shared noise biases the fit the other way, so the errors-in-variables correction is
        scaled by ``1 - w``, which leaves the fit unbiased when the shared part is matched by ``K``.

        Returns
        -------
        float
            ``w`` (near 0 for independent images).
        """
        half = 2
        size = 1024
        bbox = science.bbox
        width, height = min(bbox.width, size), min(bbox.height, size)
        box = Box(bbox.x0 + (bbox.width - width) // 2, bbox.y0 + (bbox.height - height) // 2, width, height)
        cx, cy = box.center
        image = kernel.kernel_image(cx, cy)
        convolved = template.subexposure(box)
        difference = science.subexposure(box, deep=True)
        usable = np.isfinite(convolved.image) & np.isfinite(convolved.variance)
        blank = np.where(usable, convolved.image, 0.0).astype(np.float64)
        blank_variance = np.where(usable, convolved.variance, 0.0).astype(np.float64)
        difference.image[...] = difference.image - convolve_constant(blank, image) - kernel.background(cx, cy)
        # the difference's own variance, so that only its real outliers are left out as sources
        difference.variance[...] = difference.variance + convolve_constant(blank_variance, image**2)
        rho = noise_cross_correlation(convolved, difference, half)
        c = image.shape[0] // 2
        core = float(image[c - half : c + half + 1, c - half : c + half + 1].sum())
        shared = 1.0 + float(rho.sum()) / core if core > 0 else 0.0
        self.metadata["sharedNoiseFraction"] = shared
        return shared

    def getFwhms(self, template: Exposure, science: Exposure, preconvolved: bool = False) -> tuple[float, float]:  # noqa: N802
        """Mean PSF FWHMs (pixels) of the two images over the science box.

        With ``preconvolved`` the science image has been convolved with its own PSF, which widens
        it by ``sqrt(2)`` (for Gaussians).
        """
        cfg = self.config
        fwhm_t = psf_fwhm_over_box(require_psf(template, "template"), science.bbox, cfg.fwhmExposureGrid, cfg.fwhmExposureBuffer)
        fwhm_s = psf_fwhm_over_box(require_psf(science, "science"), science.bbox, cfg.fwhmExposureGrid, cfg.fwhmExposureBuffer)
        if preconvolved:
            fwhm_s *= math.sqrt(2.0)
        return fwhm_t, fwhm_s

    def makeKernelBasis(self, fwhmTemplate: float, fwhmScience: float) -> AlardLuptonBasis:  # noqa: N802, N803
        """The Alard--Lupton basis for two PSF FWHMs (pixels)."""
        return basis_for_fwhm(fwhmTemplate, fwhmScience, self.config.psfMatchConfig())

    def makeCandidateList(  # noqa: N802
        self,
        template: Exposure,
        science: Exposure,
        kernelSources: Table,  # noqa: N803
        kernelSize: int,  # noqa: N803
    ) -> list[KernelCandidate]:
        """Kernel candidates (stamps in both images) around the usable kernel sources.

        Raises
        ------
        InsufficientKernelSourcesError
            If no source survives the cuts; ``.rejected`` gives the count per reason.
        """
        try:
            return make_candidate_list(template, science, kernelSources, kernelSize, self.config.psfMatchConfig())
        except NoKernelCandidatesError as exc:
            raise InsufficientKernelSourcesError(
                f"cannot PSF-match: {exc}", rejected=exc.rejected, n_input=exc.n_input
            ) from exc

    def selectKernelSources(  # noqa: N802
        self,
        template: Exposure,
        science: Exposure,
        candidateList: Table,  # noqa: N803
        preconvolved: bool = False,
    ) -> Table:
        """The rows of ``candidateList`` usable as kernel sources (flags, S/N, isolation, masks).

        Raises
        ------
        InsufficientKernelSourcesError
            If fewer than ``minKernelSources`` remain.
        """
        fwhm_t, fwhm_s = self.getFwhms(template, science, preconvolved)
        basis = self.makeKernelBasis(fwhm_t, fwhm_s)
        candidates = self.makeCandidateList(template, science, candidateList, basis.kernel_size)
        if len(candidates) < self.config.minKernelSources:
            raise InsufficientKernelSourcesError(
                f"only {len(candidates)} kernel sources of {len(candidateList)} pass the selection "
                f"(need minKernelSources={self.config.minKernelSources})",
                n_input=len(candidateList),
            )
        if "id" in candidateList.colnames:
            chosen = {c.source_id for c in candidates}
            keep = np.array([int(i) in chosen for i in candidateList["id"]], dtype=bool)
        else:
            keep = np.zeros(len(candidateList), dtype=bool)
            keep[[c.source_id for c in candidates]] = True
        return candidateList[keep]

    # ------------------------------------------------------------------ run
    def run(
        self,
        template: Exposure,
        science: Exposure,
        kernelSources: Table,  # noqa: N803
        preconvolved: bool = False,
    ) -> Struct:
        """Fit the kernel matching ``template`` to ``science``.

        Parameters
        ----------
        template : Exposure
            The image to convolve, in the science image's pixel frame.
        science : Exposure
            The image to match.
        kernelSources : astropy.table.Table
            Source catalog (``x``, ``y`` in the common frame; ``psfFlux``/``psfFluxErr`` or ``snr``;
            flag columns) from which candidates are selected.
        preconvolved : bool
            The science image was convolved with its PSF (widens its FWHM by sqrt(2)).

        Returns
        -------
        Struct
            ``psfMatchingKernel`` (:class:`~tasks.psfmatch.SpatialKernel`), ``backgroundModel``
            (:class:`BackgroundModel`), ``diagnostics`` (:class:`~tasks.psfmatch.KernelFitDiagnostics`),
            ``basis`` and ``candidates`` (the candidates with their final status).

        Raises
        ------
        MissingPsfError, InsufficientKernelSourcesError, KernelSolutionError
        """
        cfg = self.config.psfMatchConfig()
        fwhm_t, fwhm_s = self.getFwhms(template, science, preconvolved)
        basis = self.makeKernelBasis(fwhm_t, fwhm_s)
        if self.config.noiseBiasCorrection:
            cfg = cfg.replace(noise_bias_scale=self.measureNoiseBiasScale(template, min(basis.sigmas)))
        candidates = self.makeCandidateList(template, science, kernelSources, basis.kernel_size)
        variation, scale = self._psfModelVariation(template, science, basis, candidates, max(fwhm_t, fwhm_s))
        fit_candidates = candidates if variation is None else subtract_variation(candidates, variation, basis, scale)

        def fit(config: PsfMatchConfig) -> tuple[SpatialKernel, KernelFitDiagnostics, int]:
            """The fit to the stars, then the PSF models' variation added back; and the stars' order."""
            fitted, diagnostics = self._fit(template, science, fit_candidates, config, basis, fwhm_t, fwhm_s)
            order = fitted.kernel_order
            return (fitted if variation is None else add_variation(fitted, variation, scale)), diagnostics, order

        kernel, diag, fitted_order = fit(cfg)
        if cfg.noise_bias_scale > 0:
            shared = self.measureSharedNoiseFraction(template, science, kernel)
            if shared > self.config.sharedNoiseThreshold:
                self.log.info(
                    "%.0f%% of the convolved image's noise is also in the image it is matched to (the science "
                    "visit is in the template?): refitting with the noise correction scaled by %.2f",
                    100.0 * shared, 1.0 - shared,
                )
                cfg = cfg.replace(noise_bias_scale=cfg.noise_bias_scale * max(0.0, 1.0 - shared))
                kernel, diag, fitted_order = fit(cfg)
        if variation is not None:
            # the candidates as returned carry the original science stamps (for diagnostics)
            original = {(c.x, c.y): c.science for c in candidates}
            diag.candidates = [replace(c, science=original[(c.x, c.y)]) for c in diag.candidates]
        diag.fwhm_template, diag.fwhm_science = fwhm_t, fwhm_s
        self._record(kernel, diag, science.bbox)
        # the order fitted to the stars; the kernel's own order includes the PSF models' variation
        self.metadata["spatialKernelOrder"] = fitted_order
        self.metadata["kernelOrder"] = kernel.kernel_order
        return Struct(
            psfMatchingKernel=kernel,
            backgroundModel=BackgroundModel(kernel),
            diagnostics=diag,
            basis=basis,
            candidates=diag.candidates,
        )

    def _psfModelVariation(  # noqa: N802
        self,
        template: Exposure,
        science: Exposure,
        basis: AlardLuptonBasis,
        candidates: list[KernelCandidate],
        radius: float,
    ) -> tuple[KernelVariation | None, float]:
        """The PSF models' kernel variation and the candidates' flux ratio (None, 1 when not used)."""
        md = self.metadata
        md["psfModelVariation"] = 0.0
        if not self.config.usePsfModelVariation:
            return None, 1.0
        if template.psf.is_constant and science.psf.is_constant:
            return None, 1.0
        try:
            variation = model_kernel_variation(
                template.psf, science.psf, basis, science.bbox,
                order=self.config.psfModelVariationOrder, grid=self.config.psfModelVariationGrid,
            )
        except (PsfError, PsfMatchError) as exc:
            self.log.warning("no PSF-model kernel variation (%s); the stars alone set it", exc)
            return None, 1.0
        md["psfModelVariation"] = variation.amplitude
        if variation.amplitude < self.config.minPsfModelVariation:
            return None, 1.0
        ratio, relative_err, snr_t, snr_s = aperture_flux_ratios(candidates, radius)
        min_snr = self.config.minStampSignalToNoise
        scale = reference_flux_ratio(ratio, relative_err, (snr_t >= min_snr) & (snr_s >= min_snr))
        if not (math.isfinite(scale) and scale > 0):
            self.log.warning("no PSF-model kernel variation: the candidates' flux ratio is %g", scale)
            return None, 1.0
        md["psfModelVariationScale"] = scale
        self.log.info(
            "PSF models: the kernel changes by up to %.1f%% across the image (order %d); removed from the "
            "candidates before the fit (flux ratio %.4f)",
            100.0 * variation.amplitude, variation.order, scale,
        )
        return variation, scale

    def _fit(
        self,
        template: Exposure,
        science: Exposure,
        candidates: list[KernelCandidate],
        cfg: PsfMatchConfig,
        basis: AlardLuptonBasis,
        fwhm_t: float,
        fwhm_s: float,
    ) -> tuple[SpatialKernel, KernelFitDiagnostics]:
        """The kernel fit of :meth:`run` for one configuration (errors mapped to the task's)."""
        try:
            fallback = list(range(cfg.spatial_kernel_order - 1, -1, -1)) if self.config.allowSpatialOrderFallback else []
            if self.config.kernelSumReference == "weighted" and cfg.use_sigma_clipping:
                kernel, diag = fit_kernel_weighted_clipping(
                    candidates, basis, science.bbox, cfg, fallback_orders=fallback,
                    min_per_term=self.config.minCandidatesPerSpatialTerm, log=self.log,
                    select_order=self.config.spatialOrderSelection == "crossValidation",
                    order_folds=self.config.spatialOrderFolds,
                    min_stamp_snr=self.config.minStampSignalToNoise, aperture_radius=max(fwhm_t, fwhm_s),
                )
            else:
                kernel, diag = self._fitWithFallback(template, science, candidates, cfg, basis, fallback)
        except NoKernelCandidatesError as exc:
            raise InsufficientKernelSourcesError(
                f"cannot PSF-match: {exc}", rejected=exc.rejected, n_input=exc.n_input
            ) from exc
        except SingularKernelSolutionError as exc:
            raise KernelSolutionError(
                f"cannot PSF-match: {exc}", condition_number=exc.condition_number
            ) from exc
        return kernel, diag

    def _fitWithFallback(  # noqa: N802
        self,
        template: Exposure,
        science: Exposure,
        candidates: list[KernelCandidate],
        cfg: PsfMatchConfig,
        basis: AlardLuptonBasis,
        fallback: list[int],
    ) -> tuple[SpatialKernel, KernelFitDiagnostics]:
        """``tasks.psfmatch.fit_psf_matching_kernel``, retried at lower spatial orders when singular."""
        orders = [cfg.spatial_kernel_order, *fallback]
        for k, order in enumerate(orders):
            try:
                return fit_psf_matching_kernel(
                    template, science, candidates, cfg.replace(spatial_kernel_order=order), basis=basis
                )
            except SingularKernelSolutionError as exc:
                if k + 1 >= len(orders):
                    raise
                self.log.warning("spatial kernel order %d failed (%s); retrying with order %d", order, exc, orders[k + 1])
        raise AssertionError("unreachable")

    def _record(self, kernel: SpatialKernel, diag: KernelFitDiagnostics, bbox: Box) -> None:
        md = self.metadata
        summary = diag.to_dict(include_candidates=False)
        for key in ("n_candidates", "n_used", "kernel_sum_median", "kernel_sum_sigma", "spatial_condition_number",
                    "n_parameters", "spatial_iterations", "residual_mean", "residual_std", "fwhm_template",
                    "fwhm_science", "elapsed"):
            md[key] = summary[key]
        md["rejected"] = dict(diag.rejected)
        md["rejectedSummary"] = format_rejections(diag.rejected)
        md["kernelSize"] = kernel.kernel_size
        md["spatialKernelOrder"] = kernel.kernel_order
        scores = getattr(diag, "spatial_order_scores", None) or {}
        md["spatialOrderScores"] = {
            str(order): (float(value) if math.isfinite(value) else None) for order, value in sorted(scores.items())
        }
        md["nBasis"] = kernel.n_basis
        md["basis"] = diag.basis.to_dict()
        cx, cy = bbox.center
        md["kernelSumCentre"] = float(kernel.kernel_sum(cx, cy))
        corners = [(bbox.x0, bbox.y0), (bbox.x1 - 1, bbox.y0), (bbox.x0, bbox.y1 - 1), (bbox.x1 - 1, bbox.y1 - 1)]
        md["kernelSumCorners"] = [float(kernel.kernel_sum(x, y)) for x, y in corners]
        md["backgroundCentre"] = float(kernel.background(cx, cy))
        ref = getattr(diag, "kernel_sum_reference", None)
        ref_err = getattr(diag, "kernel_sum_reference_error", None)
        if ref is not None and ref_err is not None and math.isfinite(ref) and math.isfinite(ref_err):
            md["kernelSumCandidates"] = ref
            md["kernelSumCandidatesError"] = ref_err
            tolerance = max(3.0 * ref_err, 0.02 * abs(ref))
            md["kernelSumConsistent"] = bool(abs(md["kernelSumCentre"] - ref) <= tolerance)
            if not md["kernelSumConsistent"]:
                self.log.warning(
                    "the spatial kernel sums to %.4f but its candidates' weighted mean kernel sum is %.4f +- %.4f: "
                    "the kernel-sum/background degeneracy is poorly broken by %d candidates; photometry on the "
                    "difference may be biased",
                    md["kernelSumCentre"], ref, ref_err, diag.n_used,
                )
        self.log.info(
            "kernel %d px (%d basis images), %d of %d candidates used, kernel sum %.5f, "
            "background %.3g counts at the centre, FWHM %.2f -> %.2f px",
            kernel.kernel_size, kernel.n_basis, diag.n_used, len(diag.candidates), md["kernelSumCentre"],
            md["backgroundCentre"], diag.fwhm_template, diag.fwhm_science,
        )


def candidate_summaries(candidates: Sequence[KernelCandidate]) -> list[dict[str, Any]]:
    """Plain-data summaries (no pixels) of kernel candidates, for metadata and plots."""
    return [c.summary() for c in candidates]


def aperture_flux_ratios(
    candidates: Sequence[KernelCandidate], radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Science/template aperture flux ratio of each candidate (:func:`stamp_fluxes`), its relative
    error, and the aperture S/N in the template and in the science stamp (NaN where undefined)."""
    fluxes = np.array([stamp_fluxes(c, radius) for c in candidates]).reshape(-1, 4)
    ft, et, fs, es = fluxes.T
    with np.errstate(divide="ignore", invalid="ignore"):
        return fs / ft, np.hypot(et / ft, es / fs), ft / et, fs / es


def reference_flux_ratio(ratio: np.ndarray, relative_err: np.ndarray, usable: np.ndarray) -> float:
    """The candidates' common flux ratio: the weighted median of the usable ratios (NaN below 3).

    Weights come from the relative errors: weights from the ratio's own error (which scales with
    the ratio) gave a near-zero ratio an enormous weight and made it the reference for every
    candidate.
    """
    usable = usable & np.isfinite(ratio) & np.isfinite(relative_err)
    if usable.sum() < 3:
        return float("nan")
    return weighted_median(ratio[usable], 1.0 / relative_err[usable] ** 2)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The weighted median: the value where the cumulative weight crosses half the total."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    order = np.argsort(v)
    v, w = v[order], w[order]
    cum = np.cumsum(w)
    if cum.size == 0 or not cum[-1] > 0:
        return float(np.median(v)) if v.size else float("nan")
    k = int(np.searchsorted(cum, 0.5 * cum[-1]))
    return float(v[min(k, v.size - 1)])


def consensus_value(values: np.ndarray, errors: np.ndarray, floor_quantile: float = 25.0) -> float:
    """The value most candidates agree on: the mode of a sum of Gaussians, one per candidate.

    Each candidate contributes a normalized Gaussian centred on its value with its own error,
    floored at the ``floor_quantile`` percentile of all errors (so that one very precise outlier --
    a bright variable star -- cannot outweigh a group of consistent candidates); the mode is
    searched among the candidates' values.
    """
    v = np.asarray(values, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    ok = np.isfinite(v) & np.isfinite(e) & (e > 0)
    if not ok.any():
        return float(np.median(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
    v, e = v[ok], e[ok]
    s = np.maximum(e, np.percentile(e, floor_quantile))
    z = (v[:, None] - v[None, :]) / s[None, :]
    score = (np.exp(-0.5 * z * z) / s[None, :]).sum(axis=1)
    return float(v[int(np.argmax(score))])


def stamp_fluxes(candidate: KernelCandidate, radius: float) -> tuple[float, float, float, float]:
    """Aperture fluxes and errors of a kernel candidate's source: template flux, error, science flux, error.

    The sum of ``stamp - median(stamp border)`` within ``radius`` pixels of the source, and the
    square root of the summed variance there.
    """
    n = candidate.stamp_size
    cx = candidate.x - candidate.xy0[0]
    cy = candidate.y - candidate.xy0[1]
    yy, xx = np.mgrid[0:n, 0:n]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= max(radius, 1.0) ** 2
    border = np.zeros((n, n), dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    out = []
    for image, variance in ((candidate.template, candidate.template_variance), (candidate.science, candidate.science_variance)):
        out.append(float((image[inside] - np.median(image[border])).sum()))
        out.append(math.sqrt(float(np.clip(variance[inside], 0.0, None).sum())))
    return out[0], out[1], out[2], out[3]


def _local_parameter_rows(kernel: SpatialKernel, candidates: Sequence[KernelCandidate]) -> np.ndarray:
    """:func:`tasks.psfmatch.spatial.local_parameters` of many candidates at once, one row each.

    The Chebyshev terms are evaluated for all positions in one call: per candidate they cost
    ~0.2 ms, 0.5 s per kernel fit with ~900 candidates on a 4096x4096 pair (bench_diffim).
    """
    if not candidates:
        return np.zeros((0, kernel.n_basis))
    coeffs = kernel.coefficients(np.array([c.x for c in candidates]), np.array([c.y for c in candidates]))
    n_bg = {c.solution.n_background_terms if c.solution is not None else 0 for c in candidates}
    if len(n_bg) != 1:
        return np.array([local_parameters(kernel, c) for c in candidates])
    (nb,) = n_bg
    bg = kernel.background_coefficients
    if nb and bg.size != nb:
        bg = np.zeros(nb)
    return np.hstack([coeffs, np.broadcast_to(bg[:nb], (len(candidates), nb))])


def select_spatial_order(
    candidates: Sequence[KernelCandidate],
    n_basis: int,
    bbox: Box,
    orders: Sequence[int],
    *,
    constant_first_term: bool = True,
    seed: int = 20240607,
    n_folds: int = 10,
) -> tuple[int, dict[int, float]]:
    """The spatial kernel order that best predicts candidates left out of the fit (k-fold cross-validation).

    The solved candidates are split at random (a fixed seed: deterministic) into ``n_folds``
    folds; for each order and fold the spatial kernel and background are fitted on the other
    folds and every candidate of the fold is scored with its own stamp's chi^2
    (``CandidateSolution.residual_stats``: weights ``1 / V``, so the bright stars -- where a wrong
    kernel shape shows -- count most).  The order with the smallest summed held-out chi^2 wins;
    an order whose system is singular on any fold scores infinity.

    Why: with too few or badly spread candidates for the number of free coefficients (27 basis
    images x 6 Chebyshev terms at order 2) the spatial model follows the noise of a few bright
    stars and is wrong elsewhere -- badly at the image corners -- while the candidates' own fit
    residuals look fine.  Held-out candidates see it.

    The global normal equations are those of :func:`tasks.psfmatch.spatial.fit_spatial_kernel`
    (same parameter layout), assembled here for all orders at once from per-candidate Kronecker
    products -- ``sum_k M_k (x) f_k f_k^T`` as one matrix product -- which takes milliseconds
    where building the system per order and fold would take ~0.2 s each for 900 candidates.

    Returns
    -------
    order : int
    scores : dict
        Held-out chi^2 per pixel of each order tried.
    """
    orders = sorted({int(o) for o in orders}, reverse=True)
    top = orders[0]
    funcs = ChebyshevBasis2D(bbox, top)
    terms = funcs.terms
    n_t = len(terms)
    f = funcs.evaluate(np.array([c.x for c in candidates]), np.array([c.y for c in candidates]))  # (K, T)
    mats = np.stack([c.solution.normal_matrix for c in candidates])  # type: ignore[union-attr]
    vecs = np.stack([c.solution.normal_vector for c in candidates])  # type: ignore[union-attr]
    noise_list = [c.solution.noise_matrix for c in candidates]  # type: ignore[union-attr]
    noise = np.stack(noise_list) if all(nm is not None for nm in noise_list) else None
    n_loc = mats.shape[1]
    n_bg = n_loc - n_basis
    k = len(candidates)
    folds = np.random.default_rng(seed).permutation(k) % n_folds
    ff = (f[:, :, None] * f[:, None, :]).reshape(k, n_t * n_t)
    npix = np.array([max(c.solution.n_pixels, 1) for c in candidates], dtype=np.float64)  # type: ignore[union-attr]
    totals = {o: 0.0 for o in orders}

    def kernel_block(matrices: np.ndarray, train: np.ndarray) -> np.ndarray:
        # kernel-kernel block G[i, s, j, t] = sum_k M_k[i, j] f_k[s] f_k[t]
        block = matrices[train, :n_basis, :n_basis].reshape(-1, n_basis * n_basis).T @ ff[train]
        return block.reshape(n_basis, n_basis, n_t, n_t).transpose(0, 2, 1, 3)

    for fold in range(n_folds):
        train = folds != fold
        test = ~train
        kk = kernel_block(mats, train)
        nkk = kernel_block(noise, train) if noise is not None else None
        kb = np.einsum("kiu,ks->isu", mats[train, :n_basis, n_basis:], f[train])  # (n_basis, T, n_bg)
        bb = mats[train, n_basis:, n_basis:].sum(axis=0)
        vk = np.einsum("ki,ks->is", vecs[train, :n_basis], f[train])
        vb = vecs[train, n_basis:].sum(axis=0)
        for order in orders:
            sel = [t for t, (i, j) in enumerate(terms) if i + j <= order]
            index = [(i, t) for i in range(n_basis) for t in (sel[:1] if (i == 0 and constant_first_term) else sel)]
            rows_i = np.array([i for i, _ in index])
            rows_t = np.array([t for _, t in index])
            n_k = len(index)
            big = np.zeros((n_k + n_bg, n_k + n_bg))
            big[:n_k, :n_k] = kk[rows_i[:, None], rows_t[:, None], rows_i[None, :], rows_t[None, :]]
            big[:n_k, n_k:] = kb[rows_i, rows_t]
            big[n_k:, :n_k] = big[:n_k, n_k:].T
            big[n_k:, n_k:] = bb
            rhs = np.concatenate([vk[rows_i, rows_t], vb])
            diag = np.diag(big)
            if not np.all(diag > 0):
                totals[order] = float("inf")
                continue
            d = np.sqrt(diag)
            scaled = big / d[:, None] / d[None, :]
            try:
                if noise is not None:
                    big_noise = np.zeros_like(big)
                    big_noise[:n_k, :n_k] = nkk[rows_i[:, None], rows_t[:, None], rows_i[None, :], rows_t[None, :]]
                    scaled = remove_noise(scaled, big_noise / d[:, None] / d[None, :])
                params = scipy.linalg.solve(scaled, rhs / d, assume_a="pos") / d
            except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
                totals[order] = float("inf")
                continue
            coeffs = np.zeros((n_basis, n_t))
            coeffs[rows_i, rows_t] = params[:n_k]
            local = np.hstack([f[test] @ coeffs.T, np.broadcast_to(params[n_k:], (int(test.sum()), n_bg))])
            chi2 = sum(
                c.solution.residual_stats(theta)[2]  # type: ignore[union-attr]
                for c, theta in zip((c for c, t in zip(candidates, test, strict=True) if t), local, strict=True)
            )
            totals[order] += chi2
    total_pixels = float(npix.sum())
    scores = {o: (v / total_pixels if np.isfinite(v) else float("inf")) for o, v in totals.items()}
    best = min(orders, key=lambda o: (scores[o], o))
    return best, scores


def _robust_sigma(values: np.ndarray) -> float:
    q75, q25 = np.percentile(values, [75.0, 25.0])
    return float(0.7413 * (q75 - q25))


def fit_kernel_weighted_clipping(
    candidates: Sequence[KernelCandidate],
    basis: AlardLuptonBasis,
    bbox: Box,
    config: PsfMatchConfig,
    *,
    fallback_orders: Sequence[int] = (),
    min_per_term: int = 0,
    log: logging.Logger | None = None,
    select_order: bool = False,
    order_folds: int = 10,
    min_stamp_snr: float = 0.0,
    aperture_radius: float = 3.0,
) -> tuple[SpatialKernel, KernelFitDiagnostics]:
    """The kernel fit of :func:`tasks.psfmatch.fit_kernel_to_candidates` with a weighted kernel-sum reference.

    The steps are those of ``tasks.psfmatch`` (solve every candidate; reject candidates whose own
    residual is bad; clip kernel-sum outliers; fit the spatial kernel and background; reject
    candidates that the spatial model fits badly and refit), with one change: the kernel sums are
    clipped around a reference that favours the precise candidates instead of the plain median:
    first the consensus value (:func:`consensus_value`, the mode of the candidates' kernel sums
    each smoothed by its own error, errors floored at their lower quartile: robust to a single
    bright variable star), then, after each clipping round, the *inverse-variance weighted* median
    of the survivors (weights ``1 / sigma_k^2`` from each candidate's own kernel-sum error).

    Why: a faint candidate's own solution is biased low -- the noise of the image being convolved
    is a noisy regressor (errors-in-variables attenuation), strongest for a single-epoch template
    or when the science image is the convolved one -- and faint candidates are the majority.  On a
    simulated 1024x1024 pair with the science image sharper (0.55" against 0.68"), the plain
    median of the candidate kernel sums sat 20% below the truth, the bright (S/N > 150) candidates
    were within 1% of it and were clipped as "outliers" against that median, and the final kernel
    sum came out 6.4% low; with the weighted reference it is within 1%.  The faint candidates are
    kept (their errors cover the bias) and weigh little in the spatial fit.

    ``fallback_orders``: spatial kernel orders to try, in turn, when the spatial system at
    ``config.spatial_kernel_order`` is singular or ill-conditioned (the per-candidate solutions do
    not depend on it, so they are reused), or when fewer than ``min_per_term`` good candidates per
    Chebyshev term remain after the clipping.

    ``min_stamp_snr``: candidates whose aperture S/N (:func:`stamp_fluxes`, radius ``aperture_radius``
    pixels) is below it in either stamp are rejected before they are solved (a source missing from
    one image), and so are those whose aperture flux ratio differs from the candidates' weighted
    median by more than 10% and 5 sigma (a transient on a galaxy, a strongly variable star).

    ``select_order``: after the clipping, choose the spatial order among those allowed (the
    configured one and the lower ``fallback_orders``) with :func:`select_spatial_order`; the scores
    are kept in ``diag.spatial_order_scores`` (held-out chi^2 per pixel by order).
    """
    log = log or _log
    cfg = config
    start = time.perf_counter()
    bg_model = ChebyshevBasis2D(bbox, cfg.spatial_background_order) if cfg.fit_background else None
    unmatched: dict[int, KernelCandidate] = {}
    if min_stamp_snr > 0:
        ratio, relative_err, snr_t, snr_s = aperture_flux_ratios(candidates, aperture_radius)
        matched = (snr_t >= min_stamp_snr) & (snr_s >= min_stamp_snr)
        ratio_err = np.abs(ratio) * relative_err
        reference = reference_flux_ratio(ratio, relative_err, matched)
        off = matched & (np.abs(ratio - reference) > np.maximum(5.0 * ratio_err, 0.1 * np.abs(reference)))
        if not math.isfinite(reference) or off.sum() > 0.5 * matched.sum():
            # When most candidates disagree with the reference, the reference is what is wrong (the
            # aperture ratio also depends on the two PSFs, on blends and on the coadd's clipping):
            # the screening is skipped and the kernel fit's own clipping decides.
            if math.isfinite(reference):
                log.warning(
                    "aperture flux ratio screening skipped: %d of %d candidates are off the reference %.4g",
                    int(off.sum()), int(matched.sum()), reference,
                )
            off[:] = False
        for i, c in enumerate(candidates):
            if not matched[i]:
                unmatched[i] = c.rejected(f"aperture S/N below {min_stamp_snr:g} in one image")
            elif off[i]:
                unmatched[i] = c.rejected("aperture flux ratio off by more than 10% and 5 sigma")
    solved = iter(
        solve_candidates(
            [c for i, c in enumerate(candidates) if i not in unmatched],
            basis,
            background=bg_model,
            fit_background=cfg.fit_background,
            constant_variance_weighting=cfg.constant_variance_weighting,
            noise_bias_scale=cfg.noise_bias_scale,
            max_condition_number=cfg.max_condition_number,
            workers=cfg.workers,
        )
    )
    cands = [unmatched[i] if i in unmatched else next(solved) for i in range(len(candidates))]

    def good_indices() -> list[int]:
        return [i for i, c in enumerate(cands) if c.status == GOOD]

    for i in good_indices():
        sol = cands[i].solution
        assert sol is not None
        if abs(sol.residual_mean) > cfg.candidate_residual_mean_max:
            cands[i] = cands[i].rejected(f"residual mean above {cfg.candidate_residual_mean_max:g}")
        elif sol.residual_std > cfg.candidate_residual_std_max:
            cands[i] = cands[i].rejected(f"residual std above {cfg.candidate_residual_std_max:g}")
    reference = float("nan")
    for iteration in range(10):
        idx = good_indices()
        if len(idx) < 3:
            break
        ksums = np.array([cands[i].solution.kernel_sum for i in idx])  # type: ignore[union-attr]
        errors = np.array([cands[i].solution.kernel_sum_error for i in idx])  # type: ignore[union-attr]
        errors = np.where(np.isfinite(errors) & (errors > 0), errors, np.inf)
        finite = np.isfinite(errors)
        weights = np.where(finite, 1.0 / np.where(finite, errors, 1.0) ** 2, 0.0)
        if iteration == 0:
            # start from the value most candidates agree on, not from one precise outlier
            reference = consensus_value(ksums, errors)
        else:
            reference = weighted_median(ksums, weights) if weights.sum() > 0 else float(np.median(ksums))
        floor = cfg.ksum_sigma_floor * abs(reference)
        sig = np.sqrt(np.where(finite, errors, 0.0) ** 2 + floor**2)
        deviation = np.where(finite, (ksums - reference) / sig, 0.0)
        scale = max(1.0, _robust_sigma(deviation[finite])) if finite.sum() > 3 else 1.0
        outliers = [i for i, d in zip(idx, deviation, strict=True) if abs(d) > cfg.max_ksum_sigma * scale]
        if not outliers:
            break
        for i in outliers:
            cands[i] = cands[i].rejected(f"kernel sum outlier (> {cfg.max_ksum_sigma:g} sigma)")

    kernel: SpatialKernel | None = None
    info = None
    iterations = 0
    orders = [cfg.spatial_kernel_order, *[o for o in fallback_orders if o < cfg.spatial_kernel_order]]
    order_index = 0
    n_good = len(good_indices())
    while (
        min_per_term > 0
        and order_index + 1 < len(orders)
        and n_good < min_per_term * (orders[order_index] + 1) * (orders[order_index] + 2) // 2
    ):
        log.warning(
            "%d good kernel candidates are too few for spatial kernel order %d (%d per Chebyshev term wanted); "
            "using order %d",
            n_good, orders[order_index], min_per_term, orders[order_index + 1],
        )
        order_index += 1
    scores: dict[int, float] = {}
    if select_order and order_index + 1 < len(orders) and len(good_indices()) >= 2 * cfg.min_candidates:
        allowed = orders[order_index:]
        chosen, scores = select_spatial_order(
            [cands[i] for i in good_indices()], basis.n_basis, bbox, allowed,
            constant_first_term=cfg.constant_first_term,
            n_folds=order_folds,
        )
        log.info(
            "spatial kernel order %d chosen by %d-fold cross-validation over %d candidates (held-out chi2 per "
            "pixel: %s)", chosen, order_folds, len(good_indices()),
            ", ".join(f"order {o}: {v:.5f}" for o, v in sorted(scores.items(), reverse=True)),
        )
        order_index = orders.index(chosen)
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
        try:
            kernel, info = fit_spatial_kernel(
                [cands[i] for i in idx],
                basis,
                bbox,
                kernel_order=orders[order_index],
                background_order=cfg.spatial_background_order,
                fit_background=cfg.fit_background,
                constant_first_term=cfg.constant_first_term,
                max_condition_number=cfg.max_spatial_condition_number,
            )
        except SingularKernelSolutionError as exc:
            if order_index + 1 >= len(orders):
                raise
            order_index += 1
            log.warning(
                "spatial kernel order %d failed with %d candidates (%s); retrying with order %d",
                orders[order_index - 1], len(idx), exc, orders[order_index],
            )
            continue
        iterations += 1
        if iterations >= cfg.max_spatial_iterations:
            break
        n_rejected = 0
        for i, theta in zip(idx, _local_parameter_rows(kernel, [cands[i] for i in idx]), strict=True):
            sol = cands[i].solution
            assert sol is not None
            mean, std, _ = sol.residual_stats(theta)
            if abs(mean) > cfg.candidate_residual_mean_max:
                cands[i] = cands[i].rejected(f"spatial model residual mean above {cfg.candidate_residual_mean_max:g}")
                n_rejected += 1
            elif std > cfg.candidate_residual_std_max:
                cands[i] = cands[i].rejected(f"spatial model residual std above {cfg.candidate_residual_std_max:g}")
                n_rejected += 1
        if n_rejected == 0:
            break
    assert kernel is not None and info is not None
    used = [cands[i] for i in good_indices()]
    stats = np.array([c.solution.residual_stats(theta)[:2]  # type: ignore[union-attr]
                      for c, theta in zip(used, _local_parameter_rows(kernel, used), strict=True)])
    ksums = np.array([c.solution.kernel_sum for c in used])  # type: ignore[union-attr]
    errs = np.array([c.solution.kernel_sum_error for c in used])  # type: ignore[union-attr]
    ok = np.isfinite(errs) & (errs > 0)
    if ok.any():
        w = 1.0 / errs[ok] ** 2
        reference = float((w * ksums[ok]).sum() / w.sum())
        reference_error = float(1.0 / math.sqrt(w.sum()))
    else:
        reference_error = float("nan")
    diag = fit_diagnostics(basis, cands, used, stats, info, iterations, start)
    # not fields of KernelFitDiagnostics: the candidates' inverse-variance weighted kernel sum
    diag.kernel_sum_reference = reference  # type: ignore[attr-defined]
    diag.kernel_sum_reference_error = reference_error  # type: ignore[attr-defined]
    diag.spatial_order_scores = scores  # type: ignore[attr-defined]
    cx, cy = bbox.center
    log.info(
        "PSF-matching kernel: %d px, %d basis images, spatial order %d, %d of %d candidates used (rejected: %s), "
        "kernel sum %.5f at the centre (weighted reference %.5f), spatial condition number %.3g, %.2f s",
        basis.kernel_size, basis.n_basis, kernel.kernel_order, diag.n_used, len(cands),
        format_rejections(diag.rejected), kernel.kernel_sum(cx, cy), reference, info.condition_number, diag.elapsed,
    )
    return kernel, diag
