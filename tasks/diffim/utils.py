"""Small helpers shared by the image-differencing tasks: FFT convolution, masks, robust statistics."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np

from butler.exposure import Exposure
from butler.geometry import Box
from butler.masks import add_plane
from tasks.psfmatch import SpatialKernel, convolve_image

__all__ = [
    "convolve_constant",
    "pad_to_square",
    "remap_mask",
    "merge_mask_planes",
    "robust_std",
    "plane_bits",
    "good_pixels",
]

_log = logging.getLogger(__name__)


def pad_to_square(kernel: np.ndarray) -> np.ndarray:
    """Zero-pad an odd-sized 2-D kernel to an odd square (centre kept on the central pixel)."""
    arr = np.asarray(kernel, dtype=np.float64)
    ny, nx = arr.shape
    if ny % 2 == 0 or nx % 2 == 0:
        raise ValueError(f"kernel dimensions must be odd, got {arr.shape}")
    size = max(ny, nx)
    if ny == nx:
        return arr
    out = np.zeros((size, size))
    oy, ox = (size - ny) // 2, (size - nx) // 2
    out[oy : oy + ny, ox : ox + nx] = arr
    return out


def convolve_constant(
    image: np.ndarray,
    kernel: np.ndarray,
    *,
    workers: int | None = None,
    cell_size: int = 512,
    correlate: bool = False,
) -> np.ndarray:
    """Convolve (or correlate) a float image with one fixed kernel, by cell-wise FFTs.

    This reuses :func:`tasks.psfmatch.convolve_image` (a one-term, order-0 spatial kernel), so
    the cells, zero padding outside the image and ``workers`` threads behave the same way.

    Parameters
    ----------
    image : numpy.ndarray
        2-D, finite (replace NaNs first).
    kernel : numpy.ndarray
        Odd-sized kernel image (``kernel[dy + h, dx + h]`` at offset ``(dx, dy)``).
    workers : int, optional
        Threads for ``scipy.fft``.
    cell_size : int
        Cell size, pixels.
    correlate : bool
        Correlate instead (``out(x) = sum_d K(d) in(x + d)``): the matched filter.

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    kern = pad_to_square(kernel)
    if correlate:
        kern = kern[::-1, ::-1]
    data = np.asarray(image)
    spatial = SpatialKernel(kern[None, :, :], [[1.0]], [], Box.from_shape(data.shape), 0, 0)
    return convolve_image(data, spatial, cell_size=cell_size, workers=workers, dtype=np.float32)


def merge_mask_planes(target: dict[str, int], source: Mapping[str, int]) -> dict[str, int]:
    """Add the planes of ``source`` missing from ``target`` (in place); returns ``target``."""
    for name in source:
        add_plane(target, name)
    return target


def remap_mask(mask: np.ndarray, from_planes: Mapping[str, int], to_planes: Mapping[str, int]) -> np.ndarray:
    """Re-express a mask's bits from one plane map in another (planes must exist in ``to_planes``)."""
    if all(to_planes.get(name) == bit for name, bit in from_planes.items()):
        return mask
    out = np.zeros(mask.shape, dtype=np.int32)
    for name, bit in from_planes.items():
        if name not in to_planes:
            raise KeyError(f"mask plane {name!r} has no bit in the target plane map; merge the maps first")
        hit = (mask & (1 << bit)) != 0
        if hit.any():
            out[hit] |= np.int32(1 << to_planes[name])
    return out


def plane_bits(planes: Mapping[str, int], names: Iterable[str]) -> int:
    """OR of the bits of the named planes that exist in ``planes`` (absent names are skipped)."""
    value = 0
    for name in names:
        if name in planes:
            value |= 1 << planes[name]
    return value


def good_pixels(exposure: Exposure, bad_planes: Iterable[str], *, step: int = 1) -> np.ndarray:
    """Boolean array (subsampled by ``step``) of finite pixels with none of ``bad_planes`` set."""
    sl = (slice(None, None, step), slice(None, None, step))
    bits = plane_bits(exposure.mask_planes, bad_planes)
    img = exposure.image[sl]
    var = exposure.variance[sl]
    ok = np.isfinite(img) & np.isfinite(var) & (var > 0)
    if bits:
        ok &= (exposure.mask[sl] & bits) == 0
    return ok


def robust_std(values: np.ndarray) -> float:
    """0.7413 times the interquartile range (the std of a Gaussian), NaN for fewer than 2 values."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        return float("nan")
    q25, q75 = np.percentile(arr, [25.0, 75.0])
    return float(0.7413 * (q75 - q25))


def clipped_std(values: np.ndarray, n_sigma: float = 5.0, iterations: int = 3) -> float:
    """Standard deviation after iterative clipping at ``n_sigma`` robust sigmas around the median."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        return float("nan")
    for _ in range(iterations):
        med = float(np.median(arr))
        sig = robust_std(arr)
        if not math.isfinite(sig) or sig == 0:
            break
        keep = np.abs(arr - med) < n_sigma * sig
        if keep.all():
            break
        arr = arr[keep]
    return float(np.std(arr))
