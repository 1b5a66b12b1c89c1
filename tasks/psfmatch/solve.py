"""Per-candidate kernel solutions: weighted linear least squares on a pair of stamps.

For one kernel candidate (a bright isolated star) with template stamp ``T``, science stamp ``S``
and variance ``V`` (all ``N x N`` pixels), the model of the science pixels is::

    S ~= sum_i a_i (T (x) B_i) + background

where ``B_i`` are the basis images (``k x k``, see :mod:`.basis`) and ``(x)`` is true convolution.
Only the central ``n x n`` pixels with ``n = N - k + 1`` are fitted: those where the convolution
with a ``k x k`` kernel is complete ("valid" region).  The convolutions of all candidates of a
batch with all basis images are a few matrix products for the (separable) Alard--Lupton basis,
or FFTs for any other basis.

The background columns are Chebyshev terms of the *image* box evaluated at each fitted pixel
(the spatial model's own functions), so that the spatial fit (:mod:`.spatial`) can solve kernel
and background together from the per-candidate normal equations without approximating the
background as constant across a stamp.  The candidate's own solution fits a local background
plane instead (LSST fits a constant; with a background gradient that biases the kernel sums of
faint stars, which the kernel-sum clipping then mistakes for outliers).

Weights are ``1 / V`` per pixel, or ``1 / median(V)`` per candidate with
``constant_variance_weighting`` (LSST's default, which lets bright-star cores drive the fit).
``V`` is the sum of the science and template variances.  Residual statistics are always computed
with the variance of the *difference*, ``V_sci + (V_tmpl (x) K**2)``.

Noise in the convolved image is an error in the *variables* of the regression: its power adds
``sum_p w_p sum_q B_i(q) B_j(q) V_T(p - q)`` to the expected normal matrix, which shrinks the
kernel (a smaller sum, a smoother shape) by roughly the ratio of the candidates' summed noise to
their summed signal.  Every stamp adds the same noise term however faint its star, so the
faint candidates bias the kernel.  With ``noise_bias_scale`` > 0 each solution carries that
expected term (``noise_matrix``) and the spatial fit removes it (:mod:`.spatial`), not a
candidate's own solution, where a faint star's corrected system would lose positive
definiteness.  The model is independent pixel noise in the convolved image, uncorrelated with
the noise of the image it is matched to.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.fft

from .basis import AlardLuptonBasis, polynomial_exponents
from .chebyshev import ChebyshevBasis2D

__all__ = [
    "KernelCandidate",
    "CandidateSolution",
    "solve_candidates",
    "solve_candidate",
    "scaled_condition_number",
    "GOOD",
    "REJECTED",
    "UNSOLVED",
]

_log = logging.getLogger(__name__)

#: Candidate status values.
UNSOLVED, GOOD, REJECTED = "unsolved", "good", "rejected"

#: Candidates per batch (bounds the memory of the convolved-basis stack).
_BATCH = 64

#: OpenBLAS runs a GEMM single-threaded when ``m * n * k`` is below 4 * 65536.  The products here
#: are many and small; threaded BLAS gains little on them and, when the cores are already busy
#: (the threaded scheduler, DESIGN.md section 7), its threads spin and stall the call by 10-100x.
_SERIAL_GEMM = 1 << 18


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (2-D or stacked) as BLAS calls small enough to stay on the calling thread."""
    p, k = a.shape[-2:]
    q = b.shape[-1]
    if p * k * q <= _SERIAL_GEMM:
        return a @ b
    out = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (p, q), dtype=np.result_type(a, b))
    if p >= q:
        step = max(1, _SERIAL_GEMM // (k * q))
        for i in range(0, p, step):
            out[..., i : i + step, :] = a[..., i : i + step, :] @ b
    else:
        step = max(1, _SERIAL_GEMM // (k * p))
        for j in range(0, q, step):
            out[..., :, j : j + step] = a @ b[..., :, j : j + step]
    return out


@dataclass(frozen=True, eq=False)
class CandidateSolution:
    """The least-squares solution of one kernel candidate, and what the spatial fit needs from it.

    Attributes
    ----------
    kernel_coefficients : numpy.ndarray
        ``(n_basis,)`` coefficients ``a_i`` of the basis images.
    background : float
        Background (science minus convolved template) at the stamp centre from the candidate's own
        fit of a local plane, counts.
    kernel_sum : float
        Sum of the kernel image (the first coefficient for a renormalized basis).
    kernel_sum_error : float
        Its 1-sigma statistical uncertainty (from the pixel variances, whatever the weighting).
    condition_number : float
        Condition number of the diagonally scaled normal matrix of the local solution.
    chi2 : float
        Sum of squared normalized residuals of the candidate's own solution over the fitted pixels.
    dof : int
        Fitted pixels minus fitted parameters.
    residual_mean, residual_std : float
        Mean and standard deviation of ``(S - model) / sqrt(V_diff)`` over the fitted pixels.
    normal_matrix, normal_vector : numpy.ndarray
        ``A^T W A`` and ``A^T W s`` with columns = the ``n_basis`` convolved basis images followed
        by the ``n_background_terms`` Chebyshev background terms (weights as configured).
    n_background_terms : int
        Number of background columns (0 when no background is fitted).
    noise_matrix : numpy.ndarray or None
        Expected contribution of the convolved image's noise to ``normal_matrix`` (same shape;
        zero in the background rows and columns), or None when not computed.
    """

    kernel_coefficients: np.ndarray
    background: float
    kernel_sum: float
    kernel_sum_error: float
    condition_number: float
    chi2: float
    dof: int
    residual_mean: float
    residual_std: float
    normal_matrix: np.ndarray = field(repr=False)
    normal_vector: np.ndarray = field(repr=False)
    n_background_terms: int
    # Quadratic forms of the normalized residual (weights 1 / V_diff), for assessing any solution.
    _q_matrix: np.ndarray = field(repr=False)
    _q_vector: np.ndarray = field(repr=False)
    _q_scalar: float = field(repr=False)
    _l_vector: np.ndarray = field(repr=False)
    _l_scalar: float = field(repr=False)
    n_pixels: int = 0
    noise_matrix: np.ndarray | None = field(default=None, repr=False)

    def residual_stats(self, parameters: np.ndarray) -> tuple[float, float, float]:
        """Normalized-residual ``(mean, std, chi2)`` of this stamp for a full parameter vector.

        Parameters
        ----------
        parameters : numpy.ndarray
            ``(n_basis + n_background_terms,)``: kernel coefficients, then background-term
            coefficients (for a spatial model: its coefficients evaluated at this candidate).
        """
        theta = np.asarray(parameters, dtype=np.float64)
        n = max(self.n_pixels, 1)
        chi2 = self._q_scalar - 2.0 * float(theta @ self._q_vector) + float(theta @ self._q_matrix @ theta)
        chi2 = max(chi2, 0.0)
        mean = (self._l_scalar - float(theta @ self._l_vector)) / n
        var = max(chi2 / n - mean**2, 0.0)
        return mean, math.sqrt(var), chi2

    def summary(self) -> dict[str, Any]:
        """Plain-data summary (no matrices)."""
        return {
            "kernel_sum": self.kernel_sum,
            "kernel_sum_error": self.kernel_sum_error,
            "background": self.background,
            "condition_number": self.condition_number,
            "chi2": self.chi2,
            "dof": self.dof,
            "residual_mean": self.residual_mean,
            "residual_std": self.residual_std,
        }


@dataclass(frozen=True, eq=False)
class KernelCandidate:
    """A kernel candidate: a star's template and science stamps, and (once solved) its solution.

    Candidates are immutable: the fit returns new candidates (``dataclasses.replace``) with
    ``solution``, ``status`` and ``reason`` filled in, so the same inputs can be fitted from
    several threads.

    Attributes
    ----------
    x, y : float
        Position of the star in the parent pixel frame, pixels (where the spatial model is evaluated).
    xy0 : tuple of int
        Parent-frame pixel of ``template[0, 0]`` (all four stamps share it).
    template, science : numpy.ndarray
        ``N x N`` float64 stamps, counts: the image to convolve and the image to match.
    template_variance, science_variance : numpy.ndarray
        Their variances, counts^2.
    source_id : int
        Id of the source in the input catalog (-1 when none).
    snr : float
        Signal-to-noise ratio of the source (NaN when unknown).
    solution : CandidateSolution or None
    status : str
        ``"unsolved"``, ``"good"`` or ``"rejected"``.
    reason : str
        Why the candidate was rejected (empty otherwise).
    """

    x: float
    y: float
    xy0: tuple[int, int]
    template: np.ndarray = field(repr=False)
    science: np.ndarray = field(repr=False)
    template_variance: np.ndarray = field(repr=False)
    science_variance: np.ndarray = field(repr=False)
    source_id: int = -1
    snr: float = float("nan")
    solution: CandidateSolution | None = None
    status: str = UNSOLVED
    reason: str = ""

    def __post_init__(self) -> None:
        shape = np.shape(self.template)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"kernel candidate stamps must be square, got {shape}")
        for name in ("science", "template_variance", "science_variance"):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(
                    f"kernel candidate {name} has shape {np.shape(getattr(self, name))}, template {shape}"
                )

    @property
    def good(self) -> bool:
        """True when solved and not rejected."""
        return self.status == GOOD

    @property
    def stamp_size(self) -> int:
        """Stamp width (= height), pixels."""
        return int(np.shape(self.template)[0])

    def rejected(self, reason: str) -> KernelCandidate:
        """A copy marked rejected for ``reason``."""
        return replace(self, status=REJECTED, reason=reason)

    def summary(self) -> dict[str, Any]:
        """Plain-data summary (no pixels): position, status, reason and solution numbers."""
        out: dict[str, Any] = {
            "x": self.x,
            "y": self.y,
            "source_id": self.source_id,
            "snr": None if not math.isfinite(self.snr) else self.snr,
            "status": self.status,
            "reason": self.reason,
        }
        if self.solution is not None:
            out.update(self.solution.summary())
        return out


def scaled_condition_number(matrix: np.ndarray) -> np.ndarray | float:
    """Condition number (largest / smallest eigenvalue) of symmetric matrices after Jacobi scaling.

    Scaling by ``1 / sqrt(diag)`` on both sides removes the arbitrary units of the columns (the
    flux of the star, the pixel count), so the number measures real degeneracy of the basis.
    Works on one matrix or a stack; a zero diagonal (an unconstrained parameter) gives ``inf``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    diag = np.diagonal(m, axis1=-2, axis2=-1)
    bad = ~(diag > 0).all(axis=-1)
    d = np.where(diag > 0, diag, 1.0)
    inv = 1.0 / np.sqrt(d)
    scaled = m * inv[..., :, None] * inv[..., None, :]
    scaled = 0.5 * (scaled + np.swapaxes(scaled, -1, -2))
    with np.errstate(invalid="ignore"):
        if not np.all(np.isfinite(scaled)):
            cond = np.full(m.shape[:-2], np.inf)
        else:
            eig = np.linalg.eigvalsh(scaled)
            lo, hi = eig[..., 0], eig[..., -1]
            cond = np.where(lo > 0, hi / np.where(lo > 0, lo, 1.0), np.inf)
    cond = np.where(bad, np.inf, cond)
    return float(cond) if np.ndim(cond) == 0 else cond


def _fft_size(size: int) -> int:
    return scipy.fft.next_fast_len(size, real=True)


def valid_conv_per_stamp(stamps: np.ndarray, kernels: np.ndarray, k: int, workers: int | None) -> np.ndarray:
    """Valid-region true convolution of each ``(N, N)`` stamp with its own ``(k, k)`` kernel, by FFT.

    A circular convolution of length ``L >= N`` does not wrap into the valid region ``[k - 1, N)``.
    """
    size = stamps.shape[-1]
    fft = _fft_size(size)
    prod = scipy.fft.rfft2(stamps, s=(fft, fft), workers=workers)
    prod *= scipy.fft.rfft2(kernels, s=(fft, fft), workers=workers)
    full = scipy.fft.irfft2(prod, s=(fft, fft), workers=workers)
    return full[..., k - 1 : size, k - 1 : size]


class _BasisConvolver:
    """Valid-region convolutions of template stamps with every basis image.

    For an :class:`AlardLuptonBasis` the raw images are separable (``g(x) u**i * g(y) v**j``), so
    each convolution is two small matrix products (a row pass per ``(Gaussian, i)`` shared by
    every ``j``), and the renormalized images are a fixed linear combination of the raw ones:
    about 20x faster than one FFT per basis image.  Any other basis goes through FFTs.
    """

    def __init__(self, basis: np.ndarray | AlardLuptonBasis, size: int, workers: int | None) -> None:
        self.images = basis.images if isinstance(basis, AlardLuptonBasis) else np.asarray(basis, dtype=np.float64)
        self.n_basis, self.k, _ = self.images.shape
        self.size = size
        self.n = size - self.k + 1
        self.workers = workers
        self._separable = isinstance(basis, AlardLuptonBasis)
        if self._separable:
            assert isinstance(basis, AlardLuptonBasis)
            self._prepare_separable(basis)
        else:
            fft = _fft_size(size)
            self._basis_ft = scipy.fft.rfft2(self.images, s=(fft, fft), workers=workers)

    def _prepare_separable(self, basis: AlardLuptonBasis) -> None:
        k, size, n = self.k, self.size, self.n
        h = k // 2
        offsets = np.arange(-h, h + 1, dtype=np.float64)
        # band[a, b] = index into a 1-D kernel for input pixel a and valid output b: 2h + b - a.
        a = np.arange(size)[:, None]
        b = np.arange(n)[None, :]
        idx = 2 * h + b - a
        inside = (idx >= 0) & (idx < k)
        self._groups: list[tuple[list[np.ndarray], list[tuple[int, int]]]] = []
        for sigma, degree in zip(basis.sigmas, basis.degrees, strict=True):
            gauss = np.exp(-0.5 * offsets**2 / sigma**2)
            mats = []
            for p in range(degree + 1):
                f = gauss * (offsets / h) ** p
                mats.append(np.where(inside, f[np.clip(idx, 0, k - 1)], 0.0))  # (N, n)
            self._groups.append((mats, polynomial_exponents(degree)))
        self._mix = np.asarray(basis.transform)  # images = mix @ raw images

    def __call__(self, stamps: np.ndarray) -> np.ndarray:
        """``(m, N, N)`` stamps -> ``(m, n_basis, n, n)`` valid convolutions."""
        m = stamps.shape[0]
        if not self._separable:
            fft = _fft_size(self.size)
            ft = scipy.fft.rfft2(stamps, s=(fft, fft), workers=self.workers)
            full = scipy.fft.irfft2(ft[:, None] * self._basis_ft[None], s=(fft, fft), workers=self.workers)
            return full[..., self.k - 1 : self.size, self.k - 1 : self.size]
        # One large matrix product per pass (the candidates folded into the rows/columns) rather
        # than one small product per candidate.
        size, n = self.size, self.n
        flat_rows = stamps.reshape(m * size, size)
        raw = np.empty((len(self._mix[0]), n, m * n))
        r = 0
        for mats, exps in self._groups:
            # row pass: (m N, N) @ (N, n) -> (m, N, n) -> (N, m n) with the candidates side by side
            rows = [_matmul(flat_rows, mx).reshape(m, size, n).transpose(1, 0, 2).reshape(size, m * n) for mx in mats]
            for i, j in exps:
                raw[r] = _matmul(mats[j].T, rows[i])  # column pass: (n, N) @ (N, m n)
                r += 1
        raw = raw.reshape(-1, n, m, n).transpose(0, 2, 1, 3).reshape(len(raw), m * n * n)
        return _matmul(self._mix, raw).reshape(self.n_basis, m, n, n).transpose(1, 0, 2, 3)


def solve_candidates(
    candidates: Sequence[KernelCandidate],
    basis: np.ndarray | AlardLuptonBasis,
    *,
    background: ChebyshevBasis2D | None = None,
    fit_background: bool = True,
    constant_variance_weighting: bool = True,
    max_condition_number: float = 1.0e10,
    noise_bias_scale: float = 0.0,
    workers: int | None = None,
) -> list[KernelCandidate]:
    """Solve every candidate for its kernel coefficients and background.

    Each candidate's own solution fits the kernel plus a local background *plane* over its
    stamp (a constant would let a background gradient leak into the kernel sums of faint stars);
    its normal equations for the spatial fit use the global background terms instead.

    Parameters
    ----------
    candidates : sequence of KernelCandidate
        Stamps must be larger than the kernel.  Inputs are not modified.
    basis : AlardLuptonBasis or numpy.ndarray
        The basis (fast separable convolutions) or any ``(n_basis, k, k)`` images, odd ``k``.
    background : ChebyshevBasis2D, optional
        Spatial model of the differential background (the image box and its order); its terms
        become the background columns of the normal equations.  ``None``: one constant column.
    fit_background : bool
        Fit a background at all.
    constant_variance_weighting : bool
        Weight every pixel of a stamp by ``1 / median(V)`` instead of ``1 / V``.
    max_condition_number : float
        Candidates whose scaled normal matrix is worse conditioned are rejected.
    noise_bias_scale : float
        Subtract this multiple of the expected contribution of the convolved image's noise
        (independent pixels with the variances of ``template_variance``) from the normal matrices
        handed to the spatial fit (see the module docstring); 0 leaves them alone.
    workers : int, optional
        Threads for ``scipy.fft`` (default: scipy's, i.e. the caller's ``scipy.fft.set_workers``).

    Returns
    -------
    list of KernelCandidate
        New candidates in the same order, status ``"good"`` with a :class:`CandidateSolution`, or
        ``"rejected"`` with the reason (non-finite pixels, non-positive variance, stamp too small,
        singular or ill-conditioned system).
    """
    images = basis.images if isinstance(basis, AlardLuptonBasis) else np.asarray(basis, dtype=np.float64)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % 2 == 0:
        raise ValueError(f"basis must have shape (n_basis, k, k) with odd k, got {images.shape}")
    k = images.shape[1]
    out: list[KernelCandidate | None] = [None] * len(candidates)
    groups: dict[int, list[int]] = {}
    for idx, cand in enumerate(candidates):
        size = cand.stamp_size
        if size < k + 2:
            out[idx] = cand.rejected(f"stamp of {size} px too small for a {k} px kernel")
            continue
        arrays = (cand.template, cand.science, cand.template_variance, cand.science_variance)
        if not all(np.all(np.isfinite(a)) for a in arrays):
            out[idx] = cand.rejected("non-finite pixels")
            continue
        groups.setdefault(size, []).append(idx)
    for size, indices in groups.items():
        convolver = _BasisConvolver(basis, size, workers)
        for start in range(0, len(indices), _BATCH):
            chunk = indices[start : start + _BATCH]
            solved = _solve_batch(
                [candidates[i] for i in chunk],
                convolver,
                background=background,
                fit_background=fit_background,
                constant_variance_weighting=constant_variance_weighting,
                max_condition_number=max_condition_number,
                noise_bias_scale=noise_bias_scale,
                workers=workers,
            )
            for i, cand in zip(chunk, solved, strict=True):
                out[i] = cand
    result = [c for c in out if c is not None]
    n_bad = sum(1 for c in result if c.status == REJECTED)
    _log.debug("solved %d kernel candidates (%d rejected)", len(result), n_bad)
    return result


def _background_columns(
    cands: Sequence[KernelCandidate], n: int, h: int, background: ChebyshevBasis2D | None, fit_background: bool
) -> np.ndarray:
    """Global background terms at every fitted pixel of each candidate: ``(m, n_terms, n * n)``."""
    m = len(cands)
    if not fit_background:
        return np.zeros((m, 0, n * n))
    if background is None:
        return np.ones((m, 1, n * n))
    cols = np.empty((m, background.n_terms, n * n))
    offsets = np.arange(n, dtype=np.float64) + h
    for c, cand in enumerate(cands):
        tx, ty = background.axis_values(cand.xy0[0] + offsets, cand.xy0[1] + offsets)
        for t, (i, j) in enumerate(background.terms):
            cols[c, t] = np.outer(ty[:, j], tx[:, i]).ravel()
    return cols


def _convolved_noise_gram(
    variance: np.ndarray, weights: np.ndarray, basis: np.ndarray, workers: int | None
) -> np.ndarray:
    """Expected noise part of ``sum_p w_p (B_i (x) T)(p) (B_j (x) T)(p)`` for independent pixel noise.

    ``E = sum_q B_i(q) B_j(q) R(q)`` with ``R(q) = sum_p w_p V(p - q)`` over the fitted pixels ``p``;
    ``R`` is the valid cross-correlation of each ``(N, N)`` variance stamp with its ``(n, n)``
    weight map, one FFT per stamp.  Returns ``(m, n_basis, n_basis)``.
    """
    # The valid convolution with the reversed weights: window sums sum_u V[a + u] w[u].  The basis
    # pixel (y, x) sees the window starting at (2h - y, 2h - x) = (k - 1 - y, k - 1 - x): R in
    # basis-image order is the window sums reversed.
    windows = valid_conv_per_stamp(variance, weights[:, ::-1, ::-1], weights.shape[-1], workers)[:, ::-1, ::-1]
    flat = basis.reshape(basis.shape[0], -1)
    return np.einsum("ik,mk,jk->mij", flat, windows.reshape(len(variance), -1), flat, optimize=True)


def _local_plane(n: int) -> np.ndarray:
    """``1, dx, dy`` over the fitted region (offsets from its centre scaled to [-1, 1]): ``(3, n * n)``."""
    t = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    ones = np.ones((n, n))
    return np.stack([ones.ravel(), (ones * t[None, :]).ravel(), (ones * t[:, None]).ravel()])


def _solve_batch(
    cands: Sequence[KernelCandidate],
    convolver: _BasisConvolver,
    *,
    background: ChebyshevBasis2D | None,
    fit_background: bool,
    constant_variance_weighting: bool,
    max_condition_number: float,
    noise_bias_scale: float,
    workers: int | None,
) -> list[KernelCandidate]:
    m = len(cands)
    basis = convolver.images
    nb, k, _ = basis.shape
    h = k // 2
    n = convolver.n
    npix = n * n
    valid = (slice(h, h + n), slice(h, h + n))
    tmpl = np.stack([c.template for c in cands]).astype(np.float64, copy=False)
    sci = np.stack([c.science[valid] for c in cands]).reshape(m, npix)
    var_sci = np.stack([c.science_variance[valid] for c in cands]).reshape(m, npix)
    var_tmpl_full = np.stack([c.template_variance for c in cands]).astype(np.float64, copy=False)
    var_fit = var_sci + var_tmpl_full[:, valid[0], valid[1]].reshape(m, npix)

    conv = convolver(tmpl).reshape(m, nb, npix)
    bg_cols = _background_columns(cands, n, h, background, fit_background)
    n_bg = bg_cols.shape[1]
    plane = _local_plane(n) if fit_background else np.zeros((0, npix))
    n_loc = nb + plane.shape[0]
    # Columns: the convolved basis, the global background terms (spatial fit), the local plane
    # (the candidate's own solution).  One Gram matrix per weighting serves both systems.
    design = np.concatenate([conv, bg_cols, np.broadcast_to(plane, (m,) + plane.shape)], axis=1)
    glob = np.r_[0 : nb + n_bg]
    loc = np.r_[0:nb, nb + n_bg : nb + n_bg + plane.shape[0]]

    positive = (var_fit > 0).all(axis=1)
    safe_var = np.where(var_fit > 0, var_fit, 1.0)
    if constant_variance_weighting:
        weights = np.broadcast_to(1.0 / np.median(safe_var, axis=1)[:, None], safe_var.shape)
    else:
        weights = 1.0 / safe_var
    weighted = design * weights[:, None, :]
    gram = _matmul(weighted, design.transpose(0, 2, 1))
    rhs_all = np.einsum("mpk,mk->mp", weighted, sci)
    normal, vector = gram[:, glob][:, :, glob], rhs_all[:, glob]
    noise_matrices = None
    if noise_bias_scale > 0:
        noise_matrices = np.zeros_like(normal)
        noise_matrices[:, :nb, :nb] = noise_bias_scale * _convolved_noise_gram(
            var_tmpl_full, np.ascontiguousarray(weights).reshape(m, n, n), basis, workers
        )
    local_normal, local_vector = gram[:, loc][:, :, loc], rhs_all[:, loc]

    cond = np.atleast_1d(scaled_condition_number(local_normal))
    ok = positive & np.isfinite(cond) & (cond <= max_condition_number)
    theta_local = np.zeros((m, n_loc))
    if ok.any():
        d = np.sqrt(np.diagonal(local_normal[ok], axis1=1, axis2=2))
        scaled = local_normal[ok] / d[:, :, None] / d[:, None, :]
        rhs = local_vector[ok] / d
        theta_local[ok] = np.linalg.solve(scaled, rhs[..., None])[..., 0] / d

    # Variance of the difference: V_sci + V_tmpl (x) K^2, with each candidate's own kernel.
    kernels = np.einsum("mi,ijk->mjk", theta_local[:, :nb], basis)
    var_conv = valid_conv_per_stamp(var_tmpl_full, kernels**2, k, workers).reshape(m, npix)
    var_diff = var_sci + np.maximum(var_conv, 0.0)
    inv_diff = np.where(var_diff > 0, 1.0 / np.where(var_diff > 0, var_diff, 1.0), 0.0)
    inv_sigma = np.sqrt(inv_diff)
    local_design = design[:, loc]
    z_local = (sci - np.einsum("mp,mpk->mk", theta_local, local_design)) * inv_sigma
    # Kernel-sum uncertainty: var = g^T A^T W V W A g with g = M^-1 s (s: the basis sums).
    basis_sums = basis.sum(axis=(1, 2))
    sums = np.concatenate([basis_sums, np.zeros(n_loc - nb)])
    ksum_err = np.full(m, np.nan)
    if ok.any():
        g = np.linalg.solve(local_normal[ok], np.broadcast_to(sums, (int(ok.sum()), n_loc))[..., None])[..., 0]
        proj = np.einsum("mp,mpk->mk", g, local_design[ok]) * weights[ok]
        ksum_err[ok] = np.sqrt(np.einsum("mk,mk->m", proj * var_diff[ok], proj))
    glob_design = design[:, glob]
    q_weighted = glob_design * inv_diff[:, None, :]
    q_matrix = _matmul(q_weighted, glob_design.transpose(0, 2, 1))
    q_vector = np.einsum("mpk,mk->mp", q_weighted, sci)
    q_scalar = np.einsum("mk,mk->m", sci * inv_diff, sci)
    l_vector = np.einsum("mpk,mk->mp", glob_design, inv_sigma)
    l_scalar = np.einsum("mk,mk->m", sci, inv_sigma)

    results: list[KernelCandidate] = []
    for c, cand in enumerate(cands):
        if not positive[c]:
            results.append(cand.rejected("non-positive variance"))
            continue
        if not ok[c]:
            what = "singular" if not np.isfinite(cond[c]) else f"ill-conditioned (condition number {cond[c]:.3g})"
            results.append(cand.rejected(f"{what} kernel solution"))
            continue
        coeffs = theta_local[c, :nb].copy()
        mean, std = float(z_local[c].mean()), float(z_local[c].std())
        solution = CandidateSolution(
            kernel_coefficients=coeffs,
            background=float(theta_local[c, nb]) if fit_background else 0.0,
            kernel_sum=float(coeffs @ basis_sums),
            kernel_sum_error=float(ksum_err[c]),
            condition_number=float(cond[c]),
            chi2=float(z_local[c] @ z_local[c]),
            dof=npix - n_loc,
            residual_mean=mean,
            residual_std=std,
            normal_matrix=normal[c],
            normal_vector=vector[c],
            n_background_terms=n_bg,
            _q_matrix=q_matrix[c],
            _q_vector=q_vector[c],
            _q_scalar=float(q_scalar[c]),
            _l_vector=l_vector[c],
            _l_scalar=float(l_scalar[c]),
            n_pixels=npix,
            noise_matrix=None if noise_matrices is None else noise_matrices[c],
        )
        if not all(math.isfinite(v) for v in (solution.kernel_sum, mean, std)):
            results.append(cand.rejected("non-finite kernel solution"))
            continue
        results.append(replace(cand, solution=solution, status=GOOD, reason=""))
    return results


def solve_candidate(
    template: np.ndarray,
    science: np.ndarray,
    variance: np.ndarray,
    basis: np.ndarray | AlardLuptonBasis,
    *,
    template_variance: np.ndarray | None = None,
    fit_background: bool = True,
    constant_variance_weighting: bool = False,
    max_condition_number: float = float("inf"),
) -> CandidateSolution:
    """Solve one pair of stamps (a convenience wrapper of :func:`solve_candidates`).

    Parameters
    ----------
    template, science : numpy.ndarray
        Square stamps of equal odd or even size ``N > k + 1``, counts.
    variance : numpy.ndarray
        Variance of the science stamp (or of the difference when ``template_variance`` is None),
        counts^2.
    basis : AlardLuptonBasis or numpy.ndarray
        The basis or ``(n_basis, k, k)`` basis images.
    template_variance : numpy.ndarray, optional
        Variance of the template stamp (zeros by default).

    Raises
    ------
    SingularKernelSolutionError
        If the system is singular or worse conditioned than ``max_condition_number``.
    ValueError
        If the stamps are unusable (non-finite, non-positive variance, too small).
    """
    from .errors import SingularKernelSolutionError

    tv = np.zeros_like(np.asarray(template, dtype=np.float64)) if template_variance is None else template_variance
    cand = KernelCandidate(
        0.0, 0.0, (0, 0),
        np.asarray(template, dtype=np.float64), np.asarray(science, dtype=np.float64),
        np.asarray(tv, dtype=np.float64), np.asarray(variance, dtype=np.float64),
    )
    (result,) = solve_candidates(
        [cand], basis, background=None, fit_background=fit_background,
        constant_variance_weighting=constant_variance_weighting, max_condition_number=max_condition_number,
    )
    if result.solution is None:
        if "singular" in result.reason or "conditioned" in result.reason:
            raise SingularKernelSolutionError(f"cannot solve the kernel for these stamps: {result.reason}")
        raise ValueError(f"cannot solve the kernel for these stamps: {result.reason}")
    return result.solution
