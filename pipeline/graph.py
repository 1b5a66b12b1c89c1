"""The quantum graph: one node per quantum, edges from dataset dependencies (networkx).

A :class:`Quantum` is one task run on one data ID: its input refs (regular and prerequisite) and
predicted output refs by connection name, and its init-input refs.  Refs are
:class:`butler.refs.DatasetRef`; **a ref whose** ``path`` **is set is already stored** (an
existing input, or an output that a skipped quantum already wrote), **a ref whose** ``path`` **is
None is predicted** (it will be written by the quantum that lists it among its outputs, under the
graph's output run, with exactly that id).

Saved graphs are JSON (gzip-compressed when the file name ends in ``.gz``; read either way) —
never pickle.  Every dataset is stored once (``datasets``: id -> type, run, data ID, path) and
quanta refer to datasets by id; task configs are stored as plain data with their provenance and
rebuilt (class imported, overrides re-applied, frozen) by :meth:`QuantumGraph.task_def`.
"""

from __future__ import annotations

import gzip
import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import networkx as nx

from butler.refs import DatasetRef, DatasetType

from .errors import QuantumGraphFileError

__all__ = ["Quantum", "QuantumGraph", "GRAPH_FORMAT", "GRAPH_VERSION"]

_log = logging.getLogger(__name__)

GRAPH_FORMAT = "diapipe-quantum-graph"
GRAPH_VERSION = 1


@dataclass
class Quantum:
    """One task on one data ID.

    Attributes
    ----------
    task_label : str
    data_id : dict
        The quantum's data ID (required dimensions, then implied ones).
    inputs : dict of str to list of DatasetRef
        Regular and prerequisite inputs by connection name (sorted by data ID).
    outputs : dict of str to list of DatasetRef
        Outputs by connection name, including the automatic ``_metadata`` output.
    init_inputs : dict of str to DatasetRef
        Init-inputs of the task by connection name.
    replaces : list of DatasetRef
        Datasets already in the output run that this quantum overwrites (``clobber_outputs``);
        the executor removes them before running the quantum.
    id : str
        32 hex digits, unique in the graph (the Dask key of the quantum).
    """

    task_label: str
    data_id: dict[str, Any]
    inputs: dict[str, list[DatasetRef]] = field(default_factory=dict)
    outputs: dict[str, list[DatasetRef]] = field(default_factory=dict)
    init_inputs: dict[str, DatasetRef] = field(default_factory=dict)
    replaces: list[DatasetRef] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def input_refs(self) -> Iterator[DatasetRef]:
        """Every input ref (all connections)."""
        for refs in self.inputs.values():
            yield from refs

    def output_refs(self) -> Iterator[DatasetRef]:
        """Every output ref (all connections, metadata included)."""
        for refs in self.outputs.values():
            yield from refs

    def quantized_connections(self, connections: Any) -> tuple[Any, Any]:
        """``(inputRefs, outputRefs)`` for ``runQuantum``: single connections get a ref (or None),
        multiple ones a list; automatic connections (``_metadata``) are left out."""
        from .pipeline_task import InputQuantizedConnection, OutputQuantizedConnection

        inputs = InputQuantizedConnection()
        for kind in ("inputs", "prerequisiteInputs"):
            for name, conn in connections.connections_of(kind).items():
                refs = self.inputs.get(name, [])
                setattr(inputs, name, list(refs) if conn.multiple else (refs[0] if refs else None))
        outputs = OutputQuantizedConnection()
        for name, conn in connections.connections_of("outputs").items():
            refs = self.outputs.get(name, [])
            setattr(outputs, name, list(refs) if conn.multiple else (refs[0] if refs else None))
        return inputs, outputs

    def __repr__(self) -> str:
        did = ", ".join(f"{k}: {v!r}" for k, v in self.data_id.items())
        return f"Quantum({self.task_label}, {{{did}}}, id={self.id[:8]})"


def _format_data_id(data_id: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in data_id.items())


