"""``Task``: a configurable unit of algorithm with a logger, timers, metadata and subtasks."""

from __future__ import annotations

import functools
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from .config import Config

__all__ = ["Task", "TaskError", "timeMethod"]

F = TypeVar("F", bound=Callable[..., Any])


class TaskError(RuntimeError):
    """A task was constructed incorrectly (no name, unknown subtask)."""


class Task:
    """Base class of tasks.

    Parameters
    ----------
    config : Config, optional
        The task's config; default ``ConfigClass()``, or, for a subtask, the parent's config field
        of the same name.
    name : str, optional
        Task name; default ``_DefaultName``.  Subtasks are named after their config field.
    parentTask : Task, optional
        The task that owns this one (see :meth:`makeSubtask`).
    log : logging.Logger, optional
        Parent logger; the task logs to ``<log name>.<name>``.

    Attributes
    ----------
    config : Config
    log : logging.Logger
        Named after the task's full name (``"isr.overscan"``).
    metadata : dict
        Free-form results and timings of this task (:meth:`timer` writes here).
    """

    ConfigClass: ClassVar[type[Config]] = Config
    _DefaultName: ClassVar[str]

    def __init__(
        self,
        config: Config | None = None,
        *,
        name: str | None = None,
        parentTask: Task | None = None,  # noqa: N803 - LSST's name
        log: logging.Logger | None = None,
    ) -> None:
        if name is None:
            name = getattr(self, "_DefaultName", None)
            if name is None:
                raise TaskError(f"{type(self).__name__} needs a name: pass name=... or define _DefaultName")
        if "." in name:
            raise TaskError(f"task name {name!r} must not contain '.'")
        self._name = name
        if parentTask is not None:
            self._fullName = f"{parentTask._fullName}.{name}"
            if config is None:
                config = getattr(parentTask.config, name)
            self._taskDict = parentTask._taskDict
            parent_log = log or parentTask.log
            self.log = parent_log.getChild(name)
        else:
            self._fullName = name
            if config is None:
                config = self.ConfigClass()
            self._taskDict = {}
            self.log = log.getChild(name) if log is not None else logging.getLogger(name)
        self.config = config
        self.metadata: dict[str, Any] = {}
        self._taskDict[self._fullName] = self

    # ------------------------------------------------------------------ names
    def getName(self) -> str:  # noqa: N802
        """The task's name (``"overscan"``)."""
        return self._name

    def getFullName(self) -> str:  # noqa: N802
        """The dotted name from the top-level task (``"isr.overscan"``)."""
        return self._fullName

    def getTaskDict(self) -> dict[str, Task]:  # noqa: N802
        """``{full name: task}`` for this task's whole tree (shared by its subtasks)."""
        return dict(self._taskDict)

    # ------------------------------------------------------------------ subtasks
    def makeSubtask(self, name: str, **kwargs: Any) -> Task:  # noqa: N802
        """Build the subtask declared by config field ``name`` and set it as ``self.<name>``.

        Raises
        ------
        TaskError
            If ``name`` is not a :func:`~pipeline.config.ConfigurableField` of the config.
        """
        sub_config = getattr(self.config, name, None)
        target = getattr(sub_config, "target", None)
        if not isinstance(sub_config, Config) or target is None:
            raise TaskError(
                f"{type(self).__name__}.makeSubtask({name!r}): the config has no subtask field {name!r} "
                "(declare it with ConfigurableField(target=..., doc=...))"
            )
        subtask = target(config=sub_config, name=name, parentTask=self, **kwargs)
        setattr(self, name, subtask)
        return subtask

    # ------------------------------------------------------------------ metadata and timing
    def getFullMetadata(self) -> dict[str, dict[str, Any]]:  # noqa: N802
        """``{full name: metadata}`` of this task and all its subtasks."""
        prefix = self._fullName
        return {
            name: task.metadata
            for name, task in self._taskDict.items()
            if name == prefix or name.startswith(prefix + ".")
        }

    def emptyMetadata(self) -> None:  # noqa: N802
        """Clear the metadata of this task and its subtasks."""
        for task in self._taskDict.values():
            task.metadata.clear()

    @contextmanager
    def timer(self, name: str, logLevel: int = logging.DEBUG) -> Iterator[None]:  # noqa: N803
        """Time a block; records ``{name}StartUtc``, ``{name}EndUtc`` (ISO UTC), ``{name}Duration``
        (wall seconds), ``{name}CpuTime`` (seconds) and ``{name}MaxRss`` (bytes) in :attr:`metadata`.
        """
        start_wall = time.perf_counter()
        start_cpu = time.process_time()
        self.metadata[f"{name}StartUtc"] = datetime.now(UTC).isoformat()
        try:
            yield
        finally:
            duration = time.perf_counter() - start_wall
            self.metadata[f"{name}EndUtc"] = datetime.now(UTC).isoformat()
            self.metadata[f"{name}Duration"] = duration
            self.metadata[f"{name}CpuTime"] = time.process_time() - start_cpu
            self.metadata[f"{name}MaxRss"] = _max_rss_bytes()
            self.log.log(logLevel, "%s took %.3f s", name, duration)

    def __reduce__(self) -> Any:
        # Tasks hold loggers and live subtasks; rebuild them from the config when pickled.
        return (_rebuild_task, (type(self), self.config, self._name))


def _rebuild_task(cls: type[Task], config: Config, name: str) -> Task:
    return cls(config=config, name=name)


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def timeMethod(func: F) -> F:  # noqa: N802 - LSST's name
    """Decorator: time a task method with :meth:`Task.timer`, under the method's name."""

    @functools.wraps(func)
    def wrapper(self: Task, *args: Any, **kwargs: Any) -> Any:
        with self.timer(func.__name__):
            return func(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
