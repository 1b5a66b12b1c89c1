"""ModelPsfMatchTask: convolve an exposure so that its PSF becomes a given model PSF.

As LSST's ``lsst.ip.diffim.ModelPsfMatchTask``: the exposure's PSF model and the reference model
are *realized* at the centres of a grid of cells covering the exposure, each pair becomes a
noise-free kernel candidate, and the same Alard--Lupton machinery that MakeKernelTask uses
(:mod:`tasks.psfmatch`) solves the per-candidate kernels and their spatial variation, with no sigma
clipping (no pair can be an outlier) and no differential background.  The kernel's sum is then set
to ``kernelSum`` everywhere (the sum of a model-to-model kernel is meaningless: both PSFs are
normalized), and the exposure is convolved with it.

Choices, and where they differ from LSST
----------------------------------------
- **The matched exposure's PSF is the reference model** (LSST's behaviour: ``setPsf(referencePsfModel)``;
  issue 6 said "no PSF", but downstream tasks -- assembleCoadd's CoaddPsf, detection -- need one).
- **A kernel too large for the PSF images** (beyond ``psfSize // 2``) is clamped with a warning;
  LSST raises.  The requested size is ``kernelSize`` or, when None, the size the Alard--Lupton
  rules derive from the two FWHMs.
- Cells: ``sizeCellX`` x ``sizeCellY`` pixels (LSST: 128), with at least ``minCellsPerAxis`` per
  axis so that the spatial model (order ``spatialKernelOrder``) is constrained on small exposures.
- Variance is convolved with the kernel squared and masks are grown by the kernel footprint
  (:func:`tasks.psfmatch.convolve_exposure`); pixels within the kernel half-width of the border
  are marked ``EDGE``.
"""

from __future__ import annotations

import math
import numpy as np

from butler.exposure import Exposure
from butler.psf import Psf, measure_fwhm
from pipeline.config import Config, Field
from pipeline.struct import Struct
from pipeline.task import Task, timeMethod
from tasks.psfmatch import (
    PsfMatchConfig,
    PsfMatchError,
    SpatialKernel,
    basis_for_fwhm,
    convolve_exposure,
    fit_kernel_to_candidates,
    max_model_kernel_size,
    mean_psf_fwhm,
    model_psf_matching_candidates,
)

__all__ = ["ModelPsfMatchConfig", "ModelPsfMatchTask", "ModelPsfMatchError", "matched_psf_image"]


class ModelPsfMatchError(PsfMatchError):
    """ModelPsfMatchTask cannot run (no PSF on the exposure, bad reference model)."""


