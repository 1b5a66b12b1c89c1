"""PNG displays of a PSF-matching kernel fit, like LSST's ip_diffim debug displays.

:func:`write_kernel_plots` writes four files for one kernel fit (``ImageDifferenceTask`` calls it
when ``doWriteDebugPlots`` is set; any other caller can pass the Struct returned by
``MakeKernelTask.run``):

- ``<prefix>_kernel_basis.png`` -- every basis image (LSST ``displayKernelBasis``);
- ``<prefix>_kernel_mosaic.png`` -- the spatial kernel realized on a grid across the image, with
  its sum at each node (``displayKernelMosaic``);
- ``<prefix>_candidates.png`` -- kernel candidates: science stamp, the convolved template
  (spatial model at the candidate) and the normalized residual, framed green when used and red
  when rejected (with the reason) (``displayCandidates``);
- ``<prefix>_spatial_model.png`` -- the spatial model of the leading kernel coefficients, the
  kernel sum and the background across the image, with the candidates' own solutions as
  coloured points (``plotKernelSpatialModel``).

matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from butler.geometry import Box
from tasks.psfmatch import KernelCandidate, SpatialKernel

from .decorrelate import convolve_kernels

__all__ = [
    "write_kernel_plots",
    "plot_kernel_basis",
    "plot_kernel_mosaic",
    "plot_candidates",
    "plot_spatial_model",
    "candidate_residual",
]

_log = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    return rows, cols


def plot_kernel_basis(basis_images: np.ndarray, path: Path, title: str = "Kernel basis") -> Path:
    """Grid of the ``(n, k, k)`` basis images."""
    plt = _pyplot()
    n = basis_images.shape[0]
    rows, cols = _grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        img = basis_images[i]
        lim = float(np.abs(img).max()) or 1.0
        ax.imshow(img, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{i}: sum {img.sum():.2g}", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kernel_mosaic(kernel: SpatialKernel, bbox: Box, path: Path, grid: int = 5) -> Path:
    """The kernel realized at ``grid x grid`` positions across ``bbox`` (lower left at lower left)."""
    plt = _pyplot()
    xs = np.linspace(bbox.x0, bbox.x1 - 1, grid)
    ys = np.linspace(bbox.y0, bbox.y1 - 1, grid)
    images = [[kernel.kernel_image(x, y) for x in xs] for y in ys]
    lim = max(float(np.abs(img).max()) for row in images for img in row) or 1.0
    fig, axes = plt.subplots(grid, grid, figsize=(1.7 * grid, 1.7 * grid), squeeze=False)
    for j in range(grid):
        for i in range(grid):
            ax = axes[grid - 1 - j, i]
            img = images[j][i]
            ax.imshow(img, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"({xs[i]:.0f},{ys[j]:.0f}) sum {img.sum():.4f}", fontsize=5)
    fig.suptitle(f"Spatial kernel ({kernel.kernel_size} px, order {kernel.kernel_order})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def candidate_residual(candidate: KernelCandidate, kernel: SpatialKernel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Science stamp, model (template stamp convolved with the spatial kernel at the candidate, plus
    the background) and normalized residual, on the fitted region of the stamp."""
    k = kernel.kernel_size
    h = k // 2
    full = convolve_kernels(candidate.template, kernel.kernel_image(candidate.x, candidate.y))
    n = candidate.stamp_size
    model = full[2 * h : n, 2 * h : n]
    sci = candidate.science[h : n - h, h : n - h]
    x0, y0 = candidate.xy0
    gy, gx = np.mgrid[y0 + h : y0 + n - h, x0 + h : x0 + n - h]
    model = model + np.asarray(kernel.background(gx.astype(float), gy.astype(float)))
    var = candidate.science_variance[h : n - h, h : n - h]
    tvar = convolve_kernels(candidate.template_variance, kernel.kernel_image(candidate.x, candidate.y) ** 2)
    var = var + tvar[2 * h : n, 2 * h : n]
    with np.errstate(invalid="ignore", divide="ignore"):
        resid = (sci - model) / np.sqrt(np.where(var > 0, var, np.nan))
    return sci, model, resid


