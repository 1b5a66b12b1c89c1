"""pipeline.testing: running one quantum in a temporary repository, linting connections."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from pipeline.testing import assert_valid_connections, lint_connections, run_quantum_in_temp_repo

from .example_tasks import PATCH, VD, DiffTask, OptionalTask, PatchSumTask, ScaleTask, SchemaUserTask

QID = {"instrument": "TestCam", "visit": 1, "detector": 0}


def test_run_one_quantum(tmp_path):
    result = run_quantum_in_temp_repo(ScaleTask, {"input": {"value": 2.0}}, QID, config={"factor": 5}, root=tmp_path / "repo")
    assert result.outputs == {"output": {"value": 10.0, "data_id": None}}
    assert result.result.status == "succeeded"
    assert (tmp_path / "repo" / "butler.yaml").exists()
    assert {r.dataset_type.name for r in result.result.outputs} == {"calexp", "scale_metadata"}


def test_run_one_quantum_with_spatial_inputs():
    calexps = [({"instrument": "TestCam", "visit": 1, "detector": d}, {"value": float(d + 1)}) for d in range(2)]
    result = run_quantum_in_temp_repo(PatchSumTask, {"calexps": calexps}, {"skymap": "test", "tract": 0, "patch": 0})
    n = len(result.quantum.inputs["calexps"])
    assert n >= 1 and result.outputs["total"]["n"] == n


def test_init_inputs_and_errors():
    result = run_quantum_in_temp_repo(
        SchemaUserTask, {"schema": {"columns": ["a"]}, "src": {"value": 3}}, QID
    )
    assert result.outputs["out"] == {"columns": ["a"], "value": 3}
    with pytest.raises(Exception, match="no input connection"):
        run_quantum_in_temp_repo(ScaleTask, {"nope": 1}, QID)


class BadConnections(PipelineTaskConnections, dimensions=VD):
    many = Input(name="a", storageClass="StructuredDataDict", dimensions=PATCH, multiple=True)
    one = Input(name="b", storageClass="StructuredDataDict", dimensions=PATCH)
    same = Input(name="c", storageClass="StructuredDataDict", dimensions=VD, multiple=True)
    opt = Input(name="d", storageClass="StructuredDataDict", dimensions=VD, minimum=0)
    unused = Input(name="e", storageClass="StructuredDataDict", dimensions=VD)
    out = Output(name="f", storageClass="StructuredDataDict", dimensions=VD)


class BadConfig(PipelineTaskConfig, pipelineConnections=BadConnections):
    pass


class BadTask(PipelineTask):
    ConfigClass = BadConfig
    _DefaultName = "bad"

    def run(self, many: dict, one: list[dict], same: list, opt: dict, extra: int) -> Struct:
        return Struct()


def test_lint_connections_finds_each_problem():
    problems = lint_connections(BadTask)
    text = "\n".join(problems)
    assert "connection 'many' is multiple=True but run() annotates it as dict" in text
    assert "connection 'one' is single but run() annotates it as list" in text
    assert "connection 'one' is single but has dimensions ['patch', 'skymap', 'tract'] beyond the quantum dimensions" in text
    assert "connection 'same' is multiple but its dimensions are all quantum dimensions" in text
    assert "connection 'opt' is optional (minimum=0) but run() gives 'opt' no default" in text
    assert "input connection 'unused' is not a parameter of BadTask.run" in text
    assert "run() parameter 'extra' has no default and no input connection provides it" in text
    assert len(problems) == 7
    with pytest.raises(AssertionError, match="BadTask: "):
        assert_valid_connections(BadTask)


@pytest.mark.parametrize("task", [ScaleTask, PatchSumTask, DiffTask, OptionalTask, SchemaUserTask])
def test_lint_clean_tasks(task):
    assert lint_connections(task) == []


def test_lint_accepts_kwargs_run():
    class KwTask(BadTask):
        def run(self, **kwargs: Any) -> Struct:
            return Struct()

    assert not any("not a parameter" in p for p in lint_connections(KwTask))
