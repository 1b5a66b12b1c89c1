"""Typed task configs on pydantic v2, with layered overrides and per-value provenance.

A config is a :class:`Config` subclass: typed fields with defaults and docs
(``pydantic.Field(default, description=...)``), ``extra="forbid"`` (a misspelt field is an error),
and ``validate_assignment=True`` (a wrong type is an error when it is set, not when it is used).

Subtasks are declared with :func:`ConfigurableField` (LSST's ``pexConfig.ConfigurableField``): the
field holds the subtask's config, and remembers the subtask class (its *target*), which
:meth:`pipeline.task.Task.makeSubtask` instantiates.

Overrides come in layers, applied in this order, later layers winning:

===============  ====================================================================
layer            where it comes from
===============  ====================================================================
``default``      the field's default
``pipeline``     a task's ``config:`` block in a pipeline YAML file (``parameters.x`` allowed)
``file``         a YAML/JSON config file (``config: {file: ...}`` or ``-C label:file``)
``command line`` ``-c label:field=value`` (the string is parsed by the field's type)
``python``       plain attribute assignment in code
===============  ====================================================================

Every value remembers the layer (and file/line or option) that set it: see
:meth:`Config.provenance` and :meth:`Config.to_dict`.  Python config files are not supported on
purpose (they are code, and cannot be checked); use YAML or JSON.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib
import json
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .errors import ConfigError

__all__ = [
    "Config",
    "Field",
    "ConfigurableField",
    "ConnectionsConfig",
    "Provenance",
    "LAYERS",
    "apply_override",
    "apply_mapping",
    "apply_config_file",
    "read_config_file",
    "parse_value_for_field",
    "type_name",
]

#: Override layers, lowest precedence first.
LAYERS = ("default", "pipeline", "file", "command line", "python")


@dataclass(frozen=True)
class Provenance:
    """Which layer set a config value, and where.

    Attributes
    ----------
    layer : str
        One of :data:`LAYERS`.
    source : str or None
        ``"file.yaml:12"``, ``"-c isr:doWrite=False"``, ... when known.
    """

    layer: str
    source: str | None = None

    def __str__(self) -> str:
        return f"{self.layer} ({self.source})" if self.source else self.layer


_DEFAULT = Provenance("default")
_PYTHON = Provenance("python")
_current: contextvars.ContextVar[Provenance] = contextvars.ContextVar("config_layer", default=_PYTHON)


@contextmanager
def _layer(provenance: Provenance) -> Iterator[None]:
    token = _current.set(provenance)
    try:
        yield
    finally:
        _current.reset(token)


def type_name(cls: type) -> str:
    """``module.QualName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path 'module.Class'")
    obj: Any = importlib.import_module(module_name)
    return getattr(obj, attr) if hasattr(obj, attr) else _raise_attr(module_name, attr)


def _raise_attr(module: str, attr: str) -> Any:
    raise ImportError(f"module {module!r} has no attribute {attr!r}")


class _ConfigurableFieldSpec:
    """Placeholder left in a class body by :func:`ConfigurableField`; the metaclass turns it into a field."""

    def __init__(self, target: type, doc: str) -> None:
        self.target = target
        self.doc = doc


def ConfigurableField(target: type, doc: str = "") -> Any:  # noqa: N802 - LSST's name
    """Declare a subtask field: it holds ``target.ConfigClass()`` and remembers ``target``.

    Parameters
    ----------
    target : type
        The subtask class (a :class:`~pipeline.task.Task` subclass with a ``ConfigClass``).
    doc : str
        What the subtask does.

    Examples
    --------
    >>> class ParentConfig(Config):                       # doctest: +SKIP
    ...     detection = ConfigurableField(target=DetectTask, doc="Source detection")
    """
    if not isinstance(target, type) or not hasattr(target, "ConfigClass"):
        raise TypeError(f"ConfigurableField target must be a Task class with a ConfigClass, got {target!r}")
    return _ConfigurableFieldSpec(target, doc)


