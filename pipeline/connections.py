"""Connections: what a PipelineTask reads and writes, declared as frozen dataclasses.

A connections class lists a task's inputs, prerequisite inputs, outputs and init-inputs/outputs,
and declares the quantum dimensions and the default name templates as class keywords, as in LSST::

    class CoaddConnections(PipelineTaskConnections,
                           dimensions=("skymap", "tract", "patch", "band"),
                           defaultTemplates={"coaddName": "deep"}):
        warps = Input(name="{coaddName}Coadd_psfMatchedWarp", storageClass="Exposure",
                      dimensions=("skymap", "tract", "patch", "visit"), multiple=True)
        coadd = Output(name="{coaddName}Coadd", storageClass="Exposure",
                       dimensions=("skymap", "tract", "patch", "band"))

A config built with ``pipelineConnections=CoaddConnections`` gets a ``connections`` sub-config
with one field per connection (rename: ``connections.coadd = "otherCoadd"``) and one per template
(``connections.coaddName = "goodSeeing"``).  An instance, ``CoaddConnections(config=config)``,
holds the resolved names; its ``__init__`` may drop optional connections with
``self.inputs.remove("x")`` or ``del self.x``.
"""

from __future__ import annotations

import dataclasses
import string
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

from .errors import ConnectionDefinitionError

__all__ = [
    "BaseConnection",
    "DimensionedConnection",
    "BaseInput",
    "Input",
    "PrerequisiteInput",
    "Output",
    "InitInput",
    "InitOutput",
    "PipelineTaskConnections",
    "CONNECTION_KINDS",
    "template_fields",
]

#: Names of the per-kind sets of connection names, in a fixed order.
CONNECTION_KINDS = ("initInputs", "initOutputs", "inputs", "prerequisiteInputs", "outputs")


