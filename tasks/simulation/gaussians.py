"""Pixel-integrated elliptical Gaussians, rendered many at a time with numpy.

Everything the simulator draws -- stars, transients, the PSF model's node images, and galaxies
(Sersic profiles approximated by mixtures of Gaussians, each convolved analytically with the
Gaussian PSF) -- is a sum of elliptical Gaussians, so one vectorized renderer serves them all.

Accuracy
--------
A pixel records the integral of the profile over its area.  A Gaussian of covariance ``C`` is
sampled on ``sub x sub`` points per pixel after widening ``C`` by ``1 / (12 sub^2)`` pixel^2 (the
variance the discrete samples lack compared with a uniform pixel).  The remaining error is the
box's fourth cumulant, about ``1e-3 / (sub^4 sigma^4)`` of the profile: below 2e-4 for the widths
used here (``sub = 2`` when the minor-axis sigma is below 1.5 px, else 1).  Each stamp extends to
``nsigma`` (default 5) major-axis sigmas and is normalized to sum to one, so the rendered flux is
exactly the requested flux (minus whatever falls off the image).

Speed
-----
Components are grouped by stamp size and evaluated in chunks of a few million samples with numpy
broadcasting; a 4096x4096 field with ~4000 stars and ~1500 galaxies renders in about a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import nnls
from scipy.special import gammaincinv

__all__ = [
    "SIGMA_TO_FWHM",
    "covariance_from_shape",
    "sampling_factor",
    "gaussian_stamps",
    "add_gaussians",
    "gaussian_kernel_image",
    "SersicMixture",
    "sersic_mixture",
]

SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Samples per chunk of the vectorized renderer (memory ~ 8 bytes x this x 3).
_CHUNK_SAMPLES = 2_000_000


def covariance_from_shape(
    sigma_major: ArrayLike, axis_ratio: ArrayLike, theta_deg: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Covariance ``(cxx, cyy, cxy)`` in pixel^2 of elliptical Gaussians.

    Parameters
    ----------
    sigma_major : array_like
        Sigma along the major axis, pixels.
    axis_ratio : array_like
        Minor over major axis, in (0, 1].
    theta_deg : array_like
        Position angle of the major axis from +x towards +y, degrees.
    """
    s2 = np.asarray(sigma_major, dtype=np.float64) ** 2
    q2 = np.asarray(axis_ratio, dtype=np.float64) ** 2
    t = np.radians(np.asarray(theta_deg, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    cxx = s2 * (c * c + q2 * s * s)
    cyy = s2 * (s * s + q2 * c * c)
    cxy = s2 * (1.0 - q2) * s * c
    return cxx, cyy, cxy


def _eigen(cxx: NDArray, cyy: NDArray, cxy: NDArray) -> tuple[NDArray, NDArray]:
    mean = 0.5 * (cxx + cyy)
    diff = np.sqrt((0.5 * (cxx - cyy)) ** 2 + cxy**2)
    return mean + diff, np.maximum(mean - diff, 0.0)


def sampling_factor(sigma_minor: ArrayLike) -> NDArray[np.int64]:
    """Sub-samples per pixel axis used for a Gaussian of minor-axis sigma (pixels)."""
    s = np.asarray(sigma_minor, dtype=np.float64)
    return np.where(s < 0.7, 4, np.where(s < 1.5, 2, 1)).astype(np.int64)


def gaussian_stamps(
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    cxx: NDArray[np.float64],
    cyy: NDArray[np.float64],
    cxy: NDArray[np.float64],
    half: int,
    sub: int,
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """Normalized pixel-integrated Gaussian stamps, all of one size.

    Parameters
    ----------
    x, y : numpy.ndarray
        Centres in parent-frame pixels (pixel centres at integers).
    cxx, cyy, cxy : numpy.ndarray
        Covariances, pixel^2 (before pixel integration).
    half : int
        Stamps are ``2 * half + 1`` pixels on a side, centred on the nearest pixel.
    sub : int
        Sub-samples per pixel axis.

    Returns
    -------
    stamps : numpy.ndarray
        Shape ``(n, 2 half + 1, 2 half + 1)``, each summing to 1.
    x0, y0 : numpy.ndarray
        Parent-frame pixel of each stamp's ``[0, 0]``.
    """
    n = x.size
    size = 2 * half + 1
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    fx = x - ix
    fy = y - iy
    widen = 1.0 / (12.0 * sub * sub)
    axx = cxx + widen
    ayy = cyy + widen
    det = axx * ayy - cxy * cxy
    a = (ayy / det)[:, None, None]
    b = (-cxy / det)[:, None, None]
    c = (axx / det)[:, None, None]
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    grid = (np.arange(-half, half + 1, dtype=np.float64)[:, None] + offsets[None, :]).ravel()
    dx = grid[None, None, :] - fx[:, None, None]  # (n, 1, L)
    dy = grid[None, :, None] - fy[:, None, None]  # (n, L, 1)
    q = a * dx * dx + (2.0 * b) * dx * dy + c * dy * dy
    values = np.exp(-0.5 * q)
    if sub > 1:
        values = values.reshape(n, size, sub, size, sub).sum(axis=(2, 4))
    values /= values.sum(axis=(1, 2), keepdims=True)
    return values, ix - half, iy - half


def gaussian_kernel_image(components: list[tuple[float, float, float, float]], size: int) -> NDArray[np.float64]:
    """A centred kernel image (odd ``size``) of a Gaussian mixture, summing to 1.

    Parameters
    ----------
    components : list of (weight, cxx, cyy, cxy)
        Mixture weights (summing to 1) and covariances in pixel^2.
    size : int
        Odd image size in pixels.
    """
    half = size // 2
    out = np.zeros((size, size))
    for weight, cxx, cyy, cxy in components:
        _, minor = _eigen(np.array([cxx]), np.array([cyy]), np.array([cxy]))
        sub = int(sampling_factor(np.sqrt(minor))[0])
        stamp, _, _ = gaussian_stamps(
            np.zeros(1), np.zeros(1), np.array([cxx]), np.array([cyy]), np.array([cxy]), half, sub
        )
        out += weight * stamp[0]
    return out / out.sum()


def _chunks(indices: NDArray[np.int64], samples_each: int) -> Iterator[NDArray[np.int64]]:
    step = max(1, _CHUNK_SAMPLES // max(samples_each, 1))
    for start in range(0, indices.size, step):
        yield indices[start : start + step]


def add_gaussians(
    image: NDArray[np.float64],
    x: ArrayLike,
    y: ArrayLike,
    flux: ArrayLike,
    cxx: ArrayLike,
    cyy: ArrayLike,
    cxy: ArrayLike,
    *,
    xy0: tuple[int, int] = (0, 0),
    nsigma: float = 5.0,
    max_half: int = 100,
    aperture_radius: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Add pixel-integrated elliptical Gaussians to an image, in place.

    Parameters
    ----------
    image : numpy.ndarray
        float64 image whose ``[0, 0]`` pixel is parent pixel ``xy0``.
    x, y : array_like
        Centres, parent-frame pixels.
    flux : array_like
        Total flux of each Gaussian (image units).
    cxx, cyy, cxy : array_like
        Covariances, pixel^2.
    xy0 : (int, int)
        Parent pixel of ``image[0, 0]``.
    nsigma : float
        Stamp half-size in major-axis sigmas.
    max_half : int
        Largest stamp half-size, pixels (wider components are truncated and renormalized).
    aperture_radius : array_like, optional
        When given, also return each component's flux inside a circle of this radius (pixels)
        around its centre (pixel centres inside count), including flux that falls off the image.

    Returns
    -------
    numpy.ndarray
        Flux inside ``aperture_radius`` per component (zeros when no radius is given).
    """
    xs = np.atleast_1d(np.asarray(x, dtype=np.float64))
    ys = np.atleast_1d(np.asarray(y, dtype=np.float64))
    fl = np.broadcast_to(np.asarray(flux, dtype=np.float64), xs.shape)
    c_xx = np.broadcast_to(np.asarray(cxx, dtype=np.float64), xs.shape)
    c_yy = np.broadcast_to(np.asarray(cyy, dtype=np.float64), xs.shape)
    c_xy = np.broadcast_to(np.asarray(cxy, dtype=np.float64), xs.shape)
    radius = None if aperture_radius is None else np.broadcast_to(np.asarray(aperture_radius, float), xs.shape)
    ap_sums = np.zeros(xs.size)
    if xs.size == 0:
        return ap_sums
    major, minor = _eigen(c_xx, c_yy, c_xy)
    halves = np.clip(np.ceil(nsigma * np.sqrt(major)).astype(np.int64), 2, max_half)
    subs = sampling_factor(np.sqrt(minor))
    height, width = image.shape
    ox, oy = xy0
    # Skip components whose stamps miss the image entirely.
    on_image = (
        (xs + halves >= ox - 0.5)
        & (xs - halves <= ox + width - 0.5)
        & (ys + halves >= oy - 0.5)
        & (ys - halves <= oy + height - 0.5)
        & (fl != 0)
    )
    if radius is not None:
        on_image |= fl != 0  # aperture sums are wanted even for off-image components
    keys = halves * 16 + subs
    for key in np.unique(keys[on_image]):
        half, sub = int(key // 16), int(key % 16)
        size = 2 * half + 1
        members = np.flatnonzero((keys == key) & on_image)
        for idx in _chunks(members, (size * sub) ** 2):
            stamps, sx0, sy0 = gaussian_stamps(xs[idx], ys[idx], c_xx[idx], c_yy[idx], c_xy[idx], half, sub)
            stamps *= fl[idx][:, None, None]
            if radius is not None:
                grid = np.arange(size, dtype=np.float64)
                ddx = (sx0 - xs[idx])[:, None, None] + grid[None, None, :]
                ddy = (sy0 - ys[idx])[:, None, None] + grid[None, :, None]
                inside = ddx * ddx + ddy * ddy <= (radius[idx] ** 2)[:, None, None]
                ap_sums[idx] = (stamps * inside).sum(axis=(1, 2))
            for k in range(idx.size):
                x0 = int(sx0[k]) - ox
                y0 = int(sy0[k]) - oy
                xa, xb = max(x0, 0), min(x0 + size, width)
                ya, yb = max(y0, 0), min(y0 + size, height)
                if xa >= xb or ya >= yb:
                    continue
                image[ya:yb, xa:xb] += stamps[k, ya - y0 : yb - y0, xa - x0 : xb - x0]
    return ap_sums


# ---------------------------------------------------------------------------- Sersic profiles


@dataclass(frozen=True)
class SersicMixture:
    """A circular Sersic profile of unit half-light radius as a sum of Gaussians.

    Attributes
    ----------
    n : float
        Sersic index.
    weights : numpy.ndarray
        Flux fraction of each Gaussian (sums to 1).
    sigmas : numpy.ndarray
        Gaussian sigmas in units of the half-light radius.
    """

    n: float
    weights: NDArray[np.float64]
    sigmas: NDArray[np.float64]


@lru_cache(maxsize=32)
def sersic_mixture(n: float, *, truncation: float = 4.0, n_components: int = 14) -> SersicMixture:
    """Fit a mixture of circular Gaussians to a (truncated) Sersic profile of index ``n``.

    The profile ``I(r) = exp(-b_n ((r / r_e)^(1/n) - 1))`` is tapered to zero between 0.75 and 1 times
    ``truncation`` half-light radii; Gaussians with log-spaced sigmas from 0.005 to 2 ``r_e`` are fitted
    by non-negative least squares with area weighting, in the manner of Hogg & Lang (2013).  The
    mixture is "Sersic-like": exact enough once convolved with a seeing-limited PSF.

    Parameters
    ----------
    n : float
        Sersic index in [0.5, 6].
    truncation : float
        Outer radius in half-light radii.
    n_components : int
        Candidate Gaussians (those with zero weight are dropped).
    """
    if not 0.5 <= n <= 6.0:
        raise ValueError(f"Sersic index must be in [0.5, 6], got {n}")
    b_n = float(gammaincinv(2.0 * n, 0.5))
    r = np.geomspace(1e-3, truncation, 600)
    profile = np.exp(-b_n * (r ** (1.0 / n) - 1.0))
    taper_start = 0.75 * truncation
    taper = np.clip((truncation - r) / (truncation - taper_start), 0.0, 1.0)
    profile *= taper * taper * (3 - 2 * taper)
    sigmas = np.geomspace(0.005, 2.0, n_components)
    design = np.exp(-0.5 * (r[:, None] / sigmas[None, :]) ** 2)
    # Area weighting r dr on a log grid: dr ~ r, so weight ~ r^2; square roots for least squares.
    w = r
    amplitudes, _ = nnls(design * w[:, None], profile * w)
    fluxes = amplitudes * 2.0 * np.pi * sigmas**2
    keep = fluxes > 1e-5 * fluxes.sum()
    weights = fluxes[keep] / fluxes[keep].sum()
    return SersicMixture(float(n), weights, sigmas[keep])
