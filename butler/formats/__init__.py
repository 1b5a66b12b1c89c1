"""File formats of the datastore: Zarr v3 and FITS exposures, Parquet catalogs, JSON documents.

Every writer is atomic (:mod:`butler.formats.atomic`): data are written beside the target, made
durable, then renamed into place; nothing existing is replaced without ``overwrite=True``.
Readers raise :class:`~butler.errors.CorruptFileError` (naming the file and the problem) for
damaged data rather than returning wrong values.

The submodules are imported lazily so that importing one format does not import the others'
libraries (zarr, pyarrow, astropy.io.fits).
"""

from __future__ import annotations

from butler.lazy import attach

_LAZY: dict[str, str] = {
    "atomic_file": "butler.formats.atomic",
    "atomic_directory": "butler.formats.atomic",
    "atomic_write_bytes": "butler.formats.atomic",
    "write_exposure_zarr": "butler.formats.zarr_exposure",
    "read_exposure_zarr": "butler.formats.zarr_exposure",
    "configure_zarr_concurrency": "butler.formats.zarr_exposure",
    "write_exposure_fits": "butler.formats.fits_exposure",
    "read_exposure_fits": "butler.formats.fits_exposure",
    "write_catalog_parquet": "butler.formats.parquet_catalog",
    "read_catalog_parquet": "butler.formats.parquet_catalog",
    "write_json": "butler.formats.json_io",
    "read_json": "butler.formats.json_io",
    "write_document": "butler.formats.json_io",
    "read_document": "butler.formats.json_io",
    "write_skymap_json": "butler.formats.json_io",
    "read_skymap_json": "butler.formats.json_io",
    "write_psf_json": "butler.formats.json_io",
    "read_psf_json": "butler.formats.json_io",
    "write_config_json": "butler.formats.json_io",
    "read_config_json": "butler.formats.json_io",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
