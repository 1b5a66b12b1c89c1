"""A testing kit for PipelineTasks.

- :func:`lint_connections` checks a task's connections against its ``run`` signature (names,
  ``multiple`` vs list annotations, ``minimum`` vs defaults, dimensions vs ``multiple``).
- :func:`run_quantum_in_temp_repo` runs one quantum of a task end to end in a throw-away
  repository: it stores the given input objects, builds the quantum with the real graph builder,
  runs ``runQuantum`` through a :class:`~pipeline.pipeline_task.ButlerQuantumContext`, and reads
  the outputs back.
- Lower-level pieces: :func:`make_test_repo`, :func:`fill_test_dimensions`, :func:`make_quantum`,
  :func:`run_quantum`.
"""

from __future__ import annotations

import inspect
import tempfile
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import Config, apply_mapping
from .connections import BaseInput, Input
from .errors import PipelineError
from .graph import Quantum
from .pipeline import TaskDef
from .pipeline_graph import order_task_defs
from .quantum_execution import QuantumResult, execute_quantum, write_init_outputs
from .quantum_io import ButlerIO
from .struct import Struct

__all__ = [
    "lint_connections",
    "assert_valid_connections",
    "make_task_def",
    "make_test_repo",
    "fill_test_dimensions",
    "make_quantum",
    "run_quantum",
    "run_quantum_in_temp_repo",
    "TEST_INSTRUMENT",
]

TEST_INSTRUMENT = "TestCam"


# ---------------------------------------------------------------------- linting
def _is_list_annotation(annotation: Any) -> bool | None:
    """True for list-like annotations, False for others, None when unknown/absent."""
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        text = annotation.replace(" ", "")
        if any(text.startswith(p) for p in ("list", "List", "Sequence", "Iterable", "tuple", "Tuple", "typing.List", "collections.abc.")):
            return True
        if text in ("Any", "object", "typing.Any"):
            return None
        return False
    origin = typing.get_origin(annotation) or annotation
    if annotation is typing.Any:
        return None
    try:
        from collections.abc import Iterable as AbcIterable

        return isinstance(origin, type) and issubclass(origin, (list, tuple, AbcIterable)) and origin not in (str, bytes, dict)
    except TypeError:
        return None


def lint_connections(task_class: type, config: Config | None = None) -> list[str]:
    """Check a task's connections against its ``run`` signature.

    Returns
    -------
    list of str
        Problems found (empty when the task is consistent):

        - an input/prerequisite connection that ``run`` does not accept (and ``run`` has no ``**kwargs``);
        - a required ``run`` parameter that is no input connection (``runQuantum`` could not fill it);
        - a ``multiple`` connection annotated as a single object, or a single one annotated as a list;
        - an optional input (``minimum=0``, single) whose ``run`` parameter has no default;
        - a single input whose dimensions are not all quantum dimensions (it can match several
          datasets: make it ``multiple``), or a ``multiple`` one whose dimensions are all quantum
          dimensions (it can only ever get one dataset).
    """
    config = config if config is not None else task_class.ConfigClass()
    connections_class = getattr(config, "ConnectionsClass", None)
    if connections_class is None:
        return [f"{task_class.__name__}'s config has no connections class (pipelineConnections=...)"]
    connections = connections_class(config=config)
    problems: list[str] = []
    signature = inspect.signature(task_class.run)
    try:
        hints = typing.get_type_hints(task_class.run)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the raw ones
        hints = {}
    params = {n: p for n, p in signature.parameters.items() if n != "self"}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    inputs = {**connections.connections_of("inputs"), **connections.connections_of("prerequisiteInputs")}
    universe = None
    try:
        from butler.dimensions import default_universe

        universe = default_universe()
    except Exception:  # noqa: BLE001 - linting works without the universe
        universe = None
    quantum_dims = set(universe.required_closure(connections.dimensions)) if universe else set(connections.dimensions)
    for name, conn in inputs.items():
        param = params.get(name)
        if param is None:
            if not var_kw:
                problems.append(f"input connection {name!r} is not a parameter of {task_class.__name__}.run")
            continue
        annotation = hints.get(name, param.annotation)
        is_list = _is_list_annotation(annotation)
        if conn.multiple and is_list is False:
            problems.append(f"connection {name!r} is multiple=True but run() annotates it as {_ann(annotation)} (expected a list)")
        if not conn.multiple and is_list is True:
            problems.append(f"connection {name!r} is single but run() annotates it as {_ann(annotation)}")
        if isinstance(conn, BaseInput) and conn.minimum == 0 and not conn.multiple and param.default is inspect.Parameter.empty:
            problems.append(f"connection {name!r} is optional (minimum=0) but run() gives {name!r} no default (e.g. None)")
        dims = set(universe.required_closure(conn.dimensions)) if universe else set(conn.dimensions)
        if not conn.multiple and not dims <= quantum_dims and isinstance(conn, Input):
            problems.append(
                f"connection {name!r} is single but has dimensions {sorted(dims - quantum_dims)} beyond the quantum "
                "dimensions: several datasets can match a quantum; make it multiple=True"
            )
        if conn.multiple and dims <= quantum_dims:
            problems.append(f"connection {name!r} is multiple but its dimensions are all quantum dimensions: it gets at most one dataset")
    for name, param in params.items():
        if param.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if name not in inputs and param.default is inspect.Parameter.empty:
            problems.append(f"run() parameter {name!r} has no default and no input connection provides it")
    return problems


