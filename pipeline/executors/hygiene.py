"""Worker hygiene: settings every process (or thread pool) that runs quanta needs.

- BLAS/OpenMP: one thread per worker thread.  Environment variables only work before numpy
  loads its BLAS, so worker processes call :func:`configure_worker` first thing (this module
  imports nothing heavy); where numpy is already loaded (the threaded scheduler runs in the
  driver) ``threadpoolctl`` is used when it is installed.
- astropy: no IERS auto-download (machines are often offline; DESIGN §7).
- matplotlib: the Agg backend (no display on workers).
- zarr: its own thread pool and async concurrency bounded, so that it does not multiply with
  Dask's threads (DESIGN §7).

Everything here is idempotent and never raises: a missing optional package is skipped.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["configure_worker", "BLAS_ENV_VARS", "worker_settings"]

_log = logging.getLogger(__name__)

#: Environment variables read by BLAS/OpenMP libraries when they load.
BLAS_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

_lock = threading.Lock()
_done: dict[str, object] = {}
_limiter: object | None = None


def worker_settings() -> dict[str, object]:
    """What :func:`configure_worker` applied in this process (for metadata and tests)."""
    return dict(_done)


def configure_worker(zarr_threads: int = 1) -> dict[str, object]:
    """Apply the worker settings once per process.

    Parameters
    ----------
    zarr_threads : int
        Bound of zarr's thread pool (``threading.max_workers``) and of its async concurrency.

    Returns
    -------
    dict
        The settings applied (``blas``: how BLAS threads were limited, ``iers``, ``mpl``, ``zarr``).
    """
    global _limiter
    if _done:
        return dict(_done)
    with _lock:
        if _done:
            return dict(_done)
        settings: dict[str, object] = {}
        numpy_loaded = "numpy" in sys.modules
        for name in BLAS_ENV_VARS:
            os.environ.setdefault(name, "1")
        settings["blas"] = "environment" if not numpy_loaded else "environment (numpy already loaded)"
        try:
            from threadpoolctl import threadpool_limits

            _limiter = threadpool_limits(limits=1)
            settings["blas"] = "threadpoolctl"
        except ImportError:
            if numpy_loaded:
                _log.debug("numpy was loaded before the worker settings and threadpoolctl is not installed: "
                           "BLAS threads keep the library default")
        except Exception as exc:  # noqa: BLE001 - hygiene must never break a worker
            _log.debug("threadpoolctl failed: %s", exc)
        os.environ.setdefault("MPLBACKEND", "Agg")
        if "matplotlib" in sys.modules:
            try:
                import matplotlib

                matplotlib.use("Agg", force=True)
            except Exception as exc:  # noqa: BLE001
                _log.debug("matplotlib backend not set: %s", exc)
        settings["mpl"] = "Agg"
        try:
            from astropy.utils import iers

            iers.conf.auto_download = False
            settings["iers"] = "auto_download off"
        except Exception as exc:  # noqa: BLE001 - astropy missing or broken
            settings["iers"] = f"not set ({type(exc).__name__})"
        try:
            import zarr

            zarr.config.set({"threading.max_workers": zarr_threads, "async.concurrency": max(4, 4 * zarr_threads)})
            settings["zarr"] = {"threading.max_workers": zarr_threads, "async.concurrency": max(4, 4 * zarr_threads)}
        except Exception as exc:  # noqa: BLE001
            settings["zarr"] = f"not set ({type(exc).__name__})"
        _done.update(settings)
        return dict(settings)
