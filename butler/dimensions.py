"""The dimension universe and data IDs.

A *dimension* (instrument, visit, detector, band, skymap, tract, patch, ...) has one primary key;
it may *require* other dimensions (part of its identity: a detector is instrument + id) and *imply*
others (a visit's record names its physical_filter, which names a band).  The universe is data,
read from ``butler/config/dimensions.yaml``.

A *data ID* is a plain ``dict`` mapping dimension names to key values (``{"instrument": "SimCam",
"visit": 12, "detector": 3}``).  :meth:`DimensionUniverse.normalize` checks one against a set of
dimensions: every required key present, no unknown key, values of the right type and safe to use in
file paths.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import DataIdError, DimensionNameError

__all__ = ["FieldSpec", "Dimension", "SpatialElement", "DimensionUniverse", "DataId", "default_universe"]

DataId = dict[str, Any]

_TYPES: dict[str, type] = {"str": str, "int": int, "float": float}
# Characters allowed in string key values: they become parts of file paths.
_SAFE_STRING = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-~ ]*$")


@dataclass(frozen=True)
class FieldSpec:
    """A record field of a dimension (``visit.seeing``)."""

    name: str
    type: str
    doc: str = ""

    @property
    def python_type(self) -> type:
        """The Python type of the field's values."""
        return _TYPES[self.type]


@dataclass(frozen=True)
class Dimension:
    """One dimension of the universe."""

    name: str
    key_name: str
    key_type: str
    requires: tuple[str, ...] = ()
    implies: tuple[str, ...] = ()
    fields: tuple[FieldSpec, ...] = ()
    spatial: bool = False

    @property
    def python_type(self) -> type:
        """Python type of the primary key values."""
        return _TYPES[self.key_type]

    def field(self, name: str) -> FieldSpec:
        """A record field by name; the key (``id``/``name``) counts as a field of the key's type."""
        if name == self.key_name:
            return FieldSpec(name, self.key_type, f"{self.name} primary key")
        for spec in self.fields:
            if spec.name == name:
                return spec
        known = [self.key_name, *(f.name for f in self.fields)]
        raise DimensionNameError(f"dimension {self.name!r} has no field {name!r}; its fields: {known}")


@dataclass(frozen=True)
class SpatialElement:
    """A spatial element that is not a dimension (``visit_detector_region``)."""

    name: str
    requires: tuple[str, ...]