def _make_subconfig(target: type) -> Config:
    config = target.ConfigClass()
    config._target = target
    return config


class _ConfigMeta(type(BaseModel)):  # type: ignore[misc]
    """Turns :func:`ConfigurableField` placeholders into fields and adds a ``connections`` field
    for ``class C(PipelineTaskConfig, pipelineConnections=MyConnections)``."""

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> type:
        connections_class = kwargs.pop("pipelineConnections", None)
        annotations = namespace.setdefault("__annotations__", {})
        subtask_targets: dict[str, type] = {}
        for attr, value in list(namespace.items()):
            if isinstance(value, _ConfigurableFieldSpec):
                annotations[attr] = Config
                namespace[attr] = Field(
                    default_factory=lambda target=value.target: _make_subconfig(target), description=value.doc
                )
                subtask_targets[attr] = value.target
        if connections_class is not None:
            make = getattr(connections_class, "_make_config_class", None)
            if make is None:
                raise TypeError(f"pipelineConnections must be a PipelineTaskConnections subclass, got {connections_class!r}")
            conn_config = make()
            annotations["connections"] = conn_config
            namespace["connections"] = Field(
                default_factory=conn_config,
                description="Dataset type names of the task's connections, and name templates",
            )
            namespace["ConnectionsClass"] = connections_class
        cls = super().__new__(mcs, name, bases, namespace, **kwargs)
        inherited: dict[str, type] = {}
        for base in reversed(cls.__mro__[1:]):
            inherited.update(getattr(base, "_subtask_targets", {}) or {})
        inherited.update(subtask_targets)
        type.__setattr__(cls, "_subtask_targets", inherited)
        return cls


