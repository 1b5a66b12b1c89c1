"""The executor interface and the semantics every scheduler shares.

The driver (:func:`pipeline.execution.run_graph`) turns each quantum into a
:class:`QuantumSpec` (small, picklable: the quantum's refs, its task's config as plain data, the
repository root and the run options that matter in the worker) and hands the specs to an
:class:`Executor`.  The executor makes **one Dask task per quantum**, keyed by
:func:`quantum_key` (task label + data ID + short quantum id), whose Dask dependencies are the
graph's edges and whose function is :func:`pipeline.executors.worker.run_quantum_task`.  That
function never raises: it returns a :class:`QuantumOutcome`, so that Dask's local schedulers
(which abort on the first exception and have no retries) behave exactly like
``dask.distributed``.

Outcome vocabulary (:class:`Status`):

========== =====================================================================================
succeeded  ``runQuantum`` returned; outputs and the ``{label}_metadata`` dataset are written.
no_work    ``NoWorkFound`` (raised by the task, or because a required input was not produced
           upstream — LSST's ``adjustQuantum`` rule); a success without outputs, metadata written.
failed     the task raised (after ``--retries`` for transient errors), timed out, or its worker
           died too often; nothing it wrote is recorded.
blocked    an upstream quantum failed (or was blocked); never started.
cancelled  never finished because the run stopped (``--fail-fast``, interrupt).
========== =====================================================================================
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from butler.refs import DatasetRef

if TYPE_CHECKING:
    from ..graph import Quantum
    from ..run_options import RunOptions

__all__ = [
    "Status",
    "QuantumSpec",
    "QuantumOutcome",
    "ExecutionHooks",
    "Executor",
    "quantum_key",
    "format_data_id",
    "make_executor",
    "SCHEDULERS",
    "ALLOWED_WORKER_DEATHS",
]

_log = logging.getLogger(__name__)

#: Names accepted by ``--scheduler``.
SCHEDULERS = ("threads", "processes", "distributed")

#: Times a quantum may be running in a worker process that dies before it is reported failed
#: (``dask.distributed``'s ``distributed.scheduler.allowed-failures`` default; the processes
#: executor applies the same number).
ALLOWED_WORKER_DEATHS = 3


class Status(str, Enum):
    """Outcome of one quantum (see the module docstring)."""

    SUCCEEDED = "succeeded"
    NO_WORK = "no_work"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


#: Statuses after which downstream quanta may run.
OK_STATUSES = frozenset({Status.SUCCEEDED, Status.NO_WORK})


def format_data_id(data_id: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """``"visit=100, detector=1"`` in the data ID's (canonical) order, only ``keys`` when given."""
    wanted = None if keys is None else set(keys)
    items = [(k, v) for k, v in data_id.items() if wanted is None or k in wanted]
    return ", ".join(f"{k}={v}" for k, v in items)


def quantum_key(label: str, data_id: Mapping[str, Any], quantum_id: str, dimensions: Sequence[str] | None = None) -> str:
    """The Dask key of a quantum: ``"{label}-{k=v,...}-{id[:12]}"``.

    The label comes first so that Dask's dashboard groups tasks by pipeline task
    (``dask.utils.key_split`` keeps the leading word); the short id makes the key unique.
    """
    wanted = set(dimensions) if dimensions else None
    did = ",".join(f"{k}={v}" for k, v in data_id.items() if wanted is None or k in wanted)
    did = did.replace(" ", "_").replace("-", "~")
    return f"{label}-{did}-{quantum_id[:12]}"


@dataclass
class QuantumSpec:
    """Everything a worker needs to run one quantum (small and picklable; no pixels).

    Attributes
    ----------
    key : str
        The Dask key (:func:`quantum_key`).
    quantum : Quantum
        Its refs: stored inputs carry a ``path``; predicted ones are read at their datastore path.
    task_info : dict
        The task's class path, config and provenance as plain data (``QuantumGraph.tasks[label]``).
    repo : str
        Repository root as seen by the workers.
    formatters : dict
        The repository's storage class -> formatter overrides (``butler.yaml``).
    upstream : list of str
        Quantum ids of the producers of this quantum's inputs, in the order of the upstream
        outcomes passed to the task function.
    retries : int
        Extra attempts after a transient failure.
    timeout : float or None
        Seconds per attempt.
    hard_timeout : bool
        Whether the worker process may be killed when a timed-out attempt does not stop
        (processes and distributed); on threads it cannot.
    execution_id : str
        Identifies this execution (cancellation flags, scratch files).
    scratch : str
        Folder (in the repository) for execution scratch files (timeout tombstones).
    log_level : int
        Level at which the task's log records are captured.
    """

    key: str
    quantum: Quantum
    task_info: dict[str, Any]
    repo: str
    formatters: dict[str, str]
    upstream: list[str] = field(default_factory=list)
    retries: int = 0
    timeout: float | None = None
    hard_timeout: bool = False
    execution_id: str = ""
    scratch: str = ""
    log_level: int = logging.INFO

    @property
    def label(self) -> str:
        """The task label."""
        return self.quantum.task_label


