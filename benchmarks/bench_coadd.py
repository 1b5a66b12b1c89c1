"""Benchmark: warping one 4096x4096 exposure onto a skymap patch, and ModelPsfMatchTask on it.

Prints time (wall and CPU), peak memory of the call (``tracemalloc``: numpy's allocations) and
quality (flux and centroid errors of noiseless injected stars against their true positions) for

- ``tasks.warp.warp_exposure`` with lanczos3 / bicubic / bilinear (image + variance + mask + PSF),
- ``reproject.reproject_interp`` with bicubic / bilinear (image only; the WCS on every pixel),
- ``ModelPsfMatchTask.run`` on the Lanczos3 warp (matched to a 4.5 px Gaussian).

The geometry is the ``large`` preset's: detector 4 of its first visit (TAN WCS with the visit's
dither and rotation, its GridPsf), onto a patch-sized (4000 + 2 x 100 px) box of its tract frame
centred on the detector.
Stars (noiseless, fluxes 1e4-1e5 counts) sit on a 160 px grid over a flat variance of 100.

Usage::

    python benchmarks/bench_coadd.py [--size 4096] [--repeat 1] [--skip-reproject]
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astropy.utils import iers  # noqa: E402

iers.conf.auto_download = False

from butler.exposure import Exposure  # noqa: E402
from butler.geometry import Box  # noqa: E402
from butler.psf import GaussianPsf, measure_fwhm  # noqa: E402
from tasks.model_psf_match import ModelPsfMatchTask, matched_psf_image  # noqa: E402
from tasks.simulation import get_preset, plan_survey  # noqa: E402
from tasks.warp import warp_exposure  # noqa: E402


def build_input(size: int) -> tuple[Exposure, tuple, np.ndarray, np.ndarray, np.ndarray]:
    """A size x size exposure with the large preset's WCS and PSF, noiseless stars on a grid."""
    from dataclasses import replace

    config = replace(get_preset("large"), detector_size=size)
    plan = plan_survey(config)
    visit = plan.visits[0]
    det = plan.camera.detector(4)
    wcs = plan.detector_wcs(visit, det)
    psf = visit.psf_field.grid_psf(det, config.psf_grid)
    rng = np.random.default_rng(7)
    gx, gy = np.meshgrid(np.arange(60.0, size - 60, 160.0), np.arange(60.0, size - 60, 160.0))
    xs = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    ys = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    flux = rng.uniform(1e4, 1e5, xs.size)
    image = np.zeros((size, size), np.float32)
    for x, y, f in zip(xs, ys, flux, strict=True):
        stamp, x0, y0 = psf.shifted_image(x, y)
        h, w = stamp.shape
        image[y0 : y0 + h, x0 : x0 + w] += (f * stamp).astype(np.float32)
    exposure = Exposure(image, variance=np.full((size, size), 100.0, np.float32), wcs=wcs, psf=psf, band="r")
    # A patch-sized box of the tract frame centred on the detector (a patch the detector fills;
    # the preset's real patches cut the detector in two).
    tract = plan.skymap[plan.skymap.tract_ids[0]]
    patch = tract.patches()[0]
    ra, dec = wcs.all_pix2world([(size - 1) / 2], [(size - 1) / 2], 0)
    px, py = tract.sky_to_pixel(ra, dec)
    outer = patch.outer_bbox
    best = Box(int(round(px[0])) - outer.width // 2, int(round(py[0])) - outer.height // 2, outer.width, outer.height)
    return exposure, (tract.wcs, best), xs, ys, flux


def measure(image: np.ndarray, xy0: tuple[int, int], x: np.ndarray, y: np.ndarray, radius: float = 14.0):
    """Aperture flux and first-moment centroid at each (x, y); NaN where not fully covered."""
    out = np.full((x.size, 3), np.nan)
    for k, (a, b) in enumerate(zip(x - xy0[0], y - xy0[1], strict=True)):
        r = int(radius) + 2
        ia, ib = int(a), int(b)
        if ia - r < 0 or ib - r < 0 or ia + r + 1 > image.shape[1] or ib + r + 1 > image.shape[0]:
            continue
        sub = image[ib - r : ib + r + 1, ia - r : ia + r + 1]
        yy, xx = np.mgrid[ib - r : ib + r + 1, ia - r : ia + r + 1]
        sel = (xx - a) ** 2 + (yy - b) ** 2 <= radius**2
        pix = sub[sel].astype(np.float64)
        if not np.all(np.isfinite(pix)):
            continue
        f = pix.sum()
        out[k] = (f, (pix * xx[sel]).sum() / f + xy0[0], (pix * yy[sel]).sum() / f + xy0[1])
    return out


def timed(fn, *args, **kwargs):
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, wall, cpu, peak / 1e6


def quality(image: np.ndarray, xy0, tx, ty, flux) -> tuple[float, float, float, int]:
    m = measure(image, xy0, tx, ty)
    ok = np.isfinite(m[:, 0])
    if not ok.any():
        return (math.nan, math.nan, math.nan, 0)
    ferr = np.abs(m[ok, 0] / flux[ok] - 1.0)
    perr = np.hypot(m[ok, 1] - tx[ok], m[ok, 2] - ty[ok])
    return float(np.median(ferr)), float(ferr.max()), float(perr.max()), int(ok.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="input exposure size, pixels")
    parser.add_argument("--repeat", type=int, default=1, help="repeat each timing, report the best")
    parser.add_argument("--skip-reproject", action="store_true", help="do not run reproject")
    args = parser.parse_args()

    t0 = time.perf_counter()
    exposure, (wcs_out, target), xs, ys, flux_counts = build_input(args.size)
    ra, dec = exposure.wcs.all_pix2world(xs, ys, 0)
    tx, ty = wcs_out.all_world2pix(ra, dec, 0)
    # Same pixel scale: counts per pixel are unchanged (|det J| = 1 to 1e-6).
    print(f"input {exposure.bbox.shape} -> patch-sized tract box {target} ({time.perf_counter() - t0:.1f} s setup)")
    print(f"{'method':32s} {'wall s':>7s} {'cpu s':>7s} {'peak MB':>8s} {'flux med':>9s} {'flux max':>9s} {'pos max px':>10s} {'stars':>6s}")

    def report(name, wall, cpu, peak, q):
        print(f"{name:32s} {wall:7.2f} {cpu:7.2f} {peak:8.0f} {q[0]:9.2e} {q[1]:9.2e} {q[2]:10.4f} {q[3]:6d}")

    lanczos = None
    for method in ("lanczos3", "bicubic", "bilinear"):
        best = None
        for _ in range(args.repeat):
            out, wall, cpu, peak = timed(warp_exposure, exposure, wcs_out, target, method=method)
            best = (wall, cpu, peak) if best is None or wall < best[0] else best
        report(f"warp_exposure {method}", *best, quality(out.image, out.xy0, tx, ty, flux_counts))
        if method == "lanczos3":
            lanczos = out

    if not args.skip_reproject:
        from reproject import reproject_interp

        cutout = wcs_out.deepcopy()
        cutout.wcs.crpix = [cutout.wcs.crpix[0] - target.x0, cutout.wcs.crpix[1] - target.y0]
        for order in ("bicubic", "bilinear"):
            best = None
            for _ in range(args.repeat):
                (img, _foot), wall, cpu, peak = timed(
                    reproject_interp, (exposure.image, exposure.wcs), cutout, shape_out=target.shape, order=order
                )
                best = (wall, cpu, peak) if best is None or wall < best[0] else best
            report(f"reproject_interp {order} (image)", *best, quality(img, (target.x0, target.y0), tx, ty, flux_counts))

    assert lanczos is not None
    model = GaussianPsf.from_fwhm(4.5, size=33)
    valid = (lanczos.mask & lanczos.get_plane_bitmask("NO_DATA")) == 0
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    box = Box.from_corners(lanczos.xy0[0] + int(cols[0]), lanczos.xy0[1] + int(rows[0]),
                           lanczos.xy0[0] + int(cols[-1]) + 1, lanczos.xy0[1] + int(rows[-1]) + 1)
    sub = lanczos.subexposure(box)
    task = ModelPsfMatchTask()
    result, wall, cpu, peak = timed(task.run, sub, model)
    kernel = result.psfMatchingKernel
    fwhm_err = []
    for fx in (0.1, 0.5, 0.9):
        for fy in (0.1, 0.5, 0.9):
            x = box.x0 + fx * (box.width - 1)
            y = box.y0 + fy * (box.height - 1)
            img = matched_psf_image(sub.psf, kernel, x, y)
            fwhm_err.append(abs(measure_fwhm(img / img.sum()) / 4.5 - 1.0))
    print(
        f"{'ModelPsfMatchTask (Lanczos3 warp)':32s} {wall:7.2f} {cpu:7.2f} {peak:8.0f}   "
        f"box {box.shape}, kernel {kernel.kernel_size} px, {task.metadata['nCells']} cells, "
        f"max |FWHM/model - 1| {max(fwhm_err):.2e}, kernel sum {float(kernel.kernel_sum(*box.center)):.6f}"
    )
    for name in ("buildCellSet", "solve", "convolve"):
        print(f"    {name:20s} {task.metadata[name + 'Duration']:.2f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
