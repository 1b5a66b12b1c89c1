"""PSF models of convolved images: a PSF convolved with a (possibly spatially varying) kernel.

A difference image takes the PSF of its science side.  With the template convolved that is the
science PSF itself (``P_S``); with the science image convolved by the matching kernel ``K`` it is
``P_S (x) K / sum(K)`` -- the profile every transient has on the difference.  Decorrelation by
``phi`` convolves either once more.  :func:`convolved_psf` realizes such products as a
:class:`~butler.psf.GridPsf` (or an :class:`~butler.psf.ImagePsf` when nothing varies).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from butler.errors import PsfError
from butler.geometry import Box
from butler.psf import GridPsf, ImagePsf, Psf

from .decorrelate import convolve_kernels, trim_kernel

__all__ = ["convolved_psf"]

#: A kernel image, or a function of the parent-frame position ``(x, y)`` returning one.
KernelLike = np.ndarray | Callable[[float, float], np.ndarray]


def _normalized(img: np.ndarray) -> np.ndarray:
    total = float(img.sum())
    if not (math.isfinite(total) and total > 0):
        raise PsfError(f"convolved PSF image has non-positive sum {total:g}")
    return img / total


def _crop(img: np.ndarray, max_size: int | None) -> np.ndarray:
    if max_size is None or img.shape[0] <= max_size:
        return img
    half = max_size // 2
    c = img.shape[0] // 2
    return img[c - half : c + half + 1, c - half : c + half + 1]


def convolved_psf(psf: Psf, kernel: KernelLike, bbox: Box, grid: int = 7, max_size: int | None = None) -> Psf:
    """The PSF ``psf (x) kernel``, normalized to unit sum.

    Parameters
    ----------
    psf : Psf
        The PSF of the image before convolution.
    kernel : numpy.ndarray or callable
        A constant odd-sized kernel image, or ``kernel(x, y)`` returning the kernel image at a
        parent-frame position (pixels), e.g. ``SpatialKernel.kernel_image``.
    bbox : Box
        Where the result is needed (parent frame).
    grid : int
        Nodes per axis of the result when ``psf`` or ``kernel`` varies and ``psf`` is not already
        a :class:`~butler.psf.GridPsf` (whose nodes are reused).
    max_size : int, optional
        Largest image size kept, pixels.

    Returns
    -------
    Psf
        A :class:`~butler.psf.ImagePsf` when both are constant (Gaussian or image PSF and an array
        kernel), otherwise a :class:`~butler.psf.GridPsf`.  Images are trimmed to where they exceed
        1e-5 of their peak and renormalized.

    Raises
    ------
    PsfError
        When the PSF is defined nowhere on the grid, or a product does not have a positive sum.
    """
    varying_kernel = callable(kernel)
    if isinstance(psf, GridPsf):
        xs, ys = psf.nodes
    elif psf.is_constant and not varying_kernel:
        cx, cy = bbox.center
        img = trim_kernel(convolve_kernels(psf.image(cx, cy), kernel))
        return ImagePsf(_normalized(_crop(img, max_size)))
    else:
        xs = np.linspace(bbox.x0, bbox.x1 - 1, grid)
        ys = np.linspace(bbox.y0, bbox.y1 - 1, grid)
    images: list[list[np.ndarray | None]] = []
    for y in ys:
        row: list[np.ndarray | None] = []
        for x in xs:
            k = kernel(float(x), float(y)) if varying_kernel else kernel
            try:
                row.append(convolve_kernels(psf.image(float(x), float(y)), k))
            except PsfError:
                row.append(None)
        images.append(row)
    filled = [img for row in images for img in row if img is not None]
    if not filled:
        raise PsfError(f"{type(psf).__name__} is defined nowhere on the grid over {bbox}")
    size = max(max(img.shape) for img in filled)
    fallback = filled[len(filled) // 2]
    stack = np.zeros((len(ys), len(xs), size, size))
    for j, row in enumerate(images):
        for i, img in enumerate(row):
            img = fallback if img is None else img
            oy, ox = (size - img.shape[0]) // 2, (size - img.shape[1]) // 2
            stack[j, i, oy : oy + img.shape[0], ox : ox + img.shape[1]] = img
    # one common trim for every node
    trimmed = trim_kernel(np.abs(stack).max(axis=(0, 1)))
    half = trimmed.shape[0] // 2
    if max_size is not None:
        half = min(half, max_size // 2)
    c = size // 2
    stack = stack[:, :, c - half : c + half + 1, c - half : c + half + 1]
    for j in range(stack.shape[0]):
        for i in range(stack.shape[1]):
            stack[j, i] = _normalized(stack[j, i])
    return GridPsf(stack, xs, ys)
