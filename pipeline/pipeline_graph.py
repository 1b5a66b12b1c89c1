"""How the tasks of a pipeline fit together: who produces and who consumes each dataset type.

:func:`analyze_pipeline` checks the dataset flow of configured tasks — dimensions known to the
universe, outputs within the quantum dimensions, one producer per dataset type, one definition
per dataset type, no prerequisite produced in the pipeline, no cycle — and
:func:`order_task_defs` sorts the tasks so every producer comes before its consumers (ties keep
declaration order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .errors import PipelineGraphError

__all__ = ["DatasetFlow", "analyze_pipeline", "order_task_defs"]


@dataclass
class DatasetFlow:
    """The dataset types of a pipeline and the tasks that produce and consume them.

    Attributes
    ----------
    specs : dict
        ``{label: {kind: {connection name: (connection, DatasetTypeSpec)}}}``.
    dataset_types : dict
        ``{name: DatasetTypeSpec}`` for every dataset type used.
    producers : dict
        ``{name: (label, connection name)}``.
    consumers : dict
        ``{name: [(label, connection name, kind), ...]}``.
    """

    specs: dict[str, dict[str, dict[str, tuple[Any, Any]]]] = field(default_factory=dict)
    dataset_types: dict[str, Any] = field(default_factory=dict)
    producers: dict[str, tuple[str, str]] = field(default_factory=dict)
    consumers: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)

    def overall_inputs(self) -> list[str]:
        """Dataset types read by some task and produced by none."""
        return [name for name in self.consumers if name not in self.producers]


def analyze_pipeline(
    task_defs: Sequence[Any], universe: Any, locations: Mapping[str, tuple[str | None, int | None]] | None = None
) -> DatasetFlow:
    """Collect and check the dataset flow of configured tasks.

    Raises
    ------
    PipelineGraphError
        Unknown dimensions, outputs outside the quantum dimensions, two producers of one dataset
        type, one dataset type with two definitions, a produced prerequisite; the message names
        the task label(s) and connection(s), with the file and line of the label.
    """
    from butler.errors import DimensionNameError

    locations = locations or {}
    flow = DatasetFlow()
    first_use: dict[str, tuple[str, str]] = {}

    def where(label: str) -> dict[str, Any]:
        file, line = locations.get(label, (None, None))
        return {"file": file, "line": line, "label": label}

    for task_def in task_defs:
        label = task_def.label
        try:
            quantum_dims = set(universe.required_closure(task_def.connections.dimensions))
            specs = task_def.connection_specs(universe)
        except DimensionNameError as exc:
            raise PipelineGraphError(f"task {label!r}: {exc}", **where(label)) from None
        flow.specs[label] = specs
        for conn_name, (conn, spec) in specs["outputs"].items():
            extra = set(spec.dimensions) - quantum_dims
            if extra:
                raise PipelineGraphError(
                    f"task {label!r}: output {conn_name!r} ({spec.name}) has dimensions {sorted(extra)} that are not "
                    f"quantum dimensions {sorted(quantum_dims)}; outputs must be per quantum",
                    **where(label),
                )
        for kind, conns in specs.items():
            for conn_name, (conn, spec) in conns.items():
                previous = flow.dataset_types.get(spec.name)
                if previous is None:
                    flow.dataset_types[spec.name] = spec
                    first_use[spec.name] = (label, conn_name)
                elif previous != spec:
                    other_label, other_conn = first_use[spec.name]
                    raise PipelineGraphError(
                        f"dataset type {spec.name!r} is defined twice: task {other_label!r} ({other_conn}) says "
                        f"{list(previous.dimensions)} / {previous.storage_class}, task {label!r} ({conn_name}) says "
                        f"{list(spec.dimensions)} / {spec.storage_class}",
                        **where(label),
                    )
                if kind in ("outputs", "initOutputs"):
                    if spec.name in flow.producers:
                        other_label, other_conn = flow.producers[spec.name]
                        raise PipelineGraphError(
                            f"dataset type {spec.name!r} is produced by two tasks: {other_label!r} ({other_conn}) and "
                            f"{label!r} ({conn_name}); rename one output (config connections.{conn_name})",
                            **where(label),
                        )
                    flow.producers[spec.name] = (label, conn_name)
                else:
                    flow.consumers.setdefault(spec.name, []).append((label, conn_name, kind))
    for name, uses in flow.consumers.items():
        producer = flow.producers.get(name)
        if producer is None:
            continue
        for label, conn_name, kind in uses:
            if kind == "prerequisiteInputs":
                raise PipelineGraphError(
                    f"task {label!r}: prerequisite input {conn_name!r} ({name}) is produced by task {producer[0]!r}; "
                    "prerequisites must exist before the pipeline runs (make it a regular Input)",
                    **where(label),
                )
            if label == producer[0]:
                raise PipelineGraphError(
                    f"task {label!r} reads its own output {name!r} ({conn_name}); that is a cycle", **where(label)
                )
    return flow


def order_task_defs(
    task_defs: Sequence[Any], universe: Any, locations: Mapping[str, tuple[str | None, int | None]] | None = None
) -> list[Any]:
    """Sort tasks so that producers come before consumers (declaration order breaks ties).

    Raises
    ------
    PipelineGraphError
        On a dependency cycle (the message lists it with the dataset types involved), and on
        everything :func:`analyze_pipeline` rejects.
    """
    flow = analyze_pipeline(task_defs, universe, locations)
    graph = nx.DiGraph()
    index = {td.label: i for i, td in enumerate(task_defs)}
    graph.add_nodes_from(index)
    for name, uses in flow.consumers.items():
        producer = flow.producers.get(name)
        if producer is None:
            continue
        for label, _conn, _kind in uses:
            if graph.has_edge(producer[0], label):
                graph.edges[producer[0], label]["datasets"].append(name)
            else:
                graph.add_edge(producer[0], label, datasets=[name])
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        steps = " -> ".join(f"{u} ({', '.join(graph.edges[u, v]['datasets'])})" for u, v in cycle)
        first = cycle[0][0]
        file, line = (locations or {}).get(first, (None, None))
        raise PipelineGraphError(
            f"the pipeline has a cycle: {steps} -> {cycle[0][0]}; a task cannot depend on its own outputs",
            file=file,
            line=line,
            label=first,
        )
    order = list(nx.lexicographical_topological_sort(graph, key=index.__getitem__))
    by_label = {td.label: td for td in task_defs}
    return [by_label[label] for label in order]
