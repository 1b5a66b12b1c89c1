"""PSF-matching kernels: the Alard--Lupton machinery behind MakeKernelTask and ModelPsfMatchTask.

Pure functions and classes on the butler data model (no butler, no pipeline):

- :mod:`.basis` -- the Alard--Lupton basis, its widths and size scaled from the PSF FWHMs;
- :mod:`.candidates` -- kernel candidates from a source catalog or from two PSF models;
- :mod:`.solve` -- per-candidate least-squares solutions;
- :mod:`.spatial` -- the spatially varying kernel and background, solved together;
- :mod:`.fit` -- the driver with sigma clipping;
- :mod:`.convolve` -- applying a spatial kernel to an exposure by cell-wise FFTs;
- :mod:`.testing` -- synthetic pairs with a known kernel.
"""

from .basis import (
    DEFAULT_DEGREES,
    DEFAULT_SIGMAS,
    AlardLuptonBasis,
    alard_lupton_basis,
    basis_sigmas_from_fwhm,
    kernel_size_from_fwhm,
    kernel_size_from_sigmas,
)
from .candidates import candidate_stamp_size, make_candidate_list, max_model_kernel_size, model_psf_matching_candidates
from .config import PsfMatchConfig
from .convolve import convolve_exposure, convolve_image, convolve_variance, grow_mask, kernel_support
from .errors import NoKernelCandidatesError, PsfMatchConfigError, PsfMatchError, SingularKernelSolutionError
from .fit import (
    KernelFitDiagnostics,
    basis_for_fwhm,
    fit_kernel_to_candidates,
    fit_psf_matching_kernel,
    mean_psf_fwhm,
    psf_matching_basis,
)
from .solve import CandidateSolution, KernelCandidate, scaled_condition_number, solve_candidate, solve_candidates
from .spatial import SpatialFitInfo, SpatialKernel, fit_spatial_kernel

__all__ = [
    "DEFAULT_DEGREES",
    "DEFAULT_SIGMAS",
    "AlardLuptonBasis",
    "alard_lupton_basis",
    "basis_sigmas_from_fwhm",
    "kernel_size_from_fwhm",
    "kernel_size_from_sigmas",
    "candidate_stamp_size",
    "make_candidate_list",
    "max_model_kernel_size",
    "model_psf_matching_candidates",
    "PsfMatchConfig",
    "convolve_exposure",
    "convolve_image",
    "convolve_variance",
    "grow_mask",
    "kernel_support",
    "NoKernelCandidatesError",
    "PsfMatchConfigError",
    "PsfMatchError",
    "SingularKernelSolutionError",
    "KernelFitDiagnostics",
    "basis_for_fwhm",
    "fit_kernel_to_candidates",
    "fit_psf_matching_kernel",
    "mean_psf_fwhm",
    "psf_matching_basis",
    "CandidateSolution",
    "KernelCandidate",
    "scaled_condition_number",
    "solve_candidate",
    "solve_candidates",
    "SpatialFitInfo",
    "SpatialKernel",
    "fit_spatial_kernel",
]
