"""diapipe's data model and data store.

The public names are imported lazily (PEP 562) so that light consumers, such as the ``butler``
command's ``--help``, do not pay for importing numpy, astropy or zarr.
"""

from __future__ import annotations

from butler.lazy import attach

_LAZY: dict[str, str] = {
    # geometry and masks
    "Box": "butler.geometry",
    "DEFAULT_MASK_PLANES": "butler.masks",
    # PSF models
    "Psf": "butler.psf",
    "GaussianPsf": "butler.psf",
    "ImagePsf": "butler.psf",
    "GridPsf": "butler.psf",
    "PolynomialPsf": "butler.psf",
    "CoaddPsf": "butler.psf",
    "CoaddPsfInput": "butler.psf",
    "psf_from_dict": "butler.psf",
    # exposures
    "Exposure": "butler.exposure",
    "PhotoCalib": "butler.exposure",
    "VisitInfo": "butler.exposure",
    # catalogs
    "SOURCE_COLUMNS": "butler.catalog",
    "make_source_catalog": "butler.catalog",
    "validate_source_catalog": "butler.catalog",
    # sky geometry
    "SkyRegion": "butler.regions",
    "SkyMap": "butler.skymap",
    "TractInfo": "butler.skymap",
    "PatchInfo": "butler.skymap",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
