"""Connections: declarations, templates, renames, dropping optional connections."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.connections import (
    InitOutput,
    Input,
    Output,
    PipelineTaskConnections,
    PrerequisiteInput,
)
from pipeline.errors import ConnectionDefinitionError
from pipeline.pipeline_task import PipelineTaskConfig

from .example_tasks import DiffConfig, DiffConnections, OptionalConfig, OptionalConnections, ScaleConfig, ScaleConnections


def test_connection_types_are_frozen_dataclasses_with_lsst_fields():
    conn = Input(name="calexp", storageClass="Exposure", dimensions=["instrument", "visit"], multiple=True, deferLoad=True, minimum=2, doc="d")
    assert conn.dimensions == ("instrument", "visit")
    assert (conn.multiple, conn.deferLoad, conn.minimum, conn.doc) == (True, True, 2, "d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        conn.name = "x"
    assert PrerequisiteInput(name="a", storageClass="Psf").minimum == 1
    assert {f.name for f in dataclasses.fields(Input)} >= {"name", "storageClass", "doc", "multiple", "dimensions", "deferLoad", "minimum"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dimensions": "visit"}, "missing trailing comma"),
        ({"dimensions": [1]}, "must be strings"),
        ({"minimum": 2}, "needs multiple=True"),
        ({"minimum": -1}, "integer >= 0"),
        ({"name": ""}, "non-empty"),
    ],
)
def test_bad_connection_declarations(kwargs, message):
    args = {"name": "x", "storageClass": "Exposure", **kwargs}
    with pytest.raises(ConnectionDefinitionError, match=message):
        Input(**args)


def test_class_keywords_collect_connections_by_kind():
    assert ScaleConnections.dimensions == ("instrument", "visit", "detector")
    assert ScaleConnections.defaultTemplates == {"inName": "raw", "outName": "calexp"}
    assert ScaleConnections.inputs == {"input"} and ScaleConnections.outputs == {"output"}
    assert DiffConnections.prerequisiteInputs == {"skyMap"}
    conns = ScaleConnections(config=ScaleConfig())
    assert conns.input.name == "raw" and conns.output.name == "calexp"
    assert list(conns.connections_of("outputs")) == ["output"]


def test_rename_and_template_override_through_config():
    config = ScaleConfig()
    config.connections.outName = "scaled"
    config.connections.input = "{inName}Sim"
    conns = ScaleConnections(config=config)
    assert conns.output.name == "scaled" and conns.input.name == "rawSim"
    config2 = DiffConfig()
    config2.connections.coaddName = "goodSeeing"
    assert DiffConnections(config=config2).templates.name == "goodSeeingSum"


def test_missing_template_is_an_error_at_class_creation_and_at_instance():
    with pytest.raises(ConnectionDefinitionError, match=r"uses template\(s\) \['coaddName'\]"):

        class Bad(PipelineTaskConnections, dimensions=("visit",)):
            a = Input(name="{coaddName}Coadd", storageClass="Exposure", dimensions=("visit",))

    config = ScaleConfig()
    config.connections.output = "{nothing}X"
    with pytest.raises(ConnectionDefinitionError, match="template 'nothing'"):
        ScaleConnections(config=config)


def test_dimensions_keyword_checks_and_inheritance():
    with pytest.raises(ConnectionDefinitionError, match="missing trailing comma"):

        class Bad(PipelineTaskConnections, dimensions="visit"):
            pass

    with pytest.raises(ConnectionDefinitionError, match="unknown class keyword"):

        class Bad2(PipelineTaskConnections, dimension=("visit",)):
            pass

    class Child(ScaleConnections):
        extra = Output(name="extra", storageClass="StructuredDataDict", dimensions=("instrument", "visit", "detector"))

    assert Child.dimensions == ScaleConnections.dimensions
    assert Child.outputs == {"output", "extra"}


def test_reserved_connection_names():
    with pytest.raises(ConnectionDefinitionError, match="reserved"):

        class Bad(PipelineTaskConnections, dimensions=()):
            inputs = Input(name="x", storageClass="Exposure")


def test_dropping_optional_connections_in_init():
    config = OptionalConfig()
    assert "extra" in OptionalConnections(config=config).inputs
    config.useExtra = False
    conns = OptionalConnections(config=config)
    assert "extra" not in conns.connections_of("inputs")

    class Deleting(OptionalConnections):
        def __init__(self, *, config=None):
            super().__init__(config=config)
            del self.extra

    conns = Deleting(config=OptionalConfig())
    assert set(conns.connections_of("inputs")) == {"exposure"}
    with pytest.raises(ConnectionDefinitionError, match="no connection 'extra'"):
        conns.get("extra")


def test_connections_cannot_be_replaced_on_instances():
    conns = ScaleConnections(config=ScaleConfig())
    with pytest.raises(ConnectionDefinitionError, match="cannot be replaced"):
        conns.input = Input(name="x", storageClass="Exposure")


def test_connections_config_has_a_field_per_connection_and_template():
    class SchemaConnections(PipelineTaskConnections, dimensions=()):
        schema = InitOutput(name="src_schema", storageClass="StructuredDataDict")

    class SchemaConfig(PipelineTaskConfig, pipelineConnections=SchemaConnections):
        pass

    config = SchemaConfig()
    assert config.connections.schema == "src_schema"  # a name that shadows a pydantic method
    assert set(type(ScaleConfig().connections).model_fields) == {"input", "output", "inName", "outName"}
    assert ScaleConfig.ConnectionsClass is ScaleConnections
