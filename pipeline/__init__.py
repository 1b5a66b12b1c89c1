"""diapipe's PipelineTask framework: tasks, configs, connections, pipelines and quantum graphs.

The public names are imported lazily (PEP 562) so that ``pipetask --help`` and other light
consumers do not import pydantic, networkx or the butler until they need them.
"""

from __future__ import annotations

import importlib
from typing import Any

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

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
