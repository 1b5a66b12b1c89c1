"""Shared code of the two local Dask schedulers (``threads`` and ``processes``).

The graph is a dict of :class:`dask.task_spec.Task` objects — one per quantum, keyed by
``spec.key``, whose arguments are the spec and a :class:`~dask.task_spec.TaskRef` to each
upstream quantum — run by ``dask.threaded.get`` / ``dask.multiprocessing.get`` on a pool this
module owns.  Outcomes are reported from Dask's ``posttask`` callback, which runs in the calling
thread as each task finishes.  Graph optimisation (fusing) is off: every quantum stays one task.

A local scheduler aborts on the first exception; the task function never raises, so the only
exceptions are ours: ``_StopRun`` (``--fail-fast``), ``KeyboardInterrupt``, and — processes only
— ``BrokenProcessPool`` when a worker process died.  After a broken pool the executor starts a
new pool and runs the quanta without an outcome again, passing the outcomes it already has as
plain arguments; each quantum that was running when a worker died gets a strike, and after
:data:`~pipeline.executors.base.ALLOWED_WORKER_DEATHS` strikes it is reported failed (the same
rule as ``dask.distributed``'s ``allowed-failures``).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor as FuturesExecutor
from typing import Any

from .base import ALLOWED_WORKER_DEATHS, ExecutionHooks, Executor, QuantumOutcome, QuantumSpec, Status, cancelled_outcome, order_specs
from .worker import run_quantum_task

__all__ = ["LocalDaskExecutor"]

_log = logging.getLogger(__name__)


class _StopRun(Exception):
    """Raised from the posttask callback to make Dask's local scheduler stop (fail-fast)."""


class _WorkerDied(Exception):
    """A worker process died (the pool is broken)."""


def build_task_graph(specs: Sequence[QuantumSpec], done: dict[str, QuantumOutcome]) -> tuple[dict[str, Any], list[str]]:
    """``({key: dask Task}, keys)`` for the specs without an outcome.

    Upstream quanta that already have an outcome are passed as plain arguments (their outcome),
    the others as ``TaskRef`` dependencies.
    """
    from dask.task_spec import Task, TaskRef

    key_of = {s.quantum.id: s.key for s in specs}
    dsk: dict[str, Any] = {}
    for spec in specs:
        qid = spec.quantum.id
        if qid in done:
            continue
        args: list[Any] = []
        for up in spec.upstream:
            if up in done:
                args.append(done[up])
            else:
                args.append(TaskRef(key_of[up]))
        dsk[spec.key] = Task(spec.key, run_quantum_task, spec, *args)
    return dsk, list(dsk)


class LocalDaskExecutor(Executor):
    """Base of the threads and processes executors (see the module docstring)."""

    def __init__(self, workers: int = 1) -> None:
        super().__init__(workers)
        self._pool: FuturesExecutor | None = None

    # ------------------------------------------------------------------ per scheduler
    @abc.abstractmethod
    def _make_pool(self) -> FuturesExecutor:
        """A fresh pool of ``self.workers`` workers."""

    @abc.abstractmethod
    def _get(self, dsk: dict[str, Any], keys: list[str], pool: FuturesExecutor, callbacks: list[tuple]) -> Any:
        """Run the graph with Dask's local scheduler on ``pool``."""

    def _stop_pool(self, pool: FuturesExecutor, execution_ids: set[str]) -> None:
        """Stop a pool after fail-fast or an interrupt (running quanta: as far as possible)."""
        pool.shutdown(wait=False, cancel_futures=True)

    def _is_worker_death(self, exc: BaseException) -> bool:
        return False

    # ------------------------------------------------------------------ the loop
    def execute(self, specs: Sequence[QuantumSpec], hooks: ExecutionHooks) -> None:
        """Run the specs; see :class:`~pipeline.executors.base.Executor`."""
        specs = order_specs(specs)
        by_key = {s.key: s for s in specs}
        done: dict[str, QuantumOutcome] = {}
        strikes: dict[str, int] = {}
        execution_ids = {s.execution_id for s in specs}
        stopped = False
        while len(done) < len(specs) and not stopped:
            dsk, keys = build_task_graph(specs, done)
            state_box: dict[str, Any] = {}

            def start_state(dsk: Any, state: dict[str, Any], box: dict[str, Any] = state_box) -> None:
                box["state"] = state

            def posttask(key: str, result: QuantumOutcome, dsk: Any, state: Any, worker_id: Any) -> None:
                spec = by_key[key]
                if not isinstance(result, QuantumOutcome):  # pragma: no cover - defensive
                    result = QuantumOutcome(spec.quantum.id, spec.label, dict(spec.quantum.data_id), Status.FAILED,
                                            key=key, error=f"worker returned {type(result).__name__}")
                done[spec.quantum.id] = result
                if not hooks.on_outcome(result):
                    raise _StopRun()

            pool = self._pool or self._make_pool()
            self._pool = pool
            try:
                self._get(dsk, keys, pool, [(None, start_state, None, posttask, None)])
            except _StopRun:
                stopped = True
                self._stop_pool(pool, execution_ids)
                self._pool = None
            except KeyboardInterrupt:
                self._stop_pool(pool, execution_ids)
                self._pool = None
                self._report_cancelled(specs, done, hooks, "the run was interrupted")
                raise
            except BaseException as exc:
                if not self._is_worker_death(exc):
                    self._stop_pool(pool, execution_ids)
                    self._pool = None
                    raise
                self._stop_pool(pool, execution_ids)
                self._pool = None
                running = set(state_box.get("state", {}).get("running", ()))
                _log.warning("a worker process died while running %s; starting new workers", ", ".join(sorted(running)) or "nothing")
                for key in sorted(running):
                    spec = by_key[key]
                    qid = spec.quantum.id
                    strikes[qid] = strikes.get(qid, 0) + 1
                    if strikes[qid] >= ALLOWED_WORKER_DEATHS:
                        q = spec.quantum
                        outcome = QuantumOutcome(
                            qid, q.task_label, dict(q.data_id), Status.FAILED, key=key,
                            error_type="pipeline.executors.WorkerDiedError",
                            error=f"its worker process died {strikes[qid]} times while running it",
                            exit_code=1, attempts=strikes[qid],
                        )
                        done[qid] = outcome
                        if not hooks.on_outcome(outcome):
                            stopped = True
                            break
                time.sleep(0.1)
        self._report_cancelled(specs, done, hooks, "not run: the run stopped (--fail-fast)")

    @staticmethod
    def _report_cancelled(specs: Sequence[QuantumSpec], done: dict[str, QuantumOutcome], hooks: ExecutionHooks, why: str) -> None:
        for spec in specs:
            if spec.quantum.id not in done:
                outcome = cancelled_outcome(spec, why)
                done[spec.quantum.id] = outcome
                hooks.on_outcome(outcome)

    def close(self) -> None:
        """Shut the pool down."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
