"""PSF-matching kernel: time and peak memory of fitting and of applying it, on 2048^2 and 4096^2 pairs.

Each pair is simulated with :mod:`tasks.psfmatch.testing`: ~3000 stars per 4096x4096 (scaled by
area), a template with a round Gaussian PSF of FWHM 3.5 px (0.7" at 0.2"/px) and a science image
whose PSF varies across the image (FWHM 4.6-5.4 px, ~1.0"), 10% brighter, with a tilted background,
sky noise and a template four times deeper.  For each size the benchmark prints:

- ``candidates``: basis from the PSFs and kernel-candidate selection from the source catalog;
- ``fit``: per-candidate solutions, clipping and the spatial fit (kernel order 2, background order 1);
- ``apply``: :func:`convolve_exposure` (image, variance and mask), and its three parts separately;
- quality: kernel sum against the truth, the normalized residual std near stars (S/N > 20,
  within 2 FWHM) and on blank sky (beyond 4 FWHM of every star).

Peak memory is the process RSS peak above the stage's start, sampled every 2 ms by a helper thread
(psutil); the process's maximum RSS is printed at the end.  Times are wall clock.  Asserts nothing
about time.

Usage: ``python benchmarks/bench_kernel.py [--sizes 2048 4096] [--workers N] [--cell-size PX]``.
OpenBLAS threads: run with ``OPENBLAS_NUM_THREADS=1`` to see the numbers a threaded-scheduler
worker gets (DESIGN.md section 7); the script prints the setting it ran with.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from butler.geometry import Box  # noqa: E402
from butler.psf import GaussianPsf  # noqa: E402
from tasks.psfmatch import (  # noqa: E402
    PsfMatchConfig,
    convolve_exposure,
    convolve_image,
    convolve_variance,
    fit_psf_matching_kernel,
    grow_mask,
    kernel_support,
    make_candidate_list,
    psf_matching_basis,
)
from tasks.psfmatch.testing import corner_grid_psf, make_psf_matching_pair  # noqa: E402

SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
SCALE = 1.1
PLANE = (3.0, 2e-4, -1e-4)


def measure(func: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``func``; return its result, wall time (s) and peak RSS above the start (MiB)."""
    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = func()
    finally:
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return result, elapsed, (peak[0] - start) / 2**20


def residual_quality(pair: Any, matched: Any, kernel: Any) -> tuple[float, float]:
    """Std of (science - matched - background) / sigma near S/N > 20 stars and on blank sky.

    Pixels the (grown) EDGE, NO_DATA, BAD or SAT masks of the matched template cover are left out.
    """
    diff = pair.science.image - matched.image - kernel.background_image(pair.science.bbox)
    z = diff / np.sqrt(pair.science.variance + matched.variance)
    inside = (matched.mask & matched.get_plane_bitmask(["EDGE", "NO_DATA", "BAD", "SAT"])) == 0
    near = np.zeros(z.shape, bool)
    far = np.ones(z.shape, bool)
    fwhm = pair.science.psf.fwhm(*pair.science.bbox.center)
    snr = np.asarray(pair.sources["psfFlux"] / pair.sources["psfFluxErr"])
    r_near, r_far = 2 * fwhm, 4 * fwhm
    half = int(math.ceil(r_far))
    offs = np.arange(-half, half + 1)
    disc_far = offs[None, :] ** 2 + offs[:, None] ** 2 <= r_far**2
    disc_near = offs[None, :] ** 2 + offs[:, None] ** 2 <= r_near**2
    height, width = z.shape
    for x, y, s in zip(pair.star_x, pair.star_y, snr, strict=True):
        ix, iy = int(round(x)), int(round(y))
        ya, yb = max(iy - half, 0), min(iy + half + 1, height)
        xa, xb = max(ix - half, 0), min(ix + half + 1, width)
        sub = (slice(ya - iy + half, yb - iy + half), slice(xa - ix + half, xb - ix + half))
        far[ya:yb, xa:xb] &= ~disc_far[sub]
        if s > 20:
            near[ya:yb, xa:xb] |= disc_near[sub]
    return float(z[near & inside].std()), float(z[far & inside].std())