class Config(BaseModel, metaclass=_ConfigMeta):
    """Base class of task configs.

    Declare fields with type annotations and ``Field(default, description=...)``; declare
    subtasks with :func:`ConfigurableField`.  Override :meth:`validate` for checks that involve
    several fields (call ``super().validate()``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    _subtask_targets: ClassVar[dict[str, type]] = {}
    _provenance: dict[str, Provenance] = PrivateAttr(default_factory=dict)
    _frozen: bool = PrivateAttr(default=False)
    _target: Any = PrivateAttr(default=None)

    # ------------------------------------------------------------------ assignment and provenance
    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
            return
        if self._frozen:
            raise ConfigError(
                f"{type(self).__name__} is frozen (tasks are built from frozen configs); cannot set {name!r}",
                field=name,
            )
        if isinstance(value, Config) and name in type(self).model_fields:
            current = getattr(self, name, None)
            if isinstance(current, Config) and value._target is None:
                value._target = current._target
        super().__setattr__(name, value)
        self._provenance[name] = _current.get()

    def provenance(self, path: str) -> Provenance:
        """The layer that set a field (dotted path into nested configs), ``default`` if none did."""
        obj, last = self._resolve(path)
        return obj._provenance.get(last, _DEFAULT)

    def provenance_dict(self, prefix: str = "") -> dict[str, str]:
        """``{dotted field: "layer (source)"}`` for every field not at its default."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in self._provenance:
                out[prefix + name] = str(self._provenance[name])
            if isinstance(value, Config):
                out.update(value.provenance_dict(f"{prefix}{name}."))
        return out

    def _resolve(self, path: str) -> tuple[Config, str]:
        parts = path.split(".")
        obj: Config = self
        for part in parts[:-1]:
            value = getattr(obj, part, None) if part in type(obj).model_fields else None
            if not isinstance(value, Config):
                raise ConfigError(f"{type(obj).__name__} has no nested config {part!r} (in {path!r})", field=path)
            obj = value
        return obj, parts[-1]

    # ------------------------------------------------------------------ subtasks
    @property
    def target(self) -> type | None:
        """For a subtask config: the task class that :meth:`Task.makeSubtask` will build."""
        return self._target

    def retarget(self, name: str, target: type, ConfigClass: type | None = None) -> None:  # noqa: N803
        """Make subtask field ``name`` build ``target`` (with a fresh ``target.ConfigClass`` config)."""
        if name not in type(self).model_fields or not isinstance(getattr(self, name), Config):
            raise ConfigError(f"{type(self).__name__} has no subtask field {name!r}", field=name)
        config = (ConfigClass or target.ConfigClass)()
        config._target = target
        setattr(self, name, config)

    # ------------------------------------------------------------------ validation and freezing
    def validate(self) -> None:  # type: ignore[override]
        """Check relations between fields; the default validates nested configs.

        Raise ``ValueError`` (or :class:`~pipeline.errors.ConfigError`) with a clear message.
        """
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Config):
                value.validate()

    def freeze(self) -> None:
        """Forbid further assignments (recursively)."""
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Config):
                value.freeze()
        self._frozen = True

    @property
    def frozen(self) -> bool:
        """True once :meth:`freeze` was called."""
        return self._frozen

    def copy_config(self) -> Config:
        """A deep, unfrozen copy keeping provenance and subtask targets."""
        new = self.model_copy(deep=True)
        new._unfreeze()
        return new

    def _unfreeze(self) -> None:
        self._frozen = False
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Config):
                value._unfreeze()

    # ------------------------------------------------------------------ serialization
    def to_dict(self, *, targets: bool = True) -> dict[str, Any]:
        """Plain JSON/YAML-able data; subtask configs carry ``_target`` (their task class path)."""
        nested = {name for name in type(self).model_fields if isinstance(getattr(self, name), Config)}
        out: dict[str, Any] = self.model_dump(mode="json", exclude=nested) if len(nested) < len(type(self).model_fields) else {}
        result: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in nested:
                sub = getattr(self, name)
                data = sub.to_dict(targets=targets)
                if targets and sub._target is not None:
                    data = {"_target": type_name(sub._target), **data}
                result[name] = data
            else:
                result[name] = out[name]
        return result

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, layer: str = "file", source: str | None = None) -> Config:
        """A config of this class with ``data`` applied (the inverse of :meth:`to_dict`)."""
        config = cls()
        apply_mapping(config, data, layer=layer, source=source)
        return config

    @classmethod
    def field_doc(cls, name: str) -> str:
        """The documentation of a field."""
        field = cls.model_fields.get(name)
        if field is None:
            raise ConfigError(f"{cls.__name__} has no field {name!r}", field=name)
        return field.description or ""


class ConnectionsConfig(Config):
    """Base of the generated ``connections`` sub-config: one ``str`` field per connection (the
    dataset type name) and one per name template (``coaddName``)."""


