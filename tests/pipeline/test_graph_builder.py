"""Quantum graph building over a 6-visit x 4-detector repository with a 4x4-patch skymap."""

from __future__ import annotations

from pathlib import Path

import pytest

from butler.butler import Butler
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.errors import (
    EmptyGraphError,
    GraphBuildError,
    MissingInputError,
    OutputExistsError,
    PrerequisiteMissingError,
)
from pipeline.graph_builder import build_quantum_graph
from pipeline.pipeline import Pipeline
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.quantum_execution import execute_quantum, register_dataset_types, write_init_outputs
from pipeline.quantum_io import ButlerIO
from pipeline.testing import make_task_def
from tests.butler.conftest import INSTRUMENT

from .conftest import DETECTORS, VISITS, snapshot
from .example_tasks import PATCH, VD, OptionalTask, PatchSumTask, ScaleTask, SchemaTask, SchemaUserTask

DATA = Path(__file__).parent / "data"


def brute_force_overlaps(butler):
    """{(visit, detector): {patch ids}} by testing every pair of regions."""
    vdrs = butler.query_dimension_records("visit_detector_region")
    patches = butler.query_dimension_records("patch")
    return {
        (r["visit"], r["detector"]): {p["id"] for p in patches if r["region"].overlaps(p["region"])} for r in vdrs
    }


def build(butler, pipeline=None, **kwargs):
    pipeline = pipeline if pipeline is not None else Pipeline.from_uri(DATA / "base.yaml")
    kwargs.setdefault("input_collections", ["inputs"])
    kwargs.setdefault("output_run", "out/1")
    return build_quantum_graph(pipeline, butler, **kwargs)


def test_counts_edges_and_spatial_joins_match_brute_force(butler):
    before = snapshot(butler)
    graph = build(butler)
    assert snapshot(butler) == before  # nothing written
    overlaps = brute_force_overlaps(butler)
    n_vd = len(VISITS) * len(DETECTORS)
    covered_patches = set().union(*overlaps.values())
    assert 0 < len(covered_patches) < 16 and any(len(p) > 1 for p in overlaps.values())
    n_diff = sum(1 for patches in overlaps.values() if patches)  # a detector off the skymap gets no template
    assert n_diff < n_vd
    assert graph.summary() == {"scale": n_vd, "patchSum": len(covered_patches), "diff": n_diff}
    scale_by_vd = {(q.data_id["visit"], q.data_id["detector"]): q for q in graph.quanta_for_task("scale")}
    sum_by_patch = {q.data_id["patch"]: q for q in graph.quanta_for_task("patchSum")}
    # patch quanta get exactly the overlapping visit-detectors
    for patch, quantum in sum_by_patch.items():
        expected = {vd for vd, ps in overlaps.items() if patch in ps}
        got = {(r.data_id["visit"], r.data_id["detector"]) for r in quantum.inputs["calexps"]}
        assert got == expected
        assert {u.id for u in graph.upstream(quantum)} == {scale_by_vd[vd].id for vd in expected}
    # visit-detector quanta get exactly the overlapping patches
    edges = 0
    for quantum in graph.quanta_for_task("diff"):
        vd = (quantum.data_id["visit"], quantum.data_id["detector"])
        assert {r.data_id["patch"] for r in quantum.inputs["templates"]} == overlaps[vd]
        assert [r.data_id["skymap"] for r in quantum.inputs["skyMap"]] == ["sky"]
        assert quantum.inputs["skyMap"][0].path is not None  # existing input
        assert quantum.inputs["exposure"][0].id == scale_by_vd[vd].outputs["output"][0].id  # predicted
        assert quantum.data_id["band"] == ("r" if (vd[0] - 100) % 2 else "g")  # implied dimensions
        expected_up = {scale_by_vd[vd].id} | {sum_by_patch[p].id for p in overlaps[vd]}
        assert {u.id for u in graph.upstream(quantum)} == expected_up
        edges += len(expected_up)
    edges += sum(len(q.inputs["calexps"]) for q in sum_by_patch.values())
    assert graph.graph.number_of_edges() == edges
    # outputs are predicted in the output run with new ids, metadata included
    q = graph.quanta_for_task("scale")[0]
    assert set(q.outputs) == {"output", "_metadata"}
    ref = q.outputs["_metadata"][0]
    assert ref.run == "out/1" and ref.path is None and ref.dataset_type.name == "scale_metadata"
    assert graph.init_outputs["scale"]["_config"].dataset_type.name == "scale_config"
    order = [qq.task_label for qq in graph]
    assert order.index("diff") > max(i for i, label in enumerate(order) if label == "scale")


