"""The spatial variation of a matching kernel predicted by the two images' PSF models.

A kernel fitted to stars must learn how the match changes across the image from the stars
alone: with the ~50-80 candidates of a 1024x1024 detector, a Chebyshev order-2 model of every
basis coefficient overfits, and cross-validation settles for order 0-1 even where the PSFs change
by 6-20% across the detector.  The PSF models already say how they change.  The matching kernel
``K_m(x, y)`` between the models (ModelPsfMatchTask's fit, on the same Alard-Lupton basis) gives
the predicted variation ``dK(x, y) = K_m(x, y) - K_m(x_c, y_c)``, zero at the centre ``c``.

:func:`model_kernel_variation` returns ``dK``; :func:`subtract_variation` removes
``scale * template (x) dK`` from the candidates' science stamps, so the fit to stars only has to
learn the rest (the kernel at the centre, the photometric scale ``scale``, what the models miss);
:func:`add_variation` adds ``scale * dK`` back to the fitted kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from butler.geometry import Box
from butler.psf import Psf

from .basis import AlardLuptonBasis
from .candidates import model_psf_matching_candidates
from .chebyshev import ChebyshevBasis2D, chebyshev_terms
from .config import PsfMatchConfig
from .fit import fit_kernel_to_candidates
from .solve import KernelCandidate, valid_conv_per_stamp
from .spatial import SpatialKernel

__all__ = ["KernelVariation", "model_kernel_variation", "subtract_variation", "add_variation"]


@dataclasses.dataclass(frozen=True)
class KernelVariation:
    """``dK(x, y) = sum_i sum_t coefficients[i, t] T_t(x, y) B_i`` on a kernel's basis.

    Attributes
    ----------
    coefficients : numpy.ndarray
        ``(n_basis, n_terms)`` for Chebyshev ``order`` over ``bbox``; ``dK`` is zero at the centre.
    order : int
    bbox : Box
    amplitude : float
        Largest ``sum |dK|`` over the centre, corners and edge midpoints, relative to
        ``sum |K_m|`` at the centre: how much the models say the kernel changes.
    """

    coefficients: np.ndarray
    order: int
    bbox: Box
    amplitude: float

    def kernel(self, basis: AlardLuptonBasis) -> SpatialKernel:
        """``dK`` as a :class:`SpatialKernel` on ``basis`` (no background)."""
        return SpatialKernel(basis, self.coefficients, [], self.bbox, self.order, 0)


def model_kernel_variation(
    psf_convolved: Psf,
    psf_reference: Psf,
    basis: AlardLuptonBasis,
    bbox: Box,
    *,
    order: int = 2,
    grid: int = 5,
) -> KernelVariation:
    """The kernel variation that the PSF models predict (see the module docstring).

    Parameters
    ----------
    psf_convolved, psf_reference : Psf
        PSF models of the image to convolve and of the image to match.
    basis : AlardLuptonBasis
        The basis of the kernel fitted to stars.
    bbox : Box
        The image box (parent pixels).
    order : int
        Chebyshev order of the variation.
    grid : int
        Cells per axis where the two models are realized.

    Returns
    -------
    KernelVariation
    """
    candidates, _ = model_psf_matching_candidates(
        psf_convolved, psf_reference, bbox, grid, basis.kernel_size, clamp_kernel_size=False
    )
    config = PsfMatchConfig(
        kernel_size=basis.kernel_size, spatial_kernel_order=order, fit_background=False, use_sigma_clipping=False,
        constant_variance_weighting=False,
    )
    model, _ = fit_kernel_to_candidates(candidates, basis, bbox, config)
    coeffs = np.array(model.kernel_coefficients, dtype=np.float64)
    cx, cy = bbox.center
    centre_terms = ChebyshevBasis2D(bbox, model.kernel_order).evaluate(cx, cy).reshape(-1)
    coeffs[:, 0] -= coeffs @ centre_terms
    variation = KernelVariation(coeffs, model.kernel_order, bbox, 0.0)
    delta = variation.kernel(basis)
    xs = [bbox.x0, cx, bbox.x1 - 1]
    ys = [bbox.y0, cy, bbox.y1 - 1]
    scale = float(np.abs(model.kernel_image(cx, cy)).sum())
    amplitude = max(float(np.abs(delta.kernel_image(x, y)).sum()) for x in xs for y in ys) / scale
    return dataclasses.replace(variation, amplitude=amplitude)


def subtract_variation(
    candidates: Sequence[KernelCandidate], variation: KernelVariation, basis: AlardLuptonBasis, scale: float
) -> list[KernelCandidate]:
    """Candidates whose science stamps lose ``scale * template (x) dK(x_k, y_k)`` (unsolved copies).

    Only the pixels the kernel fit uses change (the stamp less the kernel half-width on each side,
    where ``template (x) dK`` is fully defined).  The science variance is kept: ``dK`` is small, and
    the template's noise it carries is a small part of the science stamp's.
    """
    if not candidates:
        return []
    delta = variation.kernel(basis)
    k = delta.kernel_size
    h = k // 2
    stamps = np.stack([np.asarray(c.template, dtype=np.float64) for c in candidates])
    kernels = delta.kernel_images(np.array([c.x for c in candidates]), np.array([c.y for c in candidates]))
    valid = valid_conv_per_stamp(stamps, kernels, k, None)
    out = []
    for c, conv in zip(candidates, valid, strict=True):
        science = np.array(c.science, dtype=np.float64)
        science[h : science.shape[0] - h, h : science.shape[1] - h] -= scale * conv
        out.append(dataclasses.replace(c, science=science, solution=None, status="unsolved", reason=""))
    return out


def add_variation(kernel: SpatialKernel, variation: KernelVariation, scale: float) -> SpatialKernel:
    """``kernel + scale * dK`` on the kernel's basis, at the higher of the two spatial orders."""
    order = max(kernel.kernel_order, variation.order)
    terms = {t: k for k, t in enumerate(chebyshev_terms(order))}
    coeffs = np.zeros((kernel.n_basis, len(terms)))
    for k, t in enumerate(chebyshev_terms(kernel.kernel_order)):
        coeffs[:, terms[t]] += kernel.kernel_coefficients[:, k]
    for k, t in enumerate(chebyshev_terms(variation.order)):
        coeffs[:, terms[t]] += scale * variation.coefficients[:, k]
    return kernel.with_coefficients(coeffs, order)
