"""Exceptions raised by the butler package.

One hierarchy: every error derives from :class:`ButlerError`, and each leaf also derives from the
builtin exception a caller would naturally catch (``LookupError``, ``ValueError``, ...), as
``lsst.daf.butler`` does.  Messages say what was wrong, where (file, field, data ID, column) and
what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ButlerError",
    "DataModelError",
    "MaskPlaneError",
    "PsfError",
    "FormatError",
    "CorruptFileError",
    "SkyMapError",
]


class ButlerError(Exception):
    """Base class of every error raised by the butler package."""


class DataModelError(ButlerError, ValueError):
    """An in-memory object (array, header, field) does not satisfy the data model."""


class MaskPlaneError(ButlerError, KeyError):
    """A mask plane name is unknown, or no bit is left for a new plane."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class PsfError(DataModelError):
    """A PSF model is malformed (not normalized, even-sized, non-finite, unknown type)."""


class FormatError(ButlerError, ValueError):
    """A file cannot be read or written in the requested format."""


class CorruptFileError(FormatError, OSError):
    """A file exists but is truncated, damaged or not of the expected layout."""


class SkyMapError(ButlerError, ValueError):
    """A skymap definition is invalid or a sky position is outside every tract."""
