"""Execute a quantum graph on Dask: the driver.

:func:`execute_graph` (what ``pipetask run`` calls) and :func:`run_graph` (the library call)
do, in order:

1. **connect** to the scheduler (``--address``) before anything is written, so that an
   unreachable scheduler is one clear error and an untouched repository;
2. **prepare the run** (the driver is the only registry writer): register the graph's dataset
   types, the output RUN and the CHAINED output collection (``[run, earlier runs..., inputs]``,
   defined first so that an interrupted run can be found and resumed), remove the datasets
   ``--clobber-outputs`` replaces, write the per-run provenance — each task's ``{label}_config``,
   the ``packages`` dataset (versions of Python and the packages in use), and the quantum graph
   itself (``{run}/.executions/<stamp>/quantum_graph.json.gz``);
3. **run** one Dask task per quantum through an :class:`~pipeline.executors.base.Executor`
   (threads, processes or distributed); as each outcome arrives a writer thread records the
   quantum's outputs in the registry (whole quanta, batched in small transactions), so an
   interrupted run keeps everything that finished;
4. **summarize**: counts per task and status, every failure with its data ID and error, the
   blocked quanta; saved as ``summary.json`` next to the graph (``pipetask report`` reads it back)
   and, with ``--summary FILE``, there too.  Exit code 0 only if every quantum succeeded (or
   found no work).

Resume (LSST's semantics): ``--skip-existing`` skips quanta whose ``{label}_metadata`` dataset
exists — it is written last, and recorded in the same transaction as the quantum's other
outputs, so it marks a finished quantum; ``--extend-run`` writes into the output chain's first
run; ``--clobber-outputs`` replaces outputs already in the run.
"""

from __future__ import annotations

import json
import logging
import platform
import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from butler.refs import DatasetRef

from .errors import OutputExistsError, PipelineError
from .executors.base import ExecutionHooks, Executor, QuantumOutcome, QuantumSpec, Status, format_data_id, make_executor, quantum_key
from .graph import QuantumGraph
from .run_options import RunOptions

__all__ = [
    "execute_graph",
    "run_graph",
    "ExecutionReport",
    "load_report",
    "package_versions",
    "EXECUTIONS_FOLDER",
    "PACKAGES_DATASET",
]

_log = logging.getLogger(__name__)

#: Folder (inside a run's datastore folder) holding each execution's graph and summary.
EXECUTIONS_FOLDER = ".executions"
#: Dataset type of the per-run package versions (no dimensions, StructuredDataDict).
PACKAGES_DATASET = "packages"
_SUMMARY_FORMAT = "diapipe-execution-summary"


