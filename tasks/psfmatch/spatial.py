"""Spatially varying kernel and differential background, solved together over all candidates.

Model: at parent-frame position ``(x, y)`` the kernel is ``K(x, y) = sum_i a_i(x, y) B_i`` and the
background is ``b(x, y)``, where every ``a_i`` and ``b`` are 2-D Chebyshev series over the image
box (:mod:`.chebyshev`), of order ``kernel_order`` (default 2) and ``background_order``
(default 1).  With ``constant_first_term`` (LSST's choice for the Alard--Lupton basis) the first
coefficient -- which is the kernel sum, since the other basis images sum to zero -- is one constant.

The global least-squares system is assembled from the per-candidate normal equations
(:mod:`.solve`): candidate ``k`` at ``x_k`` constrains its local parameters
``theta_k = E_k p`` (``E_k`` maps the global parameters ``p`` to the kernel coefficients at
``x_k``; the background columns already hold the global Chebyshev terms at each pixel), so
``sum_k E_k^T M_k E_k p = sum_k E_k^T b_k``.  The kernel block of ``E_k^T M_k E_k`` is
``M_k (x) f(x_k) f(x_k)^T``; the whole sum is one matrix product over a stacked ``E``.

Errors in the variables: when the candidates carry the expected noise part ``N_k`` of their
normal matrices (:mod:`.solve`), the summed ``N = sum_k E_k^T N_k E_k`` is removed from the
global matrix ``M``.  In the basis where ``M`` is the identity, ``N`` is diagonal with entries
``mu`` = the fraction of each direction's power that is noise.  Removing all of it divides a
direction's solution by ``1 - mu``: harmless where the candidates measure the kernel (the kernel
sum, the core: ``mu`` of a few percent) but an unbounded amplification of noise where they do not
(fine structure of narrow, high-order basis images, ``mu`` near 1, where the uncorrected
solution stays near zero).  So ``mu`` is capped at ``MAX_NOISE_FRACTION``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

from butler.geometry import Box
from butler.serialization import decode_array, encode_array

from .basis import AlardLuptonBasis
from .chebyshev import ChebyshevBasis2D
from .errors import PsfMatchConfigError, SingularKernelSolutionError
from .solve import KernelCandidate, scaled_condition_number

__all__ = ["SpatialKernel", "SpatialFitInfo", "fit_spatial_kernel", "spatial_parameter_layout", "remove_noise", "MAX_NOISE_FRACTION"]

_log = logging.getLogger(__name__)

#: Largest fraction of a direction's power removed as noise: a direction is amplified at most
#: ``1 / (1 - MAX_NOISE_FRACTION)`` times by the errors-in-variables correction.
MAX_NOISE_FRACTION = 0.5


class SpatialKernel:
    """A spatially varying PSF-matching kernel with its differential background.

    ``template (x) K(x, y) + background(x, y) ~= science`` at every parent-frame pixel ``(x, y)``.

    Parameters
    ----------
    basis : numpy.ndarray or AlardLuptonBasis
        ``(n_basis, k, k)`` basis images (or the basis object, which also makes :meth:`to_dict`
        compact).
    kernel_coefficients : array_like
        ``(n_basis, n_kernel_terms)`` Chebyshev coefficients of each basis coefficient ``a_i``.
    background_coefficients : array_like
        ``(n_background_terms,)`` Chebyshev coefficients of the background, counts (may be empty).
    bbox : Box
        Parent-frame box over which positions are scaled to ``[-1, 1]``.
    kernel_order, background_order : int
        Total Chebyshev degrees.
    """

    def __init__(
        self,
        basis: np.ndarray | AlardLuptonBasis,
        kernel_coefficients: ArrayLike,
        background_coefficients: ArrayLike,
        bbox: Box,
        kernel_order: int,
        background_order: int,
    ) -> None:
        self._basis_spec = basis if isinstance(basis, AlardLuptonBasis) else None
        images = basis.images if isinstance(basis, AlardLuptonBasis) else np.array(basis, dtype=np.float64)
        if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % 2 == 0:
            raise PsfMatchConfigError(f"kernel basis must have shape (n, k, k) with odd k, got {images.shape}")
        self._kfuncs = ChebyshevBasis2D(bbox, kernel_order)
        self._bfuncs = ChebyshevBasis2D(bbox, background_order)
        coeffs = np.array(kernel_coefficients, dtype=np.float64)
        if coeffs.shape != (images.shape[0], self._kfuncs.n_terms):
            raise PsfMatchConfigError(
                f"kernel coefficients must have shape (n_basis, n_terms) = ({images.shape[0]}, "
                f"{self._kfuncs.n_terms}) for order {kernel_order}, got {coeffs.shape}"
            )
        bg = np.array(background_coefficients, dtype=np.float64).reshape(-1)
        if bg.size not in (0, self._bfuncs.n_terms):
            raise PsfMatchConfigError(
                f"background coefficients must have {self._bfuncs.n_terms} entries for order "
                f"{background_order} (or none), got {bg.size}"
            )
        if not (np.all(np.isfinite(coeffs)) and np.all(np.isfinite(bg))):
            raise PsfMatchConfigError("spatial kernel coefficients must be finite")
        for arr in (images, coeffs, bg):
            arr.setflags(write=False)
        self._images = images
        self._coeffs = coeffs
        self._bg = bg
        self.bbox = bbox
        self.kernel_order = int(kernel_order)
        self.background_order = int(background_order)
        self._basis_sums = images.sum(axis=(1, 2))

    # ------------------------------------------------------------------ properties
    @property
    def basis(self) -> np.ndarray:
        """Read-only ``(n_basis, k, k)`` basis images."""
        return self._images

    @property
    def kernel_coefficients(self) -> np.ndarray:
        """Read-only ``(n_basis, n_kernel_terms)`` Chebyshev coefficients."""
        return self._coeffs

    @property
    def background_coefficients(self) -> np.ndarray:
        """Read-only background Chebyshev coefficients, counts (empty: no background)."""
        return self._bg

    @property
    def kernel_size(self) -> int:
        """Kernel width (= height), pixels."""
        return int(self._images.shape[1])

    @property
    def n_basis(self) -> int:
        """Number of basis images."""
        return int(self._images.shape[0])

    @property
    def kernel_terms(self) -> list[tuple[int, int]]:
        """Chebyshev terms ``(i, j)`` of ``T_i(u) T_j(v)`` of the kernel coefficients."""
        return list(self._kfuncs.terms)

    @property
    def kernel_functions(self) -> ChebyshevBasis2D:
        """The Chebyshev terms of the kernel coefficients over :attr:`bbox`."""
        return self._kfuncs

    @property
    def is_spatially_varying(self) -> bool:
        """True when any coefficient beyond the constant term is non-zero."""
        return bool(np.any(self._coeffs[:, 1:] != 0.0))

    # ------------------------------------------------------------------ evaluation
    def coefficients(self, x: ArrayLike, y: ArrayLike) -> np.ndarray:
        """Basis coefficients ``a_i`` at ``(x, y)`` (parent pixels): shape ``broadcast.shape + (n_basis,)``."""
        return self._kfuncs.evaluate(x, y) @ self._coeffs.T

    def kernel_image(self, x: float, y: float) -> np.ndarray:
        """The ``k x k`` kernel image at parent-frame position ``(x, y)`` (float64, not normalized)."""
        return np.tensordot(self.coefficients(float(x), float(y)), self._images, axes=1)

    def kernel_images(self, x: ArrayLike, y: ArrayLike) -> np.ndarray:
        """Kernel images at many positions: shape ``(n, k, k)`` for 1-D ``x``, ``y``."""
        a = self.coefficients(np.atleast_1d(x), np.atleast_1d(y))
        return np.tensordot(a, self._images, axes=1)

    def kernel_sum(self, x: ArrayLike, y: ArrayLike) -> np.ndarray | float:
        """Sum of the kernel image at ``(x, y)``: the photometric scale template -> science."""
        out = self.coefficients(x, y) @ self._basis_sums
        return float(out) if np.ndim(out) == 0 else out

    def background(self, x: ArrayLike, y: ArrayLike) -> np.ndarray | float:
        """Differential background (science minus convolved template) at ``(x, y)``, counts."""
        if self._bg.size == 0:
            out = np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape)
        else:
            out = self._bfuncs.evaluate(x, y) @ self._bg
        return float(out) if np.ndim(out) == 0 else out

    def background_image(self, bbox: Box, dtype: Any = np.float32) -> np.ndarray:
        """The background realized on every pixel of ``bbox`` (parent frame), counts."""
        if self._bg.size == 0:
            return np.zeros(bbox.shape, dtype=dtype)
        xs = np.arange(bbox.x0, bbox.x1, dtype=np.float64)
        ys = np.arange(bbox.y0, bbox.y1, dtype=np.float64)
        return self._bfuncs.evaluate_grid(xs, ys, self._bg).astype(dtype, copy=False)

    def term_kernels(self) -> np.ndarray:
        """``(n_kernel_terms, k, k)`` images ``K_t`` with ``K(x, y) = sum_t T_t(x, y) K_t``.

        A spatially varying convolution is then ``sum_t T_t(x, y) (image (x) K_t)(x, y)``: one
        constant-kernel convolution per spatial term (what :mod:`.convolve` does per cell).
        """
        return np.einsum("it,ijk->tjk", self._coeffs, self._images)

    def with_kernel_sum(self, kernel_sum: float) -> SpatialKernel:
        """A copy whose kernel sums to ``kernel_sum`` everywhere (ModelPsfMatchTask's ``kernelSum``).

        Sets the first coefficient to the constant ``kernel_sum / sum(B_0)``; requires the other
        basis images to sum to zero (a renormalized basis).
        """
        if np.any(np.abs(self._basis_sums[1:]) > 1e-9 * abs(self._basis_sums[0])):
            raise PsfMatchConfigError("with_kernel_sum needs a renormalized basis (images 1.. summing to 0)")
        coeffs = self._coeffs.copy()
        coeffs[0, :] = 0.0
        coeffs[0, 0] = float(kernel_sum) / self._basis_sums[0]
        basis = self._basis_spec if self._basis_spec is not None else self._images
        return SpatialKernel(basis, coeffs, self._bg, self.bbox, self.kernel_order, self.background_order)

    def scaled(self, factor: float) -> SpatialKernel:
        """A copy whose kernel (not its background) is multiplied by ``factor`` everywhere."""
        basis = self._basis_spec if self._basis_spec is not None else self._images
        return SpatialKernel(basis, self._coeffs * float(factor), self._bg, self.bbox, self.kernel_order, self.background_order)

    def with_coefficients(self, kernel_coefficients: ArrayLike, kernel_order: int) -> SpatialKernel:
        """A copy on the same basis and background with other kernel coefficients (and spatial order)."""
        basis = self._basis_spec if self._basis_spec is not None else self._images
        return SpatialKernel(basis, kernel_coefficients, self._bg, self.bbox, kernel_order, self.background_order)

    def without_background(self) -> SpatialKernel:
        """A copy with no background term."""
        basis = self._basis_spec if self._basis_spec is not None else self._images
        return SpatialKernel(basis, self._coeffs, [], self.bbox, self.kernel_order, self.background_order)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data (task metadata, a JSON dataset); read back with :meth:`from_dict`.

        The basis is stored by its parameters when known (small), otherwise as an encoded array.
        """
        basis: dict[str, Any]
        if self._basis_spec is not None:
            basis = self._basis_spec.to_dict()
        else:
            basis = {"type": "images", "images": encode_array(self._images)}
        return {
            "type": "SpatialKernel",
            "bbox": self.bbox.to_list(),
            "kernel_order": self.kernel_order,
            "background_order": self.background_order,
            "kernel_coefficients": self._coeffs.tolist(),
            "background_coefficients": self._bg.tolist(),
            "basis": basis,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpatialKernel:
        """Inverse of :meth:`to_dict`."""
        try:
            if data.get("type") != "SpatialKernel":
                raise PsfMatchConfigError(f"not a serialized SpatialKernel (type {data.get('type')!r})")
            bdata = data["basis"]
            basis: np.ndarray | AlardLuptonBasis
            if bdata.get("type") == "AlardLuptonBasis":
                basis = AlardLuptonBasis.from_dict(bdata)
            else:
                basis = decode_array(bdata["images"], field="SpatialKernel.basis")
            return cls(
                basis,
                data["kernel_coefficients"],
                data["background_coefficients"],
                Box.from_list(data["bbox"]),
                int(data["kernel_order"]),
                int(data["background_order"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PsfMatchConfigError(f"malformed SpatialKernel data: {exc!r}") from None

    def __repr__(self) -> str:
        return (
            f"SpatialKernel(kernel_size={self.kernel_size}, n_basis={self.n_basis}, "
            f"kernel_order={self.kernel_order}, background_order={self.background_order}, bbox={self.bbox})"
        )


@dataclass(frozen=True)
class SpatialFitInfo:
    """Numbers describing one spatial solve.

    Attributes
    ----------
    n_candidates : int
        Candidates in the fit.
    n_parameters : int
        Free parameters (kernel plus background).
    condition_number : float
        Condition number of the diagonally scaled global normal matrix.
    """

    n_candidates: int
    n_parameters: int
    condition_number: float


def spatial_parameter_layout(
    n_basis: int, n_kernel_terms: int, n_background_terms: int, constant_first_term: bool
) -> list[tuple[int, int]]:
    """``(first index, number of terms)`` of each basis coefficient's block in the global vector.

    The background block follows the last basis block and has ``n_background_terms`` entries.
    """
    layout = []
    start = 0
    for i in range(n_basis):
        n = 1 if (i == 0 and constant_first_term) else n_kernel_terms
        layout.append((start, n))
        start += n
    return layout


def fit_spatial_kernel(
    candidates: Sequence[KernelCandidate],
    basis: np.ndarray | AlardLuptonBasis,
    bbox: Box,
    *,
    kernel_order: int = 2,
    background_order: int = 1,
    fit_background: bool = True,
    constant_first_term: bool = True,
    max_condition_number: float = 1.0e10,
) -> tuple[SpatialKernel, SpatialFitInfo]:
    """Solve the spatial kernel and background together from solved candidates.

    Parameters
    ----------
    candidates : sequence of KernelCandidate
        Candidates with solutions (built by :func:`.solve.solve_candidates` with the background
        model ``ChebyshevBasis2D(bbox, background_order)`` when ``fit_background``).
    basis : numpy.ndarray or AlardLuptonBasis
        The basis the candidates were solved with.
    bbox : Box
        Image box of the spatial model (the science image's box), parent pixels.
    kernel_order, background_order : int
        Chebyshev orders of the kernel coefficients and of the background.
    fit_background : bool
        Whether the candidates carry background columns.
    constant_first_term : bool
        Keep the first (kernel-sum) coefficient constant over the image.
    max_condition_number : float
        Largest acceptable condition number of the scaled global normal matrix.

    Raises
    ------
    SingularKernelSolutionError
        Too few candidates for the spatial orders, an unconstrained parameter, or a condition
        number above ``max_condition_number``; the message says what to change.
    """
    images = basis.images if isinstance(basis, AlardLuptonBasis) else np.asarray(basis, dtype=np.float64)
    n_basis = images.shape[0]
    kfuncs = ChebyshevBasis2D(bbox, kernel_order)
    n_kt = kfuncs.n_terms
    solved = [c for c in candidates if c.solution is not None]
    if not solved:
        raise SingularKernelSolutionError("no solved kernel candidates to build the spatial kernel from")
    n_bg = solved[0].solution.n_background_terms  # type: ignore[union-attr]
    expected_bg = ChebyshevBasis2D(bbox, background_order).n_terms if fit_background else 0
    if n_bg != expected_bg:
        raise PsfMatchConfigError(
            f"candidates carry {n_bg} background terms but background_order={background_order} "
            f"(fit_background={fit_background}) needs {expected_bg}; solve them with the same background model"
        )
    m = len(solved)
    positions = {(round(c.x, 3), round(c.y, 3)) for c in solved}
    n_varying_needed = n_kt if (n_basis > 1 or not constant_first_term) else 1
    if len(positions) < n_varying_needed:
        raise SingularKernelSolutionError(
            f"{len(positions)} distinct kernel-candidate positions cannot constrain a spatial kernel of "
            f"order {kernel_order} ({n_kt} terms per coefficient): use more candidates or a lower "
            "spatial_kernel_order"
        )
    layout = spatial_parameter_layout(n_basis, n_kt, n_bg, constant_first_term)
    n_kpar = layout[-1][0] + layout[-1][1]
    n_par = n_kpar + n_bg

    f = kfuncs.evaluate(np.array([c.x for c in solved]), np.array([c.y for c in solved]))  # (m, n_kt)
    local = n_basis + n_bg
    expand = np.zeros((m, local, n_par))
    for i, (start, count) in enumerate(layout):
        expand[:, i, start : start + count] = f[:, :count]
    for t in range(n_bg):
        expand[:, n_basis + t, n_kpar + t] = 1.0
    normals = np.stack([c.solution.normal_matrix for c in solved])  # type: ignore[union-attr]
    vectors = np.stack([c.solution.normal_vector for c in solved])  # type: ignore[union-attr]
    projected = normals @ expand  # (m, local, n_par)
    big_matrix = expand.reshape(m * local, n_par).T @ projected.reshape(m * local, n_par)
    big_matrix = 0.5 * (big_matrix + big_matrix.T)
    big_vector = np.einsum("mlp,ml->p", expand, vectors)
    noise_list = [c.solution.noise_matrix for c in solved]  # type: ignore[union-attr]
    big_noise = None
    if all(nm is not None for nm in noise_list):
        projected_noise = np.stack(noise_list) @ expand
        big_noise = expand.reshape(m * local, n_par).T @ projected_noise.reshape(m * local, n_par)

    diag = np.diag(big_matrix)
    if not np.all(diag > 0):
        bad = int(np.count_nonzero(~(diag > 0)))
        raise SingularKernelSolutionError(
            f"spatial kernel system is singular: {bad} of {n_par} parameters are unconstrained by the "
            f"{m} kernel candidates (all-zero template stamps?)"
        )
    cond = scaled_condition_number(big_matrix)
    if not (math.isfinite(cond) and cond <= max_condition_number):
        raise SingularKernelSolutionError(
            f"spatial kernel system is {'singular' if not math.isfinite(cond) else 'ill-conditioned'} "
            f"(scaled condition number {cond:.3g} > {max_condition_number:.3g}) with {m} candidates, "
            f"{n_par} parameters (kernel order {kernel_order}, background order {background_order}); "
            "use more, better spread candidates or lower the spatial orders",
            condition_number=cond,
        )
    d = np.sqrt(diag)
    scaled = big_matrix / d[:, None] / d[None, :]
    try:
        if big_noise is not None:
            scaled = remove_noise(scaled, big_noise / d[:, None] / d[None, :])
        params = scipy.linalg.solve(scaled, big_vector / d, assume_a="pos") / d
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError) as exc:
        raise SingularKernelSolutionError(
            f"spatial kernel system could not be solved ({exc}); condition number {cond:.3g}", condition_number=cond
        ) from None
    coeffs = np.zeros((n_basis, n_kt))
    for i, (start, count) in enumerate(layout):
        coeffs[i, :count] = params[start : start + count]
    bg = params[n_kpar:]
    kernel = SpatialKernel(basis, coeffs, bg, bbox, kernel_order, background_order)
    _log.debug("spatial kernel from %d candidates, %d parameters, condition number %.3g", m, n_par, cond)
    return kernel, SpatialFitInfo(n_candidates=m, n_parameters=n_par, condition_number=float(cond))


def remove_noise(matrix: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``matrix - noise`` with each direction's noise fraction capped at ``MAX_NOISE_FRACTION``.

    With ``matrix = L L^T`` (Cholesky) and ``L^-1 noise L^-T = U diag(mu) U^T``, returns
    ``L U diag(1 - min(mu, cap)) U^T L^T``, which stays positive definite.

    Parameters
    ----------
    matrix : numpy.ndarray
        Symmetric positive definite normal matrix (best diagonally scaled).
    noise : numpy.ndarray
        The expected noise part of ``matrix``, in the same scaling.

    Raises
    ------
    numpy.linalg.LinAlgError
        If ``matrix`` is not positive definite.
    """
    lower = np.linalg.cholesky(matrix)
    whitened = scipy.linalg.solve_triangular(lower, noise, lower=True)
    whitened = scipy.linalg.solve_triangular(lower, whitened.T, lower=True).T
    mu, vecs = np.linalg.eigh(0.5 * (whitened + whitened.T))
    keep = 1.0 - np.clip(mu, 0.0, MAX_NOISE_FRACTION)
    inner = (vecs * keep) @ vecs.T
    corrected = lower @ inner @ lower.T
    return 0.5 * (corrected + corrected.T)


def local_parameters(kernel: SpatialKernel, candidate: KernelCandidate) -> np.ndarray:
    """The spatial model's parameters at a candidate, in the candidate's column order.

    Kernel coefficients at ``(x, y)`` followed by the background Chebyshev coefficients (the
    background columns of a candidate hold the global terms at its pixels).
    """
    a = kernel.coefficients(candidate.x, candidate.y)
    n_bg = candidate.solution.n_background_terms if candidate.solution is not None else 0
    bg = kernel.background_coefficients
    if n_bg and bg.size != n_bg:
        bg = np.zeros(n_bg)
    return np.concatenate([a, bg[:n_bg]])