def run_size(size: int, workers: int | None, cell_size: int, seed: int) -> None:
    n_stars = int(round(3000 * (size / 4096) ** 2))
    bbox = Box(0, 0, size, size)
    science_psf = corner_grid_psf(
        tuple(f / SIGMA_TO_FWHM for f in (4.6, 4.9, 5.1, 5.4)), bbox, size=31  # type: ignore[arg-type]
    )
    t0 = time.perf_counter()
    pair = make_psf_matching_pair(
        shape=(size, size),
        n_stars=n_stars,
        template_psf=GaussianPsf(3.5 / SIGMA_TO_FWHM),
        science_psf=science_psf,
        scale=SCALE,
        background=PLANE,
        flux_range=(2.0e3, 1.0e6),
        sky_sigma=20.0,
        seed=seed,
    )
    # realistic template masks for the mask propagation: bad columns, saturated cores, a NO_DATA corner
    rng = np.random.default_rng(seed + 1)
    tmask = pair.template.mask
    for col in rng.integers(0, size, 5):
        tmask[:, col] |= pair.template.get_plane_bitmask("BAD")
    for x, y in rng.integers(0, size, (20, 2)):
        tmask[max(y - 4, 0) : y + 5, max(x - 4, 0) : x + 5] |= pair.template.get_plane_bitmask("SAT")
    tmask[: size // 20, : size // 20] |= pair.template.get_plane_bitmask("NO_DATA")
    print(f"\n== {size}x{size}: {n_stars} stars (simulated in {time.perf_counter() - t0:.1f} s)")
    cfg = PsfMatchConfig(workers=workers)

    def select() -> tuple[Any, list[Any]]:
        basis, _, _ = psf_matching_basis(pair.template, pair.science, cfg)
        return basis, make_candidate_list(pair.template, pair.science, pair.sources, basis.kernel_size, cfg)

    (basis, cands), t_sel, m_sel = measure(select)
    (kernel, diag), t_fit, m_fit = measure(
        lambda: fit_psf_matching_kernel(pair.template, pair.science, cands, cfg, basis=basis)
    )
    matched, t_app, m_app = measure(
        lambda: convolve_exposure(pair.template, kernel, cell_size=cell_size, workers=workers)
    )
    opts = {"xy0": pair.template.xy0, "cell_size": cell_size, "workers": workers}
    _, t_img, m_img = measure(lambda: convolve_image(pair.template.image, kernel, **opts))
    _, t_var, m_var = measure(lambda: convolve_variance(pair.template.variance, kernel, **opts))
    support = kernel_support(kernel, pair.template.xy0, pair.template.shape, 0.0)
    _, t_msk, m_msk = measure(lambda: grow_mask(pair.template.mask, support))

    print(f"  kernel {basis.kernel_size} px, {basis.n_basis} basis images, sigmas "
          f"{', '.join(f'{s:.2f}' for s in basis.sigmas)} px; {diag.n_parameters} spatial parameters")
    print(f"  {'stage':<28}{'time (s)':>10}{'peak (MiB)':>12}")
    print(f"  {'candidates (basis+select)':<28}{t_sel:>10.2f}{m_sel:>12.0f}   {len(cands)} candidates")
    print(f"  {'fit (solve+clip+spatial)':<28}{t_fit:>10.2f}{m_fit:>12.0f}   {diag.n_used} used, "
          f"rejected {dict(diag.rejected) or 'none'}")
    print(f"  {'apply: convolve_exposure':<28}{t_app:>10.2f}{m_app:>12.0f}   cell {cell_size} px, workers {workers}")
    print(f"  {'  image':<28}{t_img:>10.2f}{m_img:>12.0f}")
    print(f"  {'  variance':<28}{t_var:>10.2f}{m_var:>12.0f}")
    print(f"  {'  mask':<28}{t_msk:>10.2f}{m_msk:>12.0f}")
    cx, cy = pair.science.bbox.center
    ksums = [kernel.kernel_sum(x, y) for x, y in [(0, 0), (size - 1, 0), (0, size - 1), (size - 1, size - 1), (cx, cy)]]
    worst = max(abs(k / SCALE - 1.0) for k in ksums)
    near, sky = residual_quality(pair, matched, kernel)
    bg_err = abs(kernel.background(cx, cy) - pair.true_background(cx, cy))
    print(f"  kernel sum {ksums[-1]:.5f} at the centre (truth {SCALE}); worst relative error over corners+centre "
          f"{worst:.2e}; background error at the centre {bg_err:.3f} counts")
    print(f"  residual std (difference / sigma): near stars {near:.4f}, blank sky {sky:.4f}")
    print(f"  spatial condition number {diag.spatial_condition_number:.3g}, median candidate residual std "
          f"{diag.residual_std:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--workers", type=int, default=None, help="scipy.fft workers (default: scipy's)")
    parser.add_argument("--cell-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"bench_kernel: OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"cpus={os.cpu_count()}, numpy {np.__version__}")
    for size in args.sizes:
        run_size(size, args.workers, args.cell_size, args.seed)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmax RSS of the process (includes the simulated pairs): {rss:.0f} MiB")


if __name__ == "__main__":
    main()
