"""Quantum-graph build time: diapipe for ~1k and ~10k trivial quanta, and LSST side by side.

The repository has N_VISITS visits x N_DETECTORS detectors (regions for every visit-detector), one
input dataset per visit-detector, and a pipeline of three chained trivial tasks over
(instrument, visit, detector): ``raw -> a -> b -> c``.  A data query ``visit < V`` selects ~1k or
~10k quanta.  Printed for diapipe: the in-process build time (``build_quantum_graph``) and the wall
time of ``pipetask qgraph`` (a fresh process: imports, pipeline expansion, build, summary).

Where ``lsst.pipe.base`` and ``lsst.ctrl.mpexec`` import (the ``bench`` extra, or a venv named by
``LSST_PYTHON``, default this interpreter), the same-shaped repository is created
with LSST's own butler (registry rows only: the graph builder never reads files) and LSST's
``pipetask qgraph`` is timed the same way.  Otherwise a note says why it was skipped.

Usage: ``python benchmarks/bench_qgraph.py [--visits 1000] [--detectors 10] [--lsst-10k]``
(LSST at 10k quanta takes about a minute; it is off unless asked for).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTRUMENT = "BenchCam"
TASKS_MODULE = "bench_qgraph_tasks"

DIAPIPE_TASKS = '''
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct

VD = ("instrument", "visit", "detector")


class TrivialConnections(PipelineTaskConnections, dimensions=VD, defaultTemplates={"inName": "raw", "outName": "a"}):
    input = Input(name="{inName}", storageClass="StructuredDataDict", dimensions=VD)
    output = Output(name="{outName}", storageClass="StructuredDataDict", dimensions=VD)


class TrivialConfig(PipelineTaskConfig, pipelineConnections=TrivialConnections):
    pass


class TrivialTask(PipelineTask):
    ConfigClass = TrivialConfig
    _DefaultName = "trivial"

    def run(self, input):
        return Struct(output=input)
'''

LSST_TASKS = '''
import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT

VD = ("instrument", "visit", "detector")


class TrivialConnections(pipeBase.PipelineTaskConnections, dimensions=VD, defaultTemplates={"inName": "raw", "outName": "a"}):
    input = cT.Input(name="{inName}", storageClass="StructuredDataDict", dimensions=VD)
    output = cT.Output(name="{outName}", storageClass="StructuredDataDict", dimensions=VD)


class TrivialConfig(pipeBase.PipelineTaskConfig, pipelineConnections=TrivialConnections):
    pass


class TrivialTask(pipeBase.PipelineTask):
    ConfigClass = TrivialConfig
    _DefaultName = "trivial"

    def run(self, input):
        return pipeBase.Struct(output=input)
'''

PIPELINE = f"""description: three chained trivial tasks
tasks:
  a:
    class: {TASKS_MODULE}.TrivialTask
    config:
      connections.inName: raw
      connections.outName: a_out
  b:
    class: {TASKS_MODULE}.TrivialTask
    config:
      connections.inName: a_out
      connections.outName: b_out
  c:
    class: {TASKS_MODULE}.TrivialTask
    config:
      connections.inName: b_out
      connections.outName: c_out