class ModelPsfMatchConfig(Config):
    """Configuration of :class:`ModelPsfMatchTask` (LSST's ``ModelPsfMatchConfig`` and the
    relevant ``PsfMatchConfigAL`` fields)."""

    kernelSize: int | None = Field(
        None,
        description="Odd matching-kernel size, pixels; None derives it from the two PSF FWHMs (Alard-Lupton "
        "rules). Clamped, with a warning, to psfSize//2 where psfSize is the larger PSF image.",
    )
    kernelSizeMin: int = Field(11, description="Smallest derived kernel size, pixels (odd; LSST 11).")
    kernelSizeMax: int = Field(35, description="Largest derived kernel size, pixels (odd).")
    sizeCellX: int = Field(128, description="Cell width, pixels: one candidate per cell (LSST 128).")
    sizeCellY: int = Field(128, description="Cell height, pixels.")
    minCellsPerAxis: int = Field(3, description="At least this many cells per axis (constrains the spatial fit).")
    maxCellsPerAxis: int = Field(16, description="At most this many cells per axis (bounds the solve time on large exposures).")
    spatialKernelOrder: int = Field(2, description="Chebyshev order of the kernel's spatial variation (LSST 2).")
    fwhmGrid: int = Field(3, description="PSF FWHMs (for the basis widths) are averaged on an NxN grid.")
    cellSize: int = Field(512, description="Cell size of the FFT convolution, pixels.")
    fftWorkers: int | None = Field(None, description="Threads for scipy.fft (None: scipy's default).")

    def validate(self) -> None:
        super().validate()
        if self.kernelSize is not None and (self.kernelSize < 3 or self.kernelSize % 2 == 0):
            raise ValueError(f"kernelSize must be odd and >= 3 pixels, got {self.kernelSize}")
        if self.kernelSizeMin % 2 == 0 or self.kernelSizeMax % 2 == 0 or not 3 <= self.kernelSizeMin <= self.kernelSizeMax:
            raise ValueError(
                f"kernelSizeMin/Max must be odd with 3 <= min <= max, got {self.kernelSizeMin}, {self.kernelSizeMax}"
            )
        if min(self.sizeCellX, self.sizeCellY) < 8:
            raise ValueError("sizeCellX/sizeCellY must be >= 8 pixels")
        if not 1 <= self.minCellsPerAxis <= self.maxCellsPerAxis:
            raise ValueError("need 1 <= minCellsPerAxis <= maxCellsPerAxis")

    def psf_match_config(self, kernel_size: int | None = None) -> PsfMatchConfig:
        """The :class:`~tasks.psfmatch.PsfMatchConfig` used for the fit (no clipping, no background)."""
        return PsfMatchConfig.for_model_psf_matching(
            kernel_size=kernel_size,
            kernel_size_min=self.kernelSizeMin,
            kernel_size_max=self.kernelSizeMax,
            spatial_kernel_order=self.spatialKernelOrder,
            spatial_background_order=0,
            fwhm_grid=self.fwhmGrid,
            min_candidates=1,
            workers=self.fftWorkers,
        )


def matched_psf_image(psf: Psf, kernel: SpatialKernel, x: float, y: float) -> np.ndarray:
    """The PSF after convolution with a matching kernel at ``(x, y)``: ``psf.image(x, y) (x) K(x, y)``.

    Returned un-normalized (it sums to the kernel sum), on a grid large enough for both.
    """
    from scipy.signal import fftconvolve

    return fftconvolve(psf.image(x, y), kernel.kernel_image(x, y), mode="full")


