"""Helpers of the executor tests: an Exposure repository, pipelines, runs, a loopback cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from butler.butler import Butler
from pipeline.execution import ExecutionReport, run_graph
from pipeline.executors.base import Executor
from pipeline.graph import QuantumGraph
from pipeline.graph_builder import build_quantum_graph
from pipeline.pipeline import Pipeline
from pipeline.run_options import RunOptions
from tests.butler.conftest import INSTRUMENT, fill_dimensions
from tests.pipeline.execution_tasks import raw_exposure

ROOT = Path(__file__).resolve().parents[2]
VISITS = (100, 101)
DETECTORS = (0, 1, 2, 3)
WHERE = "visit IN (100, 101)"
TASKS = "tests.pipeline.execution_tasks"


def make_exposure_repo(path: Path) -> Path:
    """A repository with raw exposures (16x16) for 2 visits x 4 detectors in ``inputs``."""
    Butler.create(path, formatters={"Config": "json"})
    with Butler(path, run="inputs") as butler:
        fill_dimensions(butler)
        butler.register_dataset_type("rawExp", ["instrument", "visit", "detector"], "Exposure")
        for v in VISITS:
            for d in DETECTORS:
                butler.put(raw_exposure(v, d), "rawExp", instrument=INSTRUMENT, visit=v, detector=d)
    return path


def write_pipeline(folder: Path, scale: Mapping[str, Any] | None = None, tasks: tuple[str, ...] = ("scale", "visitSum", "stats"), name: str = "exec.yaml") -> Path:
    """A pipeline YAML of the execution tasks (``scale`` config overrides given as a mapping)."""
    classes = {"scale": "ScaleExposureTask", "visitSum": "VisitSumTask", "stats": "StatsTask"}
    spec: dict[str, Any] = {"description": "executor tests", "tasks": {}}
    for label in tasks:
        entry: dict[str, Any] = {"class": f"{TASKS}.{classes[label]}"}
        if label == "scale" and scale:
            entry["config"] = dict(scale)
        spec["tasks"][label] = entry
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def build(repo: Path, pipeline_file: Path, run: str = "u/test/run1", *, output: str | None = "u/test", where: str = WHERE,
          skip_existing_in: tuple[str, ...] = (), clobber: bool = False) -> QuantumGraph:
    """Build the graph of a pipeline file over the repository."""
    with Butler(repo) as butler:
        return build_quantum_graph(
            Pipeline.from_uri(str(pipeline_file)), butler, input_collections=["inputs"], output_run=run, output=output,
            where=where, skip_existing_in=list(skip_existing_in), clobber_outputs=clobber,
        )


def execute(repo: Path, graph: QuantumGraph, executor: Executor, **options: Any) -> ExecutionReport:
    """Run a graph with an executor (kept open) and options."""
    opts = RunOptions(
        processes=executor.workers, scheduler=executor.name, output=graph.metadata.get("output"),
        output_run=graph.metadata["output_run"], input_collections=["inputs"], **options,
    )
    return run_graph(graph, repo, opts, executor=executor)


def by_tag(report: ExecutionReport, label: str) -> dict[str, Any]:
    """``{"visit:detector" or "visit": outcome}`` of one task."""
    out = {}
    for o in report.outcomes.values():
        if o.task_label == label:
            tag = f"{o.data_id['visit']}:{o.data_id['detector']}" if "detector" in o.data_id else str(o.data_id["visit"])
            out[tag] = o
    return out


def registered(repo: Path, dataset_type: str, run: str = "u/test/run1") -> dict[str, Any]:
    """``{"visit:detector": ref}`` of a dataset type in the run."""
    with Butler(repo) as butler:
        try:
            refs = butler.query_datasets(dataset_type, collections=[run], find_first=False)
        except Exception:  # noqa: BLE001
            return {}
    return {(f"{r.data_id['visit']}:{r.data_id['detector']}" if "detector" in r.data_id else str(r.data_id["visit"])): r for r in refs}


def visible_files(repo: Path, run: str = "u/test/run1") -> set[str]:
    """Files and zarr groups under the run's folder, excluding execution records."""
    base = Path(repo) / run
    out = set()
    if not base.is_dir():
        return out
    for p in base.rglob("*"):
        rel = p.relative_to(repo).as_posix()
        if "/.executions/" in f"/{rel}" or ".zarr/" in rel:
            continue
        if p.is_file() or p.name.endswith(".zarr"):
            out.add(rel)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("MPLBACKEND", "Agg")
    return env


class LoopbackCluster:
    """A real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (random free ports)."""

    def __init__(self, workers: int = 2, log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.n_workers = workers
        self.procs: list[subprocess.Popen] = []
        self.log_dir = log_dir

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        bindir = Path(sys.executable).parent
        log = open(self.log_dir / f"{name}.log", "wb") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen([str(bindir / "dask"), *args], cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> LoopbackCluster:
        self._spawn(["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"], "scheduler")
        for i in range(self.n_workers):
            self._spawn(["worker", self.address, "--nthreads", "1", "--nworkers", "1", "--memory-limit", "0",
                         "--no-dashboard", "--name", f"w{i}", "--death-timeout", "60"], f"worker{i}")
        from distributed import Client

        deadline = time.time() + 90
        while True:
            try:
                with Client(self.address, timeout=5, set_as_default=False) as client:
                    client.wait_for_workers(self.n_workers, timeout=max(1, deadline - time.time()))
                break
            except Exception:
                if time.time() > deadline:
                    self.stop()
                    raise
                time.sleep(0.5)
        return self

    def worker_pids(self) -> dict[str, int]:
        """``{worker address: pid}`` of the worker processes (not the nannies)."""
        from distributed import Client

        with Client(self.address, timeout=5, set_as_default=False) as client:
            return client.run(os.getpid)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@contextlib.contextmanager
def loopback_cluster(workers: int = 2, log_dir: Path | None = None) -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster(workers, log_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def copy_repo(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest
