"""Region values as the registry stores them (JSON text of :meth:`SkyRegion.to_dict`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..regions import SkyRegion

__all__ = ["as_region", "region_from_text"]


def as_region(value: SkyRegion | Mapping[str, Any]) -> SkyRegion:
    """A :class:`SkyRegion` from itself or its ``to_dict()`` form."""
    if isinstance(value, SkyRegion):
        return value
    return SkyRegion.from_dict(dict(value))


def region_from_text(text: str) -> SkyRegion:
    """The region stored in a registry ``region`` column."""
    return SkyRegion.from_dict(json.loads(text), trusted=True)
