"""Survey simulator: time and memory of each preset, and of one 4096x4096 visit-detector by step.

Prints, for one ``large``-preset 4096x4096 visit-detector (the last science visit, warm process):
the number of sources drawn and their kinds, seconds per step (render = stars/galaxies/transients
convolved with the PSF; noise = sky, Poisson/read noise, saturation, cosmic rays, bad columns,
repair; truth = truth tables; measure = ``src`` detection and measurement), and the rendering
rate.  Then, for each preset asked for, the wall time of ``python -m tasks.simulation`` into a
fresh repository (in a subprocess, so imports and peak RSS are included), its steps, and the
repository's size on disk.

Usage: ``python benchmarks/bench_simulation.py [--presets tiny,small] [--jobs 1]``;
``--presets tiny,small,large`` adds the whole large preset (about two minutes).  Prints; asserts
nothing.
"""

from __future__ import annotations

import argparse
import collections
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def one_large_visit_detector() -> None:
    from tasks.simulation import get_preset, plan_survey, simulate_visit_detector

    t0 = time.perf_counter()
    plan = plan_survey(get_preset("large"))
    t_plan = time.perf_counter() - t0
    visit = plan.visits[-1]
    simulate_visit_detector(plan, plan.visits[0].id, 4)  # warm-up: imports, caches
    sim = simulate_visit_detector(plan, visit.id, 4)
    kinds = collections.Counter(str(k) for k in sim.truth_sources["sourceType"])
    active = int(sim.truth_transients["isActive"][sim.truth_transients["sourceType"] == "transient"].sum())
    print(f'large preset, visit {visit.id} detector 4 (4096x4096, seeing {visit.seeing_arcsec:.2f}"):')
    print(f"  plan (visits, truth sky of {len(plan.sky)} sources, skymap): {t_plan:.3f} s")
    print(f"  on the detector: {dict(kinds)}; active transients {active}; src rows {len(sim.src)}")
    for step, seconds in sim.timings.items():
        print(f"  {step:8s} {seconds:6.2f} s")
    n_drawn = sum(kinds.values())
    print(f"  rendering rate: {n_drawn / sim.timings['render']:.0f} sources/s (PSF-convolved, sub-pixel)")
    print(f"  peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def run_preset(preset: str, jobs: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_sim_{preset}_"))
    repo = tmp / "repo"
    cmd = [sys.executable, "-m", "tasks.simulation", "--repo", str(repo), "--preset", preset, "--jobs", str(jobs)]
    t0 = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd] if Path("/usr/bin/time").exists() else cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        print(f"{preset}: FAILED\n{done.stderr}")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    size = sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())
    rss = re.search(r"MAXRSS_KB=(\d+)", done.stderr)
    print(
        f"{preset:6s} jobs={jobs}: {wall:6.1f} s wall (incl. ~2 s of imports), "
        f"repo {size / 2**20:7.1f} MiB, peak RSS {int(rss.group(1)) / 1024 if rss else float('nan'):.0f} MiB"
    )
    print(f"        {done.stdout.strip()}")
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="Comma-separated presets to run end to end.")
    parser.add_argument("--jobs", type=int, default=1, help="Worker processes for the preset runs.")
    parser.add_argument("--skip-visit", action="store_true", help="Skip the single 4096x4096 visit-detector timing.")
    args = parser.parse_args()
    if not args.skip_visit:
        one_large_visit_detector()
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        run_preset(preset, args.jobs)


if __name__ == "__main__":
    main()