def template_fields(name: str) -> set[str]:
    """The ``{field}`` names used by a dataset type name template."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(name) if field is not None}
    except ValueError as exc:
        raise ConnectionDefinitionError(f"bad name template {name!r}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class BaseConnection:
    """A dataset the task reads or writes.

    Attributes
    ----------
    name : str
        Dataset type name, possibly a template (``"{coaddName}Coadd"``).
    storageClass : str
        Storage class (``"Exposure"``, ``"SourceCatalog"``, ...).
    doc : str
        What the dataset is for this task.
    multiple : bool
        The task takes (or writes) a list of datasets for this connection.
    """

    name: str
    storageClass: str  # noqa: N815 - LSST's name
    doc: str = ""
    multiple: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConnectionDefinitionError(f"connection name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.storageClass, str) or not self.storageClass:
            raise ConnectionDefinitionError(f"connection {self.name!r}: storageClass must be a non-empty string")


@dataclasses.dataclass(frozen=True)
class DimensionedConnection(BaseConnection):
    """A connection whose datasets have dimensions (everything but init-inputs/outputs)."""

    dimensions: Iterable[str] = ()
    isCalibration: bool = False  # noqa: N815 - LSST's name

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dimensions, str):
            raise ConnectionDefinitionError(
                f"connection {self.name!r}: dimensions must be an iterable of names, got the string "
                f"{self.dimensions!r} (a missing trailing comma in a 1-tuple?)"
            )
        try:
            dims = tuple(self.dimensions)
        except TypeError:
            raise ConnectionDefinitionError(
                f"connection {self.name!r}: dimensions must be an iterable of names, got {self.dimensions!r}"
            ) from None
        if not all(isinstance(d, str) for d in dims):
            raise ConnectionDefinitionError(f"connection {self.name!r}: dimensions must be strings, got {dims!r}")
        object.__setattr__(self, "dimensions", dims)


@dataclasses.dataclass(frozen=True)
class BaseInput(DimensionedConnection):
    """An input (regular or prerequisite).

    Attributes
    ----------
    deferLoad : bool
        ``butlerQC.get`` gives a handle with ``.get(parameters=...)`` instead of the object.
    minimum : int
        Fewest datasets a quantum needs for this connection; fewer prunes the quantum (regular
        inputs) or fails the graph build (prerequisites).  ``0`` makes the input optional.
    """

    deferLoad: bool = False  # noqa: N815
    minimum: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.minimum, int) or self.minimum < 0:
            raise ConnectionDefinitionError(f"connection {self.name!r}: minimum must be an integer >= 0")
        if self.minimum > 1 and not self.multiple:
            raise ConnectionDefinitionError(
                f"connection {self.name!r}: minimum={self.minimum} needs multiple=True (a single input is 0 or 1)"
            )


@dataclasses.dataclass(frozen=True)
class Input(BaseInput):
    """A regular input: produced upstream in the pipeline, or found in the input collections.

    Attributes
    ----------
    deferGraphConstraint : bool
        Do not use this input's existence to constrain the quanta (only to attach datasets).
    """

    deferGraphConstraint: bool = False  # noqa: N815


@dataclasses.dataclass(frozen=True)
class PrerequisiteInput(BaseInput):
    """An input that must exist before the pipeline runs (never produced by a task in it).

    Attributes
    ----------
    lookupFunction : callable, optional
        ``f(dataset_type, butler, quantum_data_id, collections) -> list[DatasetRef]`` replacing
        the default lookup (datasets whose data IDs match the quantum's).
    """

    lookupFunction: Callable[..., Any] | None = None  # noqa: N815


@dataclasses.dataclass(frozen=True)
class Output(DimensionedConnection):
    """An output; its dimensions must be a subset of the quantum dimensions."""


@dataclasses.dataclass(frozen=True)
class InitInput(BaseConnection):
    """A dimensionless dataset read when the task is constructed (e.g. an upstream schema)."""


@dataclasses.dataclass(frozen=True)
class InitOutput(BaseConnection):
    """A dimensionless dataset written once per task (e.g. an output schema)."""


_KIND_OF: list[tuple[type, str]] = [
    (InitInput, "initInputs"),
    (InitOutput, "initOutputs"),
    (PrerequisiteInput, "prerequisiteInputs"),
    (Input, "inputs"),
    (Output, "outputs"),
]


class PipelineTaskConnectionsMetaclass(type):
    """Collects connection declarations and the ``dimensions``/``defaultTemplates`` keywords."""

    def __new__(mcs, name: str, bases: tuple[type, ...], dct: dict[str, Any], **kwargs: Any) -> type:
        dimensions = kwargs.pop("dimensions", None)
        templates = kwargs.pop("defaultTemplates", None)
        if kwargs:
            raise ConnectionDefinitionError(
                f"{name}: unknown class keyword(s) {sorted(kwargs)}; use dimensions=(...) and defaultTemplates={{...}}"
            )
        cls = super().__new__(mcs, name, bases, dct)
        connections: dict[str, BaseConnection] = {}
        inherited_templates: dict[str, str] = {}
        inherited_dims: tuple[str, ...] | None = None
        for base in reversed(cls.__mro__[1:]):
            if isinstance(base, PipelineTaskConnectionsMetaclass):
                connections.update(base.allConnections)
                inherited_templates.update(base.defaultTemplates)
                inherited_dims = tuple(base.dimensions)
        reserved = set(dir(_ConnectionsBase)) | set(_ConnectionsBase.__annotations__)
        for attr, value in dct.items():
            if isinstance(value, BaseConnection):
                if attr in reserved or attr.startswith("_"):
                    raise ConnectionDefinitionError(f"{name}: connection name {attr!r} is reserved; choose another")
                connections[attr] = value
        if dimensions is None:
            dims = inherited_dims if inherited_dims is not None else ()
        else:
            if isinstance(dimensions, str):
                raise ConnectionDefinitionError(
                    f"{name}: dimensions must be an iterable of names, got the string {dimensions!r} "
                    "(a missing trailing comma in a 1-tuple?)"
                )
            dims = tuple(dimensions)
            if not all(isinstance(d, str) for d in dims):
                raise ConnectionDefinitionError(f"{name}: dimensions must be strings, got {dims!r}")
        if templates is not None:
            if not isinstance(templates, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in templates.items()
            ):
                raise ConnectionDefinitionError(f"{name}: defaultTemplates must map template names to strings")
            inherited_templates.update(templates)
        for attr, conn in connections.items():
            missing = template_fields(conn.name) - set(inherited_templates)
            if missing:
                raise ConnectionDefinitionError(
                    f"{name}.{attr}: name {conn.name!r} uses template(s) {sorted(missing)} that defaultTemplates "
                    f"does not define (defined: {sorted(inherited_templates) or 'none'})"
                )
        clash = set(inherited_templates) & set(connections)
        if clash:
            raise ConnectionDefinitionError(f"{name}: template names {sorted(clash)} are also connection names")
        cls.allConnections = dict(connections)
        cls.dimensions = dims
        cls.defaultTemplates = dict(inherited_templates)
        for kind in CONNECTION_KINDS:
            setattr(cls, kind, frozenset(n for n, c in connections.items() if _kind(c) == kind))
        cls._config_class = None
        return cls


def _kind(conn: BaseConnection) -> str:
    for klass, kind in _KIND_OF:
        if isinstance(conn, klass):
            return kind
    raise ConnectionDefinitionError(f"unknown connection type {type(conn).__name__}")


class _ConnectionsBase:
    """Attributes every connections instance has (their names cannot be connection names)."""

    config: Any
    dimensions: Any
    defaultTemplates: Any
    allConnections: Any
    inputs: Any
    prerequisiteInputs: Any
    outputs: Any
    initInputs: Any
    initOutputs: Any

    def adjustQuantum(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        raise NotImplementedError

    def connections_of(self, kind: str) -> Any:
        raise NotImplementedError

    def get(self, name: str) -> Any:
        raise NotImplementedError

    def resolved_templates(self) -> Any:
        raise NotImplementedError

    def _make_config_class(self) -> Any:
        raise NotImplementedError


class PipelineTaskConnections(_ConnectionsBase, metaclass=PipelineTaskConnectionsMetaclass):
    """Base class of a task's connections.

    Parameters
    ----------
    config : PipelineTaskConfig, optional
        The task config; its ``connections`` sub-config renames connections and sets templates.
        Without it the declared defaults are used.

    Attributes
    ----------
    dimensions : set of str
        The quantum dimensions (a subclass ``__init__`` may change them).
    inputs, prerequisiteInputs, outputs, initInputs, initOutputs : set of str
        Names of the connections of each kind still in use; a subclass ``__init__`` may remove
        names to drop optional connections (or ``del self.name``).
    """

    allConnections: ClassVar[dict[str, BaseConnection]]
    defaultTemplates: ClassVar[dict[str, str]]

    def __init__(self, *, config: Any = None) -> None:
        cls = type(self)
        object.__setattr__(self, "config", config)
        for kind in CONNECTION_KINDS:
            object.__setattr__(self, kind, set(getattr(cls, kind)))
        object.__setattr__(self, "dimensions", set(cls.dimensions))
        templates = dict(cls.defaultTemplates)
        names = {attr: conn.name for attr, conn in cls.allConnections.items()}
        conn_config = getattr(config, "connections", None) if config is not None else None
        if conn_config is not None:
            for key in templates:
                templates[key] = getattr(conn_config, key)
            for attr in names:
                names[attr] = getattr(conn_config, attr)
        resolved: dict[str, BaseConnection] = {}
        for attr, conn in cls.allConnections.items():
            try:
                final = names[attr].format(**templates)
            except KeyError as exc:
                raise ConnectionDefinitionError(
                    f"{cls.__name__}.{attr}: name {names[attr]!r} uses template {exc.args[0]!r}, which is not "
                    f"defined (templates: {sorted(templates) or 'none'})"
                ) from None
            except (ValueError, IndexError) as exc:
                raise ConnectionDefinitionError(f"{cls.__name__}.{attr}: bad name template {names[attr]!r}: {exc}") from None
            resolved[attr] = dataclasses.replace(conn, name=final) if final != conn.name else conn
            object.__setattr__(self, attr, resolved[attr])
        object.__setattr__(self, "_resolved", resolved)
        object.__setattr__(self, "_templates", templates)

    def __delattr__(self, name: str) -> None:
        if name in type(self).allConnections:
            for kind in CONNECTION_KINDS:
                getattr(self, kind).discard(name)
            self._resolved.pop(name, None)
            if name in self.__dict__:
                object.__delattr__(self, name)
            return
        object.__delattr__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).allConnections:
            raise ConnectionDefinitionError(
                f"{type(self).__name__}.{name}: connections cannot be replaced on an instance; rename them "
                "through the config (connections.{name} = ...) or remove them (del self.{name})"
            )
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ resolved views
    def resolved_templates(self) -> dict[str, str]:
        """The template values in effect (defaults updated by the config)."""
        return dict(self._templates)

    def connections_of(self, kind: str) -> dict[str, BaseConnection]:
        """``{attribute name: resolved connection}`` of one kind, in declaration order.

        Parameters
        ----------
        kind : str
            One of :data:`CONNECTION_KINDS`.
        """
        if kind not in CONNECTION_KINDS:
            raise ValueError(f"unknown connection kind {kind!r}; use one of {CONNECTION_KINDS}")
        names = getattr(self, kind)
        unknown = names - set(self._resolved)
        if unknown:
            raise ConnectionDefinitionError(
                f"{type(self).__name__}.{kind} names {sorted(unknown)}, which are not (or no longer) connections"
            )
        return {attr: conn for attr, conn in self._resolved.items() if attr in names}

    def get(self, name: str) -> BaseConnection:
        """A resolved connection by attribute name."""
        try:
            return self._resolved[name]
        except KeyError:
            raise ConnectionDefinitionError(
                f"{type(self).__name__} has no connection {name!r}; connections: {', '.join(self._resolved) or 'none'}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolved)

    def adjustQuantum(  # noqa: N802 - LSST's name
        self,
        inputs: dict[str, tuple[BaseConnection, list[Any]]],
        outputs: dict[str, tuple[BaseConnection, list[Any]]],
        label: str,
        data_id: Mapping[str, Any],
    ) -> tuple[dict[str, tuple[BaseConnection, list[Any]]], dict[str, tuple[BaseConnection, list[Any]]]]:
        """Hook to edit a quantum's refs while the graph is built (default: unchanged).

        Override to drop inputs that cannot be used; raise :class:`~pipeline.errors.NoWorkFound`
        to prune the quantum.  ``minimum`` has already been checked.
        """
        return inputs, outputs

    @classmethod
    def _make_config_class(cls) -> type:
        """The ``connections`` sub-config class: a ``str`` field per connection and template."""
        if cls.__dict__.get("_config_class") is not None:
            return cls._config_class
        import pydantic

        from .config import ConnectionsConfig

        fields: dict[str, Any] = {}
        for attr, conn in cls.allConnections.items():
            fields[attr] = (str, pydantic.Field(default=conn.name, description=conn.doc or f"Dataset type name of {attr}"))
        for key, value in cls.defaultTemplates.items():
            fields[key] = (str, pydantic.Field(default=value, description=f"Name template {{{key}}}"))
        with warnings.catch_warnings():
            # Connection names such as "schema" shadow deprecated pydantic methods; harmless here.
            warnings.filterwarnings("ignore", message="Field name .* shadows an attribute", category=UserWarning)
            config_class = pydantic.create_model(
                f"{cls.__name__}Config", __base__=ConnectionsConfig, __module__=cls.__module__, **fields
            )
        cls._config_class = config_class
        return config_class