def _ann(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def assert_valid_connections(task_class: type, config: Config | None = None) -> None:
    """Raise ``AssertionError`` listing every problem :func:`lint_connections` finds."""
    problems = lint_connections(task_class, config)
    if problems:
        raise AssertionError(f"{task_class.__name__}: " + "; ".join(problems))


# ---------------------------------------------------------------------- repositories
def fill_test_dimensions(butler: Any, n_visits: int = 2, n_detectors: int = 2, instrument: str = TEST_INSTRUMENT) -> None:
    """Insert a small instrument (visits 1..n with detectors 0..n-1, band r) and a 2x2-patch skymap
    ``"test"`` whose patches cover the detectors (records only; no datasets)."""
    from butler.regions import SkyRegion

    def box(ra0: float, dec0: float, w: float, h: float) -> Any:
        return SkyRegion.from_radec([ra0, ra0 + w, ra0 + w, ra0], [dec0, dec0, dec0 + h, dec0 + h])

    butler.insert_dimension_records("instrument", [{"name": instrument}], skip_existing=True)
    butler.insert_dimension_records("band", [{"name": "r"}], skip_existing=True)
    butler.insert_dimension_records("physical_filter", [{"instrument": instrument, "name": "r_test", "band": "r"}], skip_existing=True)
    butler.insert_dimension_records("detector", [{"instrument": instrument, "id": d} for d in range(n_detectors)], skip_existing=True)
    width = 0.1 * n_detectors
    butler.insert_dimension_records(
        "visit",
        [
            {"instrument": instrument, "id": v, "physical_filter": "r_test", "region": box(10.0 + 0.01 * v, 0.0, width, 0.1)}
            for v in range(1, n_visits + 1)
        ],
        skip_existing=True,
    )
    butler.insert_dimension_records(
        "visit_detector_region",
        [
            {"instrument": instrument, "visit": v, "detector": d, "region": box(10.0 + 0.01 * v + 0.1 * d, 0.0, 0.09, 0.1)}
            for v in range(1, n_visits + 1)
            for d in range(n_detectors)
        ],
        skip_existing=True,
    )
    butler.insert_dimension_records("skymap", [{"name": "test"}], skip_existing=True)
    half = (width + 0.2) / 2
    butler.insert_dimension_records("tract", [{"skymap": "test", "id": 0, "region": box(9.95, -0.05, 2 * half, 0.2)}], skip_existing=True)
    butler.insert_dimension_records(
        "patch",
        [
            {"skymap": "test", "tract": 0, "id": j * 2 + i, "cell_x": i, "cell_y": j, "region": box(9.95 + i * half, -0.05 + j * 0.1, half, 0.1)}
            for j in range(2)
            for i in range(2)
        ],
        skip_existing=True,
    )


def make_test_repo(
    root: str | Path | None = None,
    *,
    fill: Callable[[Any], None] | None = fill_test_dimensions,
    formatters: Mapping[str, str] | None = None,
) -> Path:
    """Create a repository (in a new temporary folder by default) and fill its dimension records."""
    from butler.butler import Butler

    path = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="diapipe-test-")) / "repo"
    Butler.create(path, formatters=dict(formatters) if formatters is not None else {"Config": "json"})
    if fill is not None:
        with Butler(path) as butler:
            fill(butler)
    return path


def make_task_def(task_class: type, config: Config | Mapping[str, Any] | None = None, label: str | None = None) -> TaskDef:
    """A TaskDef for one task (config given as an object or as overrides)."""
    label = label or getattr(task_class, "_DefaultName", task_class.__name__)
    if isinstance(config, Config):
        cfg = config.copy_config()
    else:
        cfg = task_class.ConfigClass()
        if config:
            apply_mapping(cfg, config, layer="python", label=label)
    cfg.validate()
    connections = cfg.ConnectionsClass(config=cfg)
    cfg.freeze()
    return TaskDef(label, task_class, cfg, connections, "(testing)")


