"""A simulated survey run through the whole DIA pipeline, shared by the tests of one pytest process.

:func:`dia_repository` simulates a ``tiny`` survey (optionally with some fields replaced), runs
``pipelines/DIA.yaml`` on it with the threads executor into the collection ``u/dia`` and returns the
repository; the result is cached per process (and per set of overrides), so the forced-photometry
tests and the integration test build it once.  :func:`visit_table` and :func:`patch_table` stack
per-visit-detector and per-patch catalogs with their data ID keys as columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table, vstack

from butler.butler import Butler
from pipeline.execution import ExecutionReport, run_graph
from pipeline.executors.base import Executor
from pipeline.graph_builder import build_quantum_graph
from pipeline.pipeline import Pipeline
from pipeline.run_options import RunOptions
from tasks.simulation import get_preset, write_repository

ROOT = Path(__file__).resolve().parents[2]
DIA_PIPELINE = ROOT / "pipelines" / "DIA.yaml"
INPUTS = "SimCam/defaults"
OUTPUT = "u/dia"

_CACHE: dict[tuple, Path] = {}


def simulate(path: Path, **overrides: Any) -> Path:
    """A new repository holding the ``tiny`` survey (with ``overrides`` of its preset fields)."""
    write_repository(path, get_preset("tiny", **overrides))
    return path


def run_dia(repo: Path, executor: Executor, *, output: str = OUTPUT, where: str | None = None) -> ExecutionReport:
    """Build and run the DIA pipeline on ``SimCam/defaults`` into ``output`` (a new run under it)."""
    run = f"{output}/run"
    with Butler(repo) as butler:
        graph = build_quantum_graph(
            Pipeline.from_uri(str(DIA_PIPELINE)), butler, input_collections=[INPUTS], output_run=run, output=output,
            where=where,
        )
    options = RunOptions(
        processes=executor.workers, scheduler=executor.name, output=output, output_run=run, input_collections=[INPUTS],
    )
    return run_graph(graph, repo, options, executor=executor)


def dia_repository(tmp_path_factory: Any, **overrides: Any) -> Path:
    """The simulated survey after the DIA pipeline (threads, 2 workers) into ``u/dia``; built once per process.

    Raises
    ------
    AssertionError
        If a quantum failed.
    """
    from pipeline.executors.threads import ThreadsExecutor

    key = tuple(sorted(overrides.items()))
    if key not in _CACHE:
        repo = simulate(tmp_path_factory.mktemp("dia-survey") / "repo", **overrides)
        executor = ThreadsExecutor(2)
        try:
            report = run_dia(repo, executor)
        finally:
            executor.close()
        assert report.exit_code == 0, report.failures
        _CACHE[key] = repo
    return _CACHE[key]


def visit_table(butler: Butler, dataset_type: str, **where: Any) -> Table:
    """All datasets of a per-visit-detector catalog type stacked, with ``visit`` and ``detector`` columns."""
    tables = []
    for ref in butler.query_datasets(dataset_type, data_id=dict(where) or None):
        table = butler.get(ref)
        table["visit"] = np.full(len(table), int(ref.data_id["visit"]), dtype=np.int64)
        table["detector"] = np.full(len(table), int(ref.data_id["detector"]), dtype=np.int64)
        tables.append(table)
    return vstack(tables, metadata_conflicts="silent") if tables else Table()


def patch_table(butler: Butler, dataset_type: str, data_id: Mapping[str, Any] | None = None) -> Table:
    """All datasets of a per-patch catalog type stacked, with ``tract`` and ``patch`` columns."""
    tables = []
    for ref in butler.query_datasets(dataset_type, data_id=dict(data_id) if data_id else None):
        table = butler.get(ref)
        table["tract"] = np.full(len(table), int(ref.data_id["tract"]), dtype=np.int64)
        table["patch"] = np.full(len(table), int(ref.data_id["patch"]), dtype=np.int64)
        tables.append(table)
    return vstack(tables, metadata_conflicts="silent") if tables else Table()
