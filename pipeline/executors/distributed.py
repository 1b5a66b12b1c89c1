"""The ``distributed`` executor: a ``dask.distributed`` cluster.

``--address tcp://host:8786`` connects to a running scheduler (``dask scheduler`` plus
``dask worker tcp://host:8786`` processes, e.g. the docker compose file); ``--local-cluster N``
(or no address) starts a :class:`distributed.LocalCluster` of N single-threaded worker processes
for the run.  Workers must see the repository at the same path as the driver and be able to
import the task classes.

Each quantum is one ``Client.submit(run_quantum_task, spec, *upstream_futures, key=..., pure=False)``
— the upstream futures make the graph's edges Dask dependencies — and outcomes are read with
``as_completed`` as they finish.

Worker deaths: a worker process killed while running a quantum makes the scheduler run the task
again on another worker (the worker function first removes whatever the dead attempt left at
the quantum's output paths); after ``distributed.scheduler.allowed-failures`` deaths (3) the
task errs with ``KilledWorker`` and the quantum is reported failed.  A future that errs because
its upstream erred is reported blocked.  Fail-fast and interrupts cancel the futures: queued
quanta never start; a quantum already running on a worker runs to its end (Dask cannot interrupt
a running task) and its result is discarded.  With ``--timeout`` a quantum that does not stop at
its deadline ends its worker process (the nanny restarts it) and is reported failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..errors import PipelineError
from .base import ExecutionHooks, Executor, QuantumOutcome, QuantumSpec, Status, blocked_outcome, cancelled_outcome, order_specs
from .worker import run_quantum_task

__all__ = ["DistributedExecutor", "SchedulerUnreachableError"]

_log = logging.getLogger(__name__)


class SchedulerUnreachableError(PipelineError, ConnectionError):
    """The Dask scheduler address cannot be reached."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class DistributedExecutor(Executor):
    """Runs quanta on a ``dask.distributed`` cluster.

    Parameters
    ----------
    workers : int
        Workers of the local cluster when one is started (``-j``; ignored with ``address``).
    address : str, optional
        Scheduler address, ``tcp://host:port``.
    local_cluster : int, optional
        Start a local cluster of this many single-threaded worker processes.
    connect_timeout : float
        Seconds to wait for the scheduler.
    client : distributed.Client, optional
        Use this client (tests, notebooks); it is not closed.
    """

    name = "distributed"
    hard_timeout = True

    def __init__(
        self,
        workers: int = 1,
        *,
        address: str | None = None,
        local_cluster: int | None = None,
        connect_timeout: float = 10.0,
        client: Any = None,
    ) -> None:
        super().__init__(workers)
        if address and local_cluster:
            raise PipelineError("give either --address or --local-cluster, not both")
        self.address = address
        self.local_cluster = local_cluster
        self.connect_timeout = connect_timeout
        self._client = client
        self._own_client = client is None
        self._cluster: Any = None

    # ------------------------------------------------------------------ connection
    @property
    def client(self) -> Any:
        """The ``distributed.Client`` (connects, or starts the local cluster, on first use)."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        from distributed import Client, LocalCluster

        if self.address:
            try:
                return Client(self.address, timeout=self.connect_timeout, set_as_default=False)
            except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, ValueError (bad address)
                raise SchedulerUnreachableError(
                    f"cannot reach the Dask scheduler at {self.address} within {self.connect_timeout:g} s "
                    f"({_one_line(exc)}); start one with `dask scheduler` (and `dask worker {self.address}`), "
                    "check the address, or use --local-cluster N"
                ) from None
        n = self.local_cluster or self.workers
        try:
            import bokeh  # noqa: F401

            dashboard: str | None = "127.0.0.1:0"
        except ImportError:
            dashboard = None
        self._cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=dashboard,
            host="127.0.0.1", silence_logs=logging.ERROR,
        )
        return Client(self._cluster, set_as_default=False)

    def describe(self) -> str:
        """Scheduler address, workers and dashboard."""
        client = self.client
        info = client.scheduler_info()
        n_workers = len(info.get("workers", {}))
        threads = sum(w.get("nthreads", 1) for w in info.get("workers", {}).values())
        return f"distributed scheduler {client.scheduler.address}, {n_workers} worker(s), {threads} thread(s)"

    def dashboard_link(self) -> str | None:
        """The dashboard URL, or None when the scheduler serves none (bokeh not installed)."""
        try:
            services = self.client.scheduler_info().get("services", {})
            if "dashboard" not in services:
                return None
            return self.client.dashboard_link
        except Exception:  # noqa: BLE001
            return None

    # ------------------------------------------------------------------ execution
    def execute(self, specs: Sequence[QuantumSpec], hooks: ExecutionHooks) -> None:
        """Submit every quantum, then report outcomes in completion order."""
        from distributed import as_completed

        client = self.client
        hooks.on_message(self.describe())
        link = self.dashboard_link()
        hooks.on_message(f"Dask dashboard: {link}" if link else "Dask dashboard: not available (install bokeh on the scheduler)")
        specs = order_specs(specs)
        by_key = {s.key: s for s in specs}
        by_id = {s.quantum.id: s for s in specs}
        futures: dict[str, Any] = {}
        for spec in specs:
            upstream = [futures[up] for up in spec.upstream if up in futures]
            futures[spec.quantum.id] = client.submit(
                run_quantum_task, spec, *upstream, key=spec.key, pure=False, retries=0
            )
        done: dict[str, QuantumOutcome] = {}
        pending_errors: dict[str, BaseException] = {}
        stopped = False
        iterator = as_completed(list(futures.values()), with_results=True, raise_errors=False, loop=client.loop)
        try:
            for future, result in iterator:
                spec = by_key[future.key]
                qid = spec.quantum.id
                if future.status == "finished" and isinstance(result, QuantumOutcome):
                    outcomes = [result]
                else:
                    pending_errors[qid] = self._exception_of(future, result)
                    outcomes = []
                outcomes += self._resolve_errors(pending_errors, done, by_id)
                for outcome in outcomes:
                    done[outcome.quantum_id] = outcome
                    if not hooks.on_outcome(outcome):
                        stopped = True
                future.release()
                if stopped:
                    break
        except KeyboardInterrupt:
            client.cancel([f for q, f in futures.items() if q not in done], force=True)
            self._cancel_rest(specs, done, hooks, "the run was interrupted")
            raise
        if stopped:
            client.cancel([f for q, f in futures.items() if q not in done], force=True)
        for outcome in self._resolve_errors(pending_errors, done, by_id, final=True):
            done[outcome.quantum_id] = outcome
            hooks.on_outcome(outcome)
        self._cancel_rest(specs, done, hooks, "not run: the run stopped (--fail-fast)")

    @staticmethod
    def _exception_of(future: Any, result: Any) -> BaseException:
        if isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], BaseException):
            return result[1]
        if isinstance(result, BaseException):
            return result
        try:
            exc = future.exception(timeout=1)
            if exc is not None:
                return exc
        except Exception as exc:  # noqa: BLE001 - cancelled futures raise here
            return exc
        return RuntimeError(f"task {future.key} ended with status {future.status}")

    @staticmethod
    def _resolve_errors(
        pending: dict[str, BaseException], done: dict[str, QuantumOutcome], by_id: dict[str, QuantumSpec], final: bool = False
    ) -> list[QuantumOutcome]:
        """Classify errored futures: blocked if an upstream did not succeed, else failed."""
        out: list[QuantumOutcome] = []
        progress = True
        while progress and pending:
            progress = False
            for qid in list(pending):
                spec = by_id[qid]
                failed_up = next((u for u in spec.upstream if u in done and not done[u].ok), None)
                if failed_up is not None:
                    outcome = blocked_outcome(spec, done[failed_up].blocked_by or done[failed_up].key)
                elif any(u in pending for u in spec.upstream):
                    continue  # decided once that upstream is
                elif final or all(u in done for u in spec.upstream):
                    exc = pending[qid]
                    q = spec.quantum
                    name = type(exc).__name__
                    outcome = QuantumOutcome(
                        qid, q.task_label, dict(q.data_id), Status.FAILED, key=spec.key,
                        error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                        error=(f"{name}: {exc}" if name == "KilledWorker" else str(exc)) or name,
                        exit_code=1,
                    )
                else:
                    continue
                del pending[qid]
                done[qid] = outcome
                out.append(outcome)
                progress = True
        if final:
            for qid in list(pending):  # cycles of errors cannot happen; be safe anyway
                spec = by_id[qid]
                outcome = blocked_outcome(spec, "an upstream task errored")
                del pending[qid]
                done[qid] = outcome
                out.append(outcome)
        return out

    @staticmethod
    def _cancel_rest(specs: Sequence[QuantumSpec], done: dict[str, QuantumOutcome], hooks: ExecutionHooks, why: str) -> None:
        for spec in specs:
            if spec.quantum.id not in done:
                outcome = cancelled_outcome(spec, why)
                done[spec.quantum.id] = outcome
                hooks.on_outcome(outcome)

    def close(self) -> None:
        """Close the client and the local cluster this executor started."""
        if self._client is not None and self._own_client:
            try:
                self._client.close()
            finally:
                self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
