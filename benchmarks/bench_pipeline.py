"""End-to-end benchmark: the whole ``pipelines/DIA.yaml`` on a simulated survey, per visit-detector.

Simulates a preset (``large`` by default: 8 visits x 2 detectors of 4096x4096 px) once, then
runs the full pipeline (coadds, templates, subtraction, DIA sources, association, forced
photometry) with ``pipetask run`` in a child process for each scheduler asked for -- the
threaded scheduler with 2 workers and a 2-worker local dask.distributed cluster by default --
and prints:

- wall time of the run, and wall time per visit-detector (the run's wall time divided by the
  number of science visit-detectors);
- peak resident memory of the whole process tree (driver plus workers, sampled every 0.2 s);
- per task: quanta, median and max seconds per quantum and the largest per-quantum peak RSS the
  executor recorded in ``{label}_metadata``;
- the validation numbers against truth (``tasks.validation``), so that speed is never read
  without quality.

Numbers only; nothing is asserted.  Usage::

    python benchmarks/bench_pipeline.py [--preset large] [--schedulers threads,distributed] [--repo DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from butler.butler import Butler  # noqa: E402
from tasks.simulation import get_preset, write_repository  # noqa: E402
from tasks.validation.metrics import forced_coadd_accuracy, transient_recovery  # noqa: E402

PIPELINE = ROOT / "pipelines" / "DIA.yaml"
PIPETASK = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


class TreeMemory:
    """Peak summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_pipeline(repo: Path, output: str, scheduler: str, workers: int) -> tuple[float, int, int]:
    """One ``pipetask run`` of the whole pipeline; returns wall seconds, peak tree RSS and the exit status."""
    args = [*PIPETASK, "run", "-b", str(repo), "-p", str(PIPELINE), "-i", "SimCam/defaults", "-o", output, "--no-progress"]
    if scheduler == "threads":
        args += ["-j", str(workers)]
    else:
        args += ["--local-cluster", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(proc.pid) as memory:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(out[-3000:])
    return wall, memory.peak, proc.returncode


def task_table(repo: Path, output: str) -> list[tuple[str, int, float, float, float]]:
    """Per task: quanta, median and max seconds, max per-quantum RSS (MB), from the metadata datasets."""
    butler = Butler(repo, collections=[output])
    rows = []
    for dataset_type in sorted(dt.name for dt in butler.query_dataset_types("*_metadata")):
        label = dataset_type[: -len("_metadata")]
        seconds, rss = [], []
        for ref in butler.query_datasets(dataset_type):
            quantum = butler.get(ref).get("quantum", {})
            if quantum.get("status") != "succeeded":
                continue
            seconds.append(float(quantum.get("seconds", float("nan"))))
            rss.append(float(quantum.get("max_rss_bytes", 0)) / 2**20)
        if seconds:
            rows.append((label, len(seconds), statistics.median(seconds), max(seconds), max(rss)))
    return rows


def quality(repo: Path, output: str) -> dict[str, float]:
    """Validation numbers of one run."""
    butler = Butler(repo, collections=[output])
    recovery = transient_recovery(butler)
    numbers = {
        "completeness S/N>=10": recovery.completeness(10.0)[0],
        "completeness S/N 5-10": recovery.completeness(5.0, 10.0)[0],
        "unmatched DIA sources / visit-detector": recovery.false_positives / max(len(recovery.data_ids), 1),
        "transient flux ratio (median)": recovery.flux_ratio_median(10.0),
    }
    try:
        forced = forced_coadd_accuracy(butler)
        numbers["forced coadd bias S/N>20"] = forced.bias(20.0)
        numbers["forced coadd pull std"] = forced.pull_std()
    except LookupError:
        pass
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="large", help="Simulation preset (default large).")
    parser.add_argument("--schedulers", default="threads,distributed", help="Comma-separated: threads, distributed.")
    parser.add_argument("--workers", type=int, default=2, help="Workers per run (default 2).")
    parser.add_argument("--repo", help="Repository folder (default: a temporary one); reused when it exists.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary repository.")
    args = parser.parse_args()
    tmp = None
    if args.repo:
        repo = Path(args.repo)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
        repo = tmp / "repo"
    try:
        if not (repo / "butler.yaml").exists():
            t0 = time.perf_counter()
            summary = write_repository(repo, get_preset(args.preset))
            print(f"simulated {args.preset}: {len(summary['visits'])} visits x {len(summary['detectors'])} detectors in {time.perf_counter() - t0:.1f} s")
        butler = Butler(repo, collections=["SimCam/defaults"])
        n_visit_detectors = len(list(butler.query_datasets("calexp")))
        results = []
        for scheduler in [s.strip() for s in args.schedulers.split(",") if s.strip()]:
            output = f"u/bench/{scheduler}{time.strftime('%Y%m%dT%H%M%S')}"
            wall, peak, status = run_pipeline(repo, output, scheduler, args.workers)
            results.append((scheduler, wall, peak, status, output))
            print(f"\n{scheduler} ({args.workers} workers): exit {status}, {wall:.1f} s wall, "
                  f"{wall / n_visit_detectors:.1f} s per visit-detector ({n_visit_detectors}), peak tree RSS {peak / 2**30:.2f} GiB")
            if status:
                continue
            print(f"  {'task':<22}{'quanta':>7}{'median s':>10}{'max s':>9}{'max RSS MB':>12}")
            for label, n, med, mx, rss in task_table(repo, output):
                print(f"  {label:<22}{n:>7}{med:>10.2f}{mx:>9.2f}{rss:>12.0f}")
            for name, value in quality(repo, output).items():
                print(f"  {name:<40} {value:.4f}")
        print(f"\n{'scheduler':<12}{'wall s':>8}{'s / visit-detector':>20}{'peak GiB':>10}")
        for scheduler, wall, peak, status, _ in results:
            print(f"{scheduler:<12}{wall:>8.1f}{wall / n_visit_detectors:>20.1f}{peak / 2**30:>10.2f}" + ("" if status == 0 else f"  (exit {status})"))
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
