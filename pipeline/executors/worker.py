"""The function every Dask task runs: one quantum, with the shared semantics.

:func:`run_quantum_task` ``(spec, *upstream_outcomes) -> QuantumOutcome`` never raises.  In order:

1. **cancelled run** (``--fail-fast`` or interrupt on the threaded scheduler): returns
   ``cancelled`` without starting;
2. **blocked**: an upstream outcome is failed/blocked/cancelled -> ``blocked`` (never started);
3. **timeout tombstone**: a previous attempt of this quantum timed out and its process had to be
   killed (processes/distributed) -> ``failed`` (timed out), not run again;
4. **missing inputs** (LSST's rule): inputs whose producer wrote nothing (NoWorkFound upstream,
   or an optional output not written) are dropped; if a connection then has fewer refs than its
   ``minimum`` the quantum is ``no_work`` (metadata written, no outputs);
5. **attempts**: up to ``1 + retries``; before each, files left at the quantum's predicted output
   paths by an earlier attempt (or a worker that died) are removed — no registry row can point
   at them, the driver checked that none of the graph's output ids is registered;
   ``RepeatableQuantumError`` and ``InvalidQuantumError`` are never retried;
6. **timeout** per attempt (a watchdog thread): at the deadline the quantum's reads and writes
   are refused and ``QuantumTimeoutError`` is raised asynchronously in the quantum's thread (it
   stops at the next Python bytecode; a long C call first runs to its end).  If the attempt has
   not stopped ``grace`` seconds later, on processes/distributed a tombstone is written and the
   worker process exits (its pool or nanny replaces it); on threads nothing can stop it: the
   quantum is reported failed, never retried, and its late writes are refused.

The task's log records (the quantum's thread, at ``spec.log_level`` and above) are captured and
returned, and written into the ``{label}_metadata`` dataset with host, worker, attempts, timings
and peak memory.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from .base import OK_STATUSES, QuantumOutcome, QuantumSpec, Status, blocked_outcome, cancelled_outcome
from .hygiene import configure_worker, worker_settings

__all__ = [
    "run_quantum_task",
    "QuantumTimeoutError",
    "cancel_execution",
    "uncancel_execution",
    "tombstone_path",
    "HARD_TIMEOUT_EXIT_CODE",
    "MAX_LOG_RECORDS",
]

_log = logging.getLogger(__name__)

#: Exit status of a worker process ended because a timed-out quantum did not stop.
HARD_TIMEOUT_EXIT_CODE = 75
#: Log records kept per quantum (the first ones, then a note of how many were dropped).
MAX_LOG_RECORDS = 500
_MAX_MESSAGE = 2000
_MAX_TRACEBACK = 20000


class QuantumTimeoutError(Exception):
    """A quantum ran longer than ``--timeout``."""


# ---------------------------------------------------------------------- process-wide state
_cancelled: set[str] = set()
_state_lock = threading.Lock()
_datastores: dict[tuple, Any] = {}
_task_defs: dict[tuple, Any] = {}


def cancel_execution(execution_id: str) -> None:
    """Stop starting quanta of an execution in this process and refuse their reads and writes."""
    _cancelled.add(execution_id)


def uncancel_execution(execution_id: str) -> None:
    """Forget a cancellation (the driver calls it when the execution is over)."""
    _cancelled.discard(execution_id)


def tombstone_path(scratch: str, quantum_id: str) -> Path:
    """Where a hard timeout of a quantum is recorded."""
    return Path(scratch) / f"{quantum_id}.timeout"


class _DatastoreOnly:
    """What :class:`~pipeline.quantum_io.DatastoreIO` needs of a butler: its datastore."""

    def __init__(self, datastore: Any) -> None:
        self.datastore = datastore


def _datastore(repo: str, formatters: Mapping[str, str]) -> Any:
    key = (repo, tuple(sorted(formatters.items())))
    ds = _datastores.get(key)
    if ds is None:
        from butler.datastore import FileDatastore

        with _state_lock:
            ds = _datastores.get(key)
            if ds is None:
                ds = _datastores[key] = FileDatastore(Path(repo), formatters)
    return ds


def _task_def(spec: QuantumSpec) -> Any:
    key = (spec.execution_id, spec.label)
    task_def = _task_defs.get(key)
    if task_def is None:
        from ..graph import _rebuild_task_def

        with _state_lock:
            task_def = _task_defs.get(key)
            if task_def is None:
                task_def = _task_defs[key] = _rebuild_task_def(spec.label, spec.task_info)
                if len(_task_defs) > 256:  # old executions
                    for old in list(_task_defs)[:-128]:
                        _task_defs.pop(old, None)
    return task_def


# ---------------------------------------------------------------------- log capture
class _CaptureHandler(logging.Handler):
    """Collects the records of registered threads (one list per thread)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.sinks: dict[int, tuple[int, list[dict[str, Any]], list[int]]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        sink = self.sinks.get(record.thread)  # type: ignore[arg-type]
        if sink is None:
            return
        level, records, dropped = sink
        if record.levelno < level:
            return
        if len(records) >= MAX_LOG_RECORDS:
            dropped[0] += 1
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not break the quantum
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            message += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        records.append(
            {
                "time": record.created,
                "level": record.levelname,
                "name": record.name,
                "message": message[:_MAX_MESSAGE],
            }
        )


_capture: _CaptureHandler | None = None


def _capture_handler() -> _CaptureHandler:
    global _capture
    if _capture is None:
        with _state_lock:
            if _capture is None:
                handler = _CaptureHandler()
                logging.getLogger().addHandler(handler)
                _capture = handler
    return _capture


class _LogCapture:
    """Context: capture this thread's records at ``level`` and above; enable the task logger."""

    def __init__(self, level: int, logger_name: str) -> None:
        self.level = level
        self.logger_name = logger_name
        self.records: list[dict[str, Any]] = []
        self.dropped = [0]

    def __enter__(self) -> _LogCapture:
        logger = logging.getLogger(self.logger_name)
        if logger.level == logging.NOTSET and logger.getEffectiveLevel() > self.level:
            logger.setLevel(self.level)  # LSST: task logs at INFO go into the quantum's metadata
        self._token = self.attached()
        self._token.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._token.__exit__(*exc)

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Capture the records of the current thread while in the block."""
        handler = _capture_handler()
        ident = threading.get_ident()
        previous = handler.sinks.get(ident)
        handler.sinks[ident] = (self.level, self.records, self.dropped)
        try:
            yield
        finally:
            if previous is None:
                handler.sinks.pop(ident, None)
            else:
                handler.sinks[ident] = previous

    def snapshot(self) -> list[dict[str, Any]]:
        """The records so far (with a note when some were dropped)."""
        out = list(self.records)
        if self.dropped[0]:
            out.append({"time": time.time(), "level": "WARNING", "name": "pipeline.executors.worker",
                        "message": f"{self.dropped[0]} more log records were not kept (limit {MAX_LOG_RECORDS})"})
        return out


# ---------------------------------------------------------------------- fenced I/O
class _FencedIO:
    """A :class:`~pipeline.quantum_io.DatastoreIO` whose reads and writes fail once the attempt
    has timed out or the execution was cancelled (so an attempt that cannot be stopped cannot
    write anything after its deadline)."""

    def __init__(self, inner: Any, execution_id: str) -> None:
        self.inner = inner
        self.execution_id = execution_id
        self.expired: str | None = None

    def _check(self) -> None:
        if self.expired is not None:
            raise QuantumTimeoutError(self.expired)
        if self.execution_id in _cancelled:
            raise QuantumTimeoutError("the run was cancelled")

    def get(self, ref: Any, parameters: Any = None) -> Any:
        self._check()
        return self.inner.get(ref, parameters)

    def get_deferred(self, ref: Any, parameters: Any = None) -> Any:
        from ..quantum_io import InputHandle

        return InputHandle(self, ref, parameters)

    def put(self, obj: Any, ref: Any) -> Any:
        self._check()
        return self.inner.put(obj, ref)


# ---------------------------------------------------------------------- the watchdog
def _async_raise(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in another thread at its next bytecode (None clears a pending one)."""
    obj = ctypes.py_object(exc_type) if exc_type is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), obj)