def test_where_expression_restricts_every_task(butler):
    graph = build(butler, where="visit IN (100, 101) AND detector < 2")
    overlaps = brute_force_overlaps(butler)
    chosen = [(v, d) for v in (100, 101) for d in (0, 1)]
    patches = set().union(*(overlaps[vd] for vd in chosen))
    assert graph.summary() == {"scale": 4, "patchSum": len(patches), "diff": sum(1 for vd in chosen if overlaps[vd])}
    for quantum in graph.quanta_for_task("patchSum"):
        assert {(r.data_id["visit"], r.data_id["detector"]) for r in quantum.inputs["calexps"]} <= set(chosen)
    graph = build(butler, where="visit.seeing < 0.75 AND band = 'g'")  # seeing 0.6+0.1v, even visits are g
    assert {q.data_id["visit"] for q in graph.quanta_for_task("scale")} == {100}


def test_input_existence_constrains_quanta(butler):
    with Butler(butler.root, run="partial") as b:
        for v, d in [(100, 0), (103, 2)]:
            b.put({"value": 1.0}, "raw", instrument=INSTRUMENT, visit=v, detector=d)
        b.put({"name": "sky"}, "skyMapInfo", skymap="sky")
    graph = build(butler, input_collections=["partial"])
    assert {(q.data_id["visit"], q.data_id["detector"]) for q in graph.quanta_for_task("scale")} == {(100, 0), (103, 2)}
    assert all(r.run == "partial" for q in graph.quanta_for_task("scale") for r in q.inputs["input"])


def test_find_first_across_collections(butler):
    with Butler(butler.root, run="newer") as b:
        b.put({"value": -1.0}, "raw", instrument=INSTRUMENT, visit=100, detector=0)
    graph = build(butler, Pipeline.from_uri(f"{DATA / 'base.yaml'}#scale"), input_collections=["newer", "inputs"])
    runs = {(q.data_id["visit"], q.data_id["detector"]): q.inputs["input"][0].run for q in graph.quanta_for_task("scale")}
    assert runs[(100, 0)] == "newer" and runs[(100, 1)] == "inputs" and len(runs) == 24


class MinConnections(PipelineTaskConnections, dimensions=PATCH):
    calexps = Input(name="calexp", storageClass="StructuredDataDict", dimensions=VD, multiple=True, minimum=3)
    out = Output(name="patchMin", storageClass="StructuredDataDict", dimensions=PATCH)


class MinConfig(PipelineTaskConfig, pipelineConnections=MinConnections):
    pass


class MinTask(PipelineTask):
    ConfigClass = MinConfig
    _DefaultName = "minTask"


def test_minimum_prunes_quanta(butler):
    graph = build(butler, [make_task_def(ScaleTask), make_task_def(MinTask)])
    overlaps = brute_force_overlaps(butler)
    counts: dict[int, int] = {}
    for patches in overlaps.values():
        for p in patches:
            counts[p] = counts.get(p, 0) + 1
    expected = {p for p, n in counts.items() if n >= 3}
    assert expected != set(counts)  # the test must prune something
    assert {q.data_id["patch"] for q in graph.quanta_for_task("minTask")} == expected
    assert graph.metadata["pruned_quanta"]["minTask"] == {"calexps (calexp)": len(counts) - len(expected)}


