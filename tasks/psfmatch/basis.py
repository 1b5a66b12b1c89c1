"""The Alard--Lupton kernel basis: Gaussians of a few widths times low-order polynomials.

A PSF-matching kernel ``K`` with ``template (x) K ~= science`` is written as a linear combination
``K = sum_i a_i B_i`` of basis images ``B_i``.  Following Alard & Lupton (1998) and LSST's
``ip_diffim``, each basis image is a round Gaussian of width ``sigma_g`` multiplied by a monomial
``u**i * v**j`` (``i + j <= degree_g``), with ``u, v`` the pixel offsets from the kernel centre
divided by the kernel half-width (so in ``[-1, 1]``).  LSST's defaults are three Gaussians of
widths 0.7, 1.5 and 3.0 pixels with degrees 4, 2 and 2 (15 + 6 + 6 = 27 basis images).

When both PSF widths are known (``scaleByFwhm`` in LSST) the widths follow the PSFs: for a
narrow template and a wide science image the kernel is about a Gaussian of width
``sqrt(s_sci**2 - s_tmpl**2)``, which becomes one of the basis widths, the others spaced by a
factor ``gauss_beta`` (see :func:`basis_sigmas_from_fwhm`); the kernel size is
``kernel_size_fwhm_scaling`` times the largest width, odd, clipped to ``[21, 35]`` pixels.

Renormalization (LSST's ``renormalizeKernelList``): the first image is scaled to sum 1; every
other image with a non-zero sum is divided by its sum and the first image subtracted (so it sums
to 0), then scaled to unit Euclidean norm.  The sum of a kernel is then its first coefficient,
and only that coefficient carries the photometric scale.

Kernel images use the convention of :meth:`butler.psf.Psf.image`: odd-sized, the centre on the
central pixel, ``image[dy + h, dx + h]`` the value at offset ``(dx, dy)`` with ``h`` the half-width,
and they are applied by true convolution (``out(x) = sum_d K(d) in(x - d)``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import PsfMatchConfigError

__all__ = [
    "DEFAULT_SIGMAS",
    "DEFAULT_DEGREES",
    "SIGMA_TO_FWHM",
    "AlardLuptonBasis",
    "alard_lupton_basis",
    "basis_sigmas_from_fwhm",
    "kernel_size_from_sigmas",
    "kernel_size_from_fwhm",
    "polynomial_exponents",
]

_log = logging.getLogger(__name__)

#: FWHM of a Gaussian in units of its sigma.
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: LSST's unscaled Gaussian widths (pixels) and polynomial degrees.
DEFAULT_SIGMAS: tuple[float, ...] = (0.7, 1.5, 3.0)
DEFAULT_DEGREES: tuple[int, ...] = (4, 2, 2)


def polynomial_exponents(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of ``u**i * v**j`` with ``i + j <= degree``, in graded order."""
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def _check_kernel_size(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or int(kernel_size) != kernel_size:
        raise PsfMatchConfigError(f"kernel size must be an integer number of pixels, got {kernel_size!r}")
    size = int(kernel_size)
    if size < 3 or size % 2 == 0:
        raise PsfMatchConfigError(
            f"kernel size must be odd and >= 3 pixels (the kernel is centred on a pixel), got {size}"
        )
    return size


def _check_lists(sigmas: Sequence[float], degrees: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    sig = tuple(float(s) for s in sigmas)
    deg = tuple(int(d) for d in degrees)
    if not sig:
        raise PsfMatchConfigError("the Alard-Lupton basis needs at least one Gaussian")
    if len(sig) != len(deg):
        raise PsfMatchConfigError(
            f"one polynomial degree per Gaussian is needed: {len(sig)} sigmas {sig} but {len(deg)} degrees {deg}"
        )
    if not all(math.isfinite(s) and s > 0 for s in sig):
        raise PsfMatchConfigError(f"Gaussian widths must be positive numbers of pixels, got {sig}")
    if not all(d >= 0 for d in deg):
        raise PsfMatchConfigError(f"polynomial degrees must be >= 0, got {deg}")
    return sig, deg


def alard_lupton_basis(
    kernel_size: int,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    degrees: Sequence[int] = DEFAULT_DEGREES,
    *,
    renormalize: bool = True,
    orthonormalize: bool = False,
) -> np.ndarray:
    """Alard--Lupton basis images.

    Parameters
    ----------
    kernel_size : int
        Odd width and height of the kernel images, pixels.
    sigmas : sequence of float
        Gaussian widths, pixels.
    degrees : sequence of int
        Polynomial degree for each Gaussian (``(d + 1)(d + 2) / 2`` images each).
    renormalize : bool
        Apply LSST's renormalization (first image sums to 1, the others sum to 0 and have unit norm).
        Without it every image is the raw Gaussian-times-monomial.
    orthonormalize : bool
        After renormalizing, replace images 1..n-1 by an orthonormal basis of their span (they keep
        summing to 0; the first image is left alone so the kernel sum stays the first coefficient).

    Returns
    -------
    numpy.ndarray
        Shape ``(n_basis, kernel_size, kernel_size)``, float64.

    Raises
    ------
    PsfMatchConfigError
        Even or too small kernel size, mismatched ``sigmas``/``degrees``, or (when orthonormalizing)
        linearly dependent basis images.
    """
    return _basis_and_transform(kernel_size, sigmas, degrees, renormalize, orthonormalize)[0]


def _raw_basis(kernel_size: int, sigmas: Sequence[float], degrees: Sequence[int]) -> np.ndarray:
    size = _check_kernel_size(kernel_size)
    sig, deg = _check_lists(sigmas, degrees)
    half = size // 2
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    r2 = offsets[None, :] ** 2 + offsets[:, None] ** 2
    u = offsets / half
    images: list[np.ndarray] = []
    for sigma, degree in zip(sig, deg, strict=True):
        gauss = np.exp(-0.5 * r2 / sigma**2)
        for i, j in polynomial_exponents(degree):
            images.append(gauss * (u[None, :] ** i) * (u[:, None] ** j))
    return np.array(images)


def _basis_and_transform(
    kernel_size: int, sigmas: Sequence[float], degrees: Sequence[int], renormalize: bool, orthonormalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Basis images and the matrix ``T`` with ``images = T @ raw_images`` (flattened)."""
    raw = _raw_basis(kernel_size, sigmas, degrees)
    transform = np.eye(raw.shape[0])
    if renormalize or orthonormalize:
        transform = _renormalize(raw)
    images = np.tensordot(transform, raw, axes=1)
    if orthonormalize:
        ortho = _orthonormalize(images)
        transform = ortho @ transform
        images = np.tensordot(ortho, images, axes=1)
    return images, transform


def _renormalize(basis: np.ndarray) -> np.ndarray:
    """LSST's renormalization as a matrix acting on the images.

    The first image is scaled to sum 1; every other image with a non-zero sum is divided by its
    sum and the first (normalized) image subtracted, so it sums to 0; all but the first are then
    scaled to unit norm.
    """
    n = basis.shape[0]
    transform = np.zeros((n, n))
    sums = basis.sum(axis=(1, 2))
    if not abs(sums[0]) > 0:
        raise PsfMatchConfigError("the first basis image sums to zero and cannot carry the kernel sum")
    transform[0, 0] = 1.0 / sums[0]
    for k in range(1, n):
        row = np.zeros(n)
        if abs(sums[k]) > 1e-12 * np.abs(basis[k]).sum():
            row[k] = 1.0 / sums[k]
            row -= transform[0]
        else:
            row[k] = 1.0
        image = np.tensordot(row, basis, axes=1)
        norm = math.sqrt(float((image**2).sum()))
        if not norm > 1e-10 * abs(row[k]) * math.sqrt(float((basis[k] ** 2).sum())):
            raise PsfMatchConfigError(f"basis image {k} vanishes after renormalization (it duplicates the first)")
        transform[k] = row / norm
    return transform


def _orthonormalize(basis: np.ndarray) -> np.ndarray:
    """Matrix replacing images 1..n-1 by an orthonormal basis of their span (image 0 unchanged)."""
    n, k, _ = basis.shape
    out = np.eye(n)
    if n == 1:
        return out
    rest = basis[1:].reshape(n - 1, k * k).T
    _, r = np.linalg.qr(rest)
    diag = np.abs(np.diag(r))
    if diag.min() < 1e-10 * diag.max():
        raise PsfMatchConfigError(
            "basis images are linearly dependent on this kernel size; reduce the polynomial degrees "
            "or enlarge the kernel"
        )
    # Q = rest @ inv(R): new image i = sum_j inv(R)[j, i] old image j
    out[1:, 1:] = np.linalg.inv(r).T
    return out


def basis_sigmas_from_fwhm(
    fwhm_template: float,
    fwhm_science: float,
    *,
    n_gauss: int = 3,
    default_sigmas: Sequence[float] = DEFAULT_SIGMAS,
    default_degrees: Sequence[int] = DEFAULT_DEGREES,
    gauss_beta: float = 2.0,
    min_sigma: float = 0.7,
    deconvolution_degree: int = 3,
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Gaussian widths and polynomial degrees scaled to the two PSFs, as LSST's ``scaleByFwhm`` does.

    The kernel convolves the *template* (``fwhm_template``) to match the *science* image
    (``fwhm_science``).

    - Equal widths: the defaults.
    - Narrow template (convolution): the matching kernel of two Gaussians has width
      ``s_k = sqrt(s_sci**2 - s_tmpl**2)`` (at least ``min_sigma``).  If ``s_k / gauss_beta`` is
      still above ``min_sigma`` the widths start there (``s_k / beta, s_k, s_k * beta, ...``),
      otherwise at ``s_k`` (``s_k, s_k * beta, ...``).  Degrees are ``default_degrees``.
    - Wide template (deconvolution): from ``s0 = max(sqrt(s_tmpl**2 - s_sci**2), min_sigma)``,
      ``s1 = beta s0`` and ``s2 = beta s1``, the three widths
      ``sqrt((n - j) s1**2 + j s2**2 - (n + 1) s0**2)`` for ``n = 1, 2`` and ``j < n`` (the
      sum-of-Gaussians deconvolution series LSST uses), sorted, each with ``deconvolution_degree``.

    Parameters
    ----------
    fwhm_template, fwhm_science : float
        PSF FWHMs in pixels of the image to convolve and of the image to match.
    n_gauss : int
        Number of Gaussians (convolution case).
    default_sigmas, default_degrees : sequence
        Unscaled widths (pixels) and degrees; ``default_degrees`` must have ``n_gauss`` entries.
    gauss_beta : float
        Ratio between consecutive widths.
    min_sigma : float
        Smallest width allowed, pixels.
    deconvolution_degree : int
        Polynomial degree of every Gaussian in the deconvolution case.

    Returns
    -------
    sigmas : tuple of float
        Widths in pixels, increasing.
    degrees : tuple of int
        Polynomial degree of each Gaussian.
    """
    for name, value in (("fwhm_template", fwhm_template), ("fwhm_science", fwhm_science)):
        if not (math.isfinite(value) and value > 0):
            raise PsfMatchConfigError(f"{name} must be a positive number of pixels, got {value!r}")
    if n_gauss < 1:
        raise PsfMatchConfigError(f"n_gauss must be >= 1, got {n_gauss}")
    if len(default_degrees) != n_gauss or len(default_sigmas) != n_gauss:
        raise PsfMatchConfigError(
            f"n_gauss={n_gauss} but {len(default_sigmas)} default sigmas and {len(default_degrees)} degrees"
        )
    if not gauss_beta > 1.0:
        raise PsfMatchConfigError(f"gauss_beta must be > 1, got {gauss_beta}")
    s_tmpl = fwhm_template / SIGMA_TO_FWHM
    s_sci = fwhm_science / SIGMA_TO_FWHM
    if s_tmpl == s_sci:
        return tuple(float(s) for s in default_sigmas), tuple(int(d) for d in default_degrees)
    if s_sci > s_tmpl:
        kernel_sigma = max(math.sqrt(s_sci**2 - s_tmpl**2), min_sigma)
        if n_gauss == 1:
            sigmas = [kernel_sigma]
        elif kernel_sigma / gauss_beta > min_sigma:
            sigmas = [kernel_sigma / gauss_beta, kernel_sigma]
        else:
            sigmas = [kernel_sigma]
        while len(sigmas) < n_gauss:
            sigmas.append(sigmas[-1] * gauss_beta)
        return tuple(sigmas), tuple(int(d) for d in default_degrees)
    s0 = max(math.sqrt(s_tmpl**2 - s_sci**2), min_sigma)
    s1 = s0 * gauss_beta
    s2 = s1 * gauss_beta
    sigmas = sorted(
        math.sqrt((n - j) * s1**2 + j * s2**2 - (n + 1) * s0**2) for n in range(3) for j in range(n)
    )
    return tuple(sigmas), tuple(int(deconvolution_degree) for _ in sigmas)


def kernel_size_from_sigmas(
    sigmas: Sequence[float], *, scaling: float = 6.0, min_size: int = 21, max_size: int = 35
) -> int:
    """Odd kernel size ``int(scaling * max(sigmas))`` (made odd), clipped to ``[min_size, max_size]`` pixels."""
    if min_size % 2 == 0 or max_size % 2 == 0 or min_size > max_size or min_size < 3:
        raise PsfMatchConfigError(
            f"kernel size limits must be odd with 3 <= min <= max, got [{min_size}, {max_size}]"
        )
    size = int(scaling * max(sigmas))
    if size % 2 == 0:
        size += 1
    return int(min(max_size, max(size, min_size)))


def kernel_size_from_fwhm(
    fwhm_template: float,
    fwhm_science: float,
    *,
    scaling: float = 6.0,
    min_size: int = 21,
    max_size: int = 35,
    **sigma_options: Any,
) -> int:
    """Kernel size in pixels for two PSF FWHMs (pixels): from the largest scaled basis width.

    ``sigma_options`` are passed to :func:`basis_sigmas_from_fwhm`.
    """
    sigmas, _ = basis_sigmas_from_fwhm(fwhm_template, fwhm_science, **sigma_options)
    return kernel_size_from_sigmas(sigmas, scaling=scaling, min_size=min_size, max_size=max_size)


@dataclass(frozen=True, eq=False)
class AlardLuptonBasis:
    """An Alard--Lupton basis with the parameters that define it.

    Parameters
    ----------
    kernel_size : int
        Odd kernel width and height, pixels.
    sigmas : tuple of float
        Gaussian widths, pixels.
    degrees : tuple of int
        Polynomial degree of each Gaussian.
    renormalize, orthonormalize : bool
        See :func:`alard_lupton_basis`.

    Attributes
    ----------
    images : numpy.ndarray
        Read-only ``(n_basis, kernel_size, kernel_size)`` float64 basis images.
    transform : numpy.ndarray
        Read-only ``(n_basis, n_basis)`` matrix with ``images = transform @ raw`` where ``raw`` are
        the separable Gaussian-times-monomial images (used for fast separable convolutions).
    """

    kernel_size: int
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    degrees: tuple[int, ...] = DEFAULT_DEGREES
    renormalize: bool = True
    orthonormalize: bool = False
    images: np.ndarray = field(init=False, repr=False)
    transform: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        sig, deg = _check_lists(self.sigmas, self.degrees)
        object.__setattr__(self, "kernel_size", _check_kernel_size(self.kernel_size))
        object.__setattr__(self, "sigmas", sig)
        object.__setattr__(self, "degrees", deg)
        images, transform = _basis_and_transform(self.kernel_size, sig, deg, self.renormalize, self.orthonormalize)
        images.setflags(write=False)
        transform.setflags(write=False)
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "transform", transform)

    @property
    def n_basis(self) -> int:
        """Number of basis images."""
        return int(self.images.shape[0])

    @classmethod
    def from_fwhm(
        cls,
        fwhm_template: float,
        fwhm_science: float,
        *,
        kernel_size: int | None = None,
        scaling: float = 6.0,
        min_size: int = 21,
        max_size: int = 35,
        renormalize: bool = True,
        orthonormalize: bool = False,
        **sigma_options: Any,
    ) -> AlardLuptonBasis:
        """The basis matching a template of FWHM ``fwhm_template`` to a science image of ``fwhm_science`` (pixels).

        ``kernel_size`` overrides the size derived from the widths; ``sigma_options`` go to
        :func:`basis_sigmas_from_fwhm`.
        """
        sigmas, degrees = basis_sigmas_from_fwhm(fwhm_template, fwhm_science, **sigma_options)
        if kernel_size is None:
            kernel_size = kernel_size_from_sigmas(sigmas, scaling=scaling, min_size=min_size, max_size=max_size)
        _log.debug(
            "Alard-Lupton basis for FWHM %.3f -> %.3f px: sigmas %s px, degrees %s, kernel %d px",
            fwhm_template, fwhm_science, ", ".join(f"{s:.3f}" for s in sigmas), degrees, kernel_size,
        )
        return cls(kernel_size, sigmas, degrees, renormalize=renormalize, orthonormalize=orthonormalize)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data; :meth:`from_dict` rebuilds identical images."""
        return {
            "type": "AlardLuptonBasis",
            "kernel_size": self.kernel_size,
            "sigmas": list(self.sigmas),
            "degrees": list(self.degrees),
            "renormalize": self.renormalize,
            "orthonormalize": self.orthonormalize,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlardLuptonBasis:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                int(data["kernel_size"]),
                tuple(data["sigmas"]),
                tuple(data["degrees"]),
                renormalize=bool(data.get("renormalize", True)),
                orthonormalize=bool(data.get("orthonormalize", False)),
            )
        except (KeyError, TypeError) as exc:
            raise PsfMatchConfigError(f"malformed AlardLuptonBasis data: {exc}") from None
