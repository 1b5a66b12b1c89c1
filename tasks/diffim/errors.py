"""Errors of the image-differencing tasks.

Every error is a :class:`pipeline.errors.RepeatableQuantumError` (this quantum's data and the
algorithm do not go together; other quanta run on), and also derives from the builtin a caller
would naturally catch.  Messages say what was wrong, for which data ID when the task knows it,
and what to do.  "Nothing to do" situations (no template coverage, no skymap overlap) raise
:class:`pipeline.errors.NoWorkFound` instead, as LSST does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.errors import RepeatableQuantumError

__all__ = [
    "DiffimError",
    "MissingPsfError",
    "BandMismatchError",
    "TemplateGeometryError",
    "InsufficientKernelSourcesError",
    "KernelSolutionError",
    "format_data_id",
    "with_data_id",
]


def format_data_id(data_id: Mapping[str, Any] | None) -> str:
    """``"{instrument: 'SimCam', visit: 3004, detector: 4}"`` (or ``""`` for None)."""
    if not data_id:
        return ""
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in data_id.items()) + "}"


class DiffimError(RepeatableQuantumError):
    """Base class of the image-differencing errors."""


class MissingPsfError(DiffimError, ValueError):
    """An input exposure has no PSF model (PSF matching and detection need one on every image)."""


class BandMismatchError(DiffimError, ValueError):
    """Template and science exposures (or the coadd patches) are in different bands."""


class TemplateGeometryError(DiffimError, ValueError):
    """The template does not cover the science image's pixel box, or its WCS does not match."""


class InsufficientKernelSourcesError(DiffimError):
    """Too few usable kernel candidates (LSST's ``InsufficientKernelSourcesError``).

    Attributes
    ----------
    rejected : dict of str to int
        Sources (or candidates) rejected per reason.
    n_input : int
        Sources examined.
    """

    def __init__(self, message: str, *, rejected: Mapping[str, int] | None = None, n_input: int = 0) -> None:
        super().__init__(message)
        self.rejected: dict[str, int] = dict(rejected or {})
        self.n_input = int(n_input)

    def __reduce__(self) -> Any:  # keyword-only arguments do not survive default pickling
        return (_rebuild_insufficient, (type(self), str(self), self.rejected, self.n_input))


def _rebuild_insufficient(cls: type, message: str, rejected: dict[str, int], n_input: int) -> Any:
    return cls(message, rejected=rejected, n_input=n_input)


class KernelSolutionError(DiffimError, ArithmeticError):
    """The spatial kernel system is singular or too ill-conditioned to solve.

    Attributes
    ----------
    condition_number : float
        Condition number of the scaled normal matrix (``inf`` when singular).
    """

    def __init__(self, message: str, *, condition_number: float = float("inf")) -> None:
        super().__init__(message)
        self.condition_number = float(condition_number)

    def __reduce__(self) -> Any:
        return (_rebuild_solution, (type(self), str(self), self.condition_number))


def _rebuild_solution(cls: type, message: str, condition_number: float) -> Any:
    return cls(message, condition_number=condition_number)


def with_data_id(exc: BaseException, data_id: Mapping[str, Any] | None) -> BaseException:
    """A copy of a diffim error (or NoWorkFound) whose message names the data ID.

    Used by ``runQuantum``: ``run`` does not know the data ID, the quantum does.  Other exceptions
    are returned unchanged.
    """
    text = format_data_id(data_id)
    if not text or text in str(exc):
        return exc
    message = f"{exc} [data ID {text}]"
    if isinstance(exc, InsufficientKernelSourcesError):
        new: BaseException = type(exc)(message, rejected=exc.rejected, n_input=exc.n_input)
    elif isinstance(exc, KernelSolutionError):
        new = type(exc)(message, condition_number=exc.condition_number)
    elif isinstance(exc, DiffimError) or type(exc).__name__ == "NoWorkFound":
        try:
            new = type(exc)(message)
        except TypeError:
            return exc
    else:
        return exc
    new.__cause__ = exc.__cause__
    return new
