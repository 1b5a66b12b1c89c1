"""Configuration of the PSF-matching kernel fit and of the kernel-candidate selection.

Defaults follow LSST's ``PsfMatchConfigAL`` / ``MakeKernelConfig`` (and the ``subtractImages``
source selector) where they exist; the differences are noted on the fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import PsfMatchConfigError

__all__ = ["PsfMatchConfig"]


@dataclass(frozen=True)
class PsfMatchConfig:
    """Settings of candidate selection, basis, spatial model, solution and clipping.

    Basis
    -----
    kernel_size : int or None
        Odd kernel size in pixels; None derives it from the PSF widths (``scale_by_fwhm``) or uses
        ``kernel_size_min``.
    scale_by_fwhm : bool
        Scale the Gaussian widths and the kernel size by the two PSF FWHMs (LSST ``scaleByFwhm``).
    kernel_size_fwhm_scaling : float
        Kernel size = this times the largest basis sigma (LSST ``kernelSizeFwhmScaling``).
    kernel_size_min, kernel_size_max : int
        Odd limits of the derived kernel size, pixels.
    basis_sigmas, basis_degrees : tuple
        Unscaled Gaussian widths (pixels) and their polynomial degrees (LSST ``alardSigGauss``,
        ``alardDegGauss``); the number of Gaussians is their length.
    gauss_beta, min_sigma, deconvolution_degree :
        LSST ``alardGaussBeta``, ``alardMinSig`` (pixels) and ``alardDegGaussDeconv``.
    orthonormalize_basis : bool
        Orthonormalize basis images 1..n-1 (see :func:`.basis.alard_lupton_basis`).

    Spatial model
    -------------
    spatial_kernel_order, spatial_background_order : int
        Chebyshev orders (LSST ``spatialKernelOrder`` = 2, ``spatialBgOrder`` = 1; note that LSST's
        ``subtractImages`` overrides them to 1 and 2).
    fit_background : bool
        Fit the differential background together with the kernel.
    constant_first_term : bool
        Keep the first coefficient (the kernel sum) spatially constant, as LSST does for the
        Alard--Lupton basis.

    Solution
    --------
    constant_variance_weighting : bool
        Weight stamp pixels by ``1 / median(variance)`` (LSST default) rather than ``1 / variance``.
    noise_bias_scale : float
        Remove this multiple of the expected contribution of the convolved image's noise (white
        noise of the variance plane) from the normal equations of the spatial fit (errors in the
        variables; see :mod:`.solve`).  0 (the default, and for noise-free model PSFs) turns the
        correction off; MakeKernelTask measures the value on the image it convolves.
    max_condition_number, max_spatial_condition_number : float
        Limits on the condition numbers of the diagonally scaled per-candidate and global normal
        matrices (a candidate over the limit is rejected; the global system raises).  Scaling
        removes the flux units, so these are much smaller than LSST's unscaled eigenvalue ratios;
        noise-free model PSFs on small kernels reach ~5e7 (LSST's own single-kernel check,
        ``checkConditionNumber``, is off by default), hence 1e10 for both.

    Clipping (all off when ``use_sigma_clipping`` is False, as ModelPsfMatchTask needs)
    ---------------------------------------------------------------------------------
    max_ksum_sigma : float
        Reject candidates whose kernel sum is more than this many sigmas from the median (LSST
        ``maxKsumSigma``); sigma is each candidate's own kernel-sum uncertainty, see :mod:`.fit`.
    ksum_sigma_floor : float
        Floor on that sigma, relative to the median kernel sum (keeps noise-free inputs from
        rejecting candidates over rounding differences).
    candidate_residual_mean_max, candidate_residual_std_max : float
        Reject candidates whose normalized residual has ``|mean|`` or std above these, for their
        own solution and again under the spatial model (LSST ``candidateResidualMeanMax``,
        ``candidateResidualStdMax``).
    max_spatial_iterations : int
        Spatial fit / reject rounds (LSST ``maxSpatialIterations``).
    min_candidates : int
        Fewest good candidates the fit accepts (LSST ``minKernelSources``).

    Candidate selection
    -------------------
    min_snr, max_snr : float
        Source S/N range (``psfFlux / psfFluxErr``, else the ``snr`` column).
    max_candidates : int
        Keep at most this many, evenly spread: the brightest of each cell of a grid first.
    candidate_grid : int or None
        Cells per side of that grid (None: ``ceil(sqrt(max_candidates))``).
    isolation_radius : float or None
        Reject sources with another source within this many pixels (None: half the kernel size).
    stamp_size : int or None
        Candidate stamp size in pixels (None: ``2 * kernel_size + 1``, as LSST, which leaves a
        ``kernel_size + 2`` fitted region).
    bad_mask_planes : tuple of str
        Planes that disqualify a stamp in either image (planes an exposure lacks are skipped).
    bad_flags : tuple of str
        Boolean catalog columns that disqualify a source (absent columns are skipped).
    fwhm_grid : int
        PSF FWHMs are averaged over a ``fwhm_grid x fwhm_grid`` grid of positions.
    workers : int or None
        Threads for ``scipy.fft`` (None: scipy's default / the caller's ``set_workers``).
    """

    kernel_size: int | None = None
    scale_by_fwhm: bool = True
    kernel_size_fwhm_scaling: float = 6.0
    kernel_size_min: int = 21
    kernel_size_max: int = 35
    basis_sigmas: tuple[float, ...] = (0.7, 1.5, 3.0)
    basis_degrees: tuple[int, ...] = (4, 2, 2)
    gauss_beta: float = 2.0
    min_sigma: float = 0.7
    deconvolution_degree: int = 3
    orthonormalize_basis: bool = False

    spatial_kernel_order: int = 2
    spatial_background_order: int = 1
    fit_background: bool = True
    constant_first_term: bool = True

    constant_variance_weighting: bool = True
    noise_bias_scale: float = 0.0
    max_condition_number: float = 1.0e10
    max_spatial_condition_number: float = 1.0e10

    use_sigma_clipping: bool = True
    max_ksum_sigma: float = 3.0
    ksum_sigma_floor: float = 1.0e-3
    candidate_residual_mean_max: float = 0.25
    candidate_residual_std_max: float = 1.5
    max_spatial_iterations: int = 3
    min_candidates: int = 3

    min_snr: float = 10.0
    max_snr: float = 500.0
    max_candidates: int = 1000
    candidate_grid: int | None = None
    isolation_radius: float | None = None
    stamp_size: int | None = None
    bad_mask_planes: tuple[str, ...] = ("BAD", "SAT", "NO_DATA", "EDGE", "CR")
    bad_flags: tuple[str, ...] = (
        "pixelFlags_saturated",
        "pixelFlags_bad",
        "pixelFlags_edge",
        "pixelFlags_nodata",
        "pixelFlags_cr",
        "pixelFlags_interpolated",
        "psfFlux_flag",
    )
    fwhm_grid: int = 3
    workers: int | None = None

    def __post_init__(self) -> None:
        for name in ("basis_sigmas", "basis_degrees", "bad_mask_planes", "bad_flags"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

        def fail(message: str) -> None:
            raise PsfMatchConfigError(f"PsfMatchConfig: {message}")

        if self.kernel_size is not None and (self.kernel_size < 3 or self.kernel_size % 2 == 0):
            fail(f"kernel_size must be odd and >= 3 pixels, got {self.kernel_size}")
        lo, hi = self.kernel_size_min, self.kernel_size_max
        if lo % 2 == 0 or hi % 2 == 0 or not 3 <= lo <= hi:
            fail(f"kernel_size_min/max must be odd with 3 <= min <= max, got {lo}, {hi}")
        if len(self.basis_sigmas) != len(self.basis_degrees) or not self.basis_sigmas:
            fail(
                f"basis_sigmas {self.basis_sigmas} and basis_degrees {self.basis_degrees} must have "
                "equal, non-zero length"
            )
        if self.spatial_kernel_order < 0 or self.spatial_background_order < 0:
            fail("spatial orders must be >= 0")
        if self.max_spatial_iterations < 1:
            fail(f"max_spatial_iterations must be >= 1, got {self.max_spatial_iterations}")
        if self.min_candidates < 1:
            fail(f"min_candidates must be >= 1, got {self.min_candidates}")
        if not (self.min_snr < self.max_snr):
            fail(f"min_snr ({self.min_snr}) must be below max_snr ({self.max_snr})")
        if self.max_candidates < 1:
            fail(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.stamp_size is not None and self.stamp_size < 5:
            fail(f"stamp_size must be >= 5 pixels, got {self.stamp_size}")
        for name in ("max_ksum_sigma", "candidate_residual_mean_max", "candidate_residual_std_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                fail(f"{name} must be a positive number, got {value}")

    @classmethod
    def for_model_psf_matching(cls, **overrides: Any) -> PsfMatchConfig:
        """Settings for ModelPsfMatchTask: no sigma clipping, no background, constant weighting."""
        base = {"use_sigma_clipping": False, "fit_background": False, "constant_variance_weighting": True}
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> PsfMatchConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PsfMatchConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PsfMatchConfigError(f"PsfMatchConfig: unknown fields {sorted(unknown)}")
        return cls(**data)
