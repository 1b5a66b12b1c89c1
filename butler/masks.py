"""Mask bit planes: names mapped to bit numbers in an int32 mask array.

The map travels with each exposure (and into Zarr attributes and FITS ``MP_*`` keywords), so a
file written with extra planes reads back with the same meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .errors import DataModelError, MaskPlaneError

__all__ = ["DEFAULT_MASK_PLANES", "MAX_MASK_PLANES", "bitmask", "add_plane", "validate_planes"]

#: LSST's standard planes with LSST's bit numbers.
DEFAULT_MASK_PLANES: Mapping[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "CLIPPED": 9,
    "CROSSTALK": 10,
    "INEXACT_PSF": 11,
    "REJECTED": 12,
    "SENSOR_EDGE": 13,
    "UNMASKEDNAN": 14,
}

#: int32 masks hold 31 usable bits (bit 31 is the sign bit, kept free so masks stay non-negative).
MAX_MASK_PLANES = 31


def validate_planes(planes: Mapping[str, int]) -> dict[str, int]:
    """Check a name->bit map and return a plain copy.

    Raises
    ------
    DataModelError
        If a name is empty, a bit is out of ``[0, 31)``, or two names share a bit.
    """
    out: dict[str, int] = {}
    seen: dict[int, str] = {}
    for name, bit in planes.items():
        if not isinstance(name, str) or not name:
            raise DataModelError(f"mask plane names must be non-empty strings, got {name!r}")
        try:
            bit_int = int(bit)
        except (TypeError, ValueError):
            raise DataModelError(f"mask plane {name!r} has a non-integer bit {bit!r}") from None
        if not 0 <= bit_int < MAX_MASK_PLANES:
            raise DataModelError(
                f"mask plane {name!r} has bit {bit_int}; bits must be in [0, {MAX_MASK_PLANES})"
            )
        if bit_int in seen:
            raise DataModelError(f"mask planes {seen[bit_int]!r} and {name!r} share bit {bit_int}")
        seen[bit_int] = name
        out[name] = bit_int
    return out


def bitmask(planes: Mapping[str, int], names: str | Iterable[str]) -> int:
    """OR of the bits of the named planes.

    Raises
    ------
    MaskPlaneError
        If a name is not in ``planes``; the message lists the known planes.
    """
    if isinstance(names, str):
        names = [names]
    value = 0
    for name in names:
        try:
            value |= 1 << planes[name]
        except KeyError:
            raise MaskPlaneError(
                f"unknown mask plane {name!r}; known planes: {', '.join(sorted(planes))}. "
                "Add it with Exposure.add_mask_plane() first."
            ) from None
    return value


def add_plane(planes: dict[str, int], name: str) -> int:
    """Add ``name`` to ``planes`` in place (if absent) and return its bit.

    Raises
    ------
    MaskPlaneError
        If all usable bits are taken.
    """
    if name in planes:
        return planes[name]
    if not isinstance(name, str) or not name:
        raise DataModelError(f"mask plane names must be non-empty strings, got {name!r}")
    used = set(planes.values())
    for bit in range(MAX_MASK_PLANES):
        if bit not in used:
            planes[name] = bit
            return bit
    raise MaskPlaneError(f"cannot add mask plane {name!r}: all {MAX_MASK_PLANES} bits are in use")


def planes_in_mask(mask: np.ndarray, planes: Mapping[str, int]) -> dict[str, int]:
    """Number of pixels with each plane set (a small summary for logs and reports)."""
    return {name: int(np.count_nonzero(mask & (1 << bit))) for name, bit in planes.items()}