def test_optional_input_minimum_zero(butler):
    with Butler(butler.root, run="inputs") as b:
        b.register_dataset_type("extraInfo", VD, "StructuredDataDict")
        b.put({"x": 1}, "extraInfo", instrument=INSTRUMENT, visit=100, detector=1)
    graph = build(butler, [make_task_def(ScaleTask), make_task_def(OptionalTask)])
    quanta = graph.quanta_for_task("optional")
    assert len(quanta) == 24
    with_extra = [q for q in quanta if q.inputs["extra"]]
    assert [(q.data_id["visit"], q.data_id["detector"]) for q in with_extra] == [(100, 1)]
    graph = build(butler, [make_task_def(ScaleTask), make_task_def(OptionalTask, {"useExtra": False})])
    assert all("extra" not in q.inputs for q in graph.quanta_for_task("optional"))


class SingleConnections(PipelineTaskConnections, dimensions=VD):
    sums = Input(name="patchSum", storageClass="StructuredDataDict", dimensions=PATCH)
    out = Output(name="single", storageClass="StructuredDataDict", dimensions=VD)


class SingleConfig(PipelineTaskConfig, pipelineConnections=SingleConnections):
    pass


class SingleTask(PipelineTask):
    ConfigClass = SingleConfig
    _DefaultName = "single"


def test_single_input_matching_several_datasets_is_an_error(butler):
    before = snapshot(butler)
    with pytest.raises(GraphBuildError, match=r"task 'single': input 'sums' \(patchSum\) is not multiple, but \d+ datasets match quantum"):
        build(butler, [make_task_def(ScaleTask), make_task_def(PatchSumTask), make_task_def(SingleTask)])
    assert snapshot(butler) == before


def test_prerequisite_missing_names_task_and_data_id(butler):
    with Butler(butler.root, run="other") as b:
        b.insert_dimension_records("skymap", [{"name": "sky2"}])
        b.put({"name": "sky2"}, "skyMapInfo", skymap="sky2")  # the prerequisite exists, for another skymap
        for d in DETECTORS:
            b.put({"value": 1.0}, "raw", instrument=INSTRUMENT, visit=100, detector=d)
    before = snapshot(butler)
    with pytest.raises(PrerequisiteMissingError) as info:
        build(butler, input_collections=["other"], where="visit = 100 AND detector = 1")
    message = str(info.value)
    assert message.startswith(f"task 'diff' ({DATA / 'base.yaml'}:11): prerequisite input 'skyMap' (skyMapInfo)")
    assert "visit: 100, detector: 1}" in message and message.endswith("is not in the input collections ['other']")
    assert snapshot(butler) == before


def test_prerequisite_absent_everywhere(butler):
    with Butler(butler.root, run="rawonly") as b:
        b.put({"value": 1.0}, "raw", instrument=INSTRUMENT, visit=100, detector=0)
    with pytest.raises(PrerequisiteMissingError, match="task 'diff' .*prerequisite input 'skyMap' needs dataset type 'skyMapInfo'"):
        build(butler, input_collections=["rawonly"])


def test_input_nobody_produces(butler):
    before = snapshot(butler)
    with pytest.raises(MissingInputError) as info:
        build(butler, Pipeline.from_uri(f"{DATA / 'base.yaml'}#patchSum"))
    message = str(info.value)
    assert message.startswith(f"task 'patchSum' ({DATA / 'base.yaml'}:10): input 'calexps' needs dataset type 'calexp'")
    assert "not in the input collections ['inputs'] (the dataset type is not even registered)" in message
    assert snapshot(butler) == before


def test_query_selecting_nothing(butler):
    before = snapshot(butler)
    with pytest.raises(EmptyGraphError) as info:
        build(butler, where="visit = 999")
    message = str(info.value)
    assert message.startswith("data query 'visit = 999' with input collections ['inputs'] selects no quanta")
    assert "task 'scale': the data query selects no data IDs for it" in message
    assert snapshot(butler) == before
    graph = build(butler, where="visit = 999", allow_empty=True)
    assert len(graph) == 0


