"""Two-dimensional Chebyshev polynomials over a pixel box (the spatial model of kernel and background).

A function of position is ``sum_t c_t T_i(u) T_j(v)`` over the terms ``t = (i, j)`` with
``i + j <= order`` (graded order: ``(0,0), (1,0), (0,1), (2,0), (1,1), (0,2), ...``), where
``T_n`` are Chebyshev polynomials of the first kind and ``u, v`` are the parent-frame pixel
coordinates mapped linearly from the box's first and last pixel centres to ``-1`` and ``+1``
(LSST's ``Chebyshev1Function2D`` over the image box).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from butler.geometry import Box

__all__ = ["chebyshev_terms", "chebyshev_1d", "ChebyshevBasis2D"]


def chebyshev_terms(order: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of ``T_i(u) T_j(v)`` with ``i + j <= order``, in graded order."""
    if order < 0:
        raise ValueError(f"Chebyshev order must be >= 0, got {order}")
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


def chebyshev_1d(u: ArrayLike, max_order: int) -> np.ndarray:
    """``T_0(u) .. T_max_order(u)`` stacked on a new last axis (recurrence ``T_{n+1} = 2 u T_n - T_{n-1}``)."""
    u = np.asarray(u, dtype=np.float64)
    out = np.empty(u.shape + (max_order + 1,), dtype=np.float64)
    out[..., 0] = 1.0
    if max_order >= 1:
        out[..., 1] = u
    for n in range(1, max_order):
        out[..., n + 1] = 2.0 * u * out[..., n] - out[..., n - 1]
    return out


class ChebyshevBasis2D:
    """The terms ``T_i(u) T_j(v)``, ``i + j <= order``, over a pixel box.

    Parameters
    ----------
    bbox : Box
        Parent-frame pixel box; its first and last pixel centres map to -1 and +1.
    order : int
        Total degree.
    """

    def __init__(self, bbox: Box, order: int) -> None:
        if bbox.is_empty:
            raise ValueError("the spatial model needs a non-empty pixel box")
        self.bbox = bbox
        self.order = int(order)
        self.terms = chebyshev_terms(self.order)
        self._xmid = bbox.x0 + (bbox.width - 1) / 2.0
        self._ymid = bbox.y0 + (bbox.height - 1) / 2.0
        self._xhalf = max((bbox.width - 1) / 2.0, 0.5)
        self._yhalf = max((bbox.height - 1) / 2.0, 0.5)

    @property
    def n_terms(self) -> int:
        """Number of terms, ``(order + 1)(order + 2) / 2``."""
        return len(self.terms)

    def scale_x(self, x: ArrayLike) -> np.ndarray:
        """Parent-frame ``x`` (pixels) -> ``u`` in ``[-1, 1]`` over the box."""
        return (np.asarray(x, dtype=np.float64) - self._xmid) / self._xhalf

    def scale_y(self, y: ArrayLike) -> np.ndarray:
        """Parent-frame ``y`` (pixels) -> ``v`` in ``[-1, 1]`` over the box."""
        return (np.asarray(y, dtype=np.float64) - self._ymid) / self._yhalf

    def axis_values(self, x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """``T_n(u(x))`` and ``T_n(v(y))`` for ``n <= order``, each with a trailing axis of length ``order + 1``."""
        return chebyshev_1d(self.scale_x(x), self.order), chebyshev_1d(self.scale_y(y), self.order)

    def evaluate(self, x: ArrayLike, y: ArrayLike) -> np.ndarray:
        """All terms at positions ``(x, y)`` (broadcast): shape ``broadcast(x, y).shape + (n_terms,)``."""
        xb, yb = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        tx, ty = self.axis_values(xb, yb)
        return np.stack([tx[..., i] * ty[..., j] for i, j in self.terms], axis=-1)

    def evaluate_grid(self, xs: ArrayLike, ys: ArrayLike, coefficients: ArrayLike) -> np.ndarray:
        """``sum_t c_t T_i(u) T_j(v)`` on the grid ``ys x xs`` (shape ``(len(ys), len(xs))``), separably."""
        coeffs = np.asarray(coefficients, dtype=np.float64)
        tx = chebyshev_1d(self.scale_x(xs), self.order)
        ty = chebyshev_1d(self.scale_y(ys), self.order)
        out = np.zeros((ty.shape[0], tx.shape[0]), dtype=np.float64)
        for c, (i, j) in zip(coeffs, self.terms, strict=True):
            if c != 0.0:
                out += c * np.outer(ty[:, j], tx[:, i])
        return out