def plot_candidates(
    candidates: Sequence[KernelCandidate], kernel: SpatialKernel, path: Path, max_candidates: int = 36
) -> Path:
    """Science, model and normalized residual of up to ``max_candidates`` candidates.

    Used candidates are framed green, rejected ones red (titled with the reason); the brightest of
    each kind are shown, used ones first.
    """
    plt = _pyplot()
    solved = [c for c in candidates if c.solution is not None or c.status == "rejected"]
    good = sorted([c for c in solved if c.status == "good"], key=lambda c: -(c.snr if math.isfinite(c.snr) else 0))
    bad = sorted([c for c in solved if c.status != "good"], key=lambda c: -(c.snr if math.isfinite(c.snr) else 0))
    n_bad = min(len(bad), max_candidates // 3)
    chosen = good[: max_candidates - n_bad] + bad[:n_bad]
    n = max(len(chosen), 1)
    rows, cols = _grid(n)
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(1.3 * 3 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for idx, cand in enumerate(chosen):
        r, c = divmod(idx, cols)
        sci, model, resid = candidate_residual(cand, kernel)
        lim = float(np.nanpercentile(np.abs(sci), 99.5)) or 1.0
        colour = "green" if cand.status == "good" else "red"
        panels = ((sci, -lim, lim, "gray"), (model, -lim, lim, "gray"), (resid, -5, 5, "RdBu_r"))
        for p, (img, lo, hi, cmap) in enumerate(panels):
            ax = axes[r, 3 * c + p]
            ax.axis("on")
            ax.imshow(img, origin="lower", cmap=cmap, vmin=lo, vmax=hi)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2)
        std = float(np.nanstd(resid))
        label = f"({cand.x:.0f},{cand.y:.0f}) S/N {cand.snr:.0f} res {std:.2f}"
        if cand.status != "good":
            label += f"\n{cand.reason[:28]}"
        axes[r, 3 * c].set_title(label, fontsize=5, color=colour, loc="left")
    fig.suptitle("Kernel candidates: science | model | residual/sigma (green used, red rejected)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spatial_model(
    candidates: Sequence[KernelCandidate], kernel: SpatialKernel, bbox: Box, path: Path, n_coefficients: int = 6
) -> Path:
    """Maps of the leading basis coefficients, the kernel sum and the background over ``bbox``.

    The candidates' own per-candidate solutions are overplotted as points coloured on the same
    scale (used: circles, rejected: crosses).
    """
    plt = _pyplot()
    n_grid = 48
    xs = np.linspace(bbox.x0, bbox.x1 - 1, n_grid)
    ys = np.linspace(bbox.y0, bbox.y1 - 1, n_grid)
    gx, gy = np.meshgrid(xs, ys)
    coeffs = kernel.coefficients(gx, gy)  # (ny, nx, n_basis)
    ksum = np.asarray(kernel.kernel_sum(gx, gy))
    bg = np.asarray(kernel.background(gx, gy))
    n_coef = min(n_coefficients, kernel.n_basis)
    solved = [c for c in candidates if c.solution is not None]
    cand_coeffs = np.array([c.solution.kernel_coefficients for c in solved]) if solved else None  # type: ignore[union-attr]
    cand_ksum = np.array([c.solution.kernel_sum for c in solved]) if solved else None  # type: ignore[union-attr]
    cand_xy = np.array([(c.x, c.y, c.status == "good") for c in solved])
    panels: list[tuple[str, np.ndarray, np.ndarray | None]] = [("kernel sum", ksum, cand_ksum), ("background", bg, None)]
    for i in range(1, n_coef):
        panels.append((f"coefficient {i}", coeffs[..., i], None if cand_coeffs is None else cand_coeffs[:, i]))
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    extent = (bbox.x0 - 0.5, bbox.x1 - 0.5, bbox.y0 - 0.5, bbox.y1 - 0.5)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (name, field, points) in zip(axes.ravel(), panels, strict=False):
        lo, hi = float(np.min(field)), float(np.max(field))
        if points is not None and points.size:
            lo = min(lo, float(np.percentile(points, 5)))
            hi = max(hi, float(np.percentile(points, 95)))
        span = max(1e-3 * max(abs(lo), abs(hi)), 1e-12)
        if hi - lo < span:  # a constant field (the kernel sum): centre a small range on it
            mid = 0.5 * (lo + hi)
            lo, hi = mid - span, mid + span
        im = ax.imshow(field, origin="lower", extent=extent, cmap="viridis", vmin=lo, vmax=hi)
        if points is not None and cand_xy.size:
            used = cand_xy[:, 2].astype(bool)
            ax.scatter(cand_xy[used, 0], cand_xy[used, 1], c=points[used], cmap="viridis", vmin=lo, vmax=hi,
                       s=10, edgecolors="white", linewidths=0.3)
            ax.scatter(cand_xy[~used, 0], cand_xy[~used, 1], c="red", marker="x", s=8, linewidths=0.5)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(f"Spatial model (kernel order {kernel.kernel_order}, background order {kernel.background_order})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_kernel_plots(kernel_result: Any, bbox: Box, folder: str | Path, prefix: str) -> list[Path]:
    """Write the four displays of a kernel fit.

    Parameters
    ----------
    kernel_result : Struct
        ``MakeKernelTask.run``'s result (``psfMatchingKernel``, ``candidates``).
    bbox : Box
        The science image's box.
    folder : path
        Created when missing.
    prefix : str
        File name prefix (e.g. ``"<visit>_<detector>"``).

    Returns
    -------
    list of Path
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    kernel: SpatialKernel = kernel_result.psfMatchingKernel
    candidates = list(kernel_result.candidates)
    paths = [
        plot_kernel_basis(kernel.basis, out / f"{prefix}_kernel_basis.png"),
        plot_kernel_mosaic(kernel, bbox, out / f"{prefix}_kernel_mosaic.png"),
        plot_candidates(candidates, kernel, out / f"{prefix}_candidates.png"),
        plot_spatial_model(candidates, kernel, bbox, out / f"{prefix}_spatial_model.png"),
    ]
    _log.debug("wrote %s", ", ".join(str(p) for p in paths))
    return paths