# ---------------------------------------------------------------------- the report
@dataclass
class ExecutionReport:
    """What happened in one execution (also the JSON summary).

    Attributes
    ----------
    run, output : str
        Output RUN and CHAINED collections.
    execution_id : str
    scheduler : str
        Scheduler description (with the number of workers).
    outcomes : dict of str to QuantumOutcome
        By quantum id, for every quantum of the graph that was to run.
    skipped : dict of str to int
        Quanta per task skipped because they had already run (``--skip-existing``).
    tasks : dict
        ``{label: {"quanta", "succeeded", "no_work", "failed", "blocked", "cancelled", "skipped"}}``.
    interrupted : bool
    seconds : float
    summary_file, graph_file : str
        Where the summary and the graph were saved in the repository.
    dashboard : str or None
    """

    run: str
    output: str | None
    execution_id: str
    scheduler: str = ""
    started: str = ""
    finished: str = ""
    outcomes: dict[str, QuantumOutcome] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    dimensions: dict[str, list[str]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    summary_file: str = ""
    graph_file: str = ""
    dashboard: str | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> dict[str, dict[str, int]]:
        """Counts per task (pipeline order) and status."""
        rows: dict[str, dict[str, int]] = {}
        for label in self.labels:
            rows[label] = {"quanta": 0, **{str(s): 0 for s in Status}, "skipped": self.skipped.get(label, 0)}
        for outcome in self.outcomes.values():
            row = rows.setdefault(outcome.task_label, {"quanta": 0, **{str(s): 0 for s in Status}, "skipped": 0})
            row["quanta"] += 1
            row[str(outcome.status)] += 1
        return rows

    def count(self, status: Status | str) -> int:
        """Quanta with this status."""
        return sum(1 for o in self.outcomes.values() if o.status == status)

    def _item(self, o: QuantumOutcome) -> dict[str, Any]:
        return {
            "task": o.task_label,
            "data_id": dict(o.data_id),
            "data_id_text": format_data_id(o.data_id, self.dimensions.get(o.task_label)),
            "key": o.key,
            "error_type": o.error_type,
            "error_type_short": (o.error_type or "").rpartition(".")[2],
            "error": o.error,
            "attempts": o.attempts,
            "timed_out": o.timed_out,
            "traceback": o.traceback,
            "blocked_by": o.blocked_by,
        }

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Each failed quantum: task, data ID, error type and message, attempts, traceback."""
        return [self._item(o) for o in self.outcomes.values() if o.status == Status.FAILED]

    @property
    def blocked(self) -> list[dict[str, Any]]:
        """Each blocked quantum with the key of the failure upstream."""
        return [self._item(o) for o in self.outcomes.values() if o.status == Status.BLOCKED]

    @property
    def succeeded(self) -> bool:
        """True when every quantum succeeded or found no work, and the run was not interrupted."""
        return not self.interrupted and all(o.ok for o in self.outcomes.values())

    @property
    def exit_code(self) -> int:
        """0 when :attr:`succeeded`, else 1."""
        return 0 if self.succeeded else 1

    def status_line(self) -> str:
        """``"24 quanta: 22 succeeded, 1 failed, 1 blocked"``."""
        parts = [f"{self.count(s)} {str(s).replace('_', ' ')}" for s in Status if self.count(s)]
        skipped = sum(self.skipped.values())
        if skipped:
            parts.append(f"{skipped} skipped (already done)")
        head = "all succeeded" if self.succeeded else ("interrupted" if self.interrupted else "FAILED")
        return f"{head}: {len(self.outcomes)} quanta: " + (", ".join(parts) or "nothing to do")

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary."""
        return {
            "format": _SUMMARY_FORMAT,
            "version": 1,
            "run": self.run,
            "output": self.output,
            "execution_id": self.execution_id,
            "scheduler": self.scheduler,
            "started": self.started,
            "finished": self.finished,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "succeeded": self.succeeded,
            "exit_code": self.exit_code,
            "status": self.status_line(),
            "graph_file": self.graph_file,
            "dashboard": self.dashboard,
            "tasks": self.tasks,
            "failures": self.failures,
            "blocked": [{k: v for k, v in b.items() if k not in ("traceback", "error_type", "error_type_short", "error")} for b in self.blocked],
            "quanta": [
                {k: v for k, v in o.to_dict().items() if k not in ("traceback", "outputs")} | {"n_outputs": len(o.outputs)}
                for o in self.outcomes.values()
            ],
            "dimensions": self.dimensions,
            "skipped": self.skipped,
        }

    def write(self, path: str | Path) -> None:
        """Write the JSON summary (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=str), encoding="utf-8")
        tmp.replace(path)


# ---------------------------------------------------------------------- provenance helpers
_PACKAGES = (
    "diapipe", "numpy", "scipy", "astropy", "dask", "distributed", "zarr", "numcodecs", "networkx",
    "pyarrow", "sqlalchemy", "pydantic", "photutils", "reproject", "spherical-geometry",
    "cloudpickle", "rich",
)


def package_versions(task_modules: Sequence[str] = ()) -> dict[str, str]:
    """Versions of Python and of the packages a run depends on (LSST's ``packages`` dataset).

    Parameters
    ----------
    task_modules : sequence of str
        Modules of the task classes: their distributions are included too.
    """
    from importlib import metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    names = list(_PACKAGES)
    try:
        dists = metadata.packages_distributions()
    except Exception:  # noqa: BLE001
        dists = {}
    for module in task_modules:
        for dist in dists.get(module.partition(".")[0], []):
            names.append(dist)
    for name in dict.fromkeys(names):
        try:
            versions[name.lower()] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _normalize(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# ---------------------------------------------------------------------- the registry writer
class _RegistryWriter(threading.Thread):
    """The driver's single registry writer: inserts each finished quantum's outputs.

    Quanta queued while a transaction runs are inserted together in the next one (at most
    ``batch`` quanta per transaction), so a fast stream of small quanta costs few commits and a
    slow one is recorded at once.  A batch that fails (e.g. a conflict) is retried quantum by
    quantum; a quantum whose outputs cannot be recorded is reported in :attr:`errors`.
    """

    def __init__(self, registry: Any, batch: int = 200) -> None:
        super().__init__(name="diapipe-registry-writer", daemon=True)
        self.registry = registry
        self.batch = batch
        self.queue: queue.Queue[QuantumOutcome | None] = queue.Queue()
        self.errors: dict[str, BaseException] = {}
        self.recorded = 0
        self.transactions = 0
        self._lock = threading.Lock()

    def submit(self, outcome: QuantumOutcome) -> None:
        """Queue a finished quantum's outputs."""
        if outcome.outputs:
            self.queue.put(outcome)

    def run(self) -> None:
        closing = False
        while not closing:
            item = self.queue.get()
            if item is None:
                break
            items = [item]
            while len(items) < self.batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    closing = True
                    break
                items.append(nxt)
            self._insert(items)

    def _insert(self, items: list[QuantumOutcome]) -> None:
        refs = [ref for o in items for ref in o.outputs]
        try:
            self.registry.insert_datasets(refs)
            self.transactions += 1
            self.recorded += len(items)
            return
        except Exception as exc:  # noqa: BLE001 - isolate the quantum at fault below
            if len(items) == 1:
                self.errors[items[0].quantum_id] = exc
                _log.error("outputs of %s could not be recorded: %s", items[0].key, exc)
                return
        for o in items:
            self._insert([o])

    def close(self) -> None:
        """Insert everything queued, then stop."""
        self.queue.put(None)
        self.join()


# ---------------------------------------------------------------------- hooks
class _Hooks(ExecutionHooks):
    def __init__(self, report: ExecutionReport, writer: _RegistryWriter, display: Any, options: RunOptions, remote: bool) -> None:
        self.report = report
        self.writer = writer
        self.display = display
        self.options = options
        self.remote = remote
        self.stopped = False

    def on_outcome(self, outcome: QuantumOutcome) -> bool:
        if outcome.quantum_id in self.report.outcomes and self.report.outcomes[outcome.quantum_id].status != Status.CANCELLED:
            return not self.stopped  # reported twice (cannot happen): keep the first
        self.report.outcomes[outcome.quantum_id] = outcome
        if outcome.ok:
            self.writer.submit(outcome)
        self.display.update(outcome)
        if self.remote:
            for record in outcome.logs:
                level = logging.getLevelName(record.get("level", "INFO"))
                if isinstance(level, int) and level >= logging.WARNING:
                    logging.getLogger(record.get("name", "task")).log(level, "[%s] %s", outcome.key, record.get("message"))
        if outcome.status == Status.FAILED:
            did = format_data_id(outcome.data_id, self.report.dimensions.get(outcome.task_label))
            _log.warning("%s {%s} failed after %d attempt(s): %s: %s", outcome.task_label, did, outcome.attempts,
                         (outcome.error_type or "").rpartition(".")[2], outcome.error)
            if self.options.fail_fast:
                self.stopped = True
        return not self.stopped

    def on_message(self, message: str) -> None:
        self.report.messages.append(message)
        if message.startswith("Dask dashboard: http"):
            self.report.dashboard = message.split(": ", 1)[1]
        _log.info("%s", message)
        self.display.message(message)


# ---------------------------------------------------------------------- the driver
def execute_graph(graph: QuantumGraph, butler_root: str | Path, options: RunOptions) -> int:
    """Execute a quantum graph; returns the process exit code (``pipetask run``'s executor).

    Prints the progress display and the summary table when ``options.progress`` is set.

    Returns
    -------
    int
        0 when every quantum succeeded or found no work, 1 otherwise.

    Raises
    ------
    PipelineError
        The run cannot start (unreachable scheduler, existing outputs, changed configs...).
    KeyboardInterrupt
        After recording what finished and saving the summary.
    """
    report = run_graph(graph, butler_root, options)
    return report.exit_code


def run_graph(
    graph: QuantumGraph,
    butler_root: str | Path,
    options: RunOptions,
    *,
    executor: Executor | None = None,
    worker_repo: str | None = None,
) -> ExecutionReport:
    """Execute a quantum graph and return the report (see the module docstring).

    Parameters
    ----------
    graph : QuantumGraph
    butler_root : str or Path
        The repository.
    options : RunOptions
    executor : Executor, optional
        Use this executor (it is not closed) instead of the one ``options.scheduler`` names.
    worker_repo : str, optional
        The repository path as the workers see it (default: ``butler_root`` made absolute).
    """
    from butler.butler import Butler

    from .executors.display import ProgressDisplay, print_summary

    root = Path(butler_root).resolve()
    run = graph.metadata.get("output_run") or options.output_run
    if not run:
        raise PipelineError("the quantum graph names no output run")
    own_executor = executor is None
    if executor is None:
        if options.timeout is not None and options.timeout <= 0:
            raise PipelineError(f"--timeout must be positive, got {options.timeout}")
        executor = make_executor(options)
    try:
        if executor.name == "distributed":
            executor.client  # type: ignore[attr-defined]  # connect first: fail before writing anything
        with Butler(root) as butler:
            return _run(graph, butler, root, run, options, executor, worker_repo or str(root), ProgressDisplay, print_summary)
    finally:
        if own_executor:
            executor.close()


def _run(
    graph: QuantumGraph,
    butler: Any,
    root: Path,
    run: str,
    options: RunOptions,
    executor: Executor,
    worker_repo: str,
    display_class: Any,
    print_summary: Any,
) -> ExecutionReport:
    started = time.perf_counter()
    execution_id = uuid.uuid4().hex
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    output = options.output or graph.metadata.get("output")
    report = ExecutionReport(
        run=run, output=output, execution_id=execution_id, started=datetime.now(UTC).isoformat(),
        labels=list(graph.task_labels), scheduler=executor.describe() if executor.name != "distributed" else "distributed",
        dimensions={label: list(info.get("dimensions", [])) for label, info in graph.tasks.items()},
        skipped={k: int(v) for k, v in (graph.metadata.get("skipped_quanta") or {}).items()},
    )
    exec_dir = root / run / EXECUTIONS_FOLDER / f"{stamp}-{execution_id[:8]}"
    report.summary_file = str(exec_dir / "summary.json")

    # -------- prepare (registry writes: the driver only)
    registry = butler.registry
    run_existed = _collection_exists(registry, run)
    if run_existed and not (options.extend_run or options.skip_existing or options.clobber_outputs):
        if _run_has_datasets(butler, graph, run):
            raise OutputExistsError(
                f"output run {run!r} already exists and holds datasets; use --extend-run (with --skip-existing to "
                "resume), --clobber-outputs, or a new output run"
            )
    from .quantum_execution import register_dataset_types

    if options.register_dataset_types:
        register_dataset_types(butler, graph)
        butler.register_dataset_type(PACKAGES_DATASET, [], "StructuredDataDict")
    butler.register_run(run)
    if output:
        _define_chain(butler, output, run, list(options.input_collections or graph.metadata.get("input_collections") or []))
    quanta = list(graph)
    done_refs, skip_ids = _already_done(butler, graph, run, quanta, run_existed)
    if skip_ids and not options.skip_existing:
        first = graph.get_quantum(next(iter(skip_ids)))
        raise OutputExistsError(
            f"{len(skip_ids)} quanta of this graph already ran in {run!r} (e.g. {first.task_label} {first.data_id}); "
            "use --skip-existing to run only the others"
        )
    _clobber(butler, quanta, skip_ids)
    _write_init_outputs(butler, graph)
    _write_packages(butler, graph, run)
    graph.save(exec_dir / "quantum_graph.json.gz")
    report.graph_file = str(exec_dir / "quantum_graph.json.gz")

    # -------- specs
    specs = _make_specs(graph, quanta, skip_ids, done_refs, butler, worker_repo, options, executor, execution_id, exec_dir)
    for qid in skip_ids:
        q = graph.get_quantum(qid)
        report.skipped[q.task_label] = report.skipped.get(q.task_label, 0) + 1
    totals = {label: 0 for label in graph.task_labels}
    for spec in specs:
        totals[spec.label] += 1
    display = display_class(totals, enabled=options.progress)
    writer = _RegistryWriter(registry)
    writer.start()
    hooks = _Hooks(report, writer, display, options, remote=executor.name != "threads")
    report.write(report.summary_file)  # a running marker; rewritten at the end
    _log.info("executing %d quanta of run %r on %s", len(specs), run, executor.describe() if executor.name != "distributed" else "dask.distributed")
    display.start()
    interrupted: BaseException | None = None
    try:
        if specs:
            executor.execute(specs, hooks)
    except KeyboardInterrupt as exc:
        interrupted = exc
        report.interrupted = True
    finally:
        display.stop()
        writer.close()
        from .executors.worker import uncancel_execution

        uncancel_execution(execution_id)
        for qid, exc in writer.errors.items():
            outcome = report.outcomes[qid]
            outcome.status = Status.FAILED
            outcome.error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
            outcome.error = f"its outputs could not be recorded in the registry: {exc}"
        if executor.name == "distributed":
            report.scheduler = next((m for m in report.messages if m.startswith("distributed")), "distributed")
        report.finished = datetime.now(UTC).isoformat()
        report.seconds = time.perf_counter() - started
        report.write(report.summary_file)
        if options.summary:
            report.write(options.summary)
        _log.info("%s; %d registry transactions", report.status_line(), writer.transactions)
    if options.progress:
        print_summary(report)
    if interrupted is not None:
        raise interrupted
    return report


def _collection_exists(registry: Any, name: str) -> bool:
    from butler.errors import MissingCollectionError

    try:
        registry.get_collection(name)
        return True
    except MissingCollectionError:
        return False


def _run_has_datasets(butler: Any, graph: QuantumGraph, run: str) -> bool:
    for name in graph.dataset_types:
        try:
            if butler.query_datasets(name, collections=[run], find_first=False, limit=1):
                init_names = {r.dataset_type.name for refs in graph.init_outputs.values() for r in refs.values()}
                if name not in init_names:
                    return True
        except Exception:  # noqa: BLE001 - type not registered
            continue
    return False


def _define_chain(butler: Any, output: str, run: str, inputs: list[str]) -> None:
    """``output`` := ``[run, earlier children..., inputs...]`` (LSST's ``-o``)."""
    registry = butler.registry
    children: list[str] = []
    if _collection_exists(registry, output):
        info = registry.get_collection(output)
        if info.type != "CHAINED":
            raise PipelineError(f"output collection {output!r} exists and is {info.type}, not CHAINED; choose another -o")
        children = registry.get_collection_chain(output)
    chain = [run] + [c for c in children if c != run]
    chain += [c for c in inputs if c not in chain]
    if chain != children:
        butler.set_collection_chain(output, chain)


def _already_done(
    butler: Any, graph: QuantumGraph, run: str, quanta: list[Any], run_existed: bool
) -> tuple[dict[str, DatasetRef], set[str]]:
    """Quanta of the graph whose metadata dataset (same id) is already in the run, and the
    stored refs of their outputs (a graph file run twice)."""
    if not run_existed:
        return {}, set()
    predicted: dict[str, dict[str, DatasetRef]] = {}
    for q in quanta:
        for ref in q.output_refs():
            if ref.path is None:
                predicted.setdefault(ref.dataset_type.name, {})[ref.id] = ref
    stored: dict[str, DatasetRef] = {}
    for name, refs in predicted.items():
        try:
            found = butler.query_datasets(name, collections=[run], find_first=False)
        except Exception:  # noqa: BLE001 - type not registered yet
            continue
        for ref in found:
            if ref.id in refs:
                stored[ref.id] = ref
    if not stored:
        return {}, set()
    skip = set()
    for q in quanta:
        meta = q.outputs.get("_metadata") or []
        ids = [r.id for r in (meta or list(q.output_refs()))]
        if ids and all(i in stored for i in ids):
            skip.add(q.id)
    return stored, skip


def _clobber(butler: Any, quanta: list[Any], skip_ids: set[str]) -> None:
    """Remove the datasets that ``--clobber-outputs`` replaces (registry rows, then files)."""
    refs = [ref for q in quanta if q.id not in skip_ids for ref in q.replaces]
    if not refs:
        return
    _log.info("--clobber-outputs: removing %d existing datasets", len(refs))
    butler.registry.remove_datasets(refs)
    butler.datastore.remove([r.path for r in refs if r.path])


def _write_init_outputs(butler: Any, graph: QuantumGraph) -> None:
    """Each task's init-outputs and ``{label}_config``; configs already in the run must match."""
    from .pipeline import CONFIG_CONNECTION
    from .quantum_execution import init_output_objects
    from .quantum_io import ButlerIO

    io = ButlerIO(butler)
    for label in graph.task_labels:
        refs = graph.init_outputs.get(label, {})
        if not refs and not graph.quanta_for_task(label):
            continue
        task_def = graph.task_def(label)
        init_inputs = {name: io.get(ref) for name, ref in graph.init_inputs.get(label, {}).items()}
        task = task_def.make_task(init_inputs)
        objects = init_output_objects(task_def, task)
        for name, ref in refs.items():
            if ref.path is not None:
                if name == CONFIG_CONNECTION:
                    stored = butler.datastore.get(ref)
                    if _normalize(stored) != _normalize(objects[name]):
                        raise PipelineError(
                            f"the config of task {label!r} differs from the one already in run {ref.run!r}; "
                            "use a new output run (or the same config) instead of --extend-run"
                        )
                continue
            if name not in objects:
                raise PipelineError(f"task {label!r} has no object for init-output {name!r}")
            io.put(objects[name], ref)


def _write_packages(butler: Any, graph: QuantumGraph, run: str) -> None:
    modules = [info.get("class", "").rpartition(".")[0] for info in graph.tasks.values()]
    versions = package_versions([m for m in modules if m])
    existing = None
    try:
        existing = butler.find_dataset(PACKAGES_DATASET, {}, collections=[run])
    except Exception:  # noqa: BLE001
        existing = None
    if existing is not None:
        old = butler.datastore.get(existing)
        changed = {k: (old.get(k), v) for k, v in versions.items() if old.get(k) != v and k != "platform"}
        if changed:
            _log.warning("package versions differ from those already recorded in run %r: %s", run,
                         ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(changed.items())))
        return
    butler.put(versions, PACKAGES_DATASET, {}, run=run)


def _make_specs(
    graph: QuantumGraph,
    quanta: list[Any],
    skip_ids: set[str],
    done_refs: Mapping[str, DatasetRef],
    butler: Any,
    worker_repo: str,
    options: RunOptions,
    executor: Executor,
    execution_id: str,
    exec_dir: Path,
) -> list[QuantumSpec]:
    formatters = dict(butler.datastore.formatters)
    specs = []
    for q in quanta:
        if q.id in skip_ids:
            continue
        if done_refs:
            inputs = {n: [done_refs.get(r.id, r) if r.path is None else r for r in refs] for n, refs in q.inputs.items()}
            q = replace(q, inputs=inputs)
        dims = graph.tasks[q.task_label].get("dimensions")
        upstream = [u for u in graph.graph.predecessors(q.id) if u not in skip_ids]
        specs.append(
            QuantumSpec(
                key=quantum_key(q.task_label, q.data_id, q.id, dims),
                quantum=q,
                task_info=graph.tasks[q.task_label],
                repo=worker_repo,
                formatters=formatters,
                upstream=upstream,
                retries=options.retries,
                timeout=options.timeout,
                hard_timeout=executor.hard_timeout,
                execution_id=execution_id,
                scratch=str(exec_dir / "timeouts"),
            )
        )
    return specs


# ---------------------------------------------------------------------- pipetask report
def load_report(repo: str | Path, collection: str) -> dict[str, Any]:
    """The summary of a run as stored in the repository (``pipetask report``).

    Merges the summaries of every execution into the run (later ones win for the same task and
    data ID) and checks them against the registry: a quantum whose ``{label}_metadata`` dataset is
    recorded finished, whatever an interrupted summary says.

    Parameters
    ----------
    repo : str or Path
    collection : str
        A RUN collection, or a CHAINED one (its runs are merged, first in the chain wins).

    Returns
    -------
    dict
        ``run``, ``executions`` (list of summary files), ``tasks`` (counts), ``failures``,
        ``blocked``, ``succeeded``, ``exit_code``.

    Raises
    ------
    PipelineError
        No execution summary for that collection.
    """
    from butler.butler import Butler

    with Butler(repo) as butler:
        registry = butler.registry
        if not _collection_exists(registry, collection):
            raise PipelineError(f"collection {collection!r} does not exist in {repo}")
        info = registry.get_collection(collection)
        runs = [c.name for c in registry.flatten_collections([collection]) if c.type == "RUN"] if info.type == "CHAINED" else [collection]
        files: list[Path] = []
        for run in reversed(runs):
            folder = Path(repo) / run / EXECUTIONS_FOLDER
            if folder.is_dir():
                files.extend(sorted(folder.glob("*/summary.json")))
        if not files:
            raise PipelineError(f"no execution summary in {collection!r} (nothing was run there with pipetask run)")
        quanta: dict[tuple[str, str], dict[str, Any]] = {}
        labels: list[str] = []
        dimensions: dict[str, list[str]] = {}
        skipped_tasks: dict[str, int] = {}
        executions = []
        for path in files:
            data = json.loads(path.read_text(encoding="utf-8"))
            executions.append({"file": str(path), "started": data.get("started"), "status": data.get("status"),
                               "scheduler": data.get("scheduler"), "interrupted": data.get("interrupted")})
            dimensions.update(data.get("dimensions", {}))
            for label in data.get("tasks", {}):
                if label not in labels:
                    labels.append(label)
            failures = {(f["task"], json.dumps(f["data_id"], sort_keys=True)): f for f in data.get("failures", [])}
            for q in data.get("quanta", []):
                key = (q["task"], json.dumps(q["data_id"], sort_keys=True))
                entry = dict(q)
                if key in failures:
                    entry.update({k: failures[key][k] for k in ("error", "error_type", "traceback") if k in failures[key]})
                if q["status"] == "cancelled" and key in quanta:
                    continue  # an interrupted rerun does not undo an earlier outcome
                quanta[key] = entry
            for label, n in (data.get("skipped") or {}).items():
                skipped_tasks[label] = max(skipped_tasks.get(label, 0), int(n))
        # The registry has the last word on what finished.
        index: dict[tuple[str, tuple[str, ...]], list[tuple[str, str]]] = {}
        for k, q in quanta.items():
            dims = dimensions.get(k[0]) or sorted(q["data_id"])
            index.setdefault((k[0], tuple(str(q["data_id"].get(d)) for d in dims)), []).append(k)
        for label in labels:
            try:
                metas = butler.query_datasets(f"{label}_metadata", collections=runs, find_first=False)
            except Exception:  # noqa: BLE001 - the task never wrote metadata
                continue
            for ref in metas:
                dims = dimensions.get(label) or sorted(ref.data_id)
                for k in index.get((label, tuple(str(ref.data_id.get(d)) for d in dims)), []):
                    if quanta[k]["status"] not in ("succeeded", "no_work"):
                        quanta[k]["status"] = "succeeded"
                        quanta[k]["note"] = "finished (its metadata is in the registry)"
    tasks: dict[str, dict[str, int]] = {label: {"quanta": 0, **{str(s): 0 for s in Status}} for label in labels}
    for (label, _), q in quanta.items():
        row = tasks.setdefault(label, {"quanta": 0, **{str(s): 0 for s in Status}})
        row["quanta"] += 1
        row[q["status"]] = row.get(q["status"], 0) + 1
    failures = [
        {**q, "data_id_text": format_data_id(q["data_id"], dimensions.get(q["task"]))}
        for q in quanta.values() if q["status"] == "failed"
    ]
    blocked = [
        {**q, "data_id_text": format_data_id(q["data_id"], dimensions.get(q["task"]))}
        for q in quanta.values() if q["status"] == "blocked"
    ]
    ok = all(q["status"] in ("succeeded", "no_work") for q in quanta.values())
    return {
        "run": collection,
        "runs": runs,
        "executions": executions,
        "tasks": tasks,
        "failures": failures,
        "blocked": blocked,
        "succeeded": ok,
        "exit_code": 0 if ok else 1,
    }