@dataclass(frozen=True)
class DimensionUniverse:
    """All dimensions known to a repository, in dependency order."""

    dimensions: Mapping[str, Dimension]
    elements: Mapping[str, SpatialElement] = field(default_factory=dict)
    htm_level: int = 7
    version: int = 1

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "dimension config") -> DimensionUniverse:
        """Build from parsed YAML; ``source`` names the file in error messages."""
        try:
            dims: dict[str, Dimension] = {}
            for name, spec in config["dimensions"].items():
                key = spec["key"]
                if key["type"] not in _TYPES:
                    raise DimensionNameError(f"{source}: dimension {name!r} key type {key['type']!r} unknown")
                fields = tuple(
                    FieldSpec(fname, fspec["type"], fspec.get("doc", ""))
                    for fname, fspec in (spec.get("fields") or {}).items()
                )
                dims[name] = Dimension(
                    name=name,
                    key_name=key["name"],
                    key_type=key["type"],
                    requires=tuple(spec.get("requires", ())),
                    implies=tuple(spec.get("implies", ())),
                    fields=fields,
                    spatial=bool(spec.get("spatial", False)),
                )
            elements = {
                name: SpatialElement(name, tuple(spec["requires"]))
                for name, spec in (config.get("elements") or {}).items()
            }
        except (KeyError, TypeError, AttributeError) as exc:
            raise DimensionNameError(f"{source}: malformed dimension universe ({exc!r})") from None
        for dim in dims.values():
            for other in (*dim.requires, *dim.implies):
                if other not in dims:
                    raise DimensionNameError(f"{source}: dimension {dim.name!r} refers to unknown {other!r}")
        return cls(dims, elements, int(config.get("htm_level", 7)), int(config.get("version", 1)))

    @classmethod
    def from_yaml(cls, path: str | Path) -> DimensionUniverse:
        """Read a universe from a YAML file."""
        with open(path, encoding="utf-8") as stream:
            return cls.from_config(yaml.safe_load(stream), source=str(path))

    def to_config(self) -> dict[str, Any]:
        """Plain data, the inverse of :meth:`from_config`."""
        dims: dict[str, Any] = {}
        for dim in self.dimensions.values():
            spec: dict[str, Any] = {"key": {"name": dim.key_name, "type": dim.key_type}}
            if dim.requires:
                spec["requires"] = list(dim.requires)
            if dim.implies:
                spec["implies"] = list(dim.implies)
            if dim.spatial:
                spec["spatial"] = True
            if dim.fields:
                spec["fields"] = {f.name: {"type": f.type, "doc": f.doc} for f in dim.fields}
            dims[dim.name] = spec
        return {
            "version": self.version,
            "htm_level": self.htm_level,
            "dimensions": dims,
            "elements": {e.name: {"requires": list(e.requires), "spatial": True} for e in self.elements.values()},
        }

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the universe's canonical configuration: equal universes have equal digests.

        Keys caches of what is derived from a universe alone (the registry's table definitions).
        """
        text = json.dumps(self.to_config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ lookups
    def __getitem__(self, name: str) -> Dimension:
        try:
            return self.dimensions[name]
        except KeyError:
            raise DimensionNameError(
                f"unknown dimension {name!r}; known dimensions: {', '.join(self.dimensions)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.dimensions

    @cached_property
    def order(self) -> dict[str, int]:
        """A dependency-respecting position for every dimension (required/implied ones first)."""
        out: dict[str, int] = {}

        def visit(name: str, stack: tuple[str, ...]) -> None:
            if name in out:
                return
            if name in stack:
                raise DimensionNameError(f"dimension cycle: {' -> '.join((*stack, name))}")
            dim = self.dimensions[name]
            for dep in (*dim.requires, *dim.implies):
                visit(dep, (*stack, name))
            out[name] = len(out)

        for name in self.dimensions:
            visit(name, ())
        return out

    def sorted(self, names: Iterable[str]) -> tuple[str, ...]:
        """Dimension names in canonical (dependency) order; unknown names raise."""
        names = set(names)
        for name in names:
            self[name]
        return tuple(sorted(names, key=self.order.__getitem__))

    @cached_property
    def _closures(self) -> dict[tuple[str, frozenset[str]], tuple[str, ...]]:
        """Memo of the closures below: a put asked for eight of them (~70 us, measured)."""
        return {}

    def _memo(self, kind: str, names: Iterable[str]) -> tuple[str, ...]:
        key = (kind, frozenset(names))
        found = self._closures.get(key)
        if found is None:
            compute = {"required": self._required, "implied": self._implied, "full": self._full}[kind]
            found = self._closures[key] = compute(key[1])
        return found

    def required_closure(self, names: Iterable[str]) -> tuple[str, ...]:
        """The names plus everything they require, recursively (the keys of a full data ID)."""
        return self._memo("required", names)

    def implied_closure(self, names: Iterable[str]) -> tuple[str, ...]:
        """Dimensions implied (recursively, through requires too) by the names and not among them."""
        return self._memo("implied", names)

    def full_closure(self, names: Iterable[str]) -> tuple[str, ...]:
        """Required and implied dimensions of ``names``."""
        return self._memo("full", names)

    def _required(self, names: frozenset[str]) -> tuple[str, ...]:
        out: set[str] = set()
        todo = list(names)
        while todo:
            dim = self[todo.pop()]
            if dim.name not in out:
                out.add(dim.name)
                todo.extend(dim.requires)
        return self.sorted(out)

    def _implied(self, names: frozenset[str]) -> tuple[str, ...]:
        required = set(self.required_closure(names))
        out: set[str] = set()
        todo = [imp for name in required for imp in self.dimensions[name].implies]
        while todo:
            name = todo.pop()
            if name in out or name in required:
                continue
            out.add(name)
            dim = self.dimensions[name]
            todo.extend(dim.implies)
            todo.extend(dim.requires)
        return self.sorted(out - required)

    def _full(self, names: frozenset[str]) -> tuple[str, ...]:
        return self.sorted({*self.required_closure(names), *self.implied_closure(names)})

    def spatial_element_for(self, names: Iterable[str]) -> str | None:
        """The most specific spatial element covered by a set of dimensions, if any."""
        names = set(self.required_closure(names))
        for element in self.elements.values():
            if set(element.requires) <= names:
                return element.name
        for name in sorted(names, key=self.order.__getitem__, reverse=True):
            if self.dimensions[name].spatial:
                return name
        return None

    # ------------------------------------------------------------------ data IDs
    def coerce_value(self, dimension: str, value: Any) -> Any:
        """Check and convert one data ID value to its dimension's key type.

        Raises
        ------
        DataIdError
            For a wrongly typed value, or a string that is empty or unsafe in a file path.
        """
        dim = self[dimension]
        if dim.key_type == "int":
            if isinstance(value, bool) or not hasattr(value, "__index__"):
                raise DataIdError(f"data ID key {dimension!r} must be an integer, got {value!r}")
            return int(value.__index__())
        if not isinstance(value, str):
            raise DataIdError(f"data ID key {dimension!r} must be a string, got {value!r}")
        if not _SAFE_STRING.match(value) or value in (".", ".."):
            raise DataIdError(
                f"data ID value {value!r} for {dimension!r} is empty or contains characters that are not "
                "allowed (letters, digits and _ . + - ~ space only, not starting with . or -)"
            )
        return value

    def normalize(self, dimensions: Iterable[str], data_id: Mapping[str, Any], *, where: str = "data ID") -> DataId:
        """Validate a data ID for a set of dimensions.

        Parameters
        ----------
        dimensions : iterable of str
            The dataset type's (or query's) dimensions.
        data_id : mapping
            User-supplied keys; may also hold implied dimensions (``band`` for a visit).
        where : str
            Names the dataset type in error messages.

        Returns
        -------
        dict
            Required keys in canonical order, then any implied keys the user gave.

        Raises
        ------
        DataIdError
            Missing or unknown keys, or wrongly typed values.
        """
        required = self.required_closure(dimensions)
        implied = self.implied_closure(dimensions)
        unknown = [key for key in data_id if key not in required and key not in implied]
        if unknown:
            raise DataIdError(
                f"{where}: unexpected data ID key(s) {unknown}; expected {list(required)}"
                + (f" (and optionally {list(implied)})" if implied else "")
            )
        missing = [key for key in required if key not in data_id]
        if missing:
            raise DataIdError(
                f"{where}: data ID {dict(data_id)} is missing {missing}; expected {list(required)}"
            )
        out: DataId = {key: self.coerce_value(key, data_id[key]) for key in required}
        for key in implied:
            if key in data_id:
                out[key] = self.coerce_value(key, data_id[key])
        return out


@functools.cache
def default_universe() -> DimensionUniverse:
    """The universe shipped with diapipe (``butler/config/dimensions.yaml``).

    Read once per process (parsing the YAML cost ~1.7 ms of a ~22 ms repository create, measured)
    and shared by every caller: like every universe, treat it as immutable.
    """
    text = resources.files("butler").joinpath("config/dimensions.yaml").read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~10x faster
    return DimensionUniverse.from_config(yaml.load(text, Loader=loader), source="butler/config/dimensions.yaml")
