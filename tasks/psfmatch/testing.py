"""Synthetic template/science pairs with a known matching kernel, for tests and benchmarks.

Stars are rendered with :meth:`butler.psf.Psf.shifted_image` at exact sub-pixel positions in both
images; the science image is ``scale`` times brighter plus a tilted background plane.  For two
round Gaussian PSFs of widths ``s_t < s_s`` the true matching kernel is ``scale`` times the
(point-sampled, normalized) Gaussian of width ``sqrt(s_s**2 - s_t**2)``: see :func:`true_gaussian_kernel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from butler.catalog import make_source_catalog
from butler.exposure import Exposure, PhotoCalib
from butler.geometry import Box
from butler.psf import GaussianPsf, GridPsf, Psf

__all__ = ["SyntheticPair", "make_psf_matching_pair", "render_stars", "true_gaussian_kernel", "corner_grid_psf"]


@dataclass
class SyntheticPair:
    """A template/science pair and its truth.

    Attributes
    ----------
    template, science : Exposure
    sources : astropy.table.Table
        Catalog of the stars (true positions, science PSF fluxes and errors), no flags set.
    scale : float
        Photometric scale science / template (the true kernel sum).
    background : tuple of float
        ``(b0, gx, gy)``: the science image has ``b0 + gx * x + gy * y`` counts added (parent pixels).
    star_x, star_y, star_flux : numpy.ndarray
        True positions (parent pixels) and template fluxes (counts).
    """

    template: Exposure
    science: Exposure
    sources: Table
    scale: float
    background: tuple[float, float, float]
    star_x: np.ndarray
    star_y: np.ndarray
    star_flux: np.ndarray

    def true_background(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray | float:
        """The injected background at parent position ``(x, y)``, counts."""
        b0, gx, gy = self.background
        return b0 + gx * np.asarray(x) + gy * np.asarray(y)


def render_stars(
    shape: tuple[int, int], psf: Psf, xs: np.ndarray, ys: np.ndarray, fluxes: np.ndarray, xy0: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Noise-free image (float64, counts) of point sources rendered with ``psf.shifted_image``."""
    img = np.zeros(shape, dtype=np.float64)
    height, width = shape
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        stamp, x0, y0 = psf.shifted_image(float(x), float(y))
        x0 -= xy0[0]
        y0 -= xy0[1]
        sy, sx = stamp.shape
        ya, yb = max(y0, 0), min(y0 + sy, height)
        xa, xb = max(x0, 0), min(x0 + sx, width)
        if ya < yb and xa < xb:
            img[ya:yb, xa:xb] += f * stamp[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return img


def true_gaussian_kernel(
    sigma_template: float, sigma_science: float, kernel_size: int, scale: float = 1.0
) -> np.ndarray:
    """The matching kernel between two round Gaussian PSFs (pixels): a sampled Gaussian summing to ``scale``."""
    sk = math.sqrt(sigma_science**2 - sigma_template**2)
    h = kernel_size // 2
    off = np.arange(-h, h + 1, dtype=np.float64)
    k = np.exp(-0.5 * (off[:, None] ** 2 + off[None, :] ** 2) / sk**2)
    return scale * k / k.sum()


def corner_grid_psf(sigmas: tuple[float, float, float, float], bbox: Box, size: int = 25) -> GridPsf:
    """A spatially varying PSF: round Gaussians of the given widths (pixels) at the four corners of
    ``bbox`` (lower-left, lower-right, upper-left, upper-right), bilinearly interpolated in between."""
    images = np.array([[GaussianPsf(s, size=size).image(0, 0) for s in sigmas[:2]],
                       [GaussianPsf(s, size=size).image(0, 0) for s in sigmas[2:]]])
    return GridPsf(images, [bbox.x0, bbox.x1 - 1], [bbox.y0, bbox.y1 - 1])


def make_psf_matching_pair(
    *,
    shape: tuple[int, int] = (512, 512),
    n_stars: int = 150,
    template_psf: Psf | None = None,
    science_psf: Psf | None = None,
    scale: float = 1.0,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    flux_range: tuple[float, float] = (3.0e3, 3.0e5),
    sky_sigma: float = 10.0,
    template_depth: float = 4.0,
    noise: bool = True,
    margin: int = 10,
    xy0: tuple[int, int] = (0, 0),
    seed: int = 0,
) -> SyntheticPair:
    """A template/science pair of a random star field.

    Parameters
    ----------
    shape : tuple of int
        ``(height, width)`` pixels.
    n_stars : int
        Number of stars (uniform positions, log-uniform template fluxes in ``flux_range`` counts).
    template_psf, science_psf : Psf
        Defaults: round Gaussians of sigma 1.2 and 1.8 pixels.
    scale : float
        Science flux / template flux.
    background : tuple of float
        ``(b0, gx, gy)`` plane added to the science image, counts and counts per pixel.
    sky_sigma : float
        Science sky noise per pixel, counts; the variance plane is ``sky_sigma**2 + signal``
        (gain 1) in the science image and that divided by ``template_depth`` in the template.
    noise : bool
        Add Gaussian noise with those variances (the variance planes are set either way).
    seed : int
        Random seed (positions, fluxes, noise).
    """
    rng = np.random.default_rng(seed)
    tpsf = template_psf if template_psf is not None else GaussianPsf(1.2)
    spsf = science_psf if science_psf is not None else GaussianPsf(1.8)
    height, width = shape
    xs = xy0[0] + rng.uniform(margin, width - 1 - margin, n_stars)
    ys = xy0[1] + rng.uniform(margin, height - 1 - margin, n_stars)
    fluxes = np.exp(rng.uniform(math.log(flux_range[0]), math.log(flux_range[1]), n_stars))
    tmpl = render_stars(shape, tpsf, xs, ys, fluxes, xy0)
    sci_signal = render_stars(shape, spsf, xs, ys, scale * fluxes, xy0)
    b0, gx, gy = background
    xx = np.arange(xy0[0], xy0[0] + width, dtype=np.float64)[None, :]
    yy = np.arange(xy0[1], xy0[1] + height, dtype=np.float64)[:, None]
    sci = sci_signal + b0 + gx * xx + gy * yy
    var_sci = sky_sigma**2 + np.maximum(sci_signal, 0.0)
    var_tmpl = (sky_sigma**2 + np.maximum(tmpl, 0.0)) / template_depth
    if noise:
        sci = sci + rng.normal(size=shape) * np.sqrt(var_sci)
        tmpl = tmpl + rng.normal(size=shape) * np.sqrt(var_tmpl)
    calib = PhotoCalib(1.0)
    template = Exposure(tmpl, None, var_tmpl, xy0=xy0, psf=tpsf, photo_calib=calib, band="r")
    science = Exposure(sci, None, var_sci, xy0=xy0, psf=spsf, photo_calib=calib, band="r")
    sources = make_source_catalog(n_stars, columns=("psfFlux", "psfFluxErr", "pixelFlags_saturated"))
    sources["id"] = np.arange(1, n_stars + 1)
    sources["x"] = xs
    sources["y"] = ys
    sources["psfFlux"] = scale * fluxes
    cx, cy = science.bbox.center
    sigma = spsf.fwhm(cx, cy) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    sources["psfFluxErr"] = np.sqrt(4.0 * math.pi * sigma**2 * sky_sigma**2 + scale * fluxes)
    return SyntheticPair(template, science, sources, scale, (b0, gx, gy), xs, ys, fluxes)
