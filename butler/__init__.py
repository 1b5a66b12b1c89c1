"""diapipe's data model and data store.

The public names are imported lazily (PEP 562) so that light consumers, such as the ``butler``
command's ``--help``, do not pay for importing numpy, astropy or zarr.
"""

from __future__ import annotations

import importlib
from typing import Any

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

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'butler' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