def _grace_seconds(timeout: float) -> float:
    return min(max(1.0, 0.25 * timeout), 30.0)


class _Watchdog:
    """Arms a timer around one attempt running in the current thread."""

    def __init__(self, timeout: float | None, io: _FencedIO, on_hard: Callable[[], None] | None) -> None:
        self.timeout = timeout
        self.io = io
        self.on_hard = on_hard
        self.lock = threading.Lock()
        self.running = False
        self.fired = False
        self.stopped = threading.Event()
        self.thread_id = threading.get_ident()
        self.timers: list[threading.Timer] = []

    def __enter__(self) -> _Watchdog:
        if self.timeout is None:
            return self
        self.running = True
        timer = threading.Timer(self.timeout, self._fire)
        timer.daemon = True
        timer.name = "diapipe-watchdog"
        self.timers.append(timer)
        timer.start()
        return self

    def _fire(self) -> None:
        with self.lock:
            if not self.running:
                return
            self.fired = True
            self.io.expired = f"timed out after {self.timeout:g} s"
            _async_raise(self.thread_id, QuantumTimeoutError)
        if self.stopped.wait(_grace_seconds(self.timeout or 0.0)):
            return
        with self.lock:
            if self.running and self.on_hard is not None:
                self.on_hard()

    def finish(self) -> None:
        """Mark the attempt over (call in the attempt's thread; clears a pending injection)."""
        for timer in self.timers:
            timer.cancel()
        with self.lock:
            self.running = False
            if self.fired:
                _async_raise(self.thread_id, None)
        self.stopped.set()

    def __exit__(self, *exc: Any) -> None:
        self.finish()


