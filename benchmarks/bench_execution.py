"""Executor benchmarks: framework overhead per quantum and the speedup of 2 workers over 1.

Prints, for each scheduler (threads, processes, distributed on a local cluster):

- the wall time per quantum of a graph of trivial quanta (2000 by default: the task reads
  nothing and writes only its ``{label}_metadata`` dataset) with 1 and 2 workers, and the
  executor's own share (wall x workers - time inside the quanta, per quantum);
- the speedup of 2 workers over 1 on a CPU-bound pipeline: numpy ufuncs (which release the
  GIL) on threads and distributed, pure-Python loops on processes (DESIGN §7);
- where lsst-ctrl-mpexec imports (``--lsst-python``, default ``$LSST_PYTHON`` or this interpreter),
  LSST's ``pipetask run -j 1`` on a trivial pipeline of the same shape, side by side.

Numbers only; nothing is asserted.  Usage::

    python benchmarks/bench_execution.py [--quanta 2000] [--cpu-quanta 32] [--schedulers threads,processes,distributed]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from tests.pipeline.execution_tasks import NoOpTask  # noqa: E402  (importable by every worker)

INSTRUMENT = "BenchCam"
N_DETECTORS = 4


def make_repo(path: Path, n_quanta: int) -> Path:
    """A repository with enough visit x detector data IDs for ``n_quanta`` quanta."""
    from butler.butler import Butler
    from butler.regions import SkyRegion

    Butler.create(path, formatters={"Config": "json"})
    n_visits = -(-n_quanta // N_DETECTORS)
    with Butler(path) as butler:
        butler.insert_dimension_records("instrument", [{"name": INSTRUMENT, "detector_max": N_DETECTORS}])
        butler.insert_dimension_records("band", [{"name": "r"}])
        butler.insert_dimension_records("physical_filter", [{"instrument": INSTRUMENT, "name": "r_b", "band": "r"}])
        butler.insert_dimension_records("detector", [{"instrument": INSTRUMENT, "id": d, "full_name": f"S{d}"} for d in range(N_DETECTORS)])
        visits, vdr = [], []
        for v in range(n_visits):
            ra, dec = 10.0 + 0.01 * (v % 100), -5.0 + 0.01 * (v // 100)
            region = SkyRegion.from_radec([ra, ra + 0.05, ra + 0.05, ra], [dec, dec, dec + 0.05, dec + 0.05])
            visits.append({"instrument": INSTRUMENT, "id": v, "physical_filter": "r_b", "seeing": 0.7,
                           "exposure_time": 30.0, "mjd": 60000.0 + v, "region": region})
            vdr += [{"instrument": INSTRUMENT, "visit": v, "detector": d, "region": region} for d in range(N_DETECTORS)]
        butler.insert_dimension_records("visit", visits)
        butler.insert_dimension_records("visit_detector_region", vdr)
        butler.register_run("inputs")
    return path


def build_graph(repo: Path, n_quanta: int, run: str, config: dict[str, Any]) -> Any:
    from butler.butler import Butler
    from pipeline.graph_builder import build_quantum_graph
    from pipeline.testing import make_task_def

    task_def = make_task_def(NoOpTask, config, label="noop")
    n_visits = -(-n_quanta // N_DETECTORS)
    with Butler(repo) as butler:
        graph = build_quantum_graph([task_def], butler, input_collections=["inputs"], output_run=run,
                                    where=f"visit < {n_visits}")
    assert len(graph) == n_visits * N_DETECTORS, len(graph)
    return graph


def make_executor(name: str, workers: int) -> Any:
    if name == "threads":
        from pipeline.executors.threads import ThreadsExecutor

        return ThreadsExecutor(workers)
    if name == "processes":
        from pipeline.executors.processes import ProcessesExecutor

        return ProcessesExecutor(workers)
    from pipeline.executors.distributed import DistributedExecutor

    executor = DistributedExecutor(workers, local_cluster=workers)
    executor.client  # noqa: B018 - start the cluster outside the timing
    return executor


def timed_run(repo: Path, graph: Any, executor: Any) -> tuple[float, Any]:
    from pipeline.execution import run_graph
    from pipeline.run_options import RunOptions

    options = RunOptions(processes=executor.workers, scheduler=executor.name, output_run=graph.metadata["output_run"],
                         input_collections=["inputs"])
    start = time.perf_counter()
    report = run_graph(graph, repo, options, executor=executor)
    wall = time.perf_counter() - start
    if not report.succeeded:
        raise RuntimeError(f"benchmark run failed: {report.status_line()} {report.failures[:1]}")
    return wall, report


_counter = [0]


def _run_name(tag: str) -> str:
    _counter[0] += 1
    return f"bench/{tag}/{_counter[0]}"


def bench_overhead(repo: Path, scheduler: str, n: int, workers: int) -> dict[str, float]:
    executor = make_executor(scheduler, workers)
    try:
        warm = build_graph(repo, 8 * workers, _run_name("warm"), {})
        timed_run(repo, warm, executor)  # start pools / import task modules outside the timing
        graph = build_graph(repo, n, _run_name("trivial"), {})
        wall, report = timed_run(repo, graph, executor)
    finally:
        executor.close()
    inside = sum(o.seconds for o in report.outcomes.values())
    return {"wall_ms": 1e3 * wall / n, "executor_ms": 1e3 * max(0.0, wall * workers - inside) / n, "inside_ms": 1e3 * inside / n}


def bench_speedup(repo: Path, scheduler: str, n: int) -> tuple[float, float]:
    # About a second of work per quantum (DESIGN §7): numpy ufuncs release the GIL; FFTs measured
    # no gain from a second thread on this machine.
    work = {"work": "python", "repeats": 8} if scheduler == "processes" else {"work": "ufunc", "repeats": 25}
    walls = []
    for workers in (1, 2):
        executor = make_executor(scheduler, workers)
        try:
            warm = build_graph(repo, 4 * workers, _run_name("warmcpu"), {**work, "repeats": 1})
            timed_run(repo, warm, executor)
            wall, _ = timed_run(repo, build_graph(repo, n, _run_name("cpu"), work), executor)
        finally:
            executor.close()
        walls.append(wall)
    return walls[0], walls[1]


# ---------------------------------------------------------------------- LSST side by side
_LSST_SCRIPT = textwrap.dedent('''
    import sys, time, subprocess, os, textwrap
    from pathlib import Path
    root, n = Path(sys.argv[1]), int(sys.argv[2])
    import lsst.pipe.base.connectionTypes as cT
    from lsst.daf.butler import Butler
    from lsst.pipe.base import PipelineTask, PipelineTaskConfig, PipelineTaskConnections, Struct
    Butler.makeRepo(str(root / "repo"))
    butler = Butler.from_config(str(root / "repo"), writeable=True)
    butler.registry.insertDimensionData("instrument", {"name": "BenchCam", "detector_max": 4, "visit_max": 100000,
        "exposure_max": 100000, "visit_system": 0, "class_name": "lsst.obs.base.Instrument"})
    butler.registry.insertDimensionData("detector", *[{"instrument": "BenchCam", "id": d, "full_name": f"S{d}"} for d in range(n)])
    butler.registry.registerRun("inputs")
    (root / "benchtask.py").write_text(textwrap.dedent("""
        import lsst.pipe.base.connectionTypes as cT
        from lsst.pipe.base import PipelineTask, PipelineTaskConfig, PipelineTaskConnections, Struct
        class NoOpConnections(PipelineTaskConnections, dimensions=("instrument", "detector")):
            pass
        class NoOpConfig(PipelineTaskConfig, pipelineConnections=NoOpConnections):
            pass
        class NoOpTask(PipelineTask):
            ConfigClass = NoOpConfig
            _DefaultName = "noop"
            def runQuantum(self, butlerQC, inputRefs, outputRefs):
                pass
    """))
    (root / "pipe.yaml").write_text("description: bench\\ntasks:\\n  noop: benchtask.NoOpTask\\n")
    env = dict(os.environ, PYTHONPATH=str(root))
    pipetask = str(Path(sys.executable).parent / "pipetask")
    start = time.perf_counter()
    out = subprocess.run([pipetask, "run", "-b", str(root / "repo"), "-p", str(root / "pipe.yaml"), "-i", "inputs",
                          "-o", "out", "-j", "1", "--register-dataset-types"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        print("ERROR", out.stderr[-2000:])
        sys.exit(1)
    print("WALL", wall)
''')


def bench_lsst(lsst_python: str, n: int) -> str:
    """LSST's ``pipetask run -j 1`` of a trivial pipeline of ``n`` quanta (per-quantum seconds)."""
    if not Path(lsst_python).exists():
        return f"skipped: {lsst_python} not found (a venv with lsst-ctrl-mpexec)"
    probe = subprocess.run([lsst_python, "-c", "import lsst.ctrl.mpexec"], capture_output=True, text=True)
    if probe.returncode:
        return f"skipped: lsst.ctrl.mpexec does not import ({probe.stderr.strip().splitlines()[-1:]})"
    folder = Path(tempfile.mkdtemp(prefix="bench-lsst-"))
    try:
        script = folder / "bench_lsst.py"
        script.write_text(_LSST_SCRIPT)
        out = subprocess.run([lsst_python, str(script), str(folder), str(n)], capture_output=True, text=True, timeout=1800)
        line = next((x for x in out.stdout.splitlines() if x.startswith("WALL ")), None)
        if line is None:
            tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
            return f"skipped: the LSST run did not complete ({' | '.join(tail)})"
        wall = float(line.split()[1])
        return f"{1e3 * wall / n:8.1f} ms/quantum ({n} trivial quanta, -j 1, {wall:.1f} s including startup)"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quanta", type=int, default=2000, help="trivial quanta")
    parser.add_argument(
        "--cpu-quanta", type=int, default=32,
        help="CPU-bound quanta (with 8, a run's fixed costs -- collections, provenance, the saved graph, "
        "about 0.5 s -- weigh on the speedup: measured 1.55-1.88x there, 1.73-2.0x with 32)",
    )
    parser.add_argument("--schedulers", default="threads,processes,distributed")
    parser.add_argument("--lsst-python", default=os.environ.get("LSST_PYTHON", sys.executable))
    parser.add_argument("--lsst-quanta", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import dask

    dask.config.set({"logging.distributed": "error"})
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)
    folder = Path(tempfile.mkdtemp(prefix="bench-exec-"))
    try:
        repo = make_repo(folder / "repo", max(args.quanta, args.cpu_quanta))
        print(f"diapipe executor benchmark: {os.cpu_count()} cores, {args.quanta} trivial quanta, {args.cpu_quanta} CPU-bound quanta")
        print(f"{'scheduler':<12} {'workers':>7} {'wall/quantum':>14} {'executor/quantum':>17} {'in quantum':>11}")
        for scheduler in args.schedulers.split(","):
            for workers in (1, 2):
                r = bench_overhead(repo, scheduler, args.quanta, workers)
                print(f"{scheduler:<12} {workers:>7} {r['wall_ms']:>11.2f} ms {r['executor_ms']:>14.2f} ms {r['inside_ms']:>8.2f} ms", flush=True)
        print("\nspeedup of 2 workers over 1 on CPU-bound quanta (target >= 1.7x)")
        for scheduler in args.schedulers.split(","):
            one, two = bench_speedup(repo, scheduler, args.cpu_quanta)
            kind = "pure Python" if scheduler == "processes" else "numpy ufunc"
            print(f"{scheduler:<12} {kind:<12} 1 worker {one:6.2f} s, 2 workers {two:6.2f} s: {one / two:4.2f}x", flush=True)
        print("\nLSST pipetask run -j 1, trivial pipeline of the same shape (reference: ~200 ms/quantum):")
        print("  " + bench_lsst(args.lsst_python, args.lsst_quanta))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
