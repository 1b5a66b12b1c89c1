"""Resampling an exposure onto another pixel frame (LSST's ``warpExposure``).

:func:`warp_exposure` maps every target pixel centre to the input frame, interpolates the input
there with a separable kernel (Lanczos3 by default) and returns a new :class:`~butler.Exposure` on the
target frame.

How it works, and why this way
------------------------------
- **Pixel -> pixel mapping.**  The composite transform target pixel -> sky -> input pixel is
  evaluated exactly (astropy, including distortions) on a coarse grid of nodes every ``grid_step``
  target pixels, and interpolated to every pixel with cubic splines (a small dense matrix along x,
  a vector-valued B-spline along y, per band of rows); the error on a TAN mapping at 32-px spacing
  is ~1e-9 px.  Evaluating the WCS on all 16 million pixels of a 4k x 4k image costs seconds.
- **Interpolation.**  A separable kernel of ``n`` taps per axis (bilinear 2, Keys bicubic 4,
  Lanczos3 6), tabulated at 1/16384-pixel phases and normalized to sum 1 per axis as afw does.
  Lanczos3's weights are also corrected to zero first moment: raw Lanczos3 does not reproduce a
  linear ramp and shifts every star's centroid by up to 0.019 px depending on its phase (measured),
  which is the whole position budget of issue 6.  Output tiles of 64 x 512 pixels gather their
  ``n x n`` input pixels with ``np.take`` (one call per tap row) and sum them with ``einsum``.
- **Ours, not reproject.**  ``benchmarks/bench_coadd.py`` (one 4096^2 exposure onto a 4200^2
  patch, 2-core machine shared with other jobs): ours Lanczos3 ~5-10 s, bicubic ~4-7 s, bilinear
  ~2-4 s for image + variance + mask (peak ~450 MB), against ``reproject.reproject_interp`` bicubic
  ~20 s and bilinear ~17 s for the image alone (peak 2.6 GB: it evaluates the WCS on every pixel),
  with flux errors 1e-6 (ours) vs 1e-5 (reproject) on noiseless stars and centroids within 1e-4 px
  for both.  So we warp with our own code, Lanczos3 by default.
- **Flux.**  The interpolant samples *surface brightness in counts per input pixel*; it is
  multiplied by the pixel-area ratio ``|det J|`` (J = d input / d target, from the same coarse grid)
  so that the output is in counts per target pixel and total fluxes are conserved when scales differ.
- **Variance** is resampled with the squared weights, ``var_out = |det J|^2 * sum w_k^2 var_k``.
  That is the exact variance of each output pixel for independent input pixels; what it leaves out is
  the covariance that resampling introduces between neighbouring output pixels (so the variance of a
  sum of warped pixels is under-estimated; LSST makes the same approximation).  Warps that will be
  convolved (PSF matching) should ask for ``variance="interpolated"`` instead (see
  :func:`warp_exposure`).
- **Mask.**  An output pixel receives the OR of the mask bits of the input pixels under the
  *bilinear* footprint of its position (the <= 2x2 nearest pixels with weight > 1e-3; LSST's default
  ``maskWarpingKernelName = "bilinear"``): those carry the non-negligible part of the weight; the
  Lanczos side lobes (|w| < 0.1) do not spread masks.
- **Coverage.**  An output pixel is valid only when every tap with non-zero weight lies inside the
  input and none of the input pixels under its bilinear footprint is ``NO_DATA`` or non-finite;
  otherwise its image and variance are NaN and its mask is ``NO_DATA`` (a border of ~2-3 px is lost
  along input edges with Lanczos3, as in LSST).  ``EDGE`` is never invented.
- **PSF.**  The input PSF mapped through the local affine transform (target -> input pixels,
  linearized at the target box centre): a :class:`~butler.psf.CoaddPsf` with one input, so
  ``psf.image(x, y)`` in the target frame is the input PSF at the corresponding input position,
  resampled into target pixels.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS
from scipy.interpolate import BSpline, make_interp_spline

from butler.errors import DataModelError
from butler.exposure import Exposure
from butler.geometry import Box
from butler.psf import CoaddPsf, CoaddPsfInput

__all__ = [
    "VARIANCE_MODES",
    "WARP_METHODS",
    "PixelMapping",
    "WarpError",
    "pixel_mapping",
    "warp_exposure",
    "warp_kernel_weights",
    "warp_with_variances",
]

_log = logging.getLogger(__name__)

#: Interpolation methods of :func:`warp_exposure` and their number of taps per axis.
WARP_METHODS: dict[str, int] = {"bilinear": 2, "bicubic": 4, "lanczos3": 6}

#: Variance propagation modes of :func:`warp_exposure`.
VARIANCE_MODES = ("squared", "interpolated")

#: Fractional offsets closer than this to an integer are snapped (pixels): integer shifts are exact.
_SNAP = 1e-6

#: Bilinear weights below this do not propagate mask bits.
_MASK_WEIGHT = 1e-3

#: Output tile size, pixels (rows, columns), sized to keep the gathered arrays in cache.
_TILE_ROWS = 64
_TILE_COLS = 512


class WarpError(DataModelError):
    """A warp could not be set up (unknown method, missing WCS, ...)."""


# ---------------------------------------------------------------------------------------- kernels
def _lanczos(t: np.ndarray, a: int) -> np.ndarray:
    out = np.sinc(t) * np.sinc(t / a)
    out[np.abs(t) >= a] = 0.0
    return out


def _keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    at = np.abs(t)
    out = np.zeros_like(at)
    near = at <= 1
    far = (at > 1) & (at < 2)
    out[near] = (a + 2) * at[near] ** 3 - (a + 3) * at[near] ** 2 + 1
    out[far] = a * at[far] ** 3 - 5 * a * at[far] ** 2 + 8 * a * at[far] - 4 * a
    return out


def _raw_kernel_weights(method: str, frac: np.ndarray) -> np.ndarray:
    ntaps = _taps(method)
    frac = np.asarray(frac, dtype=np.float64)
    offsets = np.arange(-(ntaps // 2) + 1, ntaps // 2 + 1, dtype=np.float64)
    t = offsets.reshape((-1,) + (1,) * frac.ndim) - frac[None]
    if method == "bilinear":
        w = np.clip(1.0 - np.abs(t), 0.0, None)
    elif method == "bicubic":
        w = _keys_cubic(t)
    else:
        w = _lanczos(t, 3)
        # Raw (or sum-normalized) Lanczos3 does not reproduce a linear ramp: its first moment is off
        # by up to 0.019 px depending on the phase, which shifts every warped star's centroid by as
        # much.  Add b * t * |w| (zero wherever w is, so integer phases stay exact) with b chosen to
        # cancel the first moment; the sum is normalized below.  The change to each weight is
        # < 0.01 and the kernel's frequency response is otherwise that of Lanczos3.
        aw = np.abs(w)
        s1 = (t * w).sum(axis=0)
        s2 = (t * t * aw).sum(axis=0)
        b = np.where(s2 > 0, -s1 / np.where(s2 > 0, s2, 1.0), 0.0)
        w = w + b[None] * t * aw
    w /= w.sum(axis=0, keepdims=True)
    return w


#: Phases per pixel of the tabulated kernels (the phase is rounded to 1/_TABLE_SIZE px, < 3e-5 px).
_TABLE_SIZE = 1 << 14
_TABLES: dict[str, np.ndarray] = {}


def _weight_table(method: str) -> np.ndarray:
    """Weights for phases ``i / _TABLE_SIZE``, shape ``(n_taps, _TABLE_SIZE + 1)``, float32."""
    table = _TABLES.get(method)
    if table is None:
        phases = np.arange(_TABLE_SIZE + 1, dtype=np.float64) / _TABLE_SIZE
        table = np.ascontiguousarray(_raw_kernel_weights(method, phases).astype(np.float32))
        table.setflags(write=False)
        _TABLES[method] = table
    return table


def warp_kernel_weights(method: str, frac: np.ndarray) -> np.ndarray:
    """One-dimensional interpolation weights for fractional offsets.

    Parameters
    ----------
    method : str
        One of :data:`WARP_METHODS`.
    frac : numpy.ndarray
        Fractional offsets in ``[0, 1)`` of the sample position from the input pixel ``i = floor(u)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_taps,) + frac.shape``, float32; tap ``k`` applies to input pixel
        ``i - n_taps // 2 + 1 + k``.  Each column sums to 1.  "lanczos3" is Lanczos3 with its
        first moment corrected to zero (see the code), "bicubic" is Keys' cubic convolution
        (a = -0.5); both reproduce constants and linear ramps exactly.
    """
    return _raw_kernel_weights(method, frac).astype(np.float32)


def _taps(method: str) -> int:
    try:
        return WARP_METHODS[method]
    except KeyError:
        raise WarpError(
            f"unknown warping method {method!r}; choose one of: {', '.join(WARP_METHODS)}"
        ) from None


# ---------------------------------------------------------------------------------------- mapping
def _spline_matrix(nodes: np.ndarray, points: np.ndarray, derivative: int = 0) -> np.ndarray:
    """Matrix M with ``f(points) ~= M @ f(nodes)`` for a cubic (or lower) interpolating spline."""
    n = nodes.size
    if n == 1:
        return np.ones((points.size, 1)) if derivative == 0 else np.zeros((points.size, 1))
    k = min(3, n - 1)
    spline = make_interp_spline(nodes, np.eye(n), k=k)
    if derivative:
        spline = spline.derivative(derivative)
    return np.asarray(spline(points))


def _nodes(start: int, stop: int, step: int) -> np.ndarray:
    """Grid nodes from ``start`` to ``stop - 1`` inclusive, spaced by at most ``step``."""
    last = stop - 1
    if last <= start:
        return np.array([float(start)])
    count = max(1, math.ceil((last - start) / step))
    count = max(count, min(3, last - start))  # a cubic spline needs 4 nodes
    return np.linspace(start, last, count + 1)


@dataclass
class PixelMapping:
    """The target -> input pixel mapping of a warp, evaluated on a coarse grid.

    Attributes
    ----------
    target_bbox : Box
        Target-frame pixels covered.
    x_nodes, y_nodes : numpy.ndarray
        Target-frame pixel coordinates of the grid nodes.
    x_in, y_in : numpy.ndarray
        Input-frame pixel coordinates of the nodes, shape ``(len(y_nodes), len(x_nodes))``.
    det_j : numpy.ndarray
        ``|det d(input)/d(target)|`` at the nodes: input pixels per target pixel.
    """

    target_bbox: Box
    x_nodes: np.ndarray
    y_nodes: np.ndarray
    x_in: np.ndarray
    y_in: np.ndarray
    det_j: np.ndarray

    def __post_init__(self) -> None:
        bbox = self.target_bbox
        xs = np.arange(bbox.x0, bbox.x1, dtype=np.float64)
        wx_t = _spline_matrix(self.x_nodes, xs).T
        # Interpolate along x once for all rows of nodes (a small dense matmul), then along y per
        # chunk with a vector-valued B-spline (local support: ~4 node rows per output row; a dense
        # row-interpolation matrix costs 3x more in BLAS for these skinny shapes).
        ax = self.x_in @ wx_t
        ay = self.y_in @ wx_t
        self._ad = self.det_j @ wx_t
        self._rows = np.arange(bbox.y0, bbox.y1, dtype=np.float64)
        stacked = np.stack([ax, ay], axis=1)
        if self.y_nodes.size == 1:
            self._ys = None
            self._const = stacked[0]
        else:
            # Coefficients through the (small) inverse of the collocation matrix: one matmul instead
            # of a banded solve with 2 x width right-hand sides (5x faster for 4k-wide boxes).
            k = min(3, self.y_nodes.size - 1)
            unit = make_interp_spline(self.y_nodes, np.eye(self.y_nodes.size), k=k)
            coef = np.tensordot(unit.c, stacked, axes=1)
            self._ys = BSpline(unit.t, coef, k, axis=0)

    def evaluate(self, row0: int, row1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Input positions and area ratio for target rows ``[row0, row1)`` (0-based in the box).

        Returns
        -------
        x_in, y_in : numpy.ndarray
            Input-frame pixel coordinates, shape ``(row1 - row0, width)``, float64.
        det_j : numpy.ndarray
            Input pixels per target pixel, same shape (linear in y between nodes: it varies by
            < 1e-6 over a grid step for any sky projection at survey pixel scales).
        """
        rows = self._rows[row0:row1]
        if self._ys is None:
            xy = np.broadcast_to(self._const, (rows.size,) + self._const.shape)
            det = np.broadcast_to(self._ad[0], (rows.size, self._ad.shape[1]))
            return xy[:, 0], xy[:, 1], det
        xy = self._ys(rows)
        j = np.clip(np.searchsorted(self.y_nodes, rows, side="right") - 1, 0, self.y_nodes.size - 2)
        f = ((rows - self.y_nodes[j]) / (self.y_nodes[j + 1] - self.y_nodes[j]))[:, None]
        det = (1.0 - f) * self._ad[j] + f * self._ad[j + 1]
        return xy[:, 0], xy[:, 1], det

    def affine_at(self, x: float, y: float) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Local affine transform target -> input pixels at target position ``(x, y)``."""
        dx = 0.5
        px = np.array([x, x + dx, x - dx, x, x])
        py = np.array([y, y, y, y + dx, y - dx])
        wy = _spline_matrix(self.y_nodes, py)
        wx = _spline_matrix(self.x_nodes, px)
        xi = np.einsum("ij,jk,ik->i", wy, self.x_in, wx)
        yi = np.einsum("ij,jk,ik->i", wy, self.y_in, wx)
        a, b = (xi[1] - xi[2]) / (2 * dx), (xi[3] - xi[4]) / (2 * dx)
        d, e = (yi[1] - yi[2]) / (2 * dx), (yi[3] - yi[4]) / (2 * dx)
        c = xi[0] - a * x - b * y
        f = yi[0] - d * x - e * y
        return ((float(a), float(b), float(c)), (float(d), float(e), float(f)))


def pixel_mapping(source_wcs: WCS, target_wcs: WCS, target_bbox: Box, grid_step: int = 32) -> PixelMapping:
    """Evaluate the target -> source pixel mapping on a coarse grid of target pixels.

    Parameters
    ----------
    source_wcs, target_wcs : astropy.wcs.WCS
        Celestial WCSs of the two parent frames (0-based pixels).
    target_bbox : Box
        Target-frame pixels to cover.
    grid_step : int
        Spacing of the grid nodes, target pixels.
    """
    if grid_step < 1:
        raise WarpError(f"grid_step must be >= 1 pixel, got {grid_step}")
    xn = _nodes(target_bbox.x0, target_bbox.x1, grid_step)
    yn = _nodes(target_bbox.y0, target_bbox.y1, grid_step)
    h = 0.5
    gx, gy = np.meshgrid(xn, yn)
    # Centre and four offsets for the Jacobian, all in one WCS call per direction.
    px = np.stack([gx, gx + h, gx - h, gx, gx])
    py = np.stack([gy, gy, gy, gy + h, gy - h])
    tw = target_wcs.celestial
    sw = source_wcs.celestial
    ra, dec = tw.all_pix2world(px.ravel(), py.ravel(), 0)
    with np.errstate(invalid="ignore"):
        sx, sy = sw.all_world2pix(ra, dec, 0, quiet=True)
    sx = np.asarray(sx).reshape(px.shape)
    sy = np.asarray(sy).reshape(py.shape)
    dxdx = (sx[1] - sx[2]) / (2 * h)
    dxdy = (sx[3] - sx[4]) / (2 * h)
    dydx = (sy[1] - sy[2]) / (2 * h)
    dydy = (sy[3] - sy[4]) / (2 * h)
    det = np.abs(dxdx * dydy - dxdy * dydx)
    return PixelMapping(target_bbox, xn, yn, sx[0], sy[0], det)


# ---------------------------------------------------------------------------------------- warping
def warp_exposure(
    exposure: Exposure,
    target_wcs: WCS,
    target_bbox: Box,
    *,
    method: str = "lanczos3",
    grid_step: int = 32,
    variance: str = "squared",
) -> Exposure:
    """Resample an exposure onto ``target_bbox`` of the frame described by ``target_wcs``.

    Parameters
    ----------
    exposure : Exposure
        The input; needs a WCS.  Not modified.
    target_wcs : astropy.wcs.WCS
        Maps target parent-frame 0-based pixels to the sky.
    target_bbox : Box
        Target parent-frame pixels of the output.
    method : {"lanczos3", "bicubic", "bilinear"}
        Interpolation kernel (Keys cubic convolution with a = -0.5 for "bicubic").
    grid_step : int
        Spacing in target pixels of the grid on which the WCS transform is evaluated exactly.
    variance : {"squared", "interpolated"}
        "squared" (default): ``|det J|^2 sum w^2 v``, the exact variance of each output pixel.
        "interpolated": ``|det J| sum w v``, the variance *field* resampled like an image.  Use it
        when the warp will be convolved with a kernel broader than a pixel (PSF matching): the
        output pixels of a warp are correlated, so the per-pixel variances, convolved with
        ``K^2``, under-estimate the variance of the convolved image (by ~28% for a sub-pixel
        shift matched from 3 to 6 px FWHM), while the smooth-field variance convolved with ``K^2``
        is right (the warp's interpolation is invisible under a smooth kernel).

    Returns
    -------
    Exposure
        Image in counts per target pixel (flux conserving), variance with squared weights, mask as
        described in the module docstring (``NO_DATA`` and NaN where the input does not cover);
        ``wcs = target_wcs``; photo_calib, visit_info, band and metadata copied; the PSF mapped into
        the target frame (a one-input :class:`~butler.psf.CoaddPsf`), or None when the input has none.

    Raises
    ------
    WarpError
        Unknown method, missing WCS, or an empty target box.
    """
    if variance not in VARIANCE_MODES:
        raise WarpError(f"variance must be one of {', '.join(VARIANCE_MODES)}, got {variance!r}")
    out, _ = warp_with_variances(exposure, target_wcs, target_bbox, method=method, grid_step=grid_step,
                                 variances=(variance,))
    return out


def warp_with_variances(
    exposure: Exposure,
    target_wcs: WCS,
    target_bbox: Box,
    *,
    method: str = "lanczos3",
    grid_step: int = 32,
    variances: tuple[str, ...] = ("squared", "interpolated"),
) -> tuple[Exposure, dict[str, np.ndarray]]:
    """:func:`warp_exposure` computing several variance flavours in one pass.

    Returns
    -------
    exposure : Exposure
        The warp, whose variance plane is the first of ``variances``.
    planes : dict of str to numpy.ndarray
        Every requested variance plane by mode (MakeWarpTask uses "squared" for the direct warp
        and "interpolated" for the one it PSF-matches).
    """
    ntaps = _taps(method)
    if not variances or any(mode not in VARIANCE_MODES for mode in variances):
        raise WarpError(f"variances must be a non-empty tuple of {', '.join(VARIANCE_MODES)}, got {variances!r}")
    if exposure.wcs is None:
        raise WarpError("warp_exposure: the input exposure has no WCS; attach one before warping")
    if target_wcs is None or not isinstance(target_wcs, WCS):
        raise WarpError(f"warp_exposure: target_wcs must be an astropy WCS, got {type(target_wcs).__name__}")
    if target_bbox.is_empty:
        raise WarpError(f"warp_exposure: empty target box {target_bbox}")

    mapping = pixel_mapping(exposure.wcs, target_wcs, target_bbox, grid_step)
    mask_planes = dict(exposure.mask_planes)
    no_data_bit = 1 << _add_plane(mask_planes, "NO_DATA")

    image, planes, mask = _resample(exposure, mapping, method, ntaps, no_data_bit, tuple(variances))

    psf = None
    if exposure.psf is not None:
        cx, cy = target_bbox.center
        transform = mapping.affine_at(cx, cy)
        if all(math.isfinite(v) for row in transform for v in row):
            psf = CoaddPsf([CoaddPsfInput(exposure.psf, 1.0, target_bbox, transform)])
        else:
            _log.warning("warp_exposure: the target box centre does not map onto the input; no PSF attached")
    out = Exposure(
        image,
        mask,
        planes[0],
        xy0=(target_bbox.x0, target_bbox.y0),
        wcs=target_wcs,
        psf=psf,
        photo_calib=exposure.photo_calib,
        visit_info=exposure.visit_info,
        band=exposure.band,
        mask_planes=mask_planes,
        metadata=copy.deepcopy(exposure.metadata),
    )
    return out, dict(zip(variances, planes, strict=True))


def _add_plane(planes: dict[str, int], name: str) -> int:
    from butler.masks import add_plane

    return add_plane(planes, name)


def _resample(
    exposure: Exposure,
    mapping: PixelMapping,
    method: str,
    ntaps: int,
    no_data_bit: int,
    variance_modes: tuple[str, ...] = ("squared",),
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The gather loop: returns (image, [variance for each mode], mask) on the target box."""
    in_h, in_w = exposure.shape
    in_x0, in_y0 = exposure.xy0
    pad = ntaps // 2
    lo = ntaps // 2 - 1  # taps below floor(u)
    # Padded working copies: out-of-range taps read zeros (they get zero weight or the pixel is
    # flagged NO_DATA); non-finite inputs become 0 + NO_DATA so they cannot poison the sums.
    src_img = np.zeros((in_h + 2 * pad, in_w + 2 * pad), np.float32)
    src_var = np.zeros_like(src_img)
    src_msk = np.full(src_img.shape, no_data_bit, np.int32)
    inner = (slice(pad, pad + in_h), slice(pad, pad + in_w))
    src_img[inner] = exposure.image
    src_var[inner] = exposure.variance
    src_msk[inner] = exposure.mask
    bad = ~(np.isfinite(src_img) & np.isfinite(src_var))
    if bad.any():
        src_img[bad] = 0.0
        src_var[bad] = 0.0
        src_msk[bad] |= no_data_bit
    stride = src_img.shape[1]
    flat_img = src_img.ravel()
    flat_var = src_var.ravel()
    flat_msk = src_msk.ravel()

    height, width = mapping.target_bbox.shape
    image = np.empty((height, width), np.float32)
    variances = [np.empty((height, width), np.float32) for _ in variance_modes]
    mask = np.empty((height, width), np.int32)
    tap_offsets = np.arange(ntaps) - lo
    table = _weight_table(method)
    # Output tiles of _TILE_ROWS x _TILE_COLS keep the input rows they read (and the work
    # arrays) in cache; full-width strips of a 4k image ran 2x slower (measured).
    for r0 in range(0, height, _TILE_ROWS):
        r1 = min(height, r0 + _TILE_ROWS)
        xi_band, yi_band, det_band = mapping.evaluate(r0, r1)
        for c0 in range(0, width, _TILE_COLS):
            c1 = min(width, c0 + _TILE_COLS)
            _resample_tile(
                xi_band[:, c0:c1], yi_band[:, c0:c1], det_band[:, c0:c1], (slice(r0, r1), slice(c0, c1)),
                in_x0, in_y0, in_w, in_h, ntaps, lo, pad, stride, tap_offsets, table, variance_modes,
                flat_img, flat_var, flat_msk, no_data_bit, image, variances, mask,
            )
    return image, variances, mask


def _resample_tile(
    xi: np.ndarray,
    yi: np.ndarray,
    det: np.ndarray,
    dst: tuple[slice, slice],
    in_x0: int,
    in_y0: int,
    in_w: int,
    in_h: int,
    ntaps: int,
    lo: int,
    pad: int,
    stride: int,
    tap_offsets: np.ndarray,
    table: np.ndarray,
    variance_modes: tuple[str, ...],
    flat_img: np.ndarray,
    flat_var: np.ndarray,
    flat_msk: np.ndarray,
    no_data_bit: int,
    image: np.ndarray,
    variances: list[np.ndarray],
    mask: np.ndarray,
) -> None:
    """Resample one output tile (positions ``xi``, ``yi`` in the input's parent frame) into ``dst``."""
    u = xi - in_x0
    v = yi - in_y0
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(u) & np.isfinite(v)
        u = np.where(finite, u, -1e6)
        v = np.where(finite, v, -1e6)
        iu = np.floor(u)
        iv = np.floor(v)
        fu = u - iu
        fv = v - iv
    # Snap near-integers so that integer shifts copy pixels exactly.
    up = fu > 1.0 - _SNAP
    iu[up] += 1.0
    fu[up | (fu < _SNAP)] = 0.0
    vp = fv > 1.0 - _SNAP
    iv[vp] += 1.0
    fv[vp | (fv < _SNAP)] = 0.0
    # Coverage: all taps with non-zero weight inside the input.
    ulo = np.where(fu > 0, iu - lo, iu)
    uhi = np.where(fu > 0, iu + ntaps // 2, iu)
    vlo = np.where(fv > 0, iv - lo, iv)
    vhi = np.where(fv > 0, iv + ntaps // 2, iv)
    covered = finite & (ulo >= 0) & (uhi <= in_w - 1) & (vlo >= 0) & (vhi <= in_h - 1)
    if not covered.any():
        # Nothing of the input lands here (e.g. the corners of a rotated detector's box).
        image[dst] = np.nan
        for out in variances:
            out[dst] = np.nan
        mask[dst] = no_data_bit
        return
    # Keep every gather inside the padded arrays (uncovered pixels are overwritten below).
    iu = np.clip(iu, -1, in_w - 1).astype(np.intp)
    iv = np.clip(iv, -1, in_h - 1).astype(np.intp)
    # Kernel weights from a table (evaluating sinc on every pixel cost 5x the whole gather).
    wu = np.take(table, np.rint(fu * _TABLE_SIZE).astype(np.intp), axis=1)
    wv = np.take(table, np.rint(fv * _TABLE_SIZE).astype(np.intp), axis=1)
    squared = ["squared" == mode for mode in variance_modes]
    wu2 = wu * wu if any(squared) else None
    wv2 = wv * wv if any(squared) else None
    base = (iv + pad) * stride + (iu + pad)
    shape = base.shape
    flat_base = base.ravel()
    wu_flat = wu.reshape(ntaps, -1)
    wu2_flat = wu2.reshape(ntaps, -1) if wu2 is not None else None
    acc_i = np.zeros(flat_base.size, np.float32)
    acc_v = [np.zeros(flat_base.size, np.float32) for _ in variance_modes]
    # Per tap row: one gather of the n_taps pixels of every output pixel, and a weighted sum over
    # them with einsum (1.7x faster than a take/multiply/add per tap, measured).
    col_offsets = tap_offsets[:, None]
    for l_idx, dv in enumerate(tap_offsets):
        idx = flat_base[None, :] + (col_offsets + dv * stride)
        gathered = np.take(flat_img, idx)
        acc_i += np.einsum("kp,kp->p", gathered, wu_flat) * wv[l_idx].ravel()
        gathered = np.take(flat_var, idx)
        for acc, sq in zip(acc_v, squared, strict=True):
            if sq:
                acc += np.einsum("kp,kp->p", gathered, wu2_flat) * wv2[l_idx].ravel()  # type: ignore[index]
            else:
                acc += np.einsum("kp,kp->p", gathered, wu_flat) * wv[l_idx].ravel()
    acc_i = acc_i.reshape(shape)
    acc_v = [a.reshape(shape) for a in acc_v]
    # Mask: OR over the bilinear footprint (the 2x2 nearest pixels with non-negligible weight).
    m = np.take(flat_msk, base)
    right = fu > _MASK_WEIGHT
    upper = fv > _MASK_WEIGHT
    m |= np.where(right, np.take(flat_msk, base + 1), 0)
    m |= np.where(upper, np.take(flat_msk, base + stride), 0)
    m |= np.where(right & upper, np.take(flat_msk, base + stride + 1), 0)
    det32 = det.astype(np.float32)
    acc_i *= det32
    invalid = ~covered | ((m & no_data_bit) != 0)
    acc_i[invalid] = np.nan
    for acc, sq in zip(acc_v, squared, strict=True):
        acc *= det32 * det32 if sq else det32
        acc[invalid] = np.nan
    m[~covered] = no_data_bit
    m[invalid] |= no_data_bit
    image[dst] = acc_i
    for out, acc in zip(variances, acc_v, strict=True):
        out[dst] = acc
    mask[dst] = m
