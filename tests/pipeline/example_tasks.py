"""Small PipelineTasks for the pipeline tests (importable as tests.pipeline.example_tasks)."""

from __future__ import annotations

from typing import Any

from pipeline.config import ConfigurableField, Field
from pipeline.connections import InitInput, InitOutput, Input, Output, PipelineTaskConnections, PrerequisiteInput
from pipeline.errors import NoWorkFound
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from pipeline.task import Task

VD = ("instrument", "visit", "detector")
PATCH = ("skymap", "tract", "patch")


class ScaleConnections(PipelineTaskConnections, dimensions=VD, defaultTemplates={"inName": "raw", "outName": "calexp"}):
    input = Input(name="{inName}", storageClass="StructuredDataDict", dimensions=VD, doc="input value")
    output = Output(name="{outName}", storageClass="StructuredDataDict", dimensions=VD, doc="scaled value")


class OffsetConfig(Task.ConfigClass):  # a plain subtask config
    offset: float = Field(0.0, description="added after scaling")


class OffsetTask(Task):
    ConfigClass = OffsetConfig
    _DefaultName = "offset"

    def run(self, value: float) -> float:
        return value + self.config.offset


class ScaleConfig(PipelineTaskConfig, pipelineConnections=ScaleConnections):
    factor: float = Field(2.0, description="multiplier")
    mode: str = Field("mul", description="mul or add")
    enabled: bool = Field(True, description="do the work")
    weights: dict[str, float] = Field(default_factory=dict, description="per-band weights")
    offset = ConfigurableField(target=OffsetTask, doc="offset subtask")

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("mul", "add"):
            raise ValueError(f"mode must be 'mul' or 'add', not {self.mode!r}")


class ScaleTask(PipelineTask):
    ConfigClass = ScaleConfig
    _DefaultName = "scale"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.makeSubtask("offset")

    def run(self, input: dict) -> Struct:  # noqa: A002
        if not self.config.enabled:
            raise NoWorkFound("disabled")
        value = input["value"] * self.config.factor if self.config.mode == "mul" else input["value"] + self.config.factor
        self.metadata["scaled"] = True
        return Struct(output={"value": self.offset.run(value), "data_id": input.get("data_id")})


class PatchSumConnections(PipelineTaskConnections, dimensions=PATCH):
    calexps = Input(name="calexp", storageClass="StructuredDataDict", dimensions=VD, multiple=True)
    total = Output(name="patchSum", storageClass="StructuredDataDict", dimensions=PATCH)


class PatchSumConfig(PipelineTaskConfig, pipelineConnections=PatchSumConnections):
    pass


class PatchSumTask(PipelineTask):
    ConfigClass = PatchSumConfig
    _DefaultName = "patchSum"

    def run(self, calexps: list[dict]) -> Struct:
        return Struct(total={"value": sum(i["value"] for i in calexps), "n": len(calexps)})


class DiffConnections(PipelineTaskConnections, dimensions=VD, defaultTemplates={"coaddName": "patch"}):
    exposure = Input(name="calexp", storageClass="StructuredDataDict", dimensions=VD)
    templates = Input(name="{coaddName}Sum", storageClass="StructuredDataDict", dimensions=PATCH, multiple=True, deferLoad=True)
    skyMap = PrerequisiteInput(name="skyMapInfo", storageClass="StructuredDataDict", dimensions=("skymap",))
    diff = Output(name="diff", storageClass="StructuredDataDict", dimensions=VD)


class DiffConfig(PipelineTaskConfig, pipelineConnections=DiffConnections):
    pass


class DiffTask(PipelineTask):
    ConfigClass = DiffConfig
    _DefaultName = "diff"

    def run(self, exposure: dict, templates: list, skyMap: dict) -> Struct:  # noqa: N803
        values = [t.get()["value"] for t in templates]
        return Struct(diff={"value": exposure["value"] - sum(values), "patches": [t.dataId["patch"] for t in templates]})


class OptionalConnections(PipelineTaskConnections, dimensions=VD):
    exposure = Input(name="calexp", storageClass="StructuredDataDict", dimensions=VD)
    extra = Input(name="extraInfo", storageClass="StructuredDataDict", dimensions=VD, minimum=0)
    out = Output(name="withExtra", storageClass="StructuredDataDict", dimensions=VD)

    def __init__(self, *, config: Any = None) -> None:
        super().__init__(config=config)
        if not config.useExtra:
            self.inputs.remove("extra")


class OptionalConfig(PipelineTaskConfig, pipelineConnections=OptionalConnections):
    useExtra: bool = Field(True, description="read extraInfo when present")


class OptionalTask(PipelineTask):
    ConfigClass = OptionalConfig
    _DefaultName = "optional"

    def run(self, exposure: dict, extra: dict | None = None) -> Struct:
        return Struct(out={"value": exposure["value"], "extra": extra is not None})


class SchemaConnections(PipelineTaskConnections, dimensions=VD):
    schema = InitOutput(name="srcSchema", storageClass="StructuredDataDict")
    exposure = Input(name="calexp", storageClass="StructuredDataDict", dimensions=VD)
    src = Output(name="src", storageClass="StructuredDataDict", dimensions=VD)


class SchemaConfig(PipelineTaskConfig, pipelineConnections=SchemaConnections):
    pass


class SchemaTask(PipelineTask):
    ConfigClass = SchemaConfig
    _DefaultName = "schema"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schema = {"columns": ["id", "flux"]}

    def run(self, exposure: dict) -> Struct:
        return Struct(src={"n": 1, "value": exposure["value"]})


class SchemaUserConnections(PipelineTaskConnections, dimensions=VD):
    schema = InitInput(name="srcSchema", storageClass="StructuredDataDict")
    src = Input(name="src", storageClass="StructuredDataDict", dimensions=VD)
    out = Output(name="srcSummary", storageClass="StructuredDataDict", dimensions=VD)


class SchemaUserConfig(PipelineTaskConfig, pipelineConnections=SchemaUserConnections):
    pass


class SchemaUserTask(PipelineTask):
    ConfigClass = SchemaUserConfig
    _DefaultName = "schemaUser"

    def __init__(self, *, initInputs: Any = None, **kwargs: Any) -> None:  # noqa: N803
        super().__init__(initInputs=initInputs, **kwargs)
        self.columns = (initInputs or {})["schema"]["columns"]

    def run(self, src: dict) -> Struct:
        return Struct(out={"columns": self.columns, "value": src["value"]})


class BadPutTask(ScaleTask):
    """Writes a ref that is not its output."""

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N803
        butlerQC.put({"value": 1}, inputRefs.input)


class FailingTask(ScaleTask):
    def run(self, input: dict) -> Struct:  # noqa: A002
        raise RuntimeError("boom")


class NotATask:
    pass