# ---------------------------------------------------------------------- helpers
def _worker_name() -> str:
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            return get_worker().address
        except Exception:  # noqa: BLE001 - not in a Dask worker
            pass
    thread = threading.current_thread()
    return f"pid {os.getpid()} {thread.name}"


def _max_rss() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _predicted_paths(spec: QuantumSpec, datastore: Any) -> list[Path]:
    paths = []
    for ref in spec.quantum.output_refs():
        if ref.path is None:
            paths.append(datastore.root / datastore.path_for(ref))
    return paths


def _clean_predicted(paths: list[Path], datastore: Any, thorough: bool) -> None:
    """Remove files an earlier attempt left at the predicted paths (and, if thorough, their
    hidden temporaries)."""
    from butler.formats.atomic import is_temporary_name

    for path in paths:
        if path.exists() or path.is_symlink():
            _log.info("removing %s left by an earlier attempt", path)
            datastore._remove_path(path)
        if thorough and path.parent.is_dir():
            prefix = f".{path.name}."
            for sibling in path.parent.iterdir():
                if sibling.name.startswith(prefix) and is_temporary_name(sibling.name):
                    datastore._remove_path(sibling)


def _prune_inputs(spec: QuantumSpec, upstream: tuple[QuantumOutcome, ...], task_def: Any) -> tuple[Any, str | None]:
    """Drop predicted inputs that no upstream quantum wrote; the reason when below ``minimum``."""
    quantum = spec.quantum
    written = {ref.id for o in upstream for ref in o.outputs}
    changed = False
    inputs: dict[str, list[Any]] = {}
    for name, refs in quantum.inputs.items():
        kept = [r for r in refs if r.path is not None or r.id in written]
        changed |= len(kept) != len(refs)
        inputs[name] = kept
    if not changed:
        return quantum, None
    connections = task_def.connections
    for name, refs in inputs.items():
        try:
            conn = connections.get(name)
        except Exception:  # noqa: BLE001 - unknown connection: keep LSST's default minimum
            conn = None
        minimum = getattr(conn, "minimum", 1)
        if len(refs) < minimum:
            missing = len(quantum.inputs[name]) - len(refs)
            return quantum, (
                f"input {name!r} has {len(refs)} of the {minimum} dataset(s) it needs: {missing} were not "
                "produced upstream (NoWorkFound or an optional output)"
            )
    return replace(quantum, inputs={n: r for n, r in inputs.items() if r}), None


def _retryable(outcome: QuantumOutcome, exit_code: int | None) -> bool:
    return exit_code not in (20, 21)


# ---------------------------------------------------------------------- the task function
def run_quantum_task(spec: QuantumSpec, *upstream: QuantumOutcome) -> QuantumOutcome:
    """Run one quantum (the function of every Dask task); never raises.

    Parameters
    ----------
    spec : QuantumSpec
    *upstream : QuantumOutcome
        Outcomes of the quanta that produce this quantum's inputs (Dask passes them because they
        are the task's dependencies).

    Returns
    -------
    QuantumOutcome
    """
    try:
        return _run(spec, upstream)
    except BaseException as exc:  # noqa: BLE001 - the outcome is reported, never raised
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) and threading.current_thread() is threading.main_thread():
            raise
        q = spec.quantum
        return QuantumOutcome(
            q.id, q.task_label, dict(q.data_id), Status.FAILED, key=spec.key,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}", error=str(exc) or type(exc).__name__,
            traceback=traceback.format_exc()[-_MAX_TRACEBACK:], exit_code=1, host=socket.gethostname(), worker=_worker_name(),
        )


