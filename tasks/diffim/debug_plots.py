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

The stamp displays (basis, mosaic, candidates) are drawn as one composite RGB image per figure
(stamps coloured with their colour maps and tiled with numpy, then a single ``imshow``) rather than
one matplotlib axes per stamp: a figure of 36 candidates x 3 stamps then takes a fraction of a
second instead of several seconds.  matplotlib is imported lazily with the Agg backend (no display
needed).
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
    "GOOD_FRAME",
    "REJECTED_FRAME",
]

_log = logging.getLogger(__name__)

#: RGB frame colour of a used kernel candidate (green).
GOOD_FRAME = (0.0, 0.62, 0.0)
#: RGB frame colour of a rejected kernel candidate (red).
REJECTED_FRAME = (0.86, 0.0, 0.0)

_BACKGROUND = (1.0, 1.0, 1.0)
_NAN_COLOUR = (0.6, 0.6, 0.6)
_DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    return rows, cols


def _colorize(image: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """``(h, w, 3)`` RGB of ``image`` through a colour map (non-finite pixels grey)."""
    from matplotlib import colormaps

    span = vmax - vmin if vmax > vmin else 1.0
    scaled = np.clip((np.asarray(image, dtype=np.float64) - vmin) / span, 0.0, 1.0)
    rgb = colormaps[cmap](np.nan_to_num(scaled, nan=0.5))[..., :3]
    rgb[~np.isfinite(image)] = _NAN_COLOUR
    return rgb


def _framed(rgb: np.ndarray, colour: tuple[float, float, float] | None, width: int) -> np.ndarray:
    """``rgb`` with a border of ``width`` pixels (background colour when ``colour`` is None)."""
    h, w, _ = rgb.shape
    out = np.empty((h + 2 * width, w + 2 * width, 3))
    out[...] = colour if colour is not None else _BACKGROUND
    out[width : width + h, width : width + w] = rgb
    return out


def _tile(
    tiles: Sequence[np.ndarray], cols: int, gap: int, label_height: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tile equally sized RGB images row by row (first row at the top).

    Each tile gets ``label_height`` empty pixels above it for a caption.  Returns the composite
    and the ``(x, y)`` pixel (top left, ``y`` down) of each tile's caption.
    """
    th, tw, _ = tiles[0].shape
    rows = max(1, math.ceil(len(tiles) / cols))
    cell_h, cell_w = th + label_height + gap, tw + gap
    out = np.empty((rows * cell_h + gap, cols * cell_w + gap, 3))
    out[...] = _BACKGROUND
    anchors = []
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = gap + r * cell_h, gap + c * cell_w
        out[y + label_height : y + label_height + th, x : x + tw] = tile
        anchors.append((x, y))
    return out, anchors


def _save_composite(
    composite: np.ndarray,
    captions: Sequence[tuple[int, int, str, Any]],
    path: Path,
    title: str,
    pixel_scale: float,
    fontsize: float,
) -> Path:
    """Draw a composite RGB image with captions (``(x, y, text, colour)``, pixels) and save it."""
    plt = _pyplot()
    h, w, _ = composite.shape
    title_in = 0.3
    image_in = h * pixel_scale / _DPI
    height = image_in + title_in
    fig = plt.figure(figsize=(w * pixel_scale / _DPI, height), dpi=_DPI)
    ax = fig.add_axes((0.0, 0.0, 1.0, image_in / height))
    ax.imshow(composite, interpolation="nearest", origin="upper")
    ax.set_axis_off()
    for x, y, text, colour in captions:
        ax.text(x, y, text, fontsize=fontsize, color=colour, va="top", ha="left")
    fig.suptitle(title, fontsize=9, y=1.0 - 0.05 / height, va="top")
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_kernel_basis(basis_images: np.ndarray, path: Path, title: str = "Kernel basis") -> Path:
    """Grid of the ``(n, k, k)`` basis images, each on its own symmetric colour scale.

    Parameters
    ----------
    basis_images : numpy.ndarray
        ``(n, k, k)`` basis images.
    path : Path
        Output PNG.
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    images = np.asarray(basis_images, dtype=np.float64)
    label = 9
    tiles = []
    for img in images:
        lim = float(np.abs(img).max()) or 1.0
        tiles.append(_framed(_colorize(img[::-1], "RdBu_r", -lim, lim), (0.3, 0.3, 0.3), 1))
    _, cols = _grid(len(tiles))
    composite, anchors = _tile(tiles, cols, gap=4, label_height=label)
    captions = [
        (x, y, f"{i}: sum {img.sum():.2g}", "black") for i, ((x, y), img) in enumerate(zip(anchors, images, strict=True))
    ]
    return _save_composite(composite, captions, path, title, pixel_scale=4.0, fontsize=6.5)


def plot_kernel_mosaic(kernel: SpatialKernel, bbox: Box, path: Path, grid: int = 5) -> Path:
    """The kernel realized at ``grid x grid`` positions across ``bbox`` (lower left at lower left).

    All stamps share one symmetric colour scale; each is captioned with its position and sum.

    Parameters
    ----------
    kernel : SpatialKernel
    bbox : Box
        The image box the positions span (first to last pixel centre).
    path : Path
        Output PNG.
    grid : int
        Positions per axis.

    Returns
    -------
    Path
        ``path``.
    """
    xs = np.linspace(bbox.x0, bbox.x1 - 1, grid)
    ys = np.linspace(bbox.y0, bbox.y1 - 1, grid)
    gx, gy = np.meshgrid(xs, ys)
    images = kernel.kernel_images(gx.ravel(), gy.ravel()).reshape(grid, grid, kernel.kernel_size, kernel.kernel_size)
    lim = float(np.abs(images).max()) or 1.0
    tiles, texts = [], []
    for j in range(grid - 1, -1, -1):  # top row of the figure: the largest y
        for i in range(grid):
            img = images[j, i]
            tiles.append(_framed(_colorize(img[::-1], "RdBu_r", -lim, lim), (0.3, 0.3, 0.3), 1))
            texts.append(f"({xs[i]:.0f},{ys[j]:.0f}) {img.sum():.4f}")
    composite, anchors = _tile(tiles, grid, gap=4, label_height=9)
    captions = [(x, y, text, "black") for (x, y), text in zip(anchors, texts, strict=True)]
    title = f"Spatial kernel ({kernel.kernel_size} px, order {kernel.kernel_order}): position and sum"
    return _save_composite(composite, captions, path, title, pixel_scale=4.0, fontsize=6.5)


def candidate_residual(
    candidate: KernelCandidate, kernel: SpatialKernel
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Science stamp, model and normalized residual of a kernel candidate, on the fitted region.

    The model is the template stamp convolved with the spatial kernel realized at the candidate,
    plus the background; the residual is ``(science - model) / sqrt(V_science + V_template (x) K^2)``.

    Parameters
    ----------
    candidate : KernelCandidate
    kernel : SpatialKernel

    Returns
    -------
    science, model, residual : numpy.ndarray
        Stamps of the fitted region (the candidate stamp less the kernel half-size on each side).
    """
    k = kernel.kernel_size
    h = k // 2
    kern = kernel.kernel_image(candidate.x, candidate.y)
    full = convolve_kernels(candidate.template, kern)
    n = candidate.stamp_size
    model = full[2 * h : n, 2 * h : n]
    sci = candidate.science[h : n - h, h : n - h]
    x0, y0 = candidate.xy0
    gy, gx = np.mgrid[y0 + h : y0 + n - h, x0 + h : x0 + n - h]
    model = model + np.asarray(kernel.background(gx.astype(float), gy.astype(float)))
    var = candidate.science_variance[h : n - h, h : n - h]
    tvar = convolve_kernels(candidate.template_variance, kern**2)
    var = var + tvar[2 * h : n, 2 * h : n]
    with np.errstate(invalid="ignore", divide="ignore"):
        resid = (sci - model) / np.sqrt(np.where(var > 0, var, np.nan))
    return sci, model, resid


def plot_candidates(
    candidates: Sequence[KernelCandidate], kernel: SpatialKernel, path: Path, max_candidates: int = 36
) -> Path:
    """Science, model and normalized residual of up to ``max_candidates`` candidates.

    Used candidates are framed green (:data:`GOOD_FRAME`), rejected ones red
    (:data:`REJECTED_FRAME`, captioned with the reason); the brightest of each kind are shown,
    used ones first, with up to a third of the places for rejected ones.  Science and model share
    a grey scale (99.5th percentile of ``|science|``), the residual runs from -5 to 5 sigma.

    Parameters
    ----------
    candidates : sequence of KernelCandidate
        The candidates with their final status (``MakeKernelTask.run(...).candidates``).
    kernel : SpatialKernel
    path : Path
        Output PNG.
    max_candidates : int

    Returns
    -------
    Path
        ``path``.
    """
    solved = [c for c in candidates if c.solution is not None or c.status == "rejected"]

    def brightness(c: KernelCandidate) -> float:
        return -(c.snr if math.isfinite(c.snr) else 0.0)

    good = sorted([c for c in solved if c.status == "good"], key=brightness)
    bad = sorted([c for c in solved if c.status != "good"], key=brightness)
    n_bad = min(len(bad), max_candidates // 3)
    chosen = good[: max_candidates - n_bad] + bad[:n_bad]
    tiles, texts = [], []
    for cand in chosen:
        sci, model, resid = candidate_residual(cand, kernel)
        lim = float(np.nanpercentile(np.abs(sci), 99.5)) or 1.0
        gap = np.ones((sci.shape[0], 1, 3))
        strip = np.hstack([
            _colorize(sci[::-1], "gray", -lim, lim), gap,
            _colorize(model[::-1], "gray", -lim, lim), gap,
            _colorize(resid[::-1], "RdBu_r", -5.0, 5.0),
        ])
        used = cand.status == "good"
        tiles.append(_framed(strip, GOOD_FRAME if used else REJECTED_FRAME, 2))
        text = f"({cand.x:.0f},{cand.y:.0f}) S/N {cand.snr:.0f} res {float(np.nanstd(resid)):.2f}"
        if not used:
            text += f" {cand.reason[:30]}"
        texts.append((text, GOOD_FRAME if used else REJECTED_FRAME))
    if not tiles:
        tiles = [np.ones((8, 24, 3))]
        texts = [("no solved candidates", "black")]
    shapes = {t.shape for t in tiles}
    if len(shapes) > 1:
        th = max(s[0] for s in shapes)
        tw = max(s[1] for s in shapes)
        padded = []
        for t in tiles:
            canvas = np.empty((th, tw, 3))
            canvas[...] = _BACKGROUND
            canvas[: t.shape[0], : t.shape[1]] = t
            padded.append(canvas)
        tiles = padded
    _, cols = _grid(len(tiles))
    composite, anchors = _tile(tiles, cols, gap=4, label_height=9)
    captions = [(x, y, text, colour) for (x, y), (text, colour) in zip(anchors, texts, strict=True)]
    title = "Kernel candidates: science | model | residual/sigma (green used, red rejected)"
    return _save_composite(composite, captions, path, title, pixel_scale=3.0, fontsize=6)


def plot_spatial_model(
    candidates: Sequence[KernelCandidate], kernel: SpatialKernel, bbox: Box, path: Path, n_coefficients: int = 6
) -> Path:
    """Maps of the leading basis coefficients, the kernel sum and the background over ``bbox``.

    The candidates' own per-candidate solutions are overplotted as points coloured on the same
    scale (used: circles, rejected: red crosses).

    Parameters
    ----------
    candidates : sequence of KernelCandidate
    kernel : SpatialKernel
    bbox : Box
        The image box of the maps.
    path : Path
        Output PNG.
    n_coefficients : int
        Basis coefficients mapped (the first, constant one included in the count).

    Returns
    -------
    Path
        ``path``.
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
    cand_xy = np.array([(c.x, c.y, c.status == "good") for c in solved]).reshape(-1, 3)
    panels: list[tuple[str, np.ndarray, np.ndarray | None]] = [("kernel sum", ksum, cand_ksum), ("background", bg, None)]
    for i in range(1, n_coef):
        panels.append((f"coefficient {i}", coeffs[..., i], None if cand_coeffs is None else cand_coeffs[:, i]))
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False, dpi=_DPI)
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.06, top=0.88, wspace=0.45, hspace=0.35)
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
    fig.suptitle(
        f"Spatial model (kernel order {kernel.kernel_order}, background order {kernel.background_order})", fontsize=9
    )
    fig.savefig(path, dpi=_DPI)
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
        The basis, mosaic, candidates and spatial-model PNGs, in that order.
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
