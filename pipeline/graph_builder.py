"""Build a :class:`~pipeline.graph.QuantumGraph` from a pipeline, a butler and a data query.

For each task, in pipeline order, **one** ``query_data_ids`` over the union of the quantum
dimensions and the dimensions of its inputs (and of prerequisites that are not per quantum)
gives rows that relate every quantum data ID to the data IDs of its inputs — spatial joins
included (a visit-detector quantum with patch inputs gets exactly the overlapping patches, a
patch quantum with visit-detector inputs exactly the overlapping visit-detectors).  The rows are
constrained by the user's where expression and, in SQL, by the existence of the inputs that no
task produces.  Inputs are then attached from one ``query_datasets`` per dataset type (find-first
in the input collections) or from the outputs predicted for upstream quanta; a quantum with fewer
datasets than a connection's ``minimum`` is pruned.  Outputs are predicted as new refs in the
output run.  Nothing is written to the repository.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from butler.errors import MissingCollectionError, MissingDatasetTypeError
from butler.refs import DatasetRef, DatasetType

from .errors import (
    EmptyGraphError,
    GraphBuildError,
    MissingInputError,
    NoWorkFound,
    OutputExistsError,
    PrerequisiteMissingError,
)
from .graph import Quantum, QuantumGraph, task_info
from .pipeline import METADATA_CONNECTION, Pipeline, TaskDef
from .pipeline_graph import DatasetFlow, analyze_pipeline

__all__ = ["QuantumGraphBuilder", "build_quantum_graph", "BuildReport"]

_log = logging.getLogger(__name__)


def _key_getter(keys: Sequence[str]) -> Callable[[Mapping[str, Any]], tuple]:
    """A fast ``row -> tuple(row[k] for k in keys)``."""
    if not keys:
        return lambda row: ()
    if len(keys) == 1:
        key = keys[0]
        return lambda row: (row[key],)
    return itemgetter(*keys)  # type: ignore[return-value]


def _fmt(data_id: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in data_id.items()) + "}"


@dataclass
class BuildReport:
    """What happened per task while building (for ``pipetask qgraph`` and logs).

    Attributes
    ----------
    data_ids : dict
        ``{label: number of candidate quantum data IDs from the query}``.
    pruned : dict
        ``{label: {reason: count}}`` of quanta dropped (missing inputs below ``minimum``,
        ``NoWorkFound`` from ``adjustQuantum``).
    skipped : dict
        ``{label: count}`` of quanta skipped because their outputs exist (``skip_existing_in``).
    seconds : dict
        ``{label: seconds}`` spent building each task's quanta.
    """

    data_ids: dict[str, int] = field(default_factory=dict)
    pruned: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def why_empty(self, label: str) -> str:
        """A sentence saying why a task has no quanta."""
        if not self.data_ids.get(label):
            return "the data query selects no data IDs for it"
        reasons = self.pruned.get(label, {})
        if reasons:
            parts = [f"{count} lacked {reason}" for reason, count in reasons.items()]
            return f"{self.data_ids[label]} candidate data IDs, all pruned: " + "; ".join(parts)
        if self.skipped.get(label):
            return f"all {self.skipped[label]} quanta already have their outputs (skipped)"
        return "no quanta"


class QuantumGraphBuilder:
    """Builds quantum graphs; see :func:`build_quantum_graph` for the parameters."""

    def __init__(
        self,
        butler: Any,
        pipeline: Pipeline | Sequence[TaskDef],
        *,
        input_collections: str | Sequence[str],
        output_run: str,
        output: str | None = None,
        where: str | None = None,
        bind: Mapping[str, Any] | None = None,
        data_id: Mapping[str, Any] | None = None,
        skip_existing_in: Sequence[str] = (),
        clobber_outputs: bool = False,
        allow_empty: bool = False,
    ) -> None:
        from butler.datastore import validate_run_name

        self.butler = butler
        self.registry = butler.registry
        self.universe = butler.universe
        self.instrument: str | None = None
        if isinstance(pipeline, Pipeline):
            self.instrument = pipeline.instrument
            self.task_defs = pipeline.to_task_defs(self.universe)
            self.locations = {label: (pipeline.task_spec(label).file, pipeline.task_spec(label).line) for label in pipeline.labels}
        else:
            from .pipeline_graph import order_task_defs

            self.task_defs = order_task_defs(list(pipeline), self.universe)
            self.locations = {}
        self.input_collections = [input_collections] if isinstance(input_collections, str) else list(input_collections)
        if not self.input_collections:
            raise GraphBuildError("no input collections: give at least one (-i)")
        self.output_run = validate_run_name(output_run)
        self.output = output
        self.where = where or None
        self.bind = dict(bind or {})
        self.data_id = dict(data_id or {})
        self.skip_existing_in = list(skip_existing_in)
        self.clobber_outputs = clobber_outputs
        self.allow_empty = allow_empty
        self.report = BuildReport()
        self._dataset_types: dict[str, DatasetType] = {}
        self._registered: dict[str, bool] = {}
        self._existing: dict[str, dict[tuple, DatasetRef]] = {}
        self._predicted: dict[str, dict[tuple, DatasetRef]] = {}
        self._where_dims: set[str] | None = None

    # ------------------------------------------------------------------ helpers
    def _where(self, label: str) -> dict[str, Any]:
        file, line = self.locations.get(label, (None, None))
        return {"file": file, "line": line}

    def _task_location(self, label: str) -> str:
        file, line = self.locations.get(label, (None, None))
        return f" ({file}:{line})" if file else ""

    def _where_dimensions(self) -> set[str]:
        if self._where_dims is None:
            if self.where:
                from butler.queries import identifiers, parse_cached

                self._where_dims = {n.partition(".")[0] for n in identifiers(parse_cached(self.where), self.bind)}
            else:
                self._where_dims = set()
        return self._where_dims

    def _check_dataset_types(self, flow: DatasetFlow) -> None:
        for name, spec in flow.dataset_types.items():
            self._dataset_types[name] = spec.to_dataset_type()
            try:
                registered = self.registry.get_dataset_type(name)
            except MissingDatasetTypeError:
                self._registered[name] = False
                continue
            self._registered[name] = True
            if registered.dimensions != spec.dimensions or registered.storage_class != spec.storage_class:
                users = [lbl for lbl, conns in flow.specs.items() for kind in conns.values() for _, s in kind.values() if s.name == name]
                raise GraphBuildError(
                    f"dataset type {name!r} is registered in the repository as {list(registered.dimensions)} / "
                    f"{registered.storage_class}, but task {users[0]!r} declares {list(spec.dimensions)} / "
                    f"{spec.storage_class}; fix the connection or rename the dataset type"
                )

    def _existing_refs(self, name: str) -> dict[tuple, DatasetRef]:
        """Find-first datasets of a type in the input collections, keyed by required data ID."""
        cached = self._existing.get(name)
        if cached is not None:
            return cached
        out: dict[tuple, DatasetRef] = {}
        if self._registered.get(name):
            dt = self._dataset_types[name]
            closure = set(self.universe.full_closure(dt.dimensions))
            where = self.where if self.where and self._where_dimensions() <= closure else None
            data_id = {k: v for k, v in self._constraint().items() if k in closure}
            refs = self.butler.query_datasets(
                name, collections=self.input_collections, where=where, bind=self.bind if where else None, data_id=data_id
            )
            get = _key_getter(dt.dimensions)
            for ref in refs:
                out[get(ref.data_id)] = ref
        self._existing[name] = out
        return out

    def _constraint(self) -> dict[str, Any]:
        constraint = dict(self.data_id)
        if self.instrument and "instrument" not in constraint and "." not in self.instrument:
            constraint["instrument"] = self.instrument
        return constraint

    def _any_exists(self, name: str) -> bool:
        if not self._registered.get(name):
            return False
        return bool(self.butler.query_datasets(name, collections=self.input_collections, find_first=False, limit=1))

    def _check_overall_inputs(self, flow: DatasetFlow) -> None:
        for name in flow.overall_inputs():
            for label, conn_name, kind in flow.consumers[name]:
                conn, _spec = flow.specs[label][kind][conn_name]
                if getattr(conn, "minimum", 1) == 0 or getattr(conn, "lookupFunction", None) is not None:
                    continue
                if not self._any_exists(name):
                    what = "prerequisite input" if kind == "prerequisiteInputs" else ("init-input" if kind == "initInputs" else "input")
                    cls = PrerequisiteMissingError if kind == "prerequisiteInputs" else MissingInputError
                    registered = "" if self._registered.get(name) else " (the dataset type is not even registered)"
                    raise cls(
                        f"task {label!r}{self._task_location(label)}: {what} {conn_name!r} needs dataset type {name!r}, "
                        f"which no task in the pipeline produces and which is not in the input collections "
                        f"{self.input_collections}{registered}; add the collection that holds it (-i) or the task "
                        "that makes it"
                    )

    # ------------------------------------------------------------------ the build
    def build(self) -> QuantumGraph:
        """Build the graph (reads the registry only).

        Raises
        ------
        MissingInputError, PrerequisiteMissingError, EmptyGraphError, OutputExistsError, GraphBuildError
        """
        start = time.perf_counter()
        for name in self.input_collections:
            self.registry.get_collection(name)  # MissingCollectionError lists the collections
        flow = analyze_pipeline(self.task_defs, self.universe, self.locations)
        self._check_dataset_types(flow)
        self._check_overall_inputs(flow)
        output_run_exists = True
        try:
            self.registry.get_collection(self.output_run)
        except MissingCollectionError:
            output_run_exists = False
        quanta: list[Quantum] = []
        init_inputs: dict[str, dict[str, DatasetRef]] = {}
        init_outputs: dict[str, dict[str, DatasetRef]] = {}
        predicted_init: dict[str, DatasetRef] = {}
        for task_def in self.task_defs:
            label = task_def.label
            t0 = time.perf_counter()
            specs = flow.specs[label]
            init_inputs[label] = self._init_inputs(label, specs, predicted_init)
            init_outputs[label] = self._init_outputs(specs, predicted_init, output_run_exists)
            task_quanta = self._build_task(task_def, specs, output_run_exists, init_inputs[label])
            quanta.extend(task_quanta)
            self.report.seconds[label] = time.perf_counter() - t0
            _log.debug("%s: %d quanta in %.3f s", label, len(task_quanta), self.report.seconds[label])
        counts: dict[str, int] = {}
        for q in quanta:
            counts[q.task_label] = counts.get(q.task_label, 0) + 1
        without = {td.label: self.report.why_empty(td.label) for td in self.task_defs if not counts.get(td.label)}
        if not quanta and not self.allow_empty:
            details = "; ".join(f"task {label!r}: {why}" for label, why in without.items())
            query = f"data query {self.where!r}" if self.where else "the data query (none given)"
            raise EmptyGraphError(
                f"{query} with input collections {self.input_collections} selects no quanta ({details}); "
                "check the query (-d), the input collections (-i) and that the inputs exist"
            )
        for label, why in without.items():
            _log.warning("task %r has no quanta: %s", label, why)
        metadata = {
            "input_collections": self.input_collections,
            "output_run": self.output_run,
            "output": self.output,
            "data_query": self.where,
            "bind": self.bind,
            "data_id": self.data_id,
            "butler_root": str(getattr(self.butler, "root", "")),
            "created": datetime.now(UTC).isoformat(),
            "build_seconds": round(time.perf_counter() - start, 4),
            "tasks_without_quanta": without,
            "skipped_quanta": dict(self.report.skipped),
            "pruned_quanta": {k: dict(v) for k, v in self.report.pruned.items()},
            "output_run_exists": output_run_exists,
        }
        tasks = {td.label: task_info(td) for td in self.task_defs}
        graph = QuantumGraph(
            quanta,
            tasks,
            self._dataset_types,
            init_inputs,
            init_outputs,
            metadata,
            task_defs={td.label: td for td in self.task_defs},
        )
        _log.info("built %d quanta in %.3f s", len(graph), time.perf_counter() - start)
        return graph

    def _init_inputs(self, label: str, specs: Mapping[str, Any], predicted_init: Mapping[str, DatasetRef]) -> dict[str, DatasetRef]:
        out = {}
        for conn_name, (_conn, spec) in specs["initInputs"].items():
            ref = predicted_init.get(spec.name)
            if ref is None and self._registered.get(spec.name):
                ref = self.registry.find_dataset(spec.name, {}, self.input_collections)
            if ref is None:
                raise MissingInputError(
                    f"task {label!r}{self._task_location(label)}: init-input {conn_name!r} ({spec.name}) is neither "
                    f"produced by a task in the pipeline nor in the input collections {self.input_collections}"
                )
            out[conn_name] = ref
        return out

    def _init_outputs(self, specs: Mapping[str, Any], predicted_init: dict[str, DatasetRef], output_run_exists: bool) -> dict[str, DatasetRef]:
        out = {}
        for conn_name, (_conn, spec) in specs["initOutputs"].items():
            ref = None
            if output_run_exists and self._registered.get(spec.name):
                ref = self.registry.find_dataset(spec.name, {}, [self.output_run])  # already written: keep it
            if ref is None:
                ref = DatasetRef(self._dataset_types[spec.name], {}, self.output_run)
            out[conn_name] = ref
            predicted_init[spec.name] = ref
        return out

    def _build_task(
        self, task_def: TaskDef, specs: Mapping[str, Any], output_run_exists: bool, task_init: Mapping[str, DatasetRef]
    ) -> list[Quantum]:
        u = self.universe
        label = task_def.label
        quantum_dims = u.required_closure(task_def.connections.dimensions)
        qset = set(quantum_dims)
        query_dims: set[str] = set(quantum_dims)
        constraints: list[str] = []
        regular = specs["inputs"]
        for conn_name, (conn, spec) in regular.items():
            query_dims.update(spec.dimensions)
            if (
                spec.name not in self._predicted
                and conn.minimum > 0
                and not conn.deferGraphConstraint
                and self._registered.get(spec.name)
            ):
                constraints.append(spec.name)
        joined_prereqs = []
        for conn_name, (conn, spec) in specs["prerequisiteInputs"].items():
            if conn.lookupFunction is None and not set(spec.dimensions) <= qset:
                query_dims.update(spec.dimensions)
                joined_prereqs.append(conn_name)
        all_dims = u.full_closure(query_dims)
        data_id = {k: v for k, v in self._constraint().items() if k in all_dims}
        rows = self.butler.query_data_ids(
            list(all_dims),
            where=self.where,
            bind=self.bind or None,
            data_id=data_id,
            datasets=constraints or None,
            collections=self.input_collections if constraints else None,
        )
        qkey_of = _key_getter(quantum_dims)
        qid_keys = u.full_closure(quantum_dims)
        # Inputs: where their datasets come from, and how to key them from a row.
        sources: list[tuple[str, Any, Callable, dict[tuple, DatasetRef]]] = []
        for conn_name, (conn, spec) in regular.items():
            available = self._predicted.get(spec.name)
            if available is None:
                available = self._existing_refs(spec.name)
            sources.append((conn_name, conn, _key_getter(spec.dimensions), available))
        for conn_name in joined_prereqs:
            conn, spec = specs["prerequisiteInputs"][conn_name]
            sources.append((conn_name, conn, _key_getter(spec.dimensions), self._existing_refs(spec.name)))
        groups: dict[tuple, tuple[dict[str, Any], dict[str, dict[tuple, DatasetRef]]]] = {}
        for row in rows:
            qkey = qkey_of(row)
            group = groups.get(qkey)
            if group is None:
                group = groups[qkey] = ({k: row[k] for k in qid_keys}, {name: {} for name, *_ in sources})
            found = group[1]
            for conn_name, _conn, get, available in sources:
                ikey = get(row)
                ref = available.get(ikey)
                if ref is not None:
                    found[conn_name][ikey] = ref
        self.report.data_ids[label] = len(groups)
        pruned: dict[str, int] = {}
        prereq_direct = [
            (n, c, s, _key_getter(s.dimensions), self._existing_refs(s.name) if c.lookupFunction is None else None)
            for n, (c, s) in specs["prerequisiteInputs"].items()
            if n not in joined_prereqs
        ]
        outputs = [(n, c, s, u.full_closure(s.dimensions)) for n, (c, s) in specs["outputs"].items()]
        skip_refs = self._outputs_in(self.skip_existing_in, outputs) if self.skip_existing_in else None
        run_refs = self._outputs_in([self.output_run], outputs) if output_run_exists else None
        adjust = type(task_def.connections).adjustQuantum is not _default_adjust()
        predicted_here: dict[str, dict[tuple, DatasetRef]] = {s.name: {} for _, _, s, _ in outputs}
        quanta: list[Quantum] = []
        skipped = 0
        for _qkey, (qdata_id, found) in groups.items():
            inputs: dict[str, list[DatasetRef]] = {}
            missing = None
            for conn_name, conn, _get, _available in sources:
                refs_by_key = found[conn_name]
                if len(refs_by_key) < conn.minimum:
                    missing = conn_name
                    break
                refs = [refs_by_key[k] for k in sorted(refs_by_key)] if len(refs_by_key) > 1 else list(refs_by_key.values())
                if not conn.multiple and len(refs) > 1:
                    raise GraphBuildError(
                        f"task {label!r}{self._task_location(label)}: input {conn_name!r} ({conn.name}) is not "
                        f"multiple, but {len(refs)} datasets match quantum {_fmt(qdata_id)}; declare it multiple=True "
                        "or give it the quantum's dimensions"
                    )
                inputs[conn_name] = refs
            if missing is not None:
                conn = next(c for n, c, *_ in sources if n == missing)
                if isinstance(conn, _prerequisite_class()):
                    raise PrerequisiteMissingError(
                        f"task {label!r}{self._task_location(label)}: prerequisite input {missing!r} ({conn.name}) "
                        f"for quantum {_fmt(qdata_id)} is not in the input collections {self.input_collections}"
                    )
                reason = f"{missing} ({conn.name})"
                pruned[reason] = pruned.get(reason, 0) + 1
                continue
            for conn_name, conn, spec, get, existing in prereq_direct:
                if existing is None:
                    refs = list(conn.lookupFunction(self._dataset_types[spec.name], self.butler, dict(qdata_id), list(self.input_collections)))
                else:
                    ref = existing.get(get(qdata_id))
                    refs = [ref] if ref is not None else []
                if len(refs) < conn.minimum:
                    raise PrerequisiteMissingError(
                        f"task {label!r}{self._task_location(label)}: prerequisite input {conn_name!r} ({conn.name}) "
                        f"for quantum {_fmt(qdata_id)} is not in the input collections {self.input_collections}"
                    )
                inputs[conn_name] = refs
            if adjust:
                try:
                    adjusted_in, _ = task_def.connections.adjustQuantum(
                        {n: (task_def.connections.get(n), refs) for n, refs in inputs.items()}, {}, label, dict(qdata_id)
                    )
                except NoWorkFound as exc:
                    reason = f"NoWorkFound from adjustQuantum ({exc})" if str(exc) else "NoWorkFound from adjustQuantum"
                    pruned[reason] = pruned.get(reason, 0) + 1
                    continue
                inputs = {n: list(refs) for n, (_c, refs) in adjusted_in.items()}
            # Outputs: skip when all exist in skip_existing_in; otherwise predict (and check the run).
            out_keys = [(n, s, tuple(qdata_id[k] for k in s.dimensions), closure) for n, _c, s, closure in outputs]
            # LSST: a quantum whose metadata dataset exists has run (it is written last); without
            # metadata, all outputs must exist.  Outputs it did not write (NoWorkFound) stay missing.
            done_keys = [(s, key) for n, s, key, _cl in out_keys if n == METADATA_CONNECTION] or [(s, key) for _n, s, key, _cl in out_keys]
            if skip_refs is not None and done_keys and all(key in skip_refs[s.name] for s, key in done_keys):
                for _n, s, key, _cl in out_keys:
                    if key in skip_refs[s.name]:
                        predicted_here[s.name][key] = skip_refs[s.name][key]
                skipped += 1
                continue
            replaces = []
            if run_refs is not None:
                existing_outs = [run_refs[s.name][key] for _n, s, key, _cl in out_keys if key in run_refs[s.name]]
                if existing_outs:
                    if not self.clobber_outputs:
                        raise OutputExistsError(
                            f"task {label!r}: output(s) {sorted({r.dataset_type.name for r in existing_outs})} for quantum "
                            f"{_fmt(qdata_id)} already exist in the output run {self.output_run!r}; use a new output "
                            "run, --skip-existing-in to reuse them, or --clobber-outputs to replace them"
                        )
                    replaces = existing_outs
            out_refs: dict[str, list[DatasetRef]] = {}
            for conn_name, spec, key, closure in out_keys:
                ref = DatasetRef(self._dataset_types[spec.name], {k: qdata_id[k] for k in closure if k in qdata_id}, self.output_run)
                out_refs[conn_name] = [ref]
                predicted_here[spec.name][key] = ref
            quanta.append(Quantum(label, dict(qdata_id), inputs, out_refs, dict(task_init), replaces))
        if pruned:
            self.report.pruned[label] = pruned
            for reason, count in pruned.items():
                _log.info("%s: pruned %d quanta lacking %s", label, count, reason)
        if skipped:
            self.report.skipped[label] = skipped
        for name, refs in predicted_here.items():
            self._predicted[name] = refs
        return quanta

    def _outputs_in(self, collections: Sequence[str], outputs: Sequence[tuple[str, Any, Any, Any]]) -> dict[str, dict[tuple, DatasetRef]]:
        found: dict[str, dict[tuple, DatasetRef]] = {}
        existing_colls = []
        for name in collections:
            try:
                self.registry.get_collection(name)
                existing_colls.append(name)
            except MissingCollectionError:
                continue
        for _n, _c, spec, _cl in outputs:
            refs: dict[tuple, DatasetRef] = {}
            if existing_colls and self._registered.get(spec.name):
                get = _key_getter(spec.dimensions)
                for ref in self.butler.query_datasets(spec.name, collections=existing_colls, data_id={k: v for k, v in self._constraint().items() if k in self.universe.full_closure(spec.dimensions)}):
                    refs[get(ref.data_id)] = ref
            found[spec.name] = refs
        return found


def _default_adjust() -> Any:
    from .connections import PipelineTaskConnections

    return PipelineTaskConnections.adjustQuantum


def _prerequisite_class() -> type:
    from .connections import PrerequisiteInput

    return PrerequisiteInput


def build_quantum_graph(
    pipeline: Pipeline | Sequence[TaskDef],
    butler: Any,
    *,
    input_collections: str | Sequence[str],
    output_run: str,
    output: str | None = None,
    where: str | None = None,
    bind: Mapping[str, Any] | None = None,
    data_id: Mapping[str, Any] | None = None,
    skip_existing_in: Sequence[str] = (),
    clobber_outputs: bool = False,
    allow_empty: bool = False,
) -> QuantumGraph:
    """Build the quantum graph of a pipeline over a repository.

    Parameters
    ----------
    pipeline : Pipeline or sequence of TaskDef
        What to run (a Pipeline is expanded: configs applied, contracts checked, tasks ordered).
    butler : Butler
        The repository (only read).
    input_collections : str or sequence of str
        Where inputs are searched (in order, find-first).
    output_run : str
        The RUN collection the outputs will be written to (need not exist).
    output : str, optional
        The CHAINED collection the executor will point at ``[output_run, *inputs]``.
    where, bind : optional
        User data query (``-d``), LSST's expression language.
    data_id : mapping, optional
        Fixed data ID values (e.g. one quantum for tests).
    skip_existing_in : sequence of str
        Collections in which quanta that already ran are skipped: their ``{label}_metadata``
        dataset exists (all their outputs, for tasks without metadata).  Their existing outputs
        are used as inputs downstream.
    clobber_outputs : bool
        Outputs already in ``output_run`` are replaced (listed in ``Quantum.replaces``) instead of
        being an error.
    allow_empty : bool
        Return an empty graph instead of raising :class:`~pipeline.errors.EmptyGraphError`.

    Returns
    -------
    QuantumGraph
    """
    builder = QuantumGraphBuilder(
        butler,
        pipeline,
        input_collections=input_collections,
        output_run=output_run,
        output=output,
        where=where,
        bind=bind,
        data_id=data_id,
        skip_existing_in=skip_existing_in,
        clobber_outputs=clobber_outputs,
        allow_empty=allow_empty,
    )
    return builder.build()