def _run(spec: QuantumSpec, upstream: tuple[QuantumOutcome, ...]) -> QuantumOutcome:
    q = spec.quantum
    if spec.execution_id in _cancelled:
        return cancelled_outcome(spec)
    for outcome in upstream:
        if outcome.status not in OK_STATUSES:
            return blocked_outcome(spec, outcome.blocked_by or outcome.key or outcome.quantum_id)
    configure_worker()
    start = time.perf_counter()
    host, worker = socket.gethostname(), _worker_name()
    outcome = QuantumOutcome(q.id, q.task_label, dict(q.data_id), Status.FAILED, key=spec.key, host=host, worker=worker)
    if spec.hard_timeout and spec.scratch and spec.timeout:
        stone = tombstone_path(spec.scratch, q.id)
        if stone.exists():
            try:
                info = json.loads(stone.read_text())
            except (OSError, ValueError):
                info = {}
            outcome.error_type = f"{__name__}.QuantumTimeoutError"
            outcome.error = (
                f"timed out after {spec.timeout:g} s and did not stop within {_grace_seconds(spec.timeout):g} s; "
                f"its worker process ({info.get('worker', '?')}) was killed"
            )
            outcome.exit_code, outcome.timed_out, outcome.attempts = 1, True, int(info.get("attempt", 1))
            return outcome
    from ..quantum_io import DatastoreIO

    datastore = _datastore(spec.repo, spec.formatters)
    task_def = _task_def(spec)
    io = _FencedIO(DatastoreIO(_DatastoreOnly(datastore)), spec.execution_id)
    quantum, missing = _prune_inputs(spec, upstream, task_def)
    predicted = _predicted_paths(spec, datastore)
    history: list[dict[str, Any]] = []
    with _LogCapture(spec.log_level, spec.label) as capture:
        if missing is not None:
            _clean_predicted(predicted, datastore, thorough=False)
            outcome.status, outcome.attempts = Status.NO_WORK, 1
            logging.getLogger(spec.label).info("no work found: %s", missing)
            meta_refs = q.outputs.get("_metadata") or []
            if meta_refs:
                meta = {"quantum": _quantum_metadata(spec, 1, history, capture, host, worker, start, status="no_work", reason=missing)}
                outcome.outputs = [io.put(meta, meta_refs[0])]
            outcome.logs = capture.snapshot()
            outcome.seconds = time.perf_counter() - start
            outcome.max_rss_bytes = _max_rss()
            return outcome
        attempt = 0
        while True:
            attempt += 1
            io.expired = None
            _clean_predicted(predicted, datastore, thorough=attempt > 1)
            on_hard = _hard_timeout_action(spec, attempt, worker) if spec.hard_timeout else None
            result, error, timed_out, stopped = _attempt(spec, task_def, quantum, io, capture, on_hard, attempt, history, host, worker, start)
            if result is not None:
                outcome.outputs = list(result.outputs)
                outcome.error_type, outcome.error = result.error_type, result.error
                outcome.traceback, outcome.exit_code = result.traceback, result.exit_code
                if result.status != "failed":
                    # Finished (maybe right at the deadline, with no write refused): keep it.
                    outcome.status = Status(result.status)
                    outcome.error_type = outcome.error = outcome.traceback = None
                    outcome.exit_code = None
                    break
                timed_out = timed_out or result.error_type == f"{__name__}.QuantumTimeoutError"
            elif error is not None:
                outcome.error_type = f"{type(error).__module__}.{type(error).__qualname__}"
                outcome.error = str(error) or type(error).__name__
                outcome.traceback = "".join(traceback.format_exception(error))
                outcome.exit_code = 1
            if timed_out:
                outcome.timed_out = True
                outcome.error_type = f"{__name__}.QuantumTimeoutError"
                outcome.error = f"timed out after {spec.timeout:g} s (attempt {attempt})"
                if not stopped:
                    outcome.error += (
                        "; the thread could not be stopped and runs on in the background (its reads and writes "
                        "are refused, its result discarded)"
                    )
                outcome.exit_code = 1
            # A failed attempt: nothing it wrote is kept.
            for ref in outcome.outputs:
                if ref.path:
                    datastore._remove_path(datastore.root / ref.path)
            outcome.outputs = []
            history.append({"attempt": attempt, "error_type": outcome.error_type, "error": (outcome.error or "")[:_MAX_MESSAGE]})
            if attempt > spec.retries or not _retryable(outcome, outcome.exit_code) or not stopped:
                break
            if spec.execution_id in _cancelled:
                break
            logging.getLogger(spec.label).warning(
                "attempt %d of %s failed (%s: %s); retrying", attempt, spec.key, (outcome.error_type or "").rpartition(".")[2], outcome.error
            )
            time.sleep(min(0.05 * 2 ** (attempt - 1), 1.0))
        outcome.attempts = attempt
        outcome.logs = capture.snapshot()
    if outcome.traceback:
        outcome.traceback = outcome.traceback[-_MAX_TRACEBACK:]
    outcome.seconds = time.perf_counter() - start
    outcome.max_rss_bytes = _max_rss()
    return outcome