def make_quantum(
    task_def: TaskDef,
    butler: Any,
    data_id: Mapping[str, Any],
    *,
    input_collections: str | Sequence[str],
    output_run: str = "test/output",
    where: str | None = None,
) -> Quantum:
    """Build the quantum of one task for one data ID with the real graph builder.

    Raises
    ------
    PipelineError
        If no (or more than one) quantum matches the data ID.
    """
    from .graph_builder import build_quantum_graph

    graph = build_quantum_graph(
        [task_def], butler, input_collections=input_collections, output_run=output_run, data_id=data_id, where=where, allow_empty=True
    )
    quanta = [q for q in graph.quanta_for_task(task_def.label) if all(q.data_id.get(k) == v for k, v in data_id.items())]
    if len(quanta) != 1:
        raise PipelineError(
            f"{len(quanta)} quanta of {task_def.label!r} match {dict(data_id)}; "
            f"why: {graph.metadata.get('tasks_without_quanta', {}).get(task_def.label, 'several match')}"
        )
    return quanta[0]


def run_quantum(task_def: TaskDef, quantum: Quantum, butler: Any, *, raise_errors: bool = True) -> QuantumResult:
    """Run a quantum with a full butler (files and registry rows).

    The task's dataset types and the output run are registered, and its init-outputs (including
    ``{label}_config``) are written to the output run first, as the executor does.
    """
    from butler.refs import DatasetRef

    specs = task_def.connection_specs(butler.universe)
    for kind in specs.values():
        for _conn, spec in kind.values():
            butler.register_dataset_type(spec.name, spec.dimensions, spec.storage_class)
    run = next((ref.run for ref in quantum.output_refs()), "test/output")
    butler.register_run(run)
    io = ButlerIO(butler)
    task = task_def.make_task({name: io.get(ref) for name, ref in quantum.init_inputs.items()})
    init_refs = {}
    for name, (_conn, spec) in specs["initOutputs"].items():
        existing = butler.registry.find_dataset(spec.name, {}, [run])
        init_refs[name] = existing or DatasetRef(spec.to_dataset_type(), {}, run)
    write_init_outputs(task_def, task, init_refs, io)
    return execute_quantum(task_def, quantum, io, task=task, raise_errors=raise_errors)


def run_quantum_in_temp_repo(
    task_class: type,
    inputs: Mapping[str, Any],
    data_id: Mapping[str, Any],
    *,
    config: Config | Mapping[str, Any] | None = None,
    fill: Callable[[Any], None] | None = fill_test_dimensions,
    root: str | Path | None = None,
    raise_errors: bool = True,
) -> Struct:
    """Run one quantum of a task in a new repository and return what it wrote.

    Parameters
    ----------
    task_class : type
        The PipelineTask to test.
    inputs : mapping
        ``{connection name: object}`` for inputs with the quantum's dimensions (stored under the
        quantum data ID), or ``{connection name: [(data_id, object), ...]}`` for any input.
        Prerequisites and init-inputs the same way (init-inputs: ``{name: object}``).
    data_id : mapping
        The quantum's data ID (e.g. ``{"instrument": "TestCam", "visit": 1, "detector": 0}``).
    config : Config or mapping, optional
    fill : callable, optional
        Inserts dimension records into the new repository (default :func:`fill_test_dimensions`).
    root : path, optional
        Where to create the repository (default: a new temporary folder).

    Returns
    -------
    Struct
        ``outputs`` (``{connection: object or list}``), ``result`` (QuantumResult), ``quantum``,
        ``repo`` (Path) and ``task_def``.
    """
    from butler.butler import Butler

    task_def = make_task_def(task_class, config)
    repo = make_test_repo(root, fill=fill)
    input_run = "test/inputs"
    with Butler(repo, run=input_run) as butler:
        universe = butler.universe
        order_task_defs([task_def], universe)  # checks dimensions and outputs
        specs = task_def.connection_specs(universe)
        by_name = {**specs["inputs"], **specs["prerequisiteInputs"], **specs["initInputs"]}
        unknown = set(inputs) - set(by_name)
        if unknown:
            raise PipelineError(f"{task_class.__name__} has no input connection(s) {sorted(unknown)}; inputs: {sorted(by_name)}")
        full_id = butler.registry.expand_data_id(task_def.connections.dimensions, data_id, where="quantum data ID")
        for name, value in inputs.items():
            _conn, spec = by_name[name]
            butler.register_dataset_type(spec.name, spec.dimensions, spec.storage_class)
            items = value if isinstance(value, list) and value and isinstance(value[0], tuple) else [({k: full_id[k] for k in spec.dimensions}, value)]
            for item_id, obj in items:
                butler.put(obj, spec.name, item_id, run=input_run)
        quantum = make_quantum(task_def, butler, data_id, input_collections=[input_run])
        result = run_quantum(task_def, quantum, butler, raise_errors=raise_errors)
        outputs: dict[str, Any] = {}
        for name, conn in task_def.connections.connections_of("outputs").items():
            stored = {r.id: r for r in result.outputs}
            objs = [butler.get(stored[r.id]) for r in quantum.outputs.get(name, []) if r.id in stored]
            outputs[name] = objs if conn.multiple else (objs[0] if objs else None)
    return Struct(outputs=outputs, result=result, quantum=quantum, repo=repo, task_def=task_def)