@dataclass
class QuantumOutcome:
    """What a worker returns for one quantum (small: refs, status, error text, timings, logs).

    Attributes
    ----------
    quantum_id, task_label, key : str
    data_id : dict
    status : Status
    outputs : list of DatasetRef
        Stored refs (with ``path``) written by the quantum, metadata last; the driver inserts them.
    error_type, error, traceback : str or None
        Of the last failed attempt.
    exit_code : int or None
        20 for RepeatableQuantumError, 21 for InvalidQuantumError, 1 otherwise.
    attempts : int
        Attempts made (0 for blocked/cancelled quanta).
    seconds : float
        Wall time of all attempts.
    host, worker : str
        Host name and worker (thread, process or Dask worker address) of the last attempt.
    max_rss_bytes : int
        Peak resident memory of the worker process so far (``getrusage``).
    logs : list of dict
        Captured log records (``time``, ``level``, ``name``, ``message``).
    blocked_by : str or None
        For blocked quanta: the key of the failed quantum upstream.
    timed_out : bool
    """

    quantum_id: str
    task_label: str
    data_id: dict[str, Any]
    status: Status
    key: str = ""
    outputs: list[DatasetRef] = field(default_factory=list)
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    seconds: float = 0.0
    host: str = ""
    worker: str = ""
    max_rss_bytes: int = 0
    logs: list[dict[str, Any]] = field(default_factory=list)
    blocked_by: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True for succeeded and no-work quanta (their downstream may run)."""
        return self.status in OK_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the JSON summary (refs as dataset type + id)."""
        return {
            "quantum_id": self.quantum_id,
            "task": self.task_label,
            "data_id": dict(self.data_id),
            "key": self.key,
            "status": str(self.status),
            "outputs": [{"dataset_type": r.dataset_type.name, "id": r.id, "path": r.path} for r in self.outputs],
            "error_type": self.error_type,
            "error": self.error,
            "traceback": self.traceback,
            "exit_code": self.exit_code,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 6),
            "host": self.host,
            "worker": self.worker,
            "max_rss_bytes": self.max_rss_bytes,
            "blocked_by": self.blocked_by,
            "timed_out": self.timed_out,
        }


def blocked_outcome(spec: QuantumSpec, blocked_by: str) -> QuantumOutcome:
    """The outcome of a quantum whose upstream failed."""
    q = spec.quantum
    return QuantumOutcome(q.id, q.task_label, dict(q.data_id), Status.BLOCKED, key=spec.key, blocked_by=blocked_by)


def cancelled_outcome(spec: QuantumSpec, why: str = "the run stopped before this quantum finished") -> QuantumOutcome:
    """The outcome of a quantum that never finished because the run stopped."""
    q = spec.quantum
    return QuantumOutcome(q.id, q.task_label, dict(q.data_id), Status.CANCELLED, key=spec.key, error=why)


class ExecutionHooks(abc.ABC):
    """What an executor reports to the driver, always from the driver's thread."""

    @abc.abstractmethod
    def on_outcome(self, outcome: QuantumOutcome) -> bool:
        """A quantum finished (any status).  Return False to stop the run (``--fail-fast``)."""

    def on_idle(self) -> None:  # noqa: B027 - optional hook
        """Called at least every ~0.2 s while waiting (flush batched registry inserts, redraw)."""

    def on_message(self, message: str) -> None:  # noqa: B027 - optional hook
        """A line for the user (e.g. the Dask dashboard address)."""


class Executor(abc.ABC):
    """Runs quantum specs as Dask tasks and reports each outcome as it arrives.

    Subclasses implement :meth:`execute`.  The contract, identical on every scheduler:

    - one Dask task per spec, key ``spec.key``, dependencies = ``spec.upstream``;
    - each spec's outcome is reported exactly once through ``hooks.on_outcome``, in completion
      order, from the calling thread;
    - when ``on_outcome`` returns False, no new quantum starts; running ones are stopped where the
      scheduler can (processes are killed, Dask futures cancelled; threads cannot be stopped and
      their late writes are refused) and every spec without an outcome is reported ``cancelled``;
    - a ``KeyboardInterrupt`` stops the same way and is re-raised after the cancellations were
      reported.

    Parameters
    ----------
    workers : int
        Number of worker threads/processes (``-j``).
    """

    #: ``--scheduler`` name.
    name: str = ""
    #: Whether a timed-out attempt that does not stop may be ended by killing its process.
    hard_timeout: bool = False

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"need at least one worker, got {workers}")
        self.workers = workers

    @abc.abstractmethod
    def execute(self, specs: Sequence[QuantumSpec], hooks: ExecutionHooks) -> None:
        """Run the specs (given in dependency order) and report their outcomes."""

    def describe(self) -> str:
        """One line for logs: scheduler and workers."""
        return f"{self.name} scheduler, {self.workers} worker(s)"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (pools, clients, clusters)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_executor(options: RunOptions) -> Executor:
    """The executor named by ``options.scheduler`` (``threads``, ``processes``, ``distributed``).

    Raises
    ------
    ValueError
        Unknown scheduler name (the message lists the choices).
    """
    name = options.scheduler
    if name == "threads":
        from .threads import ThreadsExecutor

        return ThreadsExecutor(options.processes)
    if name == "processes":
        from .processes import ProcessesExecutor

        return ProcessesExecutor(options.processes)
    if name == "distributed":
        from .distributed import DistributedExecutor

        return DistributedExecutor(
            options.processes,
            address=options.address,
            local_cluster=options.local_cluster,
            connect_timeout=options.connect_timeout,
        )
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def order_specs(specs: Sequence[QuantumSpec]) -> list[QuantumSpec]:
    """Specs in an order where every producer comes before its consumers (stable)."""
    by_id = {s.quantum.id: s for s in specs}
    done: set[str] = set()
    out: list[QuantumSpec] = []
    for spec in specs:
        stack = [(spec, False)]
        while stack:
            s, expanded = stack.pop()
            qid = s.quantum.id
            if qid in done:
                continue
            if expanded:
                done.add(qid)
                out.append(s)
                continue
            stack.append((s, True))
            for up in reversed(s.upstream):
                if up in by_id and up not in done:
                    stack.append((by_id[up], False))
    return out


OutcomeCallback = Callable[[QuantumOutcome], bool]