def test_bad_query_and_missing_collection_change_nothing(butler):
    from butler.errors import ButlerError

    before = snapshot(butler)
    with pytest.raises(ButlerError):
        build(butler, where="visit >")
    with pytest.raises(ButlerError, match="collection 'nope' does not exist"):
        build(butler, input_collections=["nope"])
    assert snapshot(butler) == before


def test_registered_dataset_type_conflict(butler):
    butler.register_dataset_type("calexp", PATCH, "StructuredDataDict")
    with pytest.raises(GraphBuildError, match="'calexp' is registered in the repository as \\['skymap', 'tract', 'patch'\\]"):
        build(butler)


def test_instrument_and_data_id_constraints(butler):
    pipeline = Pipeline.from_uri(f"{DATA / 'base.yaml'}#scale")
    pipeline.instrument = "OtherCam"
    with pytest.raises(EmptyGraphError):
        build(butler, pipeline)
    graph = build(butler, Pipeline.from_uri(f"{DATA / 'base.yaml'}#scale"), data_id={"visit": 102})
    assert {q.data_id["visit"] for q in graph} == {102}


def run_all(butler, graph):
    register_dataset_types(butler, graph)
    io = ButlerIO(butler)
    for label in graph.task_labels:
        td = graph.task_def(label)
        init = {name: io.get(ref) for name, ref in graph.init_inputs[label].items()}
        write_init_outputs(td, td.make_task(init), graph.init_outputs[label], io)
    results = [execute_quantum(graph.task_def(q.task_label), q, io, raise_errors=True) for q in graph]
    assert all(r.status == "succeeded" for r in results)


def test_existing_outputs_error_skip_and_clobber(butler):
    scale_only = Pipeline.from_uri(f"{DATA / 'base.yaml'}#scale")
    run_all(butler, build(butler, scale_only, where="visit = 100"))
    with pytest.raises(OutputExistsError, match="already exist in the output run 'out/1'"):
        build(butler, scale_only, where="visit IN (100, 101)")
    pipeline = Pipeline.from_uri(f"{DATA / 'base.yaml'}#scale")
    pipeline.add_task(OptionalTask, "optional")
    graph = build(butler, pipeline, where="visit IN (100, 101)", skip_existing_in=["out/1"])
    assert graph.metadata["skipped_quanta"] == {"scale": 4}
    assert {q.data_id["visit"] for q in graph.quanta_for_task("scale")} == {101}
    exposures = [q.inputs["exposure"][0] for q in graph.quanta_for_task("optional")]
    assert len(exposures) == 8
    assert all((r.path is not None) == (r.data_id["visit"] == 100) for r in exposures)  # existing vs predicted
    assert graph.init_outputs["scale"]["_config"].path is not None  # already written in out/1
    assert graph.init_outputs["optional"]["_config"].path is None
    graph3 = build(butler, scale_only, where="visit = 100", clobber_outputs=True)
    replaced = [r.dataset_type.name for q in graph3.quanta_for_task("scale") for r in q.replaces]
    assert sorted(set(replaced)) == ["calexp", "scale_metadata"] and len(replaced) == 8


def test_init_inputs_and_outputs(butler):
    graph = build(butler, [make_task_def(ScaleTask), make_task_def(SchemaTask), make_task_def(SchemaUserTask)], where="visit = 100")
    schema_ref = graph.init_outputs["schema"]["schema"]
    assert schema_ref.dataset_type.name == "srcSchema" and schema_ref.data_id == {}
    assert graph.init_inputs["schemaUser"]["schema"].id == schema_ref.id
    assert all(q.init_inputs["schema"].id == schema_ref.id for q in graph.quanta_for_task("schemaUser"))
    run_all(butler, graph)
    out = butler.get("srcSummary", instrument=INSTRUMENT, visit=100, detector=0, collections="out/1")
    assert out["columns"] == ["id", "flux"]
