"""Pipelines: LSST's pipeline YAML, config layering, and expansion into ordered ``TaskDef``\\ s.

The YAML format is LSST's::

    description: Difference imaging
    parameters:
      coaddName: goodSeeing
    imports:
      - location: $DIAPIPE_PIPELINES/Coadd.yaml      # relative to this file, or $ENV
        exclude: [forcedPhotCoadd]                     # labels or subsets (or include: [...])
        importContracts: true
    tasks:
      isr: mypkg.isr.IsrTask                           # label: class path
      diff:
        class: mypkg.diff.ImageDifferenceTask
        config:                                        # a mapping, or a list of mappings
          connections.coaddName: parameters.coaddName  # pipeline parameters
          kernel.order: 2
          file: overrides/diff.yaml                    # a YAML/JSON config file (no Python)
    subsets:
      front: [isr, diff]
      back: {subset: [detect], description: Detection}
    contracts:
      - contract: diff.kernel.order <= 3
        msg: kernel order above 3 is unstable

``Pipeline.from_uri("DIA.yaml#front,detect")`` selects labels and subsets.  Errors name the file
and line (YAML is read with line numbers), the task label, and the config field and layer.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, apply_config_file, apply_mapping, apply_override, type_name
from .contracts import Contract, check_contracts, contract_names, parse_contract
from .errors import (
    ConfigError,
    ConnectionDefinitionError,
    PipelineDefinitionError,
    TaskImportError,
)
from .yaml_loader import LocatedDict, LocatedList, item_line, line_of, load_yaml_file, load_yaml_text

__all__ = [
    "Pipeline",
    "TaskDef",
    "TaskSpec",
    "ConfigBlock",
    "LabeledSubset",
    "DatasetTypeSpec",
    "METADATA_CONNECTION",
    "CONFIG_CONNECTION",
    "import_task_class",
    "parse_cli_config_override",
    "parse_cli_config_file",
]

_log = logging.getLogger(__name__)

#: Connection name of the automatic per-quantum metadata output (``{label}_metadata``).
METADATA_CONNECTION = "_metadata"
#: Connection name of the automatic per-task config init-output (``{label}_config``).
CONFIG_CONNECTION = "_config"

_TOP_KEYS = ("description", "instrument", "parameters", "imports", "tasks", "subsets", "contracts", "steps")
_TASK_KEYS = ("class", "config")
_IMPORT_KEYS = ("location", "include", "exclude", "importContracts", "instrument", "labeledSubsetModifyMode")
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


# ---------------------------------------------------------------------- small records
@dataclass
class ConfigBlock:
    """One source of config overrides for a task, applied in order.

    Attributes
    ----------
    layer : str
        ``pipeline``, ``file``, ``command line`` or ``python``.
    values : mapping or None
        Field -> value overrides (dotted or nested keys).
    path : str or None
        A YAML/JSON config file to apply instead of ``values``.
    file, line : optional
        Where the block was written (for errors).
    source : str or None
        How it was given (``"-c diff:kernel.order=3"``), for provenance.
    parse_strings : bool
        Parse string values by field type (command-line overrides).
    """

    layer: str
    values: Mapping[str, Any] | None = None
    path: str | None = None
    file: str | None = None
    line: int | None = None
    source: str | None = None
    parse_strings: bool = False

    def to_primitive(self) -> Any:
        """YAML-able form (as in a pipeline's ``config:`` list)."""
        if self.path is not None:
            return {"file": self.path}
        return dict(self.values or {})


@dataclass
class TaskSpec:
    """A task as declared in a pipeline, before it is imported and configured."""

    label: str
    class_path: str | None
    task_class: type | None = None
    config_blocks: list[ConfigBlock] = field(default_factory=list)
    file: str | None = None
    line: int | None = None

    @property
    def location(self) -> str:
        """``file:line`` of the label, or ``"(python)"``."""
        if self.file is None:
            return "(python)"
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass
class LabeledSubset:
    """A named set of task labels."""

    name: str
    labels: list[str]
    description: str | None = None
    file: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class DatasetTypeSpec:
    """A dataset type as a connection declares it: name, dimensions (required closure), storage class."""

    name: str
    dimensions: tuple[str, ...]
    storage_class: str

    def to_dataset_type(self) -> Any:
        """The butler :class:`~butler.refs.DatasetType`."""
        from butler.refs import DatasetType

        return DatasetType(self.name, self.dimensions, self.storage_class)


@dataclass
class TaskDef:
    """A configured task of an expanded pipeline.

    Attributes
    ----------
    label : str
    task_class : type
        A :class:`~pipeline.pipeline_task.PipelineTask` subclass.
    config : PipelineTaskConfig
        Frozen, validated config (with provenance of every overridden value).
    connections : PipelineTaskConnections
        Connections built from the config (names resolved, optional ones dropped).
    source : str
        ``file:line`` where the label is defined, for messages.
    """

    label: str
    task_class: type
    config: Config
    connections: Any
    source: str = "(python)"

    @property
    def taskName(self) -> str:  # noqa: N802 - LSST's name
        """Dotted path of the task class."""
        return type_name(self.task_class)

    @property
    def metadata_dataset_name(self) -> str:
        """``{label}_metadata``."""
        return f"{self.label}_metadata"

    @property
    def config_dataset_name(self) -> str:
        """``{label}_config``."""
        return f"{self.label}_config"

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The quantum dimensions as declared (after the connections' ``__init__``)."""
        return tuple(self.connections.dimensions)

    def connection_specs(self, universe: Any) -> dict[str, dict[str, tuple[Any, DatasetTypeSpec]]]:
        """``{kind: {connection name: (connection, DatasetTypeSpec)}}`` with dimensions closed
        over the universe; includes the automatic ``_metadata`` output and ``_config`` init-output."""
        from .connections import CONNECTION_KINDS, InitOutput, Output

        out: dict[str, dict[str, tuple[Any, DatasetTypeSpec]]] = {}
        for kind in CONNECTION_KINDS:
            specs = {}
            for name, conn in self.connections.connections_of(kind).items():
                dims = universe.required_closure(getattr(conn, "dimensions", ()))
                specs[name] = (conn, DatasetTypeSpec(conn.name, tuple(dims), conn.storageClass))
            out[kind] = specs
        quantum_dims = tuple(universe.required_closure(self.connections.dimensions))
        if getattr(self.config, "saveMetadata", True):
            conn = Output(name=self.metadata_dataset_name, storageClass="TaskMetadata", dimensions=quantum_dims)
            out["outputs"][METADATA_CONNECTION] = (conn, DatasetTypeSpec(conn.name, quantum_dims, "TaskMetadata"))
        conn = InitOutput(name=self.config_dataset_name, storageClass="Config")
        out["initOutputs"][CONFIG_CONNECTION] = (conn, DatasetTypeSpec(conn.name, (), "Config"))
        return out

    def make_task(self, init_inputs: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Construct the task (named after its label) from the frozen config."""
        return self.task_class(config=self.config, initInputs=dict(init_inputs or {}), name=self.label, **kwargs)


# ---------------------------------------------------------------------- helpers
def import_task_class(path: str, *, label: str | None = None, file: str | None = None, line: int | None = None) -> type:
    """Import ``module.Class`` and check it is a PipelineTask.

    Raises
    ------
    TaskImportError
        With the label, file and line, and the import problem.
    """
    from .pipeline_task import PipelineTask

    where = f"task {label!r}: " if label else ""
    if not isinstance(path, str) or "." not in path:
        raise TaskImportError(
            f"{where}class {path!r} is not a dotted path 'package.module.ClassName'", file=file, line=line, label=label
        )
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskImportError(
            f"{where}cannot import task class {path!r}: {exc}; check the module path and that the package is installed",
            file=file,
            line=line,
            label=label,
        ) from None
    except Exception as exc:  # noqa: BLE001 - a broken module: report it, do not crash
        raise TaskImportError(
            f"{where}importing {module_name!r} for task class {path!r} failed: {type(exc).__name__}: {exc}",
            file=file,
            line=line,
            label=label,
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        names = [n for n in dir(module) if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), PipelineTask)]
        raise TaskImportError(
            f"{where}module {module_name!r} has no class {attr!r}"
            + (f"; its PipelineTasks: {', '.join(names)}" if names else ""),
            file=file,
            line=line,
            label=label,
        )
    if not (isinstance(cls, type) and issubclass(cls, PipelineTask)):
        raise TaskImportError(f"{where}{path!r} is not a PipelineTask subclass", file=file, line=line, label=label)
    return cls


def parse_cli_config_override(text: str) -> tuple[str, str, str]:
    """Split ``label:field.path=value`` into its parts.

    Raises
    ------
    PipelineDefinitionError
        If the text is not of that form.
    """
    label, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not label.strip() or not key.strip():
        raise PipelineDefinitionError(f"bad config override {text!r}: expected LABEL:FIELD=VALUE (e.g. isr:doWrite=False)")
    return label.strip(), key.strip(), value


def parse_cli_config_file(text: str) -> tuple[str, str]:
    """Split ``label:path/to/file.yaml``."""
    label, sep, path = text.partition(":")
    if not sep or not label.strip() or not path.strip():
        raise PipelineDefinitionError(f"bad config file option {text!r}: expected LABEL:FILE (e.g. isr:isr.yaml)")
    return label.strip(), path.strip()


def _expand_location(location: str, base_dir: Path | None) -> Path:
    expanded = os.path.expandvars(os.path.expanduser(location))
    path = Path(expanded)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


# ---------------------------------------------------------------------- the pipeline
class Pipeline:
    """An ordered set of labeled tasks with their config overrides, subsets and contracts.

    Parameters
    ----------
    description : str
        What the pipeline does.
    """

    def __init__(self, description: str = "") -> None:
        self.description = description
        self.instrument: str | None = None
        self.parameters: dict[str, Any] = {}
        self.parameter_lines: dict[str, tuple[str | None, int | None]] = {}
        self._tasks: dict[str, TaskSpec] = {}
        self.subsets: dict[str, LabeledSubset] = {}
        self.contracts: list[Contract] = []
        self.file: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_uri(cls, uri: str | Path) -> Pipeline:
        """Read a pipeline file, optionally selecting labels/subsets: ``"DIA.yaml#isr,front"``."""
        text = str(uri)
        path, _, selection = text.partition("#")
        pipeline = cls.from_file(_expand_location(path, None))
        if selection:
            pipeline = pipeline.subset([s.strip() for s in selection.split(",") if s.strip()])
        return pipeline

    @classmethod
    def from_file(cls, path: str | Path) -> Pipeline:
        """Read a pipeline YAML file (imports are resolved relative to it)."""
        return cls._from_file(Path(path), ())

    @classmethod
    def _from_file(cls, path: Path, stack: tuple[str, ...]) -> Pipeline:
        key = str(path.resolve()) if path.exists() else str(path)
        if key in stack:
            chain = " -> ".join([*stack, key])
            raise PipelineDefinitionError(f"pipeline imports form a cycle: {chain}", file=str(path))
        data = load_yaml_file(path, what="pipeline file")
        return cls._from_data(data, str(path), path.parent, (*stack, key))

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>", base_dir: str | Path | None = None) -> Pipeline:
        """Parse pipeline YAML text; ``base_dir`` resolves relative imports."""
        data = load_yaml_text(text, source)
        return cls._from_data(data, source, Path(base_dir) if base_dir is not None else None, ())

    @classmethod
    def _from_data(cls, data: Any, file: str, base_dir: Path | None, stack: tuple[str, ...]) -> Pipeline:
        if not isinstance(data, Mapping):
            raise PipelineDefinitionError("a pipeline file must be a YAML mapping (description, tasks, ...)", file=file, line=line_of(data, default=1))
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            hint = " (did you mean 'subsets'?)" if "subset" in unknown else ""
            raise PipelineDefinitionError(
                f"unknown top-level key {unknown[0]!r}{hint}; allowed: {', '.join(_TOP_KEYS)}",
                file=file,
                line=line_of(data, unknown[0]),
            )
        if "description" not in data:
            raise PipelineDefinitionError("a pipeline needs a 'description'", file=file, line=line_of(data, default=1))
        if "tasks" not in data and "imports" not in data:
            raise PipelineDefinitionError("a pipeline needs 'tasks' (or 'imports')", file=file, line=line_of(data, default=1))
        pipeline = cls(str(data["description"]))
        pipeline.file = file
        instrument = data.get("instrument")
        if instrument is not None and not isinstance(instrument, str):
            raise PipelineDefinitionError("'instrument' must be one instrument name", file=file, line=line_of(data, "instrument"))
        pipeline.instrument = instrument
        if "steps" in data:
            _log.debug("%s: ignoring 'steps' (batch-processing hints)", file)

        # imports first: this file's definitions override and extend them
        imports = data.get("imports") or []
        if isinstance(imports, (str, Mapping)):
            imports = [imports]
        if not isinstance(imports, list):
            raise PipelineDefinitionError("'imports' must be a list", file=file, line=line_of(data, "imports"))
        for index, entry in enumerate(imports):
            pipeline._merge_import(entry, file, item_line(imports, index, line_of(data, "imports")), base_dir, stack)

        parameters = data.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise PipelineDefinitionError("'parameters' must be a mapping of names to values", file=file, line=line_of(data, "parameters"))
        for name, value in parameters.items():
            if isinstance(value, (Mapping, list)):
                raise PipelineDefinitionError(
                    f"parameter {name!r} must be a scalar (string, number, boolean)", file=file, line=line_of(parameters, name)
                )
            pipeline.parameters[str(name)] = value
            pipeline.parameter_lines[str(name)] = (file, line_of(parameters, name))

        tasks = data.get("tasks") or {}
        if not isinstance(tasks, Mapping):
            raise PipelineDefinitionError("'tasks' must be a mapping of labels to task classes", file=file, line=line_of(data, "tasks"))
        for label, definition in tasks.items():
            pipeline._read_task(str(label), definition, file, line_of(tasks, label))

        subsets = data.get("subsets") or {}
        if not isinstance(subsets, Mapping):
            raise PipelineDefinitionError("'subsets' must be a mapping of names to label lists", file=file, line=line_of(data, "subsets"))
        for name, value in subsets.items():
            pipeline._read_subset(str(name), value, file, line_of(subsets, name))

        contracts = data.get("contracts") or []
        if isinstance(contracts, (str, Mapping)):
            contracts = [contracts]
        if not isinstance(contracts, list):
            raise PipelineDefinitionError("'contracts' must be a list", file=file, line=line_of(data, "contracts"))
        for index, entry in enumerate(contracts):
            line = item_line(contracts, index, line_of(data, "contracts"))
            if isinstance(entry, str):
                contract = Contract(entry, None, file, line)
            elif isinstance(entry, Mapping) and isinstance(entry.get("contract"), str):
                extra = set(entry) - {"contract", "msg"}
                if extra:
                    raise PipelineDefinitionError(f"unknown contract key(s) {sorted(extra)}; use contract and msg", file=file, line=line)
                contract = Contract(entry["contract"], entry.get("msg"), file, line)
            else:
                raise PipelineDefinitionError("a contract is a string or {contract: ..., msg: ...}", file=file, line=line)
            parse_contract(contract)
            pipeline.contracts.append(contract)
        pipeline._check_subsets()
        return pipeline

    def _read_task(self, label: str, definition: Any, file: str, line: int | None) -> None:
        if label == "parameters" or not _LABEL.match(label):
            raise PipelineDefinitionError(
                f"invalid task label {label!r}: use letters, digits, '_' and '-' (and not 'parameters')",
                file=file,
                line=line,
                label=label,
            )
        if isinstance(definition, str):
            definition = {"class": definition}
        if not isinstance(definition, Mapping):
            raise PipelineDefinitionError(
                f"task {label!r} must be a class path or a mapping with 'class' and 'config'", file=file, line=line, label=label
            )
        unknown = [k for k in definition if k not in _TASK_KEYS]
        if unknown:
            raise PipelineDefinitionError(
                f"task {label!r} has unknown key {unknown[0]!r}; allowed: class, config",
                file=file,
                line=line_of(definition, unknown[0], line),
                label=label,
            )
        class_path = definition.get("class")
        existing = self._tasks.get(label)
        if class_path is None and existing is None:
            raise PipelineDefinitionError(f"task {label!r} has no 'class'", file=file, line=line, label=label)
        blocks = self._read_config_blocks(label, definition.get("config"), file, line_of(definition, "config", line))
        if existing is not None and (class_path is None or class_path == existing.class_path):
            existing.config_blocks.extend(blocks)  # an imported task configured further here
            return
        if not isinstance(class_path, str):
            raise PipelineDefinitionError(f"task {label!r}: 'class' must be a dotted class path", file=file, line=line, label=label)
        self._tasks[label] = TaskSpec(label, class_path, None, blocks, file, line)

    @staticmethod
    def _read_config_blocks(label: str, config: Any, file: str, line: int | None) -> list[ConfigBlock]:
        if config is None:
            return []
        entries = config if isinstance(config, list) else [config]
        blocks: list[ConfigBlock] = []
        for index, entry in enumerate(entries):
            entry_line = item_line(config, index, line) if isinstance(config, list) else line_of(config, default=line)
            if not isinstance(entry, Mapping):
                raise ConfigError(f"task {label!r}: a config block must be a mapping of fields to values", file=file, line=entry_line, label=label, layer="pipeline")
            for unsupported in ("python", "dataId"):
                if unsupported in entry:
                    raise ConfigError(
                        f"task {label!r}: config {unsupported!r} blocks are not supported"
                        + (" (Python overrides are code; use fields or a YAML/JSON file)" if unsupported == "python" else ""),
                        file=file,
                        line=line_of(entry, unsupported, entry_line),
                        label=label,
                        layer="pipeline",
                    )
            values = {k: v for k, v in entry.items() if k != "file"}
            if isinstance(entry, LocatedDict):
                values = entry.copy_with(values)
            if values:
                blocks.append(ConfigBlock("pipeline", values, None, file, line_of(entry, default=entry_line)))
            files = entry.get("file")
            if files is not None:
                files = files if isinstance(files, list) else [files]
                for path in files:
                    resolved = _expand_location(str(path), Path(file).parent if file and not file.startswith("<") else None)
                    blocks.append(ConfigBlock("file", None, str(resolved), file, line_of(entry, "file", entry_line)))
        return blocks

    def _read_subset(self, name: str, value: Any, file: str, line: int | None) -> None:
        description = None
        if isinstance(value, Mapping):
            if "subset" not in value:
                raise PipelineDefinitionError(f"subset {name!r} given as a mapping needs a 'subset' list", file=file, line=line)
            description = value.get("description")
            value = value["subset"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PipelineDefinitionError(f"subset {name!r} must be a list of task labels", file=file, line=line)
        self.subsets[name] = LabeledSubset(name, list(value), description, file, line)

    def _check_subsets(self) -> None:
        for subset in self.subsets.values():
            missing = [label for label in subset.labels if label not in self._tasks]
            if missing:
                raise PipelineDefinitionError(
                    f"subset {subset.name!r} names unknown task label(s) {missing}; labels: {', '.join(self._tasks)}",
                    file=subset.file,
                    line=subset.line,
                )
            if subset.name in self._tasks:
                raise PipelineDefinitionError(
                    f"subset {subset.name!r} has the same name as a task label", file=subset.file, line=subset.line
                )

    def _merge_import(self, entry: Any, file: str, line: int | None, base_dir: Path | None, stack: tuple[str, ...]) -> None:
        if isinstance(entry, str):
            entry = {"location": entry}
        if not isinstance(entry, Mapping) or "location" not in entry:
            raise PipelineDefinitionError("an import is a path or a mapping with 'location'", file=file, line=line)
        unknown = [k for k in entry if k not in _IMPORT_KEYS]
        if unknown:
            raise PipelineDefinitionError(
                f"unknown import key {unknown[0]!r}; allowed: {', '.join(_IMPORT_KEYS)}", file=file, line=line_of(entry, unknown[0], line)
            )
        include, exclude = entry.get("include"), entry.get("exclude")
        if include is not None and exclude is not None:
            raise PipelineDefinitionError("an import takes 'include' or 'exclude', not both", file=file, line=line)
        path = _expand_location(str(entry["location"]), base_dir)
        if "$" in str(path):
            raise PipelineDefinitionError(f"import location {entry['location']!r} uses an undefined environment variable", file=file, line=line)
        try:
            imported = Pipeline._from_file(path, stack)
        except PipelineDefinitionError as exc:
            if exc.file is None:
                raise PipelineDefinitionError(f"import of {entry['location']!r}: {exc.message}", file=file, line=line) from None
            raise
        names = include if include is not None else exclude
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            labels = imported._expand_selection(names, file=file, line=line)
            keep = labels if include is not None else [lbl for lbl in imported._tasks if lbl not in labels]
            imported = imported.subset(keep)
        if not entry.get("importContracts", True):
            imported.contracts = []
        if entry.get("instrument", "keep") != "keep" and "instrument" in entry:
            imported.instrument = entry["instrument"]
        duplicate = set(imported._tasks) & set(self._tasks)
        if duplicate:
            raise PipelineDefinitionError(
                f"imported pipeline {entry['location']!r} defines task label(s) {sorted(duplicate)} already imported; "
                "labels must be unique across imports",
                file=file,
                line=line,
            )
        if self.instrument is None:
            self.instrument = imported.instrument
        elif imported.instrument is not None and imported.instrument != self.instrument:
            raise PipelineDefinitionError(
                f"imported pipeline {entry['location']!r} is for instrument {imported.instrument!r}, not {self.instrument!r}",
                file=file,
                line=line,
            )
        clash = (set(imported.subsets) & set(self.subsets)) | (set(imported.subsets) & set(self._tasks))
        if clash:
            raise PipelineDefinitionError(f"imported subset name(s) {sorted(clash)} clash with existing subsets or labels", file=file, line=line)
        self._tasks.update(imported._tasks)
        self.subsets.update(imported.subsets)
        self.contracts.extend(imported.contracts)
        for name, value in imported.parameters.items():
            self.parameters.setdefault(name, value)
            self.parameter_lines.setdefault(name, imported.parameter_lines.get(name, (None, None)))

    # ------------------------------------------------------------------ programmatic editing
    def add_task(self, task: type | str, label: str, config: Mapping[str, Any] | None = None) -> None:
        """Add a task by class or dotted path, with optional overrides (layer ``python``)."""
        if label in self._tasks:
            raise PipelineDefinitionError(f"task label {label!r} is already in the pipeline", label=label)
        if not _LABEL.match(label) or label == "parameters":
            raise PipelineDefinitionError(f"invalid task label {label!r}", label=label)
        if isinstance(task, str):
            spec = TaskSpec(label, task)
        else:
            spec = TaskSpec(label, type_name(task), task)
        if config:
            spec.config_blocks.append(ConfigBlock("python", dict(config)))
        self._tasks[label] = spec

    def _spec(self, label: str) -> TaskSpec:
        spec = self._tasks.get(label)
        if spec is None:
            raise PipelineDefinitionError(
                f"no task labeled {label!r} in the pipeline; labels: {', '.join(self._tasks) or 'none'}", label=label
            )
        return spec

    def add_config_override(
        self, label: str, field_path: str, value: Any, *, layer: str = "python", source: str | None = None, parse_strings: bool = False
    ) -> None:
        """Override one field of a task's config (applied after the pipeline's own overrides)."""
        self._spec(label).config_blocks.append(
            ConfigBlock(layer, {field_path: value}, source=source, parse_strings=parse_strings)
        )

    def add_config_file(self, label: str, path: str | Path, *, source: str | None = None) -> None:
        """Apply a YAML/JSON config file to a task (layer ``file``); the file is read at expansion."""
        self._spec(label).config_blocks.append(ConfigBlock("file", None, str(path), source=source))

    def apply_cli_overrides(self, overrides: Sequence[str] = (), files: Sequence[str] = ()) -> None:
        """Apply ``-C label:file`` then ``-c label:field=value`` options (command-line layers)."""
        for text in files:
            label, path = parse_cli_config_file(text)
            self.add_config_file(label, path, source=f"-C {text}")
        for text in overrides:
            label, key, value = parse_cli_config_override(text)
            self.add_config_override(label, key, value, layer="command line", source=f"-c {text}", parse_strings=True)

    # ------------------------------------------------------------------ selection
    @property
    def labels(self) -> list[str]:
        """Task labels in declaration order."""
        return list(self._tasks)

    def task_spec(self, label: str) -> TaskSpec:
        """The declaration of one task."""
        return self._spec(label)

    def __len__(self) -> int:
        return len(self._tasks)

    def _expand_selection(self, names: Iterable[str], *, file: str | None = None, line: int | None = None) -> list[str]:
        labels: list[str] = []
        for name in names:
            if name in self._tasks:
                labels.append(name)
            elif name in self.subsets:
                labels.extend(self.subsets[name].labels)
            else:
                raise PipelineDefinitionError(
                    f"{name!r} is neither a task label nor a subset; labels: {', '.join(self._tasks) or 'none'}; "
                    f"subsets: {', '.join(self.subsets) or 'none'}",
                    file=file or self.file,
                    line=line,
                )
        return list(dict.fromkeys(labels))

    def subset(self, names: Iterable[str]) -> Pipeline:
        """A pipeline with only the given labels and/or subsets (contracts and subsets pruned)."""
        keep = set(self._expand_selection(list(names)))
        new = Pipeline(self.description)
        new.file = self.file
        new.instrument = self.instrument
        new.parameters = dict(self.parameters)
        new.parameter_lines = dict(self.parameter_lines)
        new._tasks = {label: dataclasses.replace(spec, config_blocks=list(spec.config_blocks)) for label, spec in self._tasks.items() if label in keep}
        new.subsets = {n: s for n, s in self.subsets.items() if set(s.labels) <= keep}
        new.contracts = [c for c in self.contracts if contract_names(c) <= keep]
        return new

    # ------------------------------------------------------------------ expansion
    def make_config(self, label: str) -> Config:
        """Import the task class and build its config with every override layer applied.

        Raises
        ------
        TaskImportError, ConfigError
            With the label, field, layer and file/line.
        """
        spec = self._spec(label)
        task_class = spec.task_class or import_task_class(spec.class_path or "", label=label, file=spec.file, line=spec.line)
        spec.task_class = task_class
        config_class = task_class.ConfigClass
        if getattr(config_class, "ConnectionsClass", None) is None:
            raise PipelineDefinitionError(
                f"task {label!r}: {type_name(task_class)}'s config has no connections "
                "(declare it as class MyConfig(PipelineTaskConfig, pipelineConnections=MyConnections))",
                file=spec.file,
                line=spec.line,
                label=label,
            )
        config = config_class()
        for block in spec.config_blocks:
            if block.path is not None:
                try:
                    apply_config_file(config, block.path, label=label)
                except ConfigError as exc:
                    if exc.label is None:
                        src = f" (from {block.source})" if block.source else ""
                        raise ConfigError(
                            f"task {label!r}: {exc.message}{src}", file=exc.file, line=exc.line, label=label, field=exc.field, layer="file"
                        ) from None
                    raise
            elif block.parse_strings:
                for key, value in (block.values or {}).items():
                    apply_override(
                        config, key, value, layer=block.layer, source=block.source, label=label, parse_strings=True
                    )
            else:
                apply_mapping(
                    config,
                    block.values or {},
                    layer=block.layer,
                    source=block.source,
                    label=label,
                    file=block.file,
                    line=block.line,
                    parameters=self.parameters if block.layer == "pipeline" else None,
                )
        try:
            config.validate()
        except ConfigError as exc:
            raise ConfigError(
                f"task {label!r}: config validation failed: {exc.message}", file=spec.file, line=spec.line, label=label, field=exc.field
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(
                f"task {label!r}: config validation failed: {exc}", file=spec.file, line=spec.line, label=label
            ) from None
        return config

    def to_task_defs(self, universe: Any = None) -> list[TaskDef]:
        """Import, configure, validate and order the tasks; check contracts and dataset flow.

        Parameters
        ----------
        universe : DimensionUniverse, optional
            Used to check connection dimensions; default the universe shipped with diapipe.

        Returns
        -------
        list of TaskDef
            In an order where every task comes after the tasks whose outputs it reads.

        Raises
        ------
        TaskImportError, ConfigError, ContractError, PipelineGraphError, PipelineDefinitionError
        """
        if not self._tasks:
            raise PipelineDefinitionError("the pipeline has no tasks", file=self.file)
        configs: dict[str, Config] = {label: self.make_config(label) for label in self._tasks}
        check_contracts(self.contracts, configs)
        task_defs: list[TaskDef] = []
        for label, config in configs.items():
            spec = self._tasks[label]
            assert spec.task_class is not None
            try:
                connections = config.ConnectionsClass(config=config)
            except ConnectionDefinitionError as exc:
                raise PipelineDefinitionError(f"task {label!r}: {exc}", file=spec.file, line=spec.line, label=label) from None
            config.freeze()
            task_defs.append(TaskDef(label, spec.task_class, config, connections, spec.location))
        if universe is None:
            from butler.dimensions import default_universe

            universe = default_universe()
        from .pipeline_graph import order_task_defs

        return order_task_defs(task_defs, universe, {label: (s.file, s.line) for label, s in self._tasks.items()})

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """The pipeline as plain data in the YAML layout (imports already merged)."""
        out: dict[str, Any] = {"description": self.description}
        if self.instrument:
            out["instrument"] = self.instrument
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        tasks: dict[str, Any] = {}
        for label, spec in self._tasks.items():
            blocks = [b.to_primitive() for b in spec.config_blocks]
            tasks[label] = {"class": spec.class_path, **({"config": blocks} if blocks else {})}
        out["tasks"] = tasks
        if self.subsets:
            out["subsets"] = {
                n: ({"subset": s.labels, "description": s.description} if s.description else list(s.labels))
                for n, s in self.subsets.items()
            }
        if self.contracts:
            out["contracts"] = [c.to_dict() for c in self.contracts]
        return out

    def to_yaml(self) -> str:
        """The pipeline as YAML text."""
        import yaml

        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    def __repr__(self) -> str:
        return f"Pipeline({self.description!r}, tasks={self.labels})"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, LocatedList)):
        return [_plain(v) for v in value]
    return value

