"""PipelineTask, ButlerQuantumContext and single-quantum execution."""

from __future__ import annotations

from pathlib import Path

import pytest

from butler.butler import Butler
from pipeline.errors import InvalidQuantumError
from pipeline.graph_builder import build_quantum_graph
from pipeline.pipeline import Pipeline
from pipeline.pipeline_task import ButlerQuantumContext, PipelineTask
from pipeline.quantum_execution import execute_quantum, register_dataset_types
from pipeline.quantum_io import ButlerIO, DatastoreIO, InputHandle
from pipeline.struct import Struct
from pipeline.testing import make_task_def
from tests.butler.conftest import INSTRUMENT

from .example_tasks import BadPutTask, FailingTask, ScaleTask

DATA = Path(__file__).parent / "data"


@pytest.fixture
def graph(butler):
    graph = build_quantum_graph(Pipeline.from_uri(DATA / "base.yaml"), butler, input_collections=["inputs"], output_run="out/1", where="visit = 100")
    register_dataset_types(butler, graph)
    return graph


def test_run_is_pure():
    task = ScaleTask(config=ScaleTask.ConfigClass(factor=3.0))
    assert task.run(input={"value": 2.0}).output["value"] == 6.0
    with pytest.raises(NotImplementedError):
        PipelineTask(config=ScaleTask.ConfigClass(), name="plain").run()


def test_context_allows_only_declared_refs(butler, graph):
    scale = graph.quanta_for_task("scale")
    q, other = scale[0], scale[1]
    ctx = ButlerQuantumContext(ButlerIO(butler), q, graph.task_def("scale").connections)
    assert ctx.get(q.inputs["input"][0])["value"] == 1000.0
    with pytest.raises(InvalidQuantumError, match="not one of its declared inputs"):
        ctx.get(other.inputs["input"][0])
    with pytest.raises(InvalidQuantumError, match="not one of its declared outputs"):
        ctx.put({"value": 1}, other.outputs["output"][0])
    ctx.put({"value": 1}, q.outputs["output"][0])
    with pytest.raises(InvalidQuantumError, match="twice"):
        ctx.put({"value": 1}, q.outputs["output"][0])
    assert [r.id for r in ctx.outputs_written] == [q.outputs["output"][0].id]
    assert ctx.outputs_written[0].path is not None


def test_deferred_inputs_and_multiple_lists(butler, graph):
    io = ButlerIO(butler)
    for q in graph:
        if q.task_label != "diff":
            assert execute_quantum(graph.task_def(q.task_label), q, io).status == "succeeded"
    diff = graph.quanta_for_task("diff")[0]
    task_def = graph.task_def("diff")
    ctx = ButlerQuantumContext(io, diff, task_def.connections)
    input_refs, output_refs = diff.quantized_connections(task_def.connections)
    inputs = ctx.get(input_refs)
    assert isinstance(inputs["exposure"], dict) and isinstance(inputs["skyMap"], dict)
    assert all(isinstance(h, InputHandle) for h in inputs["templates"])
    assert inputs["templates"][0].get()["n"] >= 1
    with pytest.raises(InvalidQuantumError, match="has 1 refs but run\\(\\) returned 2"):
        ctx.put([{"a": 1}, {"b": 2}], [output_refs.diff])


def test_datastore_io_writes_files_not_registry(butler, graph):
    q = graph.quanta_for_task("scale")[0]
    before = butler.query_datasets("calexp", collections=["out/1"])
    result = execute_quantum(graph.task_def("scale"), q, DatastoreIO(butler))
    assert result.status == "succeeded"
    assert {r.dataset_type.name for r in result.outputs} == {"calexp", "scale_metadata"}
    assert all((butler.root / r.path).exists() for r in result.outputs)
    assert butler.query_datasets("calexp", collections=["out/1"]) == before == []
    # a downstream read of a predicted ref finds the file without the registry
    assert DatastoreIO(butler).get(q.outputs["output"][0])["value"] == 4000.0
    butler.registry.insert_datasets(result.outputs)  # what the driver does
    assert butler.get("calexp", instrument=INSTRUMENT, visit=100, detector=0, collections="out/1")["value"] == 4000.0
    metadata = butler.get("scale_metadata", instrument=INSTRUMENT, visit=100, detector=0, collections="out/1")
    assert metadata["quantum"]["status"] == "succeeded" and metadata["scale"]["scaled"] is True
    assert metadata["scale"]["runQuantumDuration"] >= 0


def test_outcomes_no_work_failed_invalid(butler, graph):
    q = graph.quanta_for_task("scale")[0]
    io = DatastoreIO(butler)
    disabled = make_task_def(ScaleTask, {"enabled": False})
    result = execute_quantum(disabled, q, io)
    assert result.status == "no_work" and [r.dataset_type.name for r in result.outputs] == ["scale_metadata"]
    failed = execute_quantum(make_task_def(FailingTask, label="scale"), q, io)
    assert failed.status == "failed" and failed.error == "boom" and failed.exit_code == 1 and "RuntimeError" in failed.traceback
    assert failed.outputs == []
    bad = execute_quantum(make_task_def(BadPutTask, label="scale"), q, io)
    assert bad.status == "failed" and bad.exit_code == InvalidQuantumError.EXIT_CODE
    assert "not one of its declared outputs" in bad.error
    with pytest.raises(RuntimeError, match="boom"):
        execute_quantum(make_task_def(FailingTask, label="scale"), q, io, raise_errors=True)


def test_put_struct_skips_missing_and_none(butler, graph):
    q = graph.quanta_for_task("scale")[0]
    ctx = ButlerQuantumContext(ButlerIO(butler), q)
    _, outputs = q.quantized_connections(graph.task_def("scale").connections)
    ctx.put(Struct(output=None), outputs)
    ctx.put(Struct(), outputs)
    assert ctx.outputs_written == []
    with Butler(butler.root) as b:
        assert b.query_datasets("calexp", collections=["out/1"]) == []
