"""Saving, loading and drawing quantum graphs (JSON, optional gzip, never pickle)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pipeline.errors import QuantumGraphFileError
from pipeline.graph import QuantumGraph
from pipeline.graph_builder import build_quantum_graph
from pipeline.pipeline import Pipeline

DATA = Path(__file__).parent / "data"


@pytest.fixture
def graph(butler):
    pipeline = Pipeline.from_uri(DATA / "base.yaml")
    pipeline.apply_cli_overrides(["scale:mode=add"])
    return build_quantum_graph(pipeline, butler, input_collections=["inputs"], output_run="out/1", where="visit IN (100, 101)")


@pytest.mark.parametrize("name", ["g.qgraph", "g.qgraph.gz"])
def test_round_trip(graph, tmp_path, name):
    path = tmp_path / name
    graph.save(path)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    loaded = QuantumGraph.load(path)
    assert loaded.summary() == graph.summary()
    assert loaded.graph.number_of_edges() == graph.graph.number_of_edges()
    for label in graph.task_labels:
        before = {q.id: q for q in graph.quanta_for_task(label)}
        for q in loaded.quanta_for_task(label):
            original = before[q.id]
            assert q.data_id == original.data_id
            assert {n: [r.id for r in refs] for n, refs in q.inputs.items()} == {n: [r.id for r in refs] for n, refs in original.inputs.items()}
            assert {n: [(r.id, r.run, r.path, r.data_id) for r in refs] for n, refs in q.outputs.items()} == {
                n: [(r.id, r.run, r.path, r.data_id) for r in refs] for n, refs in original.outputs.items()
            }
    assert loaded.metadata["data_query"] == "visit IN (100, 101)" and loaded.metadata["output_run"] == "out/1"
    task_def = loaded.task_def("scale")
    assert task_def.config.mode == "add" and task_def.config.factor == 4.0 and task_def.config.frozen
    assert task_def.config.provenance("mode").layer == "command line"
    assert task_def.config.provenance("factor").source.endswith("base.yaml:9")
    assert task_def.config.provenance("enabled").layer == "default"
    assert loaded.task_def("diff").connections.templates.name == "patchSum"
    assert [r.id for r in loaded.overall_inputs()] and all(r.path for r in loaded.overall_inputs())
    assert loaded.init_outputs["scale"]["_config"].id == graph.init_outputs["scale"]["_config"].id


def test_file_is_plain_json_without_pickle(graph, tmp_path):
    path = tmp_path / "g.json"
    graph.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "diapipe-quantum-graph" and data["version"] == 1
    assert set(data) == {"format", "version", "metadata", "tasks", "dataset_types", "datasets", "init", "quanta"}
    assert len(data["quanta"]) == len(graph)


def test_bad_files(tmp_path):
    with pytest.raises(QuantumGraphFileError, match="does not exist"):
        QuantumGraph.load(tmp_path / "none.json")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(QuantumGraphFileError, match="not a JSON quantum graph"):
        QuantumGraph.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(QuantumGraphFileError, match="not a diapipe quantum graph"):
        QuantumGraph.load(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"format": "diapipe-quantum-graph", "version": 99}))
    with pytest.raises(QuantumGraphFileError, match="version 99"):
        QuantumGraph.load(tmp_path / "c.json")
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(json.dumps({"format": "diapipe-quantum-graph", "version": 1, "quanta": []}).encode()))
    with pytest.raises(QuantumGraphFileError, match="damaged or inconsistent"):
        QuantumGraph.load(tmp_path / "d.json.gz")


def test_drawings(graph):
    dot = graph.to_dot()
    assert dot.startswith("digraph QuantumGraph {") and dot.rstrip().endswith("}")
    assert dot.count("shape=box") == len(graph)
    assert 'label="scale\\\\ninstrument=SimCam' in dot
    mermaid = graph.to_mermaid()
    assert mermaid.startswith("flowchart LR")
    assert mermaid.count('"]\n') >= len(graph) and "-->" in mermaid
    assert "scale_metadata" not in mermaid  # automatic outputs are not drawn
