"""The PSF of a visit: seeing that varies from visit to visit and smoothly across the focal plane.

The PSF is an elliptical Gaussian (optionally plus a wider Gaussian "wing") whose width and shape
are smooth functions of the focal-plane position ``(X, Y)`` (pixels, boresight at the origin):

- FWHM (geometric mean of the axes) ``= seeing * (1 + psf_variation * f(u, v))`` (``seeing`` is
  the mosaic average, as ``u^2 + v^2 - 2/3`` averages to zero) with
  ``u, v = X / R, Y / R`` (``R`` the mosaic half-size) and ``f`` a per-visit random mix of a
  radial term ``u^2 + v^2 - 2/3`` (optics degrading with field angle) and a tilt ``a u + b v``,
  scaled so that ``|f| <= 1`` over the mosaic;
- complex ellipticity ``(1 - b/a) exp(2 i theta)``: a per-visit constant of modulus
  ``psf_ellipticity / 3`` plus a tangential pattern ``-(psf_ellipticity / 3) (u + i v)^2`` (so at most
  ``psf_ellipticity`` at the mosaic corners); polynomial, hence smooth everywhere.

What the pipeline sees is a :class:`butler.psf.GridPsf` per detector: kernel images of this analytic
PSF on a ``psf_grid x psf_grid`` grid of nodes spanning the detector (bilinearly interpolated in
between).  Stars are rendered with the analytic PSF at their exact positions, so the model differs
from the truth only by the interpolation between nodes: with the presets' 7x7 nodes a PSF-weighted
flux computed with ``psf.image(x, y)`` is within 0.1% of the truth (3x3 nodes: up to 0.8%, the
FWHM varies quadratically).  ``Psf.shifted_image`` then shifts the kernel by cubic splines, which
adds up to +0.2% at half-pixel offsets for the sharpest (0.6", sigma 1.3 px) PSFs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from butler.psf import GridPsf
from tasks.instruments.simcam import DetectorGeometry

from .gaussians import SIGMA_TO_FWHM, covariance_from_shape, gaussian_kernel_image

__all__ = ["PsfField"]

#: The wing Gaussian is this many times wider than the core.
WING_SCALE = 2.0


@dataclass(frozen=True)
class PsfField:
    """Analytic PSF of one visit as a function of focal-plane position.

    Attributes
    ----------
    seeing_px : float
        Mean FWHM over the mosaic, pixels (geometric mean of the axes).
    variation : float
        Fractional FWHM variation amplitude over the mosaic.
    radius_px : float
        Mosaic half-size ``R``, pixels (normalizes positions).
    radial, tilt_x, tilt_y : float
        Coefficients of ``f(u, v)`` (see the module docstring).
    ellipticity : float
        Largest ellipticity ``1 - b/a``.
    twist_deg : float
        Orientation of the constant ellipticity term, degrees.
    wing_fraction : float
        Flux fraction of the wide Gaussian.
    """

    seeing_px: float
    variation: float
    radius_px: float
    radial: float
    tilt_x: float
    tilt_y: float
    ellipticity: float
    twist_deg: float
    wing_fraction: float = 0.0

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        seeing_px: float,
        variation: float,
        radius_px: float,
        ellipticity: float,
        wing_fraction: float = 0.0,
    ) -> PsfField:
        """A random smooth field around a central FWHM (pixels)."""
        radial = rng.uniform(0.4, 1.0)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        tilt = rng.uniform(0.0, 1.0 - radial)
        # |radial (u^2 + v^2 - 2/3)| <= 4/3 radial at the corners (u = v = 1); |tilt terms| <= sqrt(2) tilt.
        norm = max(4.0 / 3.0 * radial + math.sqrt(2.0) * tilt, 1e-9)
        return cls(
            seeing_px=float(seeing_px),
            variation=float(variation),
            radius_px=float(radius_px),
            radial=radial / norm,
            tilt_x=tilt * math.cos(angle) / norm,
            tilt_y=tilt * math.sin(angle) / norm,
            ellipticity=float(ellipticity),
            twist_deg=float(rng.uniform(-90.0, 90.0)),
            wing_fraction=float(wing_fraction),
        )

    # ------------------------------------------------------------------ analytic PSF
    def fwhm_at(self, fx: ArrayLike, fy: ArrayLike) -> NDArray[np.float64]:
        """Core FWHM (geometric mean of the axes) in pixels at focal-plane positions ``(X, Y)``."""
        u = np.asarray(fx, dtype=np.float64) / self.radius_px
        v = np.asarray(fy, dtype=np.float64) / self.radius_px
        f = self.radial * (u * u + v * v - 2.0 / 3.0) + self.tilt_x * u + self.tilt_y * v
        return self.seeing_px * (1.0 + self.variation * f)

    def ellipticity_at(self, fx: ArrayLike, fy: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Complex ellipticity ``(e1, e2) = (1 - b/a) * (cos 2 theta, sin 2 theta)`` at ``(X, Y)``.

        A constant term of modulus ``ellipticity / 3`` (per-visit direction) plus a tangential
        pattern ``-(2/3) ellipticity (u + i v)^2 / 2``: polynomials in ``(u, v)``, so the field is
        smooth everywhere (no singular orientation at the boresight).
        """
        u = np.asarray(fx, dtype=np.float64) / self.radius_px
        v = np.asarray(fy, dtype=np.float64) / self.radius_px
        c = math.radians(2.0 * self.twist_deg)
        amp = self.ellipticity / 3.0
        e1 = amp * math.cos(c) - amp * (u * u - v * v)
        e2 = amp * math.sin(c) - amp * (2.0 * u * v)
        return e1, e2

    def shape_at(
        self, fx: ArrayLike, fy: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Core ``(sigma_major px, axis_ratio, theta_deg)`` at focal-plane positions ``(X, Y)``."""
        fx = np.asarray(fx, dtype=np.float64)
        fy = np.asarray(fy, dtype=np.float64)
        e1, e2 = self.ellipticity_at(fx, fy)
        q = 1.0 - np.hypot(e1, e2)
        theta = 0.5 * np.degrees(np.arctan2(e2, e1))
        sigma_major = self.fwhm_at(fx, fy) / (SIGMA_TO_FWHM * np.sqrt(q))
        return sigma_major, q, theta

    def components_at(
        self, fx: ArrayLike, fy: ArrayLike
    ) -> list[tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]]:
        """The PSF as Gaussian components at focal-plane positions.

        Returns
        -------
        list of (weight, cxx, cyy, cxy)
            Mixture weight (summing to 1) and covariance arrays in pixel^2.
        """
        sigma, q, theta = self.shape_at(fx, fy)
        cxx, cyy, cxy = covariance_from_shape(sigma, q, theta)
        comps = [(1.0 - self.wing_fraction, cxx, cyy, cxy)]
        if self.wing_fraction > 0:
            s2 = WING_SCALE**2
            comps.append((self.wing_fraction, cxx * s2, cyy * s2, cxy * s2))
        return comps

    def kernel_size(self, detector: DetectorGeometry) -> int:
        """Odd kernel-image size (pixels) holding 5 sigma of the widest PSF on a detector."""
        xs, ys = self._detector_samples(detector)
        sigma, _, _ = self.shape_at(*detector.to_focal_plane(xs, ys))
        widest = float(sigma.max()) * (WING_SCALE if self.wing_fraction > 0 else 1.0)
        return max(11, 2 * math.ceil(5.0 * widest) + 1)

    @staticmethod
    def _detector_samples(detector: DetectorGeometry) -> tuple[NDArray, NDArray]:
        b = detector.bbox
        g = np.linspace(0.0, 1.0, 9)
        xs, ys = np.meshgrid(b.x0 + g * (b.width - 1), b.y0 + g * (b.height - 1))
        return xs.ravel(), ys.ravel()

    # ------------------------------------------------------------------ the model
    def kernel_image(self, detector: DetectorGeometry, x: float, y: float, size: int) -> NDArray[np.float64]:
        """Centred kernel image (odd ``size``) of the analytic PSF at detector pixel ``(x, y)``."""
        fx, fy = detector.to_focal_plane(np.array([x], float), np.array([y], float))
        comps = [(w, float(a[0]), float(b[0]), float(c[0])) for w, a, b, c in self.components_at(fx, fy)]
        return gaussian_kernel_image(comps, size)

    def grid_psf(self, detector: DetectorGeometry, n_nodes: int) -> GridPsf:
        """The PSF model of one detector: kernel images on an ``n_nodes x n_nodes`` grid.

        Nodes span the detector from its first to its last pixel centre.
        """
        b = detector.bbox
        x_nodes = np.linspace(b.x0, b.x0 + b.width - 1, n_nodes)
        y_nodes = np.linspace(b.y0, b.y0 + b.height - 1, n_nodes)
        size = self.kernel_size(detector)
        images = np.empty((n_nodes, n_nodes, size, size))
        for j, yn in enumerate(y_nodes):
            for i, xn in enumerate(x_nodes):
                images[j, i] = self.kernel_image(detector, float(xn), float(yn), size)
        return GridPsf(images, x_nodes, y_nodes)

    def to_dict(self) -> dict[str, float]:
        """Plain data (for exposure metadata)."""
        return {
            "seeing_px": self.seeing_px,
            "variation": self.variation,
            "radius_px": self.radius_px,
            "radial": self.radial,
            "tilt_x": self.tilt_x,
            "tilt_y": self.tilt_y,
            "ellipticity": self.ellipticity,
            "twist_deg": self.twist_deg,
            "wing_fraction": self.wing_fraction,
        }