class QuantumGraph:
    """Quanta of a pipeline and their dependencies.

    Parameters
    ----------
    quanta : iterable of Quantum
    tasks : mapping
        ``{label: {"class": path, "config": dict, "provenance": dict, "dimensions": list}}`` in
        pipeline order (what :meth:`task_def` rebuilds tasks from).
    dataset_types : mapping of str to DatasetType
        Every dataset type the graph reads or writes (the executor registers missing ones).
    init_inputs, init_outputs : mapping
        ``{label: {connection name: DatasetRef}}``; init-outputs include ``_config``.
    metadata : mapping
        Input collections, output run, data query, creation time, tasks without quanta, ...
    task_defs : mapping of str to TaskDef, optional
        Already-built task definitions (when the graph was just built in this process).

    Attributes
    ----------
    graph : networkx.DiGraph
        Nodes are quantum ids (attribute ``quantum``); an edge ``a -> b`` means ``b`` reads an
        output of ``a`` (attribute ``datasets``: the dataset type names).
    """

    def __init__(
        self,
        quanta: Iterable[Quantum],
        tasks: Mapping[str, Mapping[str, Any]],
        dataset_types: Mapping[str, DatasetType],
        init_inputs: Mapping[str, Mapping[str, DatasetRef]] | None = None,
        init_outputs: Mapping[str, Mapping[str, DatasetRef]] | None = None,
        metadata: Mapping[str, Any] | None = None,
        task_defs: Mapping[str, Any] | None = None,
    ) -> None:
        self.tasks: dict[str, dict[str, Any]] = {label: dict(info) for label, info in tasks.items()}
        self.dataset_types = dict(dataset_types)
        self.init_inputs = {label: dict(refs) for label, refs in (init_inputs or {}).items()}
        self.init_outputs = {label: dict(refs) for label, refs in (init_outputs or {}).items()}
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._task_defs: dict[str, Any] = dict(task_defs or {})
        self.graph = nx.DiGraph()
        producer: dict[str, str] = {}
        by_task: dict[str, list[str]] = {label: [] for label in self.tasks}
        quanta = list(quanta)
        for quantum in quanta:
            if quantum.id in self.graph:
                raise QuantumGraphFileError(f"two quanta share the id {quantum.id}")
            self.graph.add_node(quantum.id, quantum=quantum)
            by_task.setdefault(quantum.task_label, []).append(quantum.id)
            for ref in quantum.output_refs():
                producer[ref.id] = quantum.id
        for quantum in quanta:
            for ref in quantum.input_refs():
                source = producer.get(ref.id)
                if source is None:
                    continue
                if self.graph.has_edge(source, quantum.id):
                    names = self.graph.edges[source, quantum.id]["datasets"]
                    if ref.dataset_type.name not in names:
                        names.append(ref.dataset_type.name)
                else:
                    self.graph.add_edge(source, quantum.id, datasets=[ref.dataset_type.name])
        self._by_task = by_task
        self._producer = producer

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def __iter__(self) -> Iterator[Quantum]:
        """Quanta in a dependency-respecting order (producers first)."""
        for node in nx.topological_sort(self.graph):
            yield self.graph.nodes[node]["quantum"]

    @property
    def task_labels(self) -> list[str]:
        """Labels of the pipeline's tasks, in pipeline order (including tasks without quanta)."""
        return list(self.tasks)

    def quanta_for_task(self, label: str) -> list[Quantum]:
        """The quanta of one task, in build order."""
        return [self.graph.nodes[q]["quantum"] for q in self._by_task.get(label, [])]

    def summary(self) -> dict[str, int]:
        """``{label: number of quanta}`` in pipeline order."""
        return {label: len(self._by_task.get(label, [])) for label in self.tasks}

    def get_quantum(self, quantum_id: str) -> Quantum:
        """A quantum by id."""
        return self.graph.nodes[quantum_id]["quantum"]

    def producer_of(self, ref: DatasetRef) -> Quantum | None:
        """The quantum that writes a predicted ref, or None for existing inputs."""
        q = self._producer.get(ref.id)
        return self.graph.nodes[q]["quantum"] if q is not None else None

    def upstream(self, quantum: Quantum) -> list[Quantum]:
        """Quanta whose outputs this quantum reads."""
        return [self.graph.nodes[q]["quantum"] for q in self.graph.predecessors(quantum.id)]

    def downstream(self, quantum: Quantum) -> list[Quantum]:
        """Quanta that read an output of this quantum."""
        return [self.graph.nodes[q]["quantum"] for q in self.graph.successors(quantum.id)]

    def overall_inputs(self) -> list[DatasetRef]:
        """Inputs that no quantum of the graph produces (they must already exist)."""
        seen: dict[str, DatasetRef] = {}
        for quantum in self:
            for ref in quantum.input_refs():
                if ref.id not in self._producer:
                    seen.setdefault(ref.id, ref)
        return list(seen.values())

    def task_def(self, label: str) -> Any:
        """The :class:`~pipeline.pipeline.TaskDef` of a label (rebuilt from the saved config)."""
        task_def = self._task_defs.get(label)
        if task_def is None:
            task_def = self._task_defs[label] = _rebuild_task_def(label, self.tasks[label])
        return task_def

    # ------------------------------------------------------------------ saving and loading
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (see the module docstring for the layout)."""
        datasets: dict[str, list[Any]] = {}

        def ref_id(ref: DatasetRef) -> str:
            if ref.id not in datasets:
                datasets[ref.id] = [ref.dataset_type.name, ref.run, ref.data_id, ref.path]
            return ref.id

        quanta = []
        for label in self.tasks:
            for quantum in self.quanta_for_task(label):
                entry: dict[str, Any] = {
                    "id": quantum.id,
                    "task": quantum.task_label,
                    "data_id": quantum.data_id,
                    "inputs": {n: [ref_id(r) for r in refs] for n, refs in quantum.inputs.items()},
                    "outputs": {n: [ref_id(r) for r in refs] for n, refs in quantum.outputs.items()},
                }
                if quantum.init_inputs:
                    entry["init_inputs"] = {n: ref_id(r) for n, r in quantum.init_inputs.items()}
                if quantum.replaces:
                    entry["replaces"] = [ref_id(r) for r in quantum.replaces]
                quanta.append(entry)
        init = {
            label: {
                "inputs": {n: ref_id(r) for n, r in self.init_inputs.get(label, {}).items()},
                "outputs": {n: ref_id(r) for n, r in self.init_outputs.get(label, {}).items()},
            }
            for label in self.tasks
        }
        return {
            "format": GRAPH_FORMAT,
            "version": GRAPH_VERSION,
            "metadata": self.metadata,
            "tasks": self.tasks,
            "dataset_types": {
                name: {"dimensions": list(dt.dimensions), "storage_class": dt.storage_class}
                for name, dt in self.dataset_types.items()
            },
            "datasets": datasets,
            "init": init,
            "quanta": quanta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "quantum graph") -> QuantumGraph:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        QuantumGraphFileError
            Not a diapipe quantum graph, a newer version, or inconsistent content.
        """
        if not isinstance(data, Mapping) or data.get("format") != GRAPH_FORMAT:
            raise QuantumGraphFileError(f"{source} is not a diapipe quantum graph (no 'format: {GRAPH_FORMAT}')")
        version = data.get("version")
        if version != GRAPH_VERSION:
            raise QuantumGraphFileError(f"{source} has graph format version {version}; this diapipe reads {GRAPH_VERSION}")
        try:
            dataset_types = {
                name: DatasetType(name, tuple(info["dimensions"]), info["storage_class"])
                for name, info in data["dataset_types"].items()
            }
            refs = {
                ref_id: DatasetRef(dataset_types[name], dict(data_id), run, ref_id, path)
                for ref_id, (name, run, data_id, path) in data["datasets"].items()
            }
            quanta = [
                Quantum(
                    task_label=q["task"],
                    data_id=dict(q["data_id"]),
                    inputs={n: [refs[i] for i in ids] for n, ids in q["inputs"].items()},
                    outputs={n: [refs[i] for i in ids] for n, ids in q["outputs"].items()},
                    init_inputs={n: refs[i] for n, i in q.get("init_inputs", {}).items()},
                    replaces=[refs[i] for i in q.get("replaces", [])],
                    id=q["id"],
                )
                for q in data["quanta"]
            ]
            init = data.get("init", {})
            init_inputs = {label: {n: refs[i] for n, i in v["inputs"].items()} for label, v in init.items()}
            init_outputs = {label: {n: refs[i] for n, i in v["outputs"].items()} for label, v in init.items()}
            return cls(quanta, data["tasks"], dataset_types, init_inputs, init_outputs, data.get("metadata", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantumGraphFileError(f"{source} is damaged or inconsistent: {type(exc).__name__}: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write the graph as JSON (gzip when the name ends in ``.gz``), atomically."""
        path = Path(path)
        text = json.dumps(self.to_dict(), separators=(",", ":"), default=_json_default)
        data = text.encode("utf-8")
        if path.suffix == ".gz":
            data = gzip.compress(data, compresslevel=6)
        tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> QuantumGraph:
        """Read a graph written by :meth:`save` (gzip detected from the content)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise QuantumGraphFileError(f"quantum graph file {path} does not exist") from None
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise QuantumGraphFileError(f"{path} is a damaged gzip file: {exc}") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise QuantumGraphFileError(f"{path} is not a JSON quantum graph: {exc}") from None
        return cls.from_dict(data, source=str(path))

    # ------------------------------------------------------------------ drawings
    def _drawing_items(self) -> tuple[list[tuple[str, str, Quantum]], dict[str, tuple[str, DatasetRef]], list[tuple[str, str]]]:
        quanta_nodes = []
        dataset_nodes: dict[str, tuple[str, DatasetRef]] = {}
        edges: list[tuple[str, str]] = []

        def dnode(ref: DatasetRef) -> str:
            if ref.id not in dataset_nodes:
                dataset_nodes[ref.id] = (f"d{len(dataset_nodes)}", ref)
            return dataset_nodes[ref.id][0]

        for i, quantum in enumerate(self):
            qid = f"q{i}"
            quanta_nodes.append((qid, quantum.task_label, quantum))
            for ref in quantum.input_refs():
                edges.append((dnode(ref), qid))
            for name, refs in quantum.outputs.items():
                if name.startswith("_"):
                    continue
                for ref in refs:
                    edges.append((qid, dnode(ref)))
        return quanta_nodes, dataset_nodes, edges

    def to_dot(self) -> str:
        """A Graphviz drawing: quanta as boxes, datasets as ellipses."""

        def esc(text: str) -> str:
            return text.replace("\\", "\\\\").replace('"', '\\"')

        quanta_nodes, dataset_nodes, edges = self._drawing_items()
        lines = ["digraph QuantumGraph {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
        for qid, label, quantum in quanta_nodes:
            text = esc(f"{label}\\n{_format_data_id(quantum.data_id)}")
            lines.append(f'  {qid} [shape=box, style="rounded,filled", fillcolor="#cfe2f3", label="{text}"];')
        for did, ref in dataset_nodes.values():
            text = esc(f"{ref.dataset_type.name}\\n{_format_data_id(ref.required_data_id)}")
            fill = "#d9ead3" if ref.path is not None else "#fff2cc"
            lines.append(f'  {did} [shape=ellipse, style=filled, fillcolor="{fill}", label="{text}"];')
        lines += [f"  {a} -> {b};" for a, b in edges]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        """A Mermaid flowchart: quanta as boxes, datasets as rounded nodes."""

        def esc(text: str) -> str:
            return text.replace('"', "#quot;")

        quanta_nodes, dataset_nodes, edges = self._drawing_items()
        lines = ["flowchart LR"]
        for qid, label, quantum in quanta_nodes:
            lines.append(f'  {qid}["{esc(label)}<br>{esc(_format_data_id(quantum.data_id))}"]')
        for did, ref in dataset_nodes.values():
            lines.append(f'  {did}(["{esc(ref.dataset_type.name)}<br>{esc(_format_data_id(ref.required_data_id))}"])')
        lines += [f"  {a} --> {b}" for a, b in edges]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"QuantumGraph({len(self)} quanta, tasks={self.summary()})"


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "__index__"):
        return int(value)
    if hasattr(value, "__float__"):
        return float(value)
    raise TypeError(f"cannot store {type(value).__name__} in a quantum graph")


def _rebuild_task_def(label: str, info: Mapping[str, Any]) -> Any:
    from .config import Provenance, apply_mapping
    from .pipeline import TaskDef, import_task_class

    task_class = import_task_class(info["class"], label=label)
    config = task_class.ConfigClass()
    apply_mapping(config, info.get("config", {}), layer="file", label=label, source="quantum graph")
    _clear_provenance(config)
    for path, (layer, source) in info.get("provenance", {}).items():
        obj, last = config._resolve(path)
        obj._provenance[last] = Provenance(layer, source)
    config.validate()
    connections = config.ConnectionsClass(config=config)
    config.freeze()
    return TaskDef(label, task_class, config, connections, info.get("source", "(quantum graph)"))


def _clear_provenance(config: Any) -> None:
    config._provenance.clear()
    for name in type(config).model_fields:
        value = getattr(config, name)
        if hasattr(value, "_provenance"):
            _clear_provenance(value)


def task_info(task_def: Any) -> dict[str, Any]:
    """What a saved graph keeps of a TaskDef (class, config, provenance, dimensions, source)."""
    config = task_def.config
    provenance = {}

    def walk(cfg: Any, prefix: str) -> None:
        for name, prov in cfg._provenance.items():
            provenance[prefix + name] = [prov.layer, prov.source]
        for name in type(cfg).model_fields:
            value = getattr(cfg, name)
            if hasattr(value, "_provenance"):
                walk(value, f"{prefix}{name}.")

    walk(config, "")
    return {
        "class": task_def.taskName,
        "config": config.to_dict(),
        "provenance": provenance,
        "dimensions": list(task_def.dimensions),
        "source": task_def.source,
        "created": datetime.now(UTC).isoformat(),
    }
