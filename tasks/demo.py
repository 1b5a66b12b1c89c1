"""``make demo``: simulate a survey, run the whole DIA pipeline on it, and check it against truth.

1. ``python -m tasks.simulation``'s survey (preset ``small`` by default) into a new repository;
2. ``pipelines/DIA.yaml`` (coadds, templates, subtraction, DIA sources, association, forced
   photometry) with the threaded Dask scheduler and a progress display;
3. :func:`tasks.validation.build_report`: numbers against truth and an HTML page with figures.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from pipeline.cli import main as pipetask_main
from tasks.simulation import get_preset, write_repository
from tasks.validation import build_report

__all__ = ["PIPELINE", "run_demo", "main"]

_log = logging.getLogger("tasks.demo")

#: The pipeline the demo runs (the project's ``pipelines/`` folder).
PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "DIA.yaml"


def _clear(repo: Path) -> None:
    """Remove a previous demo repository; refuse to delete a folder that is not a repository."""
    if not repo.exists():
        return
    if not (repo / "butler.yaml").exists():
        raise FileExistsError(f"{repo} exists and is not a butler repository; choose another --repo")
    shutil.rmtree(repo)


def run_demo(repo: Path, *, preset: str = "small", jobs: int = 2, output: str = "u/demo") -> int:
    """Simulate, run ``pipelines/DIA.yaml``, write the validation report; returns an exit status.

    Parameters
    ----------
    repo : Path
        Repository folder (re-created).
    preset : str
        Simulation preset (``tiny``, ``small``, ``large``).
    jobs : int
        Worker threads of the pipeline run.
    output : str
        Output collection of the run.

    Returns
    -------
    int
        The pipeline run's exit status (0 when every quantum succeeded).
    """
    t0 = time.perf_counter()
    _clear(repo)
    summary = write_repository(repo, get_preset(preset))
    t_sim = time.perf_counter() - t0
    sys.stdout.write(
        f"simulated survey '{preset}': {len(summary['visits'])} visits x {len(summary['detectors'])} detectors "
        f"in {t_sim:.1f} s\n"
    )
    t1 = time.perf_counter()
    status = pipetask_main(
        ["run", "-b", str(repo), "-p", str(PIPELINE), "-i", "SimCam/defaults", "-o", output, "-j", str(jobs)]
    )
    t_run = time.perf_counter() - t1
    if status != 0:
        sys.stdout.write(f"the pipeline run ended with status {status}; see `pipetask report -b {repo} {output}`\n")
        return status
    t2 = time.perf_counter()
    report = build_report(repo, output, repo / "report")
    t_report = time.perf_counter() - t2
    width = max(len(c["name"]) for c in report.checks) if report.checks else 10
    sys.stdout.write("\nagainst the simulated truth:\n")
    for check in report.checks:
        value = "n/a" if check["value"] is None else f"{check['value']:.4f}"
        sys.stdout.write(f"  {check['name']:<{width}}  {value:>8}  target {check['target']:<14} {'pass' if check['passed'] else 'MISS'}\n")
    for section, values in report.numbers.items():
        sys.stdout.write(f"  {section}: " + ", ".join(f"{k} {v}" for k, v in values.items()) + "\n")
    for note in report.notes:
        sys.stdout.write(f"  not shown: {note}\n")
    sys.stdout.write(
        f"\nsimulation {t_sim:.0f} s, pipeline {t_run:.0f} s, report {t_report:.0f} s; total {time.perf_counter() - t0:.0f} s\n"
        f"report: {report.html_path}\n"
        f"explore: butler query-datasets {repo} goodSeeingDiff_diaSrc --collections {output}\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m tasks.demo``)."""
    parser = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default="demo_repo", help="Repository folder to (re)create (default demo_repo).")
    parser.add_argument("--preset", default="small", help="Simulation preset: tiny, small or large (default small).")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="Worker threads (default 2).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_demo(Path(args.repo), preset=args.preset, jobs=max(1, args.jobs))
    except (FileExistsError, LookupError, ValueError) as exc:
        sys.stderr.write(f"demo: error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
