"""Exceptions raised by the pipeline framework.

One hierarchy: every user-facing error derives from :class:`PipelineError`, and each leaf also
derives from the builtin exception a caller would naturally catch (``ValueError``,
``LookupError``, ``ImportError``, ...), as ``butler.errors`` does.  Messages say what was wrong,
where (task label, file and line, config field and layer, data ID) and what to do.

Three names form the *outcome vocabulary* of a quantum, as in LSST's ``pipe_base``:

- :class:`NoWorkFound` — not an error: the quantum has nothing to do (an optional input is missing,
  a predicted overlap is empty).  It derives from ``BaseException`` (as in LSST) so that a task's
  ``except Exception`` does not swallow it.
- :class:`RepeatableQuantumError` — the algorithm and this data do not go together; retrying will
  not help, other quanta should run fine.
- :class:`InvalidQuantumError` — a logic or configuration error that will break (nearly) every
  quantum, e.g. a ``runQuantum`` that writes a dataset that is not among its declared outputs.
"""

from __future__ import annotations

__all__ = [
    "PipelineError",
    "PipelineDefinitionError",
    "TaskImportError",
    "ConfigError",
    "ContractError",
    "ConnectionDefinitionError",
    "PipelineGraphError",
    "GraphBuildError",
    "MissingInputError",
    "PrerequisiteMissingError",
    "EmptyGraphError",
    "OutputExistsError",
    "QuantumGraphFileError",
    "NoWorkFound",
    "RepeatableQuantumError",
    "InvalidQuantumError",
    "format_location",
]


def format_location(file: str | None, line: int | None) -> str:
    """``"file:line"``, ``"file"`` or ``""`` for an error message prefix."""
    if file is None:
        return ""
    return f"{file}:{line}" if line is not None else str(file)


class PipelineError(Exception):
    """Base class of every error raised by the pipeline package (except :class:`NoWorkFound`)."""


class PipelineDefinitionError(PipelineError, ValueError):
    """A pipeline definition (YAML or Python) is malformed.

    Attributes
    ----------
    file : str or None
        The pipeline (or config) file at fault, when known.
    line : int or None
        1-based line in ``file``.
    label : str or None
        The task label concerned, when there is one.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, label: str | None = None):
        self.file = file
        self.line = line
        self.label = label
        self.message = message
        where = format_location(file, line)
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self):  # keyword-only arguments do not survive default pickling
        return (_rebuild_definition_error, (type(self), self.message, self.file, self.line, self.label))


def _rebuild_definition_error(cls, message, file, line, label):  # type: ignore[no-untyped-def]
    return cls(message, file=file, line=line, label=label)


class TaskImportError(PipelineDefinitionError):
    """A task class named in a pipeline cannot be imported or is not a PipelineTask."""


class ConfigError(PipelineDefinitionError):
    """A config field is unknown, has a value of the wrong type, or fails ``validate()``.

    Attributes
    ----------
    field : str or None
        Dotted path of the field (``"detection.threshold"``).
    layer : str or None
        The layer that set it: ``default``, ``pipeline``, ``file``, ``command line`` or ``python``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        label: str | None = None,
        field: str | None = None,
        layer: str | None = None,
    ):
        self.field = field
        self.layer = layer
        super().__init__(message, file=file, line=line, label=label)

    def __reduce__(self):
        return (_rebuild_config_error, (type(self), self.message, self.file, self.line, self.label, self.field, self.layer))


def _rebuild_config_error(cls, message, file, line, label, field, layer):  # type: ignore[no-untyped-def]
    return cls(message, file=file, line=line, label=label, field=field, layer=layer)


class ContractError(PipelineDefinitionError):
    """A pipeline contract is violated, or cannot be evaluated (it uses forbidden syntax)."""


class ConnectionDefinitionError(PipelineError, TypeError):
    """A connections class or connection declaration is inconsistent."""


class PipelineGraphError(PipelineDefinitionError):
    """The tasks of a pipeline do not fit together: a cycle, two producers of one dataset type,
    one dataset type with two definitions, a prerequisite produced by a task."""


class GraphBuildError(PipelineError, RuntimeError):
    """A quantum graph cannot be built from the pipeline, the repository and the data query."""


class MissingInputError(GraphBuildError, LookupError):
    """An input that no task produces is not in the input collections."""


class PrerequisiteMissingError(MissingInputError):
    """A prerequisite input of a quantum is not in the input collections."""


class EmptyGraphError(GraphBuildError):
    """The data query (with the inputs that exist) selects no quantum at all."""


class OutputExistsError(GraphBuildError):
    """Outputs a graph would write already exist in the output run."""


class QuantumGraphFileError(PipelineError, ValueError):
    """A saved quantum graph file cannot be read (not one, damaged, or a newer format)."""


class NoWorkFound(BaseException):  # noqa: N818 - LSST's name
    """A quantum has no work to do; not an error (LSST semantics: derives from BaseException)."""


class RepeatableQuantumError(PipelineError, RuntimeError):
    """A problem with this quantum's data that retries will not fix; other quanta may run."""

    EXIT_CODE = 20


class InvalidQuantumError(PipelineError, RuntimeError):
    """A logic or configuration problem that invalidates the task itself (e.g. an undeclared put)."""

    EXIT_CODE = 21
