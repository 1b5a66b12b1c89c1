"""Column schemas of the forced-photometry and association catalogs, one group per measurement type.

Each group is declared once, as ``{column: ColumnSpec}`` (dtype, unit, description), and a catalog
schema is the union of its groups (:func:`merge_schemas`).  Conventional columns (those of
:mod:`butler.catalog`) keep their conventional spec.

=============================  ============================================================
group                          columns
=============================  ============================================================
:data:`POSITION_COLUMNS`       ``id, coord_ra, coord_dec, x, y`` (forced position)
:data:`PSF_FLUX_COLUMNS`       ``psfFlux, psfFluxErr, psfFlux_flag``
:func:`aperture_flux_columns`  ``apFlux_<r>_<f>, apFlux_<r>_<f>Err, apFlux_<r>_<f>_flag``
:data:`PIXEL_FLAG_COLUMNS`     ``pixelFlags_edge, pixelFlags_nodata, pixelFlags_saturated``
:data:`SCIENCE_FLUX_COLUMNS`   ``scienceFlux, scienceFluxErr, scienceFlux_flag`` (calexp)
:data:`DIA_VISIT_COLUMNS`      ``diaObjectId, visit, detector, midpointMjdTai, band``
:data:`DIA_OBJECT_COLUMNS`     the ``diaObject`` table
:data:`ASSOCIATION_COLUMNS`    what association adds to each DIA source
=============================  ============================================================

Fluxes are in nJy; positions in degrees (sky) and pixels (the measured exposure's parent frame).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from astropy import units as u
from astropy.table import Table

from butler.catalog import SOURCE_COLUMNS, ColumnSpec, make_source_catalog

__all__ = [
    "POSITION_COLUMNS",
    "PSF_FLUX_COLUMNS",
    "PIXEL_FLAG_COLUMNS",
    "PIXEL_FLAG_PLANES",
    "SCIENCE_FLUX_COLUMNS",
    "DIA_VISIT_COLUMNS",
    "DIA_OBJECT_COLUMNS",
    "ASSOCIATION_COLUMNS",
    "aperture_name",
    "aperture_flux_columns",
    "merge_schemas",
    "make_catalog",
    "make_table",
]


def _conventional(*names: str) -> dict[str, ColumnSpec]:
    return {name: SOURCE_COLUMNS[name] for name in names}


def _flag(description: str) -> ColumnSpec:
    return ColumnSpec("bool", None, description)


#: Where a forced measurement was made: the reference's id and sky position, and that position in
#: the measured exposure's pixels (``refWcs`` -> sky -> exposure WCS).
POSITION_COLUMNS: Mapping[str, ColumnSpec] = _conventional("id", "coord_ra", "coord_dec", "x", "y")

#: PSF photometry at the forced position (:func:`tasks.measure.photometry.psf_flux`).
PSF_FLUX_COLUMNS: Mapping[str, ColumnSpec] = _conventional("psfFlux", "psfFluxErr", "psfFlux_flag")

#: Pixel flags: a mask plane within ``flagRadius`` pixels of the forced position (``edge`` also when
#: the PSF stamp runs off the image); the conventional columns of :mod:`butler.catalog`.
PIXEL_FLAG_COLUMNS: Mapping[str, ColumnSpec] = _conventional("pixelFlags_edge", "pixelFlags_nodata", "pixelFlags_saturated")

#: The mask plane behind each mask-based pixel flag.
PIXEL_FLAG_PLANES: Mapping[str, str] = {
    "pixelFlags_edge": "EDGE",
    "pixelFlags_nodata": "NO_DATA",
    "pixelFlags_saturated": "SAT",
}

#: PSF photometry on the science exposure (calexp) at the position of a DIA object: total flux.
SCIENCE_FLUX_COLUMNS: Mapping[str, ColumnSpec] = {
    "scienceFlux": ColumnSpec("float64", "nJy", "PSF flux on the science exposure (total flux)"),
    "scienceFluxErr": ColumnSpec("float64", "nJy", "scienceFlux 1-sigma error"),
    "scienceFlux_flag": _flag("The science PSF flux measurement failed"),
}

#: Which DIA object, and which visit-detector and epoch, a forced source belongs to.
DIA_VISIT_COLUMNS: Mapping[str, ColumnSpec] = {
    "diaObjectId": ColumnSpec("int64", None, "Id of the DIA object measured"),
    "visit": ColumnSpec("int64", None, "Visit id"),
    "detector": ColumnSpec("int64", None, "Detector id"),
    "midpointMjdTai": ColumnSpec("float64", "d", "MJD (TAI) of the exposure midpoint"),
    "band": ColumnSpec("U8", None, "Band of the exposure"),
}

#: The ``diaObject`` table: one row per DIA object of a patch.
DIA_OBJECT_COLUMNS: Mapping[str, ColumnSpec] = {
    "diaObjectId": ColumnSpec("int64", None, "Unique DIA object id"),
    "coord_ra": SOURCE_COLUMNS["coord_ra"],
    "coord_dec": SOURCE_COLUMNS["coord_dec"],
    "nDiaSources": ColumnSpec("int32", None, "Number of associated DIA sources"),
    "nNegativeDiaSources": ColumnSpec("int32", None, "Associated DIA sources detected as negative"),
    "nDipoleDiaSources": ColumnSpec("int32", None, "Associated DIA sources flagged as dipoles"),
    "nVisits": ColumnSpec("int32", None, "Distinct visits among the associated DIA sources"),
    "firstDiaSourceMjd": ColumnSpec("float64", "d", "MJD (TAI) of the earliest associated DIA source"),
    "lastDiaSourceMjd": ColumnSpec("float64", "d", "MJD (TAI) of the latest associated DIA source"),
}

#: Columns association adds to each associated DIA source (``{diffName}Diff_assocDiaSrc``).
ASSOCIATION_COLUMNS: Mapping[str, ColumnSpec] = {
    "diaObjectId": DIA_OBJECT_COLUMNS["diaObjectId"],
    "visit": DIA_VISIT_COLUMNS["visit"],
    "detector": DIA_VISIT_COLUMNS["detector"],
    "midpointMjdTai": DIA_VISIT_COLUMNS["midpointMjdTai"],
}


def aperture_name(radius: float) -> str:
    """Column prefix of an aperture flux: ``apFlux_<r>_<f>`` for radius ``r.f`` pixels (``apFlux_6_0``)."""
    whole = int(radius)
    tenths = int(round(10 * (radius - whole)))
    if tenths == 10:
        whole, tenths = whole + 1, 0
    return f"apFlux_{whole}_{tenths}"


def aperture_flux_columns(radii: Sequence[float]) -> dict[str, ColumnSpec]:
    """The aperture-flux group for the given radii (pixels): flux, error and flag per radius."""
    out: dict[str, ColumnSpec] = {}
    for radius in radii:
        name = aperture_name(radius)
        out[name] = ColumnSpec("float64", "nJy", f"Flux in a circular aperture of radius {radius:g} pixels")
        out[name + "Err"] = ColumnSpec("float64", "nJy", f"{name} 1-sigma error")
        out[name + "_flag"] = _flag(f"{name}: the aperture runs off the image or covers unusable pixels")
    return out


def merge_schemas(*groups: Mapping[str, ColumnSpec]) -> dict[str, ColumnSpec]:
    """The union of column groups, in order.

    Raises
    ------
    ValueError
        If two groups declare the same column differently.
    """
    out: dict[str, ColumnSpec] = {}
    for group in groups:
        for name, spec in group.items():
            if name in out and out[name] != spec:
                raise ValueError(f"column {name!r} is declared twice, differently: {out[name]} and {spec}")
            out[name] = spec
    return out


def make_catalog(n_rows: int, schema: Mapping[str, ColumnSpec], meta: Mapping[str, object] | None = None) -> Table:
    """A source catalog (:func:`butler.catalog.make_source_catalog`) with ``schema``'s columns.

    Float columns start as NaN, flags as False, integers as 0.
    """
    conventional = [name for name, spec in schema.items() if SOURCE_COLUMNS.get(name) == spec]
    extra = {name: spec for name, spec in schema.items() if name not in conventional}
    table = make_source_catalog(n_rows, conventional, extra=extra, meta=meta)
    for name in table.colnames:
        if table[name].dtype.kind == "f":
            table[name][:] = np.nan
    return table


def make_table(n_rows: int, schema: Mapping[str, ColumnSpec], meta: Mapping[str, object] | None = None) -> Table:
    """A plain table (no source-catalog requirements) with ``schema``'s columns, dtypes and units."""
    table = Table(meta=dict(meta or {}))
    for name, spec in schema.items():
        column = np.zeros(n_rows, dtype=spec.dtype)
        if column.dtype.kind == "f":
            column[:] = np.nan
        table[name] = column
        if spec.unit:
            table[name].unit = u.Unit(spec.unit)
        table[name].description = spec.description
    return table
