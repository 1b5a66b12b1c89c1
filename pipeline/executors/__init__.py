"""Executors: run a quantum graph's quanta as Dask tasks (threads, processes or distributed).

One :class:`~pipeline.executors.base.Executor` interface, three peers:

- :class:`~pipeline.executors.threads.ThreadsExecutor` (``--scheduler threads``, the default),
- :class:`~pipeline.executors.processes.ProcessesExecutor` (``--scheduler processes``),
- :class:`~pipeline.executors.distributed.DistributedExecutor` (``--scheduler distributed``).

Every quantum is one Dask task whose function is
:func:`~pipeline.executors.worker.run_quantum_task`; it returns a small
:class:`~pipeline.executors.base.QuantumOutcome` (status, stored refs, error, timing, logs), never
raises, and implements the semantics the three schedulers share (blocked downstream, retries,
timeouts, NoWorkFound).  The driver (:mod:`pipeline.execution`) records outcomes as they arrive.

Names are imported lazily so that worker processes can unpickle
:func:`~pipeline.executors.hygiene.configure_worker` before numpy is imported.
"""

from __future__ import annotations

from butler.lazy import attach

_LAZY: dict[str, str] = {
    "Executor": "pipeline.executors.base",
    "ExecutionHooks": "pipeline.executors.base",
    "QuantumOutcome": "pipeline.executors.base",
    "QuantumSpec": "pipeline.executors.base",
    "Status": "pipeline.executors.base",
    "quantum_key": "pipeline.executors.base",
    "make_executor": "pipeline.executors.base",
    "run_quantum_task": "pipeline.executors.worker",
    "ThreadsExecutor": "pipeline.executors.threads",
    "ProcessesExecutor": "pipeline.executors.processes",
    "DistributedExecutor": "pipeline.executors.distributed",
    "configure_worker": "pipeline.executors.hygiene",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
