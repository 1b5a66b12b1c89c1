"""Struct and Task: names, loggers, subtasks, timers, metadata."""

from __future__ import annotations

import logging
import pickle

import pytest

from pipeline.config import Config, ConfigurableField, Field
from pipeline.struct import Struct
from pipeline.task import Task, TaskError, timeMethod


def test_struct_fields_and_helpers():
    s = Struct(a=1, b=[2])
    assert s.a == 1 and s.b == [2]
    assert s.getDict() == {"a": 1, "b": [2]}
    assert len(s) == 2 and "a" in s and dict(iter(s)) == {"a": 1, "b": [2]}
    t = Struct(c=3)
    t.mergeItems(s, "a")
    assert t.getDict() == {"c": 3, "a": 1}
    with pytest.raises(RuntimeError, match="already has a field 'a'"):
        t.mergeItems(s, "a")
    assert s.copy() == s and s.copy() is not s
    assert "a=1" in repr(s)


def test_struct_rejects_names_that_hide_methods():
    with pytest.raises(ValueError, match="reserved"):
        Struct(getDict=1)
    with pytest.raises(ValueError, match="reserved"):
        Struct(__x=1)


class LeafConfig(Config):
    gain: float = Field(1.5, description="gain, e-/ADU")


class LeafTask(Task):
    ConfigClass = LeafConfig
    _DefaultName = "leaf"

    @timeMethod
    def run(self, x: float) -> float:
        self.log.info("running leaf")
        return x * self.config.gain


class RootConfig(Config):
    leaf = ConfigurableField(target=LeafTask, doc="the leaf")
    scale: int = 2


class RootTask(Task):
    ConfigClass = RootConfig
    _DefaultName = "top"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.makeSubtask("leaf")


def test_task_names_logger_and_subtasks(caplog):
    task = RootTask()
    assert task.getName() == "top" and task.getFullName() == "top"
    assert task.leaf.getFullName() == "top.leaf"
    assert task.log.name == "top" and task.leaf.log.name == "top.leaf"
    assert task.leaf.config is task.config.leaf
    assert set(task.getTaskDict()) == {"top", "top.leaf"}
    with caplog.at_level(logging.INFO, logger="top.leaf"):
        assert task.leaf.run(2.0) == 3.0
    assert any(r.name == "top.leaf" and "running leaf" in r.message for r in caplog.records)
    md = task.getFullMetadata()
    assert set(md) == {"top", "top.leaf"}
    assert md["top.leaf"]["runDuration"] >= 0 and "runStartUtc" in md["top.leaf"]
    task.emptyMetadata()
    assert task.leaf.metadata == {}


def test_task_named_by_argument_and_logger_parent():
    parent = logging.getLogger("diapipe.test")
    task = LeafTask(name="other", log=parent)
    assert task.getName() == "other" and task.log.name == "diapipe.test.other"


def test_timer_records_start_end_duration_cpu_rss():
    task = LeafTask()
    with task.timer("work"):
        sum(range(1000))
    for suffix in ("StartUtc", "EndUtc", "Duration", "CpuTime", "MaxRss"):
        assert f"work{suffix}" in task.metadata
    assert task.metadata["workMaxRss"] > 1_000_000


def test_task_without_name_and_bad_subtask():
    class Nameless(Task):
        pass

    with pytest.raises(TaskError, match="needs a name"):
        Nameless()
    with pytest.raises(TaskError, match="no subtask field 'nope'"):
        RootTask().makeSubtask("nope")
    with pytest.raises(TaskError, match="must not contain"):
        LeafTask(name="a.b")


def test_retarget_and_pickle():
    class Leaf2Task(LeafTask):
        _DefaultName = "leaf2"

        def run(self, x: float) -> float:
            return -x

    config = RootConfig()
    config.retarget("leaf", Leaf2Task)
    task = RootTask(config=config)
    assert isinstance(task.leaf, Leaf2Task) and task.leaf.run(1.0) == -1.0
    clone = pickle.loads(pickle.dumps(RootTask()))
    assert clone.leaf.run(2.0) == 3.0
