"""Region values as the registry stores them.

A region column holds the vertices as bytes: the ``n`` right ascensions then the ``n``
declinations (degrees), little-endian float64, exactly as given (``ra`` in [0, 360)).  Binary
because it pays: writing JSON text (one float repr per coordinate) cost a tenth of a bulk region
insert (measured), and it is exact without any formatting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import DataModelError
from ..regions import SkyRegion

__all__ = ["as_region", "as_regions", "region_bytes", "region_from_bytes", "vertices_from_bytes"]


def as_region(value: SkyRegion | Mapping[str, Any]) -> SkyRegion:
    """A :class:`SkyRegion` from itself or its ``to_dict()`` form."""
    if isinstance(value, SkyRegion):
        return value
    return SkyRegion.from_dict(dict(value))


def as_regions(values: Sequence[SkyRegion | Mapping[str, Any]]) -> list[SkyRegion]:
    """:func:`as_region` of each value; the dicts are validated together (``from_radec_many``)."""
    out: list[SkyRegion | None] = [v if isinstance(v, SkyRegion) else None for v in values]
    given = [i for i, region in enumerate(out) if region is None]
    if given:
        vertices = [SkyRegion._dict_vertices(values[i]) for i in given]
        built = SkyRegion.from_radec_many([v[:, 0] for v in vertices], [v[:, 1] for v in vertices])
        for i, region in zip(given, built, strict=True):
            out[i] = region
    return out  # type: ignore[return-value]


def region_bytes(region: SkyRegion) -> bytes:
    """The bytes a registry ``region`` column holds for a region."""
    return region._ra.astype("<f8", copy=False).tobytes() + region._dec.astype("<f8", copy=False).tobytes()


def vertices_from_bytes(data: bytes) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(ra, dec)`` vertex arrays in degrees from a registry ``region`` column."""
    values = np.frombuffer(data, dtype="<f8")
    if len(values) < 6 or len(values) % 2:
        raise DataModelError(f"a stored region must hold 3 or more (ra, dec) vertices; got {len(data)} bytes")
    n = len(values) // 2
    return values[:n].astype(np.float64), values[n:].astype(np.float64)


def region_from_bytes(data: bytes) -> SkyRegion:
    """The region stored in a registry ``region`` column (validated when it was stored)."""
    ra, dec = vertices_from_bytes(data)
    return SkyRegion._trusted(ra, dec)
