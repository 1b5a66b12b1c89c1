"""The ``processes`` executor: Dask's multiprocessing scheduler on a pool of worker processes.

For pure-Python work that holds the GIL.  Worker processes are forked from a ``forkserver``
(POSIX; ``spawn`` elsewhere) that has already imported the framework and the storage formats,
so a new worker starts in a fraction of a second — after a worker died too.  The BLAS/OpenMP
variables are set (one thread) before the server imports numpy, and each worker runs
:func:`~pipeline.executors.hygiene.configure_worker` (IERS downloads off, matplotlib Agg, zarr's
pool bounded).  Specs and outcomes are pickled (cloudpickle); they hold refs, never pixels.

Worker deaths: when a worker process dies (killed, out of memory, or ended by a hard timeout) the
pool breaks; the executor starts a new one and re-runs the quanta that were running (a strike
each; a quantum with :data:`~pipeline.executors.base.ALLOWED_WORKER_DEATHS` strikes is reported
failed).  Fail-fast and interrupts kill the worker processes, so running quanta really stop.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Executor as FuturesExecutor
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .hygiene import BLAS_ENV_VARS, configure_worker
from .local import LocalDaskExecutor

__all__ = ["ProcessesExecutor", "PRELOAD"]

#: Modules the fork server imports once, so that forked workers start warm.
PRELOAD = (
    "pipeline.executors.hygiene",
    "pipeline.executors.worker",
    "pipeline.quantum_execution",
    "pipeline.quantum_io",
    "butler.datastore",
    "butler.exposure",
    "butler.formats.json_io",
    "butler.formats.zarr_exposure",
)

_log = logging.getLogger(__name__)


class ProcessesExecutor(LocalDaskExecutor):
    """Runs quanta in ``workers`` processes with ``dask.multiprocessing.get``.

    Parameters
    ----------
    workers : int
        Number of worker processes (``-j``).
    start_method : str, optional
        ``multiprocessing`` start method; default ``forkserver`` where available (safe with the
        driver's threads, fast), else ``spawn``.
    """

    name = "processes"
    hard_timeout = True

    def __init__(self, workers: int = 1, start_method: str | None = None) -> None:
        super().__init__(workers)
        if start_method is None:
            start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self.start_method = start_method

    def _make_pool(self) -> FuturesExecutor:
        for name in BLAS_ENV_VARS:  # inherited by the fork server, before it imports numpy
            os.environ.setdefault(name, "1")
        context = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            context.set_forkserver_preload(list(PRELOAD))
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=configure_worker)

    def _get(self, dsk: dict[str, Any], keys: list[str], pool: FuturesExecutor, callbacks: list[tuple]) -> Any:
        import dask.multiprocessing

        return dask.multiprocessing.get(
            dsk, keys, num_workers=self.workers, pool=pool, optimize_graph=False, chunksize=1, callbacks=callbacks
        )

    def _stop_pool(self, pool: FuturesExecutor, execution_ids: set[str]) -> None:
        processes = list(getattr(pool, "_processes", {}).values())  # stdlib internals: no public kill
        for process in processes:
            if process.is_alive():
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=5)

    def _is_worker_death(self, exc: BaseException) -> bool:
        return isinstance(exc, BrokenProcessPool)
