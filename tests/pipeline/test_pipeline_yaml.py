"""Pipeline YAML: tasks, config layers, parameters, imports, subsets, contracts, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import (
    ConfigError,
    ContractError,
    PipelineDefinitionError,
    PipelineGraphError,
    TaskImportError,
)
from pipeline.pipeline import Pipeline

DATA = Path(__file__).parent / "data"
T = "tests.pipeline.example_tasks"


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_pipeline_expands_in_dependency_order():
    pipeline = Pipeline.from_uri(DATA / "base.yaml")
    assert pipeline.labels == ["scale", "patchSum", "diff"]
    assert pipeline.subsets["back"].description == "the difference step"
    defs = pipeline.to_task_defs()
    assert [d.label for d in defs] == ["scale", "patchSum", "diff"]
    scale = defs[0]
    assert scale.config.factor == 4.0 and scale.config.frozen
    assert scale.config.provenance("factor").layer == "pipeline"
    assert scale.config.provenance("factor").source == f"{DATA / 'base.yaml'}:9"
    assert defs[2].connections.templates.name == "patchSum"


def test_order_follows_datasets_not_declaration(tmp_path):
    path = write(tmp_path, f"description: d\ntasks:\n  diff: {T}.DiffTask\n  patchSum: {T}.PatchSumTask\n  scale: {T}.ScaleTask\n")
    assert [d.label for d in Pipeline.from_file(path).to_task_defs()] == ["scale", "patchSum", "diff"]


def test_selection_by_label_and_subset():
    assert Pipeline.from_uri(f"{DATA / 'base.yaml'}#front").labels == ["scale", "patchSum"]
    sub = Pipeline.from_uri(f"{DATA / 'base.yaml'}#back,scale")
    assert sub.labels == ["scale", "diff"] and list(sub.subsets) == ["back"]
    with pytest.raises(PipelineDefinitionError, match="'nope' is neither a task label nor a subset; labels: scale, patchSum, diff; subsets: front, back"):
        Pipeline.from_uri(f"{DATA / 'base.yaml'}#nope")


def test_imports_parameters_files_and_layers():
    pipeline = Pipeline.from_file(DATA / "importing.yaml")
    assert pipeline.labels == ["scale", "patchSum", "optional"]
    assert set(pipeline.subsets) == {"front", "mine"} and len(pipeline.contracts) == 1
    defs = {d.label: d for d in pipeline.to_task_defs()}
    scale = defs["scale"].config
    assert scale.factor == 6.0  # the importing file's parameter wins
    assert scale.offset.offset == 0.5 and scale.offset.provenance("offset").layer == "file"
    assert scale.provenance("factor").source.startswith(str(DATA / "base.yaml"))


def test_import_include_env_var_and_no_contracts(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPES", str(DATA))
    path = write(tmp_path, "description: d\nimports:\n  - location: $PIPES/base.yaml\n    include: [front]\n    importContracts: false\n")
    pipeline = Pipeline.from_file(path)
    assert pipeline.labels == ["scale", "patchSum"] and pipeline.contracts == []
    bad = write(tmp_path, "description: d\nimports:\n  - location: base.yaml\n    include: [a]\n    exclude: [b]\n", "bad.yaml")
    with pytest.raises(PipelineDefinitionError, match="'include' or 'exclude', not both"):
        Pipeline.from_file(bad)


def test_import_cycle(tmp_path):
    write(tmp_path, "description: a\nimports: [b.yaml]\n", "a.yaml")
    write(tmp_path, "description: b\nimports: [a.yaml]\n", "b.yaml")
    with pytest.raises(PipelineDefinitionError, match="imports form a cycle"):
        Pipeline.from_file(tmp_path / "a.yaml")


def test_cli_overrides_win_and_record_provenance(tmp_path):
    cfg = write(tmp_path, "factor: 8\n", "scale.yaml")
    pipeline = Pipeline.from_uri(DATA / "base.yaml")
    pipeline.apply_cli_overrides(["scale:mode=add", "scale:offset.offset=1.5"], [f"scale:{cfg}"])
    config = {d.label: d for d in pipeline.to_task_defs()}["scale"].config
    assert (config.factor, config.mode, config.offset.offset) == (8.0, "add", 1.5)
    assert config.provenance("factor").layer == "file"
    assert config.provenance("mode").layer == "command line"
    assert config.provenance("mode").source == "-c scale:mode=add"


# ------------------------------------------------------------------ bad input: clear errors
def expect(tmp_path, text, error, pattern, line=None):
    path = write(tmp_path, text)
    with pytest.raises(error) as info:
        Pipeline.from_file(path).to_task_defs()
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:" if line else str(path)), message
    assert pattern in message, message
    return info.value


def test_unknown_task_class(tmp_path):
    err = expect(tmp_path, f"description: d\ntasks:\n  a: {T}.ScaleTask\n  b: {T}.NoSuchTask\n", TaskImportError, "task 'b': module 'tests.pipeline.example_tasks' has no class 'NoSuchTask'", 4)
    assert err.label == "b"
    expect(tmp_path, "description: d\ntasks:\n  a:\n    class: nosuchmodule.Task\n", TaskImportError, "cannot import task class 'nosuchmodule.Task'", 3)
    expect(tmp_path, f"description: d\ntasks:\n  a: {T}.NotATask\n", TaskImportError, "is not a PipelineTask subclass", 3)


def test_unknown_config_field(tmp_path):
    err = expect(
        tmp_path,
        f"description: d\ntasks:\n  a:\n    class: {T}.ScaleTask\n    config:\n      factor: 2\n      facter: 3\n",
        ConfigError,
        "task 'a': config field 'facter' (set by the pipeline): ScaleConfig has no field 'facter' (did you mean 'factor'?)",
        7,
    )
    assert (err.label, err.field, err.layer) == ("a", "facter", "pipeline")


def test_wrong_value_type(tmp_path):
    expect(
        tmp_path,
        f"description: d\ntasks:\n  a:\n    class: {T}.ScaleTask\n    config:\n      offset:\n        offset: lots\n",
        ConfigError,
        "config field 'offset.offset' (set by the pipeline): Input should be a valid number",
        7,
    )


def test_missing_parameter(tmp_path):
    expect(
        tmp_path,
        f"description: d\nparameters:\n  f: 2\ntasks:\n  a:\n    class: {T}.ScaleTask\n    config:\n      factor: parameters.factr\n",
        ConfigError,
        "uses pipeline parameter 'factr', which is not defined (parameters: f)",
        8,
    )


def test_validate_hook_failure(tmp_path):
    expect(tmp_path, f"description: d\ntasks:\n  a:\n    class: {T}.ScaleTask\n    config:\n      mode: div\n", ConfigError, "task 'a': config validation failed: mode must be 'mul' or 'add'", 3)


def test_violated_contract(tmp_path):
    expect(
        tmp_path,
        f"description: d\ntasks:\n  a:\n    class: {T}.ScaleTask\n    config:\n      factor: -1\ncontracts:\n  - contract: a.factor > 0\n    msg: positive please\n",
        ContractError,
        "contract 'a.factor > 0' failed: positive please (a.factor=-1.0)",
        8,
    )


def test_contract_with_code_is_rejected_when_read(tmp_path):
    path = write(tmp_path, f"description: d\ntasks:\n  a: {T}.ScaleTask\ncontracts:\n  - \"__import__('os').getcwd() == 1\"\n")
    with pytest.raises(ContractError, match=r"p.yaml:5: contract .* uses Call"):
        Pipeline.from_file(path)


def test_cycle(tmp_path):
    text = (
        f"description: d\ntasks:\n  a:\n    class: {T}.ScaleTask\n    config:\n      connections.inName: y\n      connections.outName: x\n"
        f"  b:\n    class: {T}.ScaleTask\n    config:\n      connections.inName: x\n      connections.outName: y\n"
    )
    err = expect(tmp_path, text, PipelineGraphError, "the pipeline has a cycle: a (x) -> b (y) -> a", 3)
    assert err.label == "a"


def test_two_tasks_producing_one_dataset_type(tmp_path):
    expect(
        tmp_path,
        f"description: d\ntasks:\n  a: {T}.ScaleTask\n  b: {T}.ScaleTask\n",
        PipelineGraphError,
        "dataset type 'calexp' is produced by two tasks: 'a' (output) and 'b' (output)",
        4,
    )


def test_inconsistent_dataset_type_definitions(tmp_path):
    expect(
        tmp_path,
        f"description: d\ntasks:\n  a: {T}.ScaleTask\n  b:\n    class: {T}.PatchSumTask\n    config:\n      connections.total: raw\n",
        PipelineGraphError,
        "dataset type 'raw' is defined twice: task 'a' (input) says ['instrument', 'visit', 'detector'] / StructuredDataDict, "
        "task 'b' (total) says ['skymap', 'tract', 'patch'] / StructuredDataDict",
        4,
    )


@pytest.mark.parametrize(
    ("text", "pattern", "line"),
    [
        ("description: d\ntasks:\n  a: x.Y\nsubset:\n  s: [a]\n", "unknown top-level key 'subset' (did you mean 'subsets'?)", 4),
        ("tasks:\n  a: x.Y\n", "a pipeline needs a 'description'", 1),
        ("description: d\ntasks:\n  a: x.Y\n  a: x.Z\n", "duplicate key 'a' (first at line 3)", 4),
        ("description: d\ntasks:\n  a:\n    klass: x.Y\n", "task 'a' has unknown key 'klass'", 4),
        ("description: d\ntasks:\n  a:\n    class: x.Y\n    config:\n      python: config.x = 1\n", "config 'python' blocks are not supported", 6),
        ("description: d\ntasks:\n  parameters: x.Y\n", "invalid task label 'parameters'", 3),
        ("description: d\ntasks:\n  a: x.Y\nsubsets:\n  s: [a, b]\n", "subset 's' names unknown task label(s) ['b']", 5),
        ("description: d\ntasks: [\n", "invalid YAML", 3),
    ],
)
def test_malformed_files(tmp_path, text, pattern, line):
    path = write(tmp_path, text)
    with pytest.raises(PipelineDefinitionError) as info:
        Pipeline.from_file(path)
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    assert pattern in str(info.value)


def test_missing_file_and_unknown_cli_label(tmp_path):
    with pytest.raises(PipelineDefinitionError, match="pipeline file .*missing.yaml does not exist"):
        Pipeline.from_uri(tmp_path / "missing.yaml")
    pipeline = Pipeline.from_uri(DATA / "base.yaml")
    with pytest.raises(PipelineDefinitionError, match="no task labeled 'nope'"):
        pipeline.apply_cli_overrides(["nope:x=1"])
    with pytest.raises(PipelineDefinitionError, match="expected LABEL:FIELD=VALUE"):
        pipeline.apply_cli_overrides(["scale.factor=1"])
    pipeline.apply_cli_overrides(["scale:factor=many"])
    with pytest.raises(ConfigError, match=r"task 'scale': config field 'factor' \(set by the command line -c scale:factor=many\)"):
        pipeline.to_task_defs()


def test_programmatic_pipeline_and_yaml_round_trip(tmp_path):
    from .example_tasks import ScaleTask

    pipeline = Pipeline("made in python")
    pipeline.add_task(ScaleTask, "scale", {"factor": 5})
    pipeline.add_task(f"{T}.PatchSumTask", "patchSum")
    defs = pipeline.to_task_defs()
    assert defs[0].config.factor == 5 and defs[0].config.provenance("factor").layer == "python"
    path = write(tmp_path, pipeline.to_yaml(), "round.yaml")
    again = Pipeline.from_file(path)
    assert again.labels == ["scale", "patchSum"]
    assert again.to_task_defs()[0].config.factor == 5
