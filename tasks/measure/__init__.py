"""Measurement at given positions, shared by the tasks that measure without detecting.

- :mod:`.photometry` -- PSF flux, circular-aperture flux and pixel flags at parent-frame positions
  (the formulas of ``detectAndMeasure``);
- :mod:`.noise` -- the factor by which correlated noise makes a flux error larger than the
  variance plane predicts;
- :mod:`.background` -- a smooth background model (photutils ``Background2D``).
"""

from .background import estimate_background, subtract_background
from .noise import aperture_kernel, noise_scale, psf_weights
from .photometry import DEFAULT_BAD_PLANES, FluxMeasurement, aperture_flux, aperture_weights, pixel_flags, psf_flux

__all__ = [
    "DEFAULT_BAD_PLANES",
    "FluxMeasurement",
    "aperture_flux",
    "aperture_kernel",
    "aperture_weights",
    "estimate_background",
    "noise_scale",
    "pixel_flags",
    "psf_flux",
    "psf_weights",
    "subtract_background",
]