# ---------------------------------------------------------------------- applying overrides
def _accepts_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _accepts_str(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return False


def parse_value_for_field(config: Config, name: str, text: str) -> Any:
    """Parse a command-line string for field ``name`` by the field's type.

    String fields take the text as is (``none``/``null`` give None for optional strings); other
    fields parse it as a YAML scalar or flow collection (``3``, ``1.5e-3``, ``true``, ``[1, 2]``,
    ``{a: 1}``), and pydantic then checks and converts it.
    """
    field = type(config).model_fields[name]
    annotation = field.annotation
    if _accepts_str(annotation):
        optional = type(None) in typing.get_args(annotation)
        if optional and text.strip().lower() in ("none", "null", "~"):
            return None
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _field_list(config: Config) -> str:
    return ", ".join(type(config).model_fields) or "none"


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def apply_override(
    config: Config,
    path: str,
    value: Any,
    *,
    layer: str,
    source: str | None = None,
    label: str | None = None,
    file: str | None = None,
    line: int | None = None,
    parse_strings: bool = False,
    prefix: str = "",
) -> None:
    """Set one (dotted) field of a config, recording the layer that set it.

    Parameters
    ----------
    config : Config
        The task's config (modified in place).
    path : str
        ``"field"``, ``"subtask.field"``, ``"connections.calexp"`` or ``"dictField.key"``.
    value : object
        The value; a mapping assigned to a nested config sets its fields one by one (a
        ``_target: module.Class`` entry in it retargets the subtask first).
    layer : str
        One of :data:`LAYERS`.
    source, label, file, line : optional
        For provenance and error messages.
    parse_strings : bool
        Parse a string value by the field's type (``-c`` overrides).
    prefix : str
        Dotted path of ``config`` inside the task's config (for messages).

    Raises
    ------
    ConfigError
        Unknown field (with the list of fields), wrong type, frozen config; the message names the
        task label, the field, the layer and the file/line when given.
    """
    if layer not in LAYERS:
        raise ValueError(f"unknown config layer {layer!r}; use one of {LAYERS}")
    where = f"task {label!r}: " if label else ""
    full = prefix + path

    def fail(problem: str) -> ConfigError:
        by = f"the {layer}" + (f" {source}" if source and not file else "")
        return ConfigError(
            f"{where}config field {full!r} (set by {by}): {problem}",
            file=file,
            line=line,
            label=label,
            field=full,
            layer=layer,
        )

    parts = path.split(".")
    if not all(parts):
        raise fail("empty field name")
    obj: Config = config
    for i, part in enumerate(parts[:-1]):
        fields = type(obj).model_fields
        if part not in fields:
            raise fail(f"{type(obj).__name__} has no field {part!r}{_suggest(part, fields)}; fields: {_field_list(obj)}")
        current = getattr(obj, part)
        if isinstance(current, Config):
            obj = current
            continue
        if isinstance(current, dict) and i == len(parts) - 2:
            item = parts[-1]
            if parse_strings and isinstance(value, str):
                value = yaml_scalar(value)
            _assign(obj, part, {**current, item: value}, layer, source, file, line, fail)
            return
        raise fail(f"{type(obj).__name__}.{part} is a {type(current).__name__}, not a nested config")
    name = parts[-1]
    fields = type(obj).model_fields
    if name not in fields:
        raise fail(f"{type(obj).__name__} has no field {name!r}{_suggest(name, fields)}; fields: {_field_list(obj)}")
    current = getattr(obj, name)
    if isinstance(current, Config):
        if isinstance(value, Config):
            _assign(obj, name, value, layer, source, file, line, fail)
            return
        if not isinstance(value, Mapping):
            raise fail(f"{type(obj).__name__}.{name} is a nested config; give it a mapping of its fields, not {value!r}")
        target = value.get("_target")
        if isinstance(target, str) and (current._target is None or type_name(current._target) != target):
            try:
                cls = _import_class(target)
            except (ImportError, AttributeError, ValueError) as exc:
                raise fail(f"cannot import subtask target {target!r}: {exc}") from None
            if not hasattr(cls, "ConfigClass"):
                raise fail(f"subtask target {target!r} is not a Task (no ConfigClass)")
            with _layer(Provenance(layer, _src(source, file, line))):
                obj.retarget(name, cls)
            current = getattr(obj, name)
        apply_mapping(
            current,
            value,
            layer=layer,
            source=source,
            label=label,
            file=file,
            line=line,
            prefix=f"{full}.",
        )
        return
    if parse_strings and isinstance(value, str):
        value = parse_value_for_field(obj, name, value)
    _assign(obj, name, value, layer, source, file, line, fail)


def yaml_scalar(text: str) -> Any:
    """Parse a command-line value as YAML (``3``, ``true``, ``[1, 2]``), or keep the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _src(source: str | None, file: str | None, line: int | None) -> str | None:
    if source:
        return source
    if file:
        return f"{file}:{line}" if line else file
    return None


def _assign(
    obj: Config,
    name: str,
    value: Any,
    layer: str,
    source: str | None,
    file: str | None,
    line: int | None,
    fail: Callable[[str], ConfigError],
) -> None:
    try:
        with _layer(Provenance(layer, _src(source, file, line))):
            setattr(obj, name, value)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        annotation = type(obj).model_fields[name].annotation
        raise fail(f"{err['msg']} (got {value!r}; expected {_annotation_text(annotation)})") from None
    except ConfigError as exc:
        raise fail(exc.message) from None


def _annotation_text(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def apply_mapping(
    config: Config,
    data: Mapping[str, Any],
    *,
    layer: str,
    source: str | None = None,
    label: str | None = None,
    file: str | None = None,
    line: int | None = None,
    prefix: str = "",
    parameters: Mapping[str, Any] | None = None,
) -> None:
    """Apply a mapping of (dotted or nested) field names to values, in order.

    Parameters
    ----------
    data : mapping
        ``{"field": value, "sub.field": value, "sub": {"field": value}}``.  Mappings read by
        :mod:`pipeline.yaml_loader` carry the line of each key, used in error messages.
    parameters : mapping, optional
        Pipeline parameters: string values ``"parameters.NAME"`` are replaced by their value; an
        undefined name is an error.

    Notes
    -----
    A ``_target`` key names the subtask class of a nested mapping; it is handled by the parent
    (see :func:`apply_override`) and ignored here.
    """
    key_lines = getattr(data, "key_lines", None) or {}
    for key, value in data.items():
        if key == "_target":
            continue
        key_line = key_lines.get(key, line)
        if not isinstance(key, str):
            raise ConfigError(
                f"task {label!r}: config keys must be strings, got {key!r}",
                file=file,
                line=key_line,
                label=label,
                layer=layer,
            )
        if parameters is not None:
            value = substitute_parameters(value, parameters, label=label, key=prefix + key, file=file, line=key_line)
        apply_override(
            config, key, value, layer=layer, source=source, label=label, file=file, line=key_line, prefix=prefix
        )


def substitute_parameters(
    value: Any,
    parameters: Mapping[str, Any],
    *,
    label: str | None,
    key: str,
    file: str | None,
    line: int | None,
) -> Any:
    """Replace a ``"parameters.NAME"`` string by the pipeline parameter's value (recursively)."""
    if isinstance(value, str) and value.startswith("parameters."):
        name = value[len("parameters.") :]
        if name not in parameters:
            known = ", ".join(sorted(parameters)) or "none defined"
            raise ConfigError(
                f"task {label!r}: config field {key!r} uses pipeline parameter {name!r}, which is not defined "
                f"(parameters: {known}); add it under 'parameters:'",
                file=file,
                line=line,
                label=label,
                field=key,
                layer="pipeline",
            )
        return parameters[name]
    if isinstance(value, Mapping):
        from .yaml_loader import LocatedDict

        sub_lines = getattr(value, "key_lines", {})
        items = {
            k: substitute_parameters(v, parameters, label=label, key=f"{key}.{k}", file=file, line=sub_lines.get(k, line))
            for k, v in value.items()
        }
        return value.copy_with(items) if isinstance(value, LocatedDict) else items
    if isinstance(value, list):
        return [substitute_parameters(v, parameters, label=label, key=key, file=file, line=line) for v in value]
    return value


# ---------------------------------------------------------------------- config files
def read_config_file(path: str | Path) -> Mapping[str, Any]:
    """Read a YAML or JSON config override file (a mapping); key lines are kept for errors.

    Raises
    ------
    ConfigError
        Python files (not supported: use YAML/JSON), missing files, syntax errors, non-mappings.
    """
    from .yaml_loader import load_yaml_file

    path = Path(path)
    if path.suffix == ".py":
        raise ConfigError(
            "Python config files are not supported (they are code); write the overrides as YAML or JSON",
            file=str(path),
            layer="file",
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", file=str(path), layer="file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON: {exc.msg}", file=str(path), line=exc.lineno, layer="file") from None
    else:
        data = load_yaml_file(path, what="config file")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("a config file must hold a mapping of field names to values", file=str(path), layer="file")
    return data


def apply_config_file(config: Config, path: str | Path, *, label: str | None = None) -> None:
    """Apply a YAML/JSON config file to a config (layer ``file``)."""
    data = read_config_file(path)
    apply_mapping(config, data, layer="file", label=label, file=str(path))
