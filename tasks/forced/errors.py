"""Errors of the forced-photometry and association tasks.

:class:`ForcedPhotometryError` is a :class:`pipeline.errors.RepeatableQuantumError` (this quantum's
data and the algorithm do not go together; other quanta run on) and a ``ValueError``; its message
names the quantum's data ID.
"""

from __future__ import annotations

from pipeline.errors import RepeatableQuantumError
from tasks.diffim.errors import format_data_id

__all__ = ["ForcedPhotometryError", "format_data_id"]


class ForcedPhotometryError(RepeatableQuantumError, ValueError):
    """An input of a forced-photometry or association quantum is unusable (the message says which)."""
