"""diapipe's PipelineTask framework: tasks, configs, connections, pipelines and quantum graphs.

The public names are imported lazily (PEP 562) so that ``pipetask --help`` and other light
consumers do not import pydantic, networkx or the butler until they need them.
"""

from __future__ import annotations

from butler.lazy import attach

_LAZY: dict[str, str] = {
    # outcome vocabulary and errors
    "PipelineError": "pipeline.errors",
    "NoWorkFound": "pipeline.errors",
    "RepeatableQuantumError": "pipeline.errors",
    "InvalidQuantumError": "pipeline.errors",
    # tasks and configs
    "Struct": "pipeline.struct",
    "Task": "pipeline.task",
    "timeMethod": "pipeline.task",
    "Config": "pipeline.config",
    "Field": "pipeline.config",
    "ConfigurableField": "pipeline.config",
    # connections
    "Input": "pipeline.connections",
    "PrerequisiteInput": "pipeline.connections",
    "Output": "pipeline.connections",
    "InitInput": "pipeline.connections",
    "InitOutput": "pipeline.connections",
    "PipelineTaskConnections": "pipeline.connections",
    # pipeline tasks
    "PipelineTask": "pipeline.pipeline_task",
    "PipelineTaskConfig": "pipeline.pipeline_task",
    "ButlerQuantumContext": "pipeline.pipeline_task",
    "QuantumContext": "pipeline.pipeline_task",
    "InputQuantizedConnection": "pipeline.pipeline_task",
    "OutputQuantizedConnection": "pipeline.pipeline_task",
    # pipelines and graphs
    "Pipeline": "pipeline.pipeline",
    "TaskDef": "pipeline.pipeline",
    "Quantum": "pipeline.graph",
    "QuantumGraph": "pipeline.graph",
    "build_quantum_graph": "pipeline.graph_builder",
    "QuantumGraphBuilder": "pipeline.graph_builder",
    "execute_quantum": "pipeline.quantum_execution",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
