"""The ``threads`` executor: Dask's threaded scheduler in the driver process (the default).

Quanta share the driver's memory, so there is no serialization and the per-quantum overhead is
the smallest; work scales with threads only where it releases the GIL (numpy ufuncs, FFTs, I/O —
DESIGN §7).  BLAS/OpenMP are limited to one thread per worker thread (threadpoolctl when
installed, else environment variables set before numpy loads).

Timeout on threads: a thread cannot be killed.  At the deadline the quantum's reads and writes
are refused and ``QuantumTimeoutError`` is raised in its thread (it stops at the next Python
bytecode).  If it has not stopped after a grace period, the quantum is reported failed, is not
retried, and the thread runs on in the background with its result discarded; it can write
nothing more.
"""

from __future__ import annotations

from concurrent.futures import Executor as FuturesExecutor
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .local import LocalDaskExecutor
from .worker import cancel_execution

__all__ = ["ThreadsExecutor"]


class ThreadsExecutor(LocalDaskExecutor):
    """Runs quanta on ``workers`` threads with ``dask.threaded.get``.

    Parameters
    ----------
    workers : int
        Number of threads (``-j``).
    """

    name = "threads"
    hard_timeout = False

    def _make_pool(self) -> FuturesExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="diapipe-quantum")

    def _get(self, dsk: dict[str, Any], keys: list[str], pool: FuturesExecutor, callbacks: list[tuple]) -> Any:
        import dask.threaded

        return dask.threaded.get(dsk, keys, num_workers=self.workers, pool=pool, callbacks=callbacks)

    def _stop_pool(self, pool: FuturesExecutor, execution_ids: set[str]) -> None:
        for execution_id in execution_ids:
            cancel_execution(execution_id)  # queued quanta return at once; running ones' I/O is refused
        pool.shutdown(wait=False, cancel_futures=True)