def _attempt(
    spec: QuantumSpec,
    task_def: Any,
    quantum: Any,
    io: _FencedIO,
    capture: _LogCapture,
    on_hard: Callable[[], None] | None,
    attempt: int,
    history: list[dict[str, Any]],
    host: str,
    worker: str,
    start: float,
) -> tuple[Any, BaseException | None, bool, bool]:
    """One attempt: ``(result or None, unexpected exception or None, timed out, stopped)``.

    Without a timeout the attempt runs in the calling thread.  With one, on processes and
    distributed (``on_hard`` given) it also runs here, under a watchdog that ends the process if
    it does not stop; on threads it runs in a helper thread so that this (Dask worker) thread can
    report the timeout even when the attempt cannot be stopped.
    """
    from ..quantum_execution import execute_quantum

    box: dict[str, Any] = {}

    def body() -> None:
        watchdog = _Watchdog(spec.timeout, io, on_hard)
        box["watchdog"] = watchdog
        with capture.attached():
            try:
                with watchdog:
                    box["result"] = execute_quantum(
                        task_def, quantum, io,
                        extra_metadata=lambda: _quantum_metadata(spec, attempt, history, capture, host, worker, start),
                    )
            except QuantumTimeoutError:
                watchdog.finish()
                box["timed_out"] = True
            except BaseException as exc:  # noqa: BLE001 - e.g. the metadata write failed
                watchdog.finish()
                box["error"] = exc

    if spec.timeout is None or on_hard is not None:
        body()
        watchdog = box["watchdog"]
        return box.get("result"), box.get("error"), bool(box.get("timed_out")) or watchdog.fired, True
    thread = threading.Thread(target=body, name=f"diapipe-quantum-{spec.quantum.id[:8]}", daemon=True)
    thread.start()
    thread.join(spec.timeout + _grace_seconds(spec.timeout))
    if thread.is_alive():
        io.expired = f"timed out after {spec.timeout:g} s"
        return None, None, True, False
    watchdog = box["watchdog"]
    return box.get("result"), box.get("error"), bool(box.get("timed_out")) or watchdog.fired, True


def _quantum_metadata(
    spec: QuantumSpec,
    attempt: int,
    history: list[dict[str, Any]],
    capture: _LogCapture,
    host: str,
    worker: str,
    start: float,
    **extra: Any,
) -> dict[str, Any]:
    data = {
        "id": spec.quantum.id,
        "task": spec.label,
        "data_id": dict(spec.quantum.data_id),
        "key": spec.key,
        "host": host,
        "pid": os.getpid(),
        "worker": worker,
        "attempt": attempt,
        "previous_attempts": list(history),
        "wall_seconds_all_attempts": time.perf_counter() - start,
        "max_rss_bytes": _max_rss(),
        "worker_settings": {k: str(v) for k, v in worker_settings().items()},
        "logs": capture.snapshot(),
        "execution_id": spec.execution_id,
    }
    data.update(extra)
    return data


def _hard_timeout_action(spec: QuantumSpec, attempt: int, worker: str) -> Callable[[], None]:
    def kill() -> None:
        try:
            path = tombstone_path(spec.scratch, spec.quantum.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"attempt": attempt, "worker": worker, "pid": os.getpid(), "time": time.time()}))
        finally:
            logging.getLogger(__name__).error(
                "%s timed out after %s s and did not stop; ending worker process %d", spec.key, spec.timeout, os.getpid()
            )
            os._exit(HARD_TIMEOUT_EXIT_CODE)

    return kill
