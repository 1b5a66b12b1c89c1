"""Source catalog conventions on astropy ``Table``.

This module is the one place where the column conventions of every catalog diapipe writes
(``src``, ``deepCoadd_ref``, ``goodSeeingDiff_diaSrc``, ``deepCoadd_forced_src``, ...) are defined.
A catalog is a plain :class:`astropy.table.Table`; only ``id``, ``coord_ra``, ``coord_dec``, ``x`` and
``y`` are required, and any of the columns below that is present must have the listed kind and unit.
Flag columns are boolean.  Tasks may add columns of their own (documented in their own schemas).

=====================  =======  ======  ==========================================================
column                 kind     unit    meaning
=====================  =======  ======  ==========================================================
id                     int64            unique source id within the catalog
coord_ra, coord_dec    float64  deg     ICRS position
x, y                   float64  pix     centroid in the exposure's parent frame (0-based)
xErr, yErr             float32  pix     centroid uncertainty
psfFlux, psfFluxErr    float64  nJy     PSF-fit flux and its 1-sigma error
apFlux, apFluxErr      float64  nJy     aperture flux and error (radius in table meta ``apRadius``)
ixx, iyy, ixy          float32  pix2    second moments (adaptive)
snr                    float32          detection significance (peak of the matched filter)
isNegative             bool             detected on the negative image (difference imaging)
isDipole               bool             dipole-like pair of positive and negative lobes
parent                 int64            id of the parent source (0 for none)
pixelFlags_edge        bool             near the image edge or an EDGE pixel in the footprint
pixelFlags_saturated   bool             a SAT pixel in the footprint centre
pixelFlags_bad         bool             a BAD pixel in the footprint centre
pixelFlags_cr          bool             a cosmic ray in the footprint centre
pixelFlags_nodata      bool             NO_DATA pixel in the footprint centre
pixelFlags_interpolated bool            an INTRP pixel in the footprint centre
psfFlux_flag           bool             the PSF flux measurement failed
apFlux_flag            bool             the aperture flux measurement failed
=====================  =======  ======  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import Table

from .errors import DataModelError

__all__ = ["SOURCE_COLUMNS", "REQUIRED_COLUMNS", "ColumnSpec", "make_source_catalog", "validate_source_catalog"]


@dataclass(frozen=True)
class ColumnSpec:
    """Convention for one catalog column."""

    dtype: str
    unit: str | None
    description: str

    @property
    def kind(self) -> str:
        """Numpy dtype kind (``"i"``, ``"f"``, ``"b"``)."""
        return np.dtype(self.dtype).kind


def _flag(description: str) -> ColumnSpec:
    return ColumnSpec("bool", None, description)


#: Column conventions, name -> spec (see the module docstring).
SOURCE_COLUMNS: Mapping[str, ColumnSpec] = {
    "id": ColumnSpec("int64", None, "Unique source id within the catalog"),
    "coord_ra": ColumnSpec("float64", "deg", "ICRS right ascension"),
    "coord_dec": ColumnSpec("float64", "deg", "ICRS declination"),
    "x": ColumnSpec("float64", "pix", "Centroid x in the parent pixel frame (0-based)"),
    "y": ColumnSpec("float64", "pix", "Centroid y in the parent pixel frame (0-based)"),
    "xErr": ColumnSpec("float32", "pix", "Centroid x uncertainty"),
    "yErr": ColumnSpec("float32", "pix", "Centroid y uncertainty"),
    "psfFlux": ColumnSpec("float64", "nJy", "PSF-fit flux"),
    "psfFluxErr": ColumnSpec("float64", "nJy", "PSF-fit flux 1-sigma error"),
    "apFlux": ColumnSpec("float64", "nJy", "Aperture flux"),
    "apFluxErr": ColumnSpec("float64", "nJy", "Aperture flux 1-sigma error"),
    "ixx": ColumnSpec("float32", "pix2", "Second moment xx"),
    "iyy": ColumnSpec("float32", "pix2", "Second moment yy"),
    "ixy": ColumnSpec("float32", "pix2", "Second moment xy"),
    "snr": ColumnSpec("float32", None, "Detection significance"),
    "isNegative": _flag("Detected on the negative image"),
    "isDipole": _flag("Dipole-like positive/negative pair"),
    "parent": ColumnSpec("int64", None, "Parent source id (0 for none)"),
    "pixelFlags_edge": _flag("Near the image edge or EDGE pixels in the footprint"),
    "pixelFlags_saturated": _flag("SAT pixel in the footprint centre"),
    "pixelFlags_bad": _flag("BAD pixel in the footprint centre"),
    "pixelFlags_cr": _flag("Cosmic ray in the footprint centre"),
    "pixelFlags_nodata": _flag("NO_DATA pixel in the footprint centre"),
    "pixelFlags_interpolated": _flag("INTRP pixel in the footprint centre"),
    "psfFlux_flag": _flag("PSF flux measurement failed"),
    "apFlux_flag": _flag("Aperture flux measurement failed"),
}

#: Columns every source catalog must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "coord_ra", "coord_dec", "x", "y")


def make_source_catalog(
    n_rows: int = 0,
    columns: tuple[str, ...] | list[str] = REQUIRED_COLUMNS,
    extra: Mapping[str, ColumnSpec] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Table:
    """An empty (zero-filled) source catalog with conventional dtypes, units and descriptions.

    Parameters
    ----------
    n_rows : int
        Number of rows.
    columns : sequence of str
        Conventional columns to create (the required ones are always included).
    extra : mapping of str to ColumnSpec, optional
        Task-specific columns beyond the conventions.
    meta : mapping, optional
        Table metadata (e.g. ``{"apRadius": 5.0}``).
    """
    specs: dict[str, ColumnSpec] = {}
    for name in dict.fromkeys([*REQUIRED_COLUMNS, *columns]):
        if name not in SOURCE_COLUMNS:
            raise DataModelError(
                f"{name!r} is not a conventional source column; pass it in extra= with a ColumnSpec"
            )
        specs[name] = SOURCE_COLUMNS[name]
    for name, spec in (extra or {}).items():
        if name in SOURCE_COLUMNS and SOURCE_COLUMNS[name] != spec:
            raise DataModelError(f"extra column {name!r} conflicts with the convention {SOURCE_COLUMNS[name]}")
        specs[name] = spec
    table = Table(meta=dict(meta or {}))
    for name, spec in specs.items():
        table[name] = np.zeros(n_rows, dtype=spec.dtype)
        if spec.unit:
            table[name].unit = u.Unit(spec.unit)
        table[name].description = spec.description
    return table


def validate_source_catalog(table: Table, *, where: str = "catalog") -> Table:
    """Check a table against the conventions and return it.

    Parameters
    ----------
    table : astropy.table.Table
    where : str
        Names the catalog (dataset type, file) in error messages.

    Raises
    ------
    DataModelError
        A required column is missing, a conventional column has the wrong kind or an incompatible
        unit, or ``id`` values are not unique.
    """
    if not isinstance(table, Table):
        raise DataModelError(f"{where}: a source catalog must be an astropy Table, got {type(table).__name__}")
    missing = [name for name in REQUIRED_COLUMNS if name not in table.colnames]
    if missing:
        raise DataModelError(f"{where}: missing required column(s) {missing}; present: {table.colnames}")
    for name in table.colnames:
        spec = SOURCE_COLUMNS.get(name)
        if spec is None:
            continue
        kind = table[name].dtype.kind
        compatible = kind == spec.kind or (spec.kind == "f" and kind in "iu") or (spec.kind == "i" and kind == "u")
        if not compatible:
            raise DataModelError(f"{where}: column {name!r} has dtype {table[name].dtype}, expected {spec.dtype}")
        unit = table[name].unit
        if spec.unit and unit is not None and not u.Unit(unit).is_equivalent(u.Unit(spec.unit)):
            raise DataModelError(f"{where}: column {name!r} has unit {unit}, expected {spec.unit}")
    ids = np.asarray(table["id"])
    if ids.size and np.unique(ids).size != ids.size:
        raise DataModelError(f"{where}: column 'id' has duplicate values")
    return table
