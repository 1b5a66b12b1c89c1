"""Run one quantum: build the task, call ``runQuantum``, write its metadata, report the outcome.

This is the smallest unit the executor wraps (one Dask task per quantum); it is also what
:mod:`pipeline.testing` uses.  It never raises for task failures: the outcome is a
:class:`QuantumResult` (``succeeded``, ``no_work`` or ``failed``) that pickles small, so a failed
quantum fails only its downstream.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from butler.refs import DatasetRef

from .errors import InvalidQuantumError, NoWorkFound, RepeatableQuantumError
from .graph import Quantum
from .pipeline import CONFIG_CONNECTION, METADATA_CONNECTION, TaskDef
from .pipeline_task import ButlerQuantumContext
from .quantum_io import QuantumIO

__all__ = ["QuantumResult", "execute_quantum", "init_output_objects", "write_init_outputs", "register_dataset_types"]

_log = logging.getLogger(__name__)


@dataclass
class QuantumResult:
    """The outcome of one quantum (small and picklable).

    Attributes
    ----------
    quantum_id, task_label : str
    data_id : dict
    status : str
        ``"succeeded"``, ``"no_work"`` (NoWorkFound: not an error) or ``"failed"``.
    outputs : list of DatasetRef
        Stored refs (with ``path``) of everything written, metadata included, for the driver to
        record in the registry.
    error_type, error, traceback : str or None
        For failures: exception class path, message, formatted traceback.
    exit_code : int or None
        ``RepeatableQuantumError.EXIT_CODE`` (20), ``InvalidQuantumError.EXIT_CODE`` (21), or 1.
    seconds : float
        Wall time of ``runQuantum``.
    """

    quantum_id: str
    task_label: str
    data_id: dict[str, Any]
    status: str
    outputs: list[DatasetRef] = field(default_factory=list)
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    exit_code: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True unless the quantum failed."""
        return self.status != "failed"


def execute_quantum(
    task_def: TaskDef,
    quantum: Quantum,
    io: QuantumIO,
    *,
    task: Any = None,
    raise_errors: bool = False,
    extra_metadata: Callable[[], Mapping[str, Any]] | None = None,
) -> QuantumResult:
    """Run one quantum through ``runQuantum`` with a context restricted to its refs.

    Parameters
    ----------
    task_def : TaskDef
    quantum : Quantum
    io : QuantumIO
        :class:`~pipeline.quantum_io.DatastoreIO` on workers (the driver records
        ``result.outputs``), :class:`~pipeline.quantum_io.ButlerIO` for direct runs.
    task : PipelineTask, optional
        A task already built (with init-inputs) to reuse; built here otherwise.
    raise_errors : bool
        Re-raise task exceptions (debugging) instead of returning a failed result.
    extra_metadata : callable, optional
        Called just before the metadata dataset is written; its mapping is merged into the
        metadata's ``quantum`` section (the executor adds host, attempts, log records, ...).
    """
    start = time.perf_counter()
    context = ButlerQuantumContext(io, quantum, task_def.connections)
    result = QuantumResult(quantum.id, quantum.task_label, dict(quantum.data_id), "succeeded")
    try:
        if task is None:
            init = {name: io.get(ref) for name, ref in quantum.init_inputs.items()}
            task = task_def.make_task(init)
        input_refs, output_refs = quantum.quantized_connections(task_def.connections)
        with task.timer("runQuantum"):
            task.runQuantum(context, input_refs, output_refs)
    except NoWorkFound as exc:
        result.status = "no_work"
        _log.info("%s %s: no work found (%s)", quantum.task_label, quantum.data_id, exc)
    except Exception as exc:  # noqa: BLE001 - the outcome is reported, not raised
        if raise_errors:
            raise
        result.status = "failed"
        result.error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
        result.error = str(exc)
        result.traceback = traceback.format_exc()
        result.exit_code = exc.EXIT_CODE if isinstance(exc, (RepeatableQuantumError, InvalidQuantumError)) else 1
        _log.error("%s %s failed: %s: %s", quantum.task_label, quantum.data_id, type(exc).__name__, exc)
    result.seconds = time.perf_counter() - start
    if result.status != "failed" and task is not None:
        metadata_refs = quantum.outputs.get(METADATA_CONNECTION)
        if metadata_refs:
            metadata = {"quantum": {"id": quantum.id, "status": result.status, "seconds": result.seconds}}
            if extra_metadata is not None:
                metadata["quantum"].update(extra_metadata())
            metadata.update(task.getFullMetadata())
            context.put(_plain(metadata), metadata_refs[0])
    result.outputs = list(context.outputs_written)
    return result


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def init_output_objects(task_def: TaskDef, task: Any) -> dict[str, Any]:
    """``{init-output connection: object}`` of a built task, with ``_config`` (the config as data)."""
    objects = dict(task.getInitOutputDatasets())
    objects[CONFIG_CONNECTION] = task_def.config.to_dict()
    return objects


def write_init_outputs(task_def: TaskDef, task: Any, refs: Mapping[str, DatasetRef], io: QuantumIO) -> list[DatasetRef]:
    """Write a task's init-outputs (refs that are already stored are left alone); returns stored refs."""
    objects = init_output_objects(task_def, task)
    written = []
    for name, ref in refs.items():
        if ref.path is not None:
            continue
        if name not in objects:
            raise InvalidQuantumError(f"task {task_def.label!r} has no object for init-output {name!r}")
        written.append(io.put(objects[name], ref))
    return written


def register_dataset_types(butler: Any, graph: Any) -> list[str]:
    """Register the graph's dataset types that the repository does not know yet, and its output
    run (LSST's ``--register-dataset-types``); returns the names registered.

    This writes to the registry: the executor calls it once, before running quanta.
    """
    registered = []
    for name, dataset_type in graph.dataset_types.items():
        if butler.register_dataset_type(name, dataset_type.dimensions, dataset_type.storage_class):
            registered.append(name)
    run = graph.metadata.get("output_run")
    if run:
        butler.register_run(run)
    return registered
