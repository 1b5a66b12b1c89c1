"""Exceptions raised by the PSF-matching kernel machinery.

One small hierarchy: every error derives from :class:`PsfMatchError`, and each leaf also derives
from the builtin exception a caller would naturally catch (``RuntimeError``, ``ArithmeticError``,
``ValueError``), as ``butler.errors`` and ``pipeline.errors`` do.  Tasks turn these into a failed
quantum (or ``NoWorkFound`` where LSST does) with the data ID added.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "PsfMatchError",
    "PsfMatchConfigError",
    "NoKernelCandidatesError",
    "SingularKernelSolutionError",
]


class PsfMatchError(Exception):
    """Base class of every error raised by :mod:`tasks.psfmatch`."""


class PsfMatchConfigError(PsfMatchError, ValueError):
    """A configuration value or argument is invalid (even kernel size, mismatched list lengths...)."""


class NoKernelCandidatesError(PsfMatchError, RuntimeError):
    """No (or too few) usable kernel candidates.

    Attributes
    ----------
    rejected : dict of str to int
        Number of sources (or candidates) rejected for each reason.
    n_input : int
        Number of sources (or candidates) that were examined.
    """

    def __init__(self, message: str, *, rejected: Mapping[str, int] | None = None, n_input: int = 0) -> None:
        super().__init__(message)
        self.rejected: dict[str, int] = dict(rejected or {})
        self.n_input = int(n_input)


class SingularKernelSolutionError(PsfMatchError, ArithmeticError):
    """The (spatial) kernel least-squares system is singular or too ill-conditioned to solve.

    Attributes
    ----------
    condition_number : float
        Condition number of the diagonally scaled normal matrix (``inf`` when singular).
    """

    def __init__(self, message: str, *, condition_number: float = float("inf")) -> None:
        super().__init__(message)
        self.condition_number = float(condition_number)


def format_rejections(rejected: Mapping[str, int]) -> str:
    """``"12 S/N below 10, 3 not isolated"``: counts by reason, largest first."""
    items = sorted(((n, reason) for reason, n in rejected.items() if n), reverse=True)
    return ", ".join(f"{n} {reason}" for n, reason in items) if items else "none rejected"
