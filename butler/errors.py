"""Exceptions raised by the butler package.

One hierarchy: every error derives from :class:`ButlerError`, and each leaf also derives from the
builtin exception a caller would naturally catch (``LookupError``, ``ValueError``, ...), as
``lsst.daf.butler`` does.  Messages say what was wrong, where (file, field, data ID, column) and
what to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ButlerError",
    "NotARepositoryError",
    "DimensionNameError",
    "DataIdError",
    "DimensionRecordNotFoundError",
    "MissingDatasetTypeError",
    "DatasetTypeConflictError",
    "MissingCollectionError",
    "CollectionTypeError",
    "DatasetNotFoundError",
    "DatasetExistsError",
    "UnknownStorageClassError",
    "InvalidQueryError",
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


class _PlainKeyError(KeyError):
    """A KeyError whose str() is its message, not the quoted repr KeyError gives."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MaskPlaneError(ButlerError, _PlainKeyError):
    """A mask plane name is unknown, or no bit is left for a new plane."""


class PsfError(DataModelError):
    """A PSF model is malformed (not normalized, even-sized, non-finite, unknown type)."""


class FormatError(ButlerError, ValueError):
    """A file cannot be read or written in the requested format."""


class CorruptFileError(FormatError, OSError):
    """A file exists but is truncated, damaged or not of the expected layout."""


class SkyMapError(ButlerError, ValueError):
    """A skymap definition is invalid or a sky position is outside every tract."""


class NotARepositoryError(ButlerError, FileNotFoundError):
    """A path is not a butler repository (no ``butler.yaml``)."""


class DimensionNameError(ButlerError, _PlainKeyError):
    """A dimension, dimension-record field or spatial element name is unknown."""


class DataIdError(ButlerError, ValueError):
    """A data ID has missing, unexpected or wrongly typed keys, or unsafe values."""


class DimensionRecordNotFoundError(ButlerError, LookupError):
    """A data ID refers to a dimension value that has no record in the registry."""


class MissingDatasetTypeError(ButlerError, _PlainKeyError):
    """A dataset type is not registered."""


class DatasetTypeConflictError(ButlerError, ValueError):
    """A dataset type is registered with another definition."""


class MissingCollectionError(ButlerError, _PlainKeyError):
    """A collection does not exist."""


class CollectionTypeError(ButlerError, TypeError):
    """A collection has the wrong type for the operation (e.g. a put into a CHAINED collection)."""


class DatasetNotFoundError(ButlerError, LookupError):
    """No dataset matches a dataset type and data ID in the collections searched."""


class DatasetExistsError(ButlerError, FileExistsError):
    """A dataset with this type and data ID already exists in the run."""


class UnknownStorageClassError(ButlerError, _PlainKeyError):
    """A storage class name is unknown."""


def format_caret(expression: str, column: int, width: int = 1) -> str:
    """Return the line of ``expression`` holding ``column`` and a caret line under it.

    Parameters
    ----------
    expression : `str`
        The full expression text.
    column : `int`
        1-based character offset into ``expression`` (equal to the column for a one-line
        expression).  ``len(expression) + 1`` points just past the end.
    width : `int`, optional
        Number of characters to underline; the caret line is ``^`` repeated ``width`` times,
        clipped to the end of the line (but never fewer than one).

    Returns
    -------
    snippet : `str`
        Two lines, each indented by four spaces: the source line and the caret line.
    """
    offset = min(max(column - 1, 0), len(expression))
    line_start = expression.rfind("\n", 0, offset) + 1
    line_end = expression.find("\n", offset)
    if line_end < 0:
        line_end = len(expression)
    line = expression[line_start:line_end]
    col0 = offset - line_start
    # Tabs would make the caret drift; show them as single spaces.
    line = line.replace("\t", " ")
    width = max(1, min(width, len(line) - col0))
    return f"    {line}\n    {' ' * col0}{'^' * width}"


def _line_and_column(expression: str, column: int) -> tuple[int, int]:
    offset = min(max(column - 1, 0), len(expression))
    line = expression.count("\n", 0, offset) + 1
    line_start = expression.rfind("\n", 0, offset) + 1
    return line, offset - line_start + 1


class InvalidQueryError(ButlerError, ValueError):
    """A where expression is malformed, or refers to something that does not exist.

    The message names the problem, the 1-based column (and line, for a multi-line
    expression), shows the expression with a caret line under the offending spot, and ends
    with a hint when there is one.

    Parameters
    ----------
    message : `str`
        What is wrong, e.g. ``"expected a value after '>'"``.
    expression : `str`, optional
        The full expression text; without it no caret is shown (the SQL compiler adds it to
        errors raised by identifier resolvers, see `with_context`).
    column : `int`, optional
        1-based character offset into ``expression`` of the offending spot.
    width : `int`, optional
        Number of characters to underline.
    hint : `str`, optional
        What to do about it, appended on its own line.

    Attributes
    ----------
    message, expression, column, width, hint
        As given.
    line : `int` or `None`
        1-based line of the offending spot.
    line_column : `int` or `None`
        1-based column within that line.
    """

    def __init__(
        self,
        message: str,
        *,
        expression: str | None = None,
        column: int | None = None,
        width: int = 1,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.expression = expression
        self.column = column
        self.width = width
        self.hint = hint
        if expression is not None and column is not None:
            self.line, self.line_column = _line_and_column(expression, column)
        else:
            self.line = self.line_column = None
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.message]
        if self.expression is not None and self.column is not None:
            assert self.line is not None
            where = (
                f"column {self.line_column}"
                if "\n" not in self.expression
                else f"line {self.line}, column {self.line_column}"
            )
            parts = [f"{self.message} (at {where} of the where expression):"]
            parts.append(format_caret(self.expression, self.column, self.width))
        elif self.column is not None:
            parts = [f"{self.message} (at column {self.column} of the where expression)"]
        if self.hint:
            parts.append(self.hint)
        return "\n".join(parts)

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default Exception pickling (dask moves
        # exceptions between processes).
        return (
            _rebuild_invalid_query_error,
            (type(self), self.message, self.expression, self.column, self.width, self.hint),
        )

    def with_context(self, expression: str, column: int, width: int = 1) -> InvalidQueryError:
        """Return a copy that points into ``expression``, unless this error already does.

        Parameters
        ----------
        expression : `str`
            The full expression text.
        column : `int`
            1-based character offset of the offending spot.
        width : `int`, optional
            Number of characters to underline.

        Returns
        -------
        error : `InvalidQueryError`
            ``self`` if it already has an expression, else a new error of the same type.
        """
        if self.expression is not None:
            return self
        return type(self)(
            self.message,
            expression=expression,
            column=self.column if self.column is not None else column,
            width=width if self.column is None else self.width,
            hint=self.hint,
        )


def _rebuild_invalid_query_error(
    cls: type[InvalidQueryError],
    message: str,
    expression: str | None,
    column: int | None,
    width: int,
    hint: str | None,
) -> InvalidQueryError:
    return cls(message, expression=expression, column=column, width=width, hint=hint)