"""

LSST_SETUP = '''
import sys, time
from lsst.daf.butler import Butler, DatasetType
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

root, n_visits, n_detectors = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
Butler.makeRepo(root)
butler = Butler.from_config(root, writeable=True)
reg = butler.registry
reg.insertDimensionData("instrument", {"name": "BenchCam", "detector_max": 1000, "visit_max": 10**7, "exposure_max": 10**7, "class_name": "none"})
reg.insertDimensionData("physical_filter", {"instrument": "BenchCam", "name": "r1", "band": "r"})
reg.insertDimensionData("day_obs", {"instrument": "BenchCam", "id": 20240101})
reg.insertDimensionData("detector", *[{"instrument": "BenchCam", "id": d, "full_name": f"D{d}"} for d in range(n_detectors)])
reg.insertDimensionData("visit", *[{"instrument": "BenchCam", "id": v, "name": f"v{v}", "physical_filter": "r1", "day_obs": 20240101} for v in range(n_visits)])

def poly(ra, dec, w, h):
    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(a, b)) for a, b in ((ra, dec), (ra + w, dec), (ra + w, dec + h), (ra, dec + h))])

reg.insertDimensionData("visit_detector_region", *[
    {"instrument": "BenchCam", "visit": v, "detector": d, "region": poly(10 + 0.01 * v + 0.1 * d, 0.0, 0.09, 0.1)}
    for v in range(n_visits) for d in range(n_detectors)
])
dt = DatasetType("raw", ("instrument", "visit", "detector"), "StructuredDataDict", universe=butler.dimensions)
reg.registerDatasetType(dt)
reg.registerRun("raw")
reg.insertDatasets(dt, [{"instrument": "BenchCam", "visit": v, "detector": d} for v in range(n_visits) for d in range(n_detectors)], run="raw")
'''


def _diapipe_repo(root: Path, n_visits: int, n_detectors: int) -> None:
    from butler.butler import Butler
    from butler.refs import DatasetRef
    from butler.regions import SkyRegion

    Butler.create(root)
    with Butler(root) as butler:
        butler.insert_dimension_records("instrument", [{"name": INSTRUMENT}])
        butler.insert_dimension_records("band", [{"name": "r"}])
        butler.insert_dimension_records("physical_filter", [{"instrument": INSTRUMENT, "name": "r1", "band": "r"}])
        butler.insert_dimension_records("detector", [{"instrument": INSTRUMENT, "id": d} for d in range(n_detectors)])
        butler.insert_dimension_records("visit", [{"instrument": INSTRUMENT, "id": v, "physical_filter": "r1"} for v in range(n_visits)])

        def box(ra: float) -> SkyRegion:
            return SkyRegion.from_radec([ra, ra + 0.09, ra + 0.09, ra], [0.0, 0.0, 0.1, 0.1])

        butler.insert_dimension_records(
            "visit_detector_region",
            [
                {"instrument": INSTRUMENT, "visit": v, "detector": d, "region": box(10 + 0.01 * v + 0.1 * d)}
                for v in range(n_visits)
                for d in range(n_detectors)
            ],
        )
        butler.register_dataset_type("raw", ["instrument", "visit", "detector"], "StructuredDataDict")
        butler.register_run("raw")
        dt = butler.registry.get_dataset_type("raw")
        # Registry rows only (as on the LSST side): the graph builder never opens the files.
        refs = [
            DatasetRef(dt, {"instrument": INSTRUMENT, "visit": v, "detector": d}, "raw", path=f"raw/{v}/{d}.json")
            for v in range(n_visits)
            for d in range(n_detectors)
        ]
        butler.registry.insert_datasets(refs)


def _time_cli(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout + proc.stderr


def _lsst_python() -> str | None:
    candidates = [os.environ.get("LSST_PYTHON"), sys.executable]
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import lsst.pipe.base, lsst.ctrl.mpexec"], capture_output=True)
        if probe.returncode == 0:
            return python
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visits", type=int, default=1000)
    parser.add_argument("--detectors", type=int, default=10)
    parser.add_argument("--lsst-10k", action="store_true", help="also time LSST at ~10k quanta (about a minute)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary repositories")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="bench-qgraph-"))
    (work / f"{TASKS_MODULE}.py").write_text(textwrap.dedent(DIAPIPE_TASKS))
    (work / "pipeline.yaml").write_text(PIPELINE)
    sys.path.insert(0, str(work))
    per_visit = 3 * args.detectors
    sizes = {"~1k": max(1, round(1000 / per_visit)), "~10k": max(1, round(10000 / per_visit))}
    if sizes["~10k"] > args.visits:
        parser.error(f"--visits must be at least {sizes['~10k']} for ~10k quanta")

    print(f"Repository: {args.visits} visits x {args.detectors} detectors; pipeline: 3 chained trivial tasks per visit-detector")
    t0 = time.perf_counter()
    repo = work / "diapipe_repo"
    _diapipe_repo(repo, args.visits, args.detectors)
    print(f"diapipe: repository setup {time.perf_counter() - t0:.1f} s (not part of the timings)")

    from butler.butler import Butler
    from pipeline.graph_builder import build_quantum_graph
    from pipeline.pipeline import Pipeline

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    pipetask = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]
    results: dict[str, dict[str, float]] = {}
    for name, n_visit in sizes.items():
        where = f"visit < {n_visit}"
        with Butler(repo) as butler:
            start = time.perf_counter()
            graph = build_quantum_graph(
                Pipeline.from_file(work / "pipeline.yaml"), butler, input_collections=["raw"], output_run=f"out/n{n_visit}", where=where
            )
            build = time.perf_counter() - start
            start = time.perf_counter()
            graph.save(work / f"g{n_visit}.qgraph")
            save = time.perf_counter() - start
        cli, _ = _time_cli([*pipetask, "qgraph", "-b", str(repo), "-p", str(work / "pipeline.yaml"), "-i", "raw", "--output-run", "out/cli", "-d", where, "--save-qgraph", str(work / "cli.qgraph")], env)
        results[name] = {"quanta": len(graph), "build": build, "cli": cli}
        print(
            f"diapipe {name:>4}: {len(graph):6d} quanta  build {build:6.3f} s ({1e3 * build / len(graph):.3f} ms/quantum)  "
            f"save {save:5.3f} s  `pipetask qgraph` {cli:6.2f} s wall"
        )

    python = _lsst_python()
    if python is None:
        print("LSST: skipped (lsst.pipe.base / lsst.ctrl.mpexec do not import here; install the bench extra or set LSST_PYTHON)")
    else:
        lsst_dir = work / "lsst"
        lsst_dir.mkdir()
        (lsst_dir / f"{TASKS_MODULE}.py").write_text(textwrap.dedent(LSST_TASKS))
        (lsst_dir / "pipeline.yaml").write_text(PIPELINE)
        lsst_repo = lsst_dir / "repo"
        lsst_env = {**os.environ, "PYTHONPATH": str(lsst_dir)}
        t0 = time.perf_counter()
        setup = subprocess.run([python, "-c", LSST_SETUP, str(lsst_repo), str(args.visits), str(args.detectors)], capture_output=True, text=True, env=lsst_env)
        if setup.returncode != 0:
            print(f"LSST: skipped (repository setup failed: {setup.stderr.strip().splitlines()[-1] if setup.stderr.strip() else setup.returncode})")
        else:
            print(f"LSST: repository setup {time.perf_counter() - t0:.1f} s (not part of the timings), {python}")
            lsst_pipetask = str(Path(python).parent / "pipetask")
            for name, n_visit in sizes.items():
                if name == "~10k" and not args.lsst_10k:
                    print("LSST    ~10k: not run (pass --lsst-10k; it takes about a minute)")
                    continue
                where = f"visit < {n_visit}"
                cmd = [lsst_pipetask, "qgraph", "-b", str(lsst_repo), "-p", str(lsst_dir / "pipeline.yaml"), "-i", "raw", "--output-run", f"out/n{n_visit}", "-d", where, "--save-qgraph", str(lsst_dir / "g.qg")]
                try:
                    wall, output = _time_cli(cmd, lsst_env)
                except RuntimeError as exc:
                    print(f"LSST    {name}: failed: {str(exc).splitlines()[-1]}")
                    continue
                ours = results[name]
                match = re.search(r"QuantumGraph contains (\d+) quanta", output)
                n_lsst = int(match.group(1)) if match else -1
                if n_lsst != ours["quanta"]:
                    print(f"LSST    {name}: WARNING: LSST built {n_lsst} quanta, diapipe {ours['quanta']}")
                print(
                    f"LSST    {name:>4}: {n_lsst:6d} quanta  `pipetask qgraph` {wall:6.2f} s wall  "
                    f"(diapipe CLI {ours['cli']:.2f} s: {wall / ours['cli']:.1f}x faster; in-process build {wall / ours['build']:.0f}x)"
                )
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    target = results["~10k"]["build"]
    print(f"target: 10k quanta built in under 5 s -> {'met' if target < 5 else 'NOT met'} ({target:.2f} s in process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