class ModelPsfMatchTask(Task):
    """Match an exposure's PSF to a model PSF (for coaddition).

    Examples
    --------
    >>> task = ModelPsfMatchTask()                                        # doctest: +SKIP
    >>> result = task.run(exposure, GaussianPsf.from_fwhm(5.0))           # doctest: +SKIP
    >>> result.psfMatchedExposure.psf                                     # doctest: +SKIP
    """

    ConfigClass = ModelPsfMatchConfig
    _DefaultName = "modelPsfMatch"

    @timeMethod
    def run(self, exposure: Exposure, referencePsfModel: Psf, kernelSum: float = 1.0) -> Struct:  # noqa: N803
        """PSF-match ``exposure`` to ``referencePsfModel``.

        Parameters
        ----------
        exposure : Exposure
            Must have a PSF model.  Not modified.
        referencePsfModel : Psf
            The PSF to match to; should be broader than the exposure's everywhere (matching to a
            narrower PSF is a deconvolution and rings).
        kernelSum : float
            Sum of the matching kernel everywhere (a flux scale applied by the convolution).

        Returns
        -------
        Struct
            ``psfMatchedExposure`` (same bbox, WCS, photo_calib, visit_info, band, metadata; PSF =
            ``referencePsfModel``), ``psfMatchingKernel`` (:class:`~tasks.psfmatch.SpatialKernel`),
            ``kernelCellSet`` (the solved candidates, one per cell, with their positions and
            per-candidate solutions) and ``referencePsfModel``.

        Raises
        ------
        ModelPsfMatchError
            If the exposure has no PSF, or the reference model is not a PSF.
        """
        if exposure.psf is None:
            raise ModelPsfMatchError(
                f"ModelPsfMatchTask: the exposure {exposure.bbox} has no PSF model; it cannot be matched to "
                "a reference PSF (attach the PSF measured for it, e.g. the calexp's, before warping)"
            )
        if not isinstance(referencePsfModel, Psf):
            raise ModelPsfMatchError(
                f"ModelPsfMatchTask: referencePsfModel must be a butler.psf.Psf, got {type(referencePsfModel).__name__}"
            )
        if not (math.isfinite(kernelSum) and kernelSum > 0):
            raise ModelPsfMatchError(f"ModelPsfMatchTask: kernelSum must be a positive number, got {kernelSum!r}")
        cfg = self.config
        bbox = exposure.bbox
        psf_in = exposure.psf
        fit_cfg = cfg.psf_match_config(cfg.kernelSize)
        fwhm_in = mean_psf_fwhm(psf_in, bbox, cfg.fwhmGrid)
        fwhm_ref = mean_psf_fwhm(referencePsfModel, bbox, cfg.fwhmGrid)
        if fwhm_ref < fwhm_in:
            self.log.warning(
                "reference PSF FWHM %.2f px is narrower than the exposure's %.2f px: matching deconvolves and "
                "will ring; choose a broader model PSF",
                fwhm_ref, fwhm_in,
            )
        requested = basis_for_fwhm(fwhm_in, fwhm_ref, fit_cfg).kernel_size
        if cfg.kernelSize is None:
            # A derived size is clamped quietly to what the PSF images support (psfSize // 2); an
            # explicit kernelSize that is too large gets the warning (model_psf_matching_candidates).
            cx, cy = bbox.center
            psf_size = max(max(psf_in.image(cx, cy).shape), max(referencePsfModel.image(cx, cy).shape))
            requested = min(requested, max_model_kernel_size(psf_size + 1 - psf_size % 2))
        nx = int(np.clip(math.ceil(bbox.width / cfg.sizeCellX), cfg.minCellsPerAxis, cfg.maxCellsPerAxis))
        ny = int(np.clip(math.ceil(bbox.height / cfg.sizeCellY), cfg.minCellsPerAxis, cfg.maxCellsPerAxis))
        with self.timer("buildCellSet"):
            candidates, kernel_size = model_psf_matching_candidates(
                psf_in, referencePsfModel, bbox, (nx, ny), requested
            )
        fit_cfg = fit_cfg.replace(kernel_size=kernel_size)
        basis = basis_for_fwhm(fwhm_in, fwhm_ref, fit_cfg)
        with self.timer("solve"):
            kernel, diagnostics = fit_kernel_to_candidates(candidates, basis, bbox, fit_cfg)
        kernel = kernel.with_kernel_sum(kernelSum)
        cx, cy = bbox.center
        self.log.info(
            "PSF-matching %s (FWHM %.2f px) to a %.2f px model: %d px kernel, %d cells, kernel sum %.4f",
            bbox, fwhm_in, fwhm_ref, kernel_size, len(candidates), float(kernel.kernel_sum(cx, cy)),
        )
        with self.timer("convolve"):
            matched = convolve_exposure(exposure, kernel, cell_size=cfg.cellSize, workers=cfg.fftWorkers)
        matched.psf = referencePsfModel
        self.metadata.update(
            {
                "kernelSize": kernel_size,
                "requestedKernelSize": requested,
                "nCells": len(candidates),
                "fwhmInput": fwhm_in,
                "fwhmReference": fwhm_ref,
                "kernelSum": float(kernelSum),
                "spatialConditionNumber": float(diagnostics.spatial_condition_number),
            }
        )
        return Struct(
            psfMatchedExposure=matched,
            psfMatchingKernel=kernel,
            kernelCellSet=diagnostics.candidates,
            referencePsfModel=referencePsfModel,
            diagnostics=diagnostics,
        )

    def matched_fwhm(self, psf: Psf, kernel: SpatialKernel, x: float, y: float) -> float:
        """FWHM in pixels of ``psf`` convolved with ``kernel`` at ``(x, y)`` (a quality check)."""
        image = matched_psf_image(psf, kernel, x, y)
        return measure_fwhm(image / image.sum())

