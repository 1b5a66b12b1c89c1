"""Kernel candidates: stamps around bright isolated stars, or around realized PSF models.

:func:`make_candidate_list` (LSST's ``selectKernelSources`` + ``makeCandidateList``) picks stars
from a source catalog (the conventions of :mod:`butler.catalog`) and cuts template and science
stamps around them; :func:`model_psf_matching_candidates` realizes two PSF *models* on a grid of
cells instead (ModelPsfMatchTask).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from butler.exposure import Exposure
from butler.geometry import Box
from butler.psf import Psf

from .config import PsfMatchConfig
from .errors import NoKernelCandidatesError, PsfMatchConfigError, format_rejections
from .solve import KernelCandidate

__all__ = ["make_candidate_list", "model_psf_matching_candidates", "candidate_stamp_size", "max_model_kernel_size"]

_log = logging.getLogger(__name__)


def candidate_stamp_size(kernel_size: int, config: PsfMatchConfig | None = None) -> int:
    """Stamp size in pixels for a kernel size: ``config.stamp_size`` or ``2 * kernel_size + 1``."""
    cfg = config or PsfMatchConfig()
    size = cfg.stamp_size if cfg.stamp_size is not None else 2 * int(kernel_size) + 1
    if size < kernel_size + 2:
        raise PsfMatchConfigError(
            f"stamp_size {size} px leaves no fitted pixels around a {kernel_size} px kernel; use >= {kernel_size + 2}"
        )
    return int(size)


def _signal_to_noise(sources: Table) -> np.ndarray | None:
    cols = sources.colnames
    if "psfFlux" in cols and "psfFluxErr" in cols:
        flux = np.asarray(sources["psfFlux"], dtype=np.float64)
        err = np.asarray(sources["psfFluxErr"], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(err > 0, flux / err, np.nan)
    if "snr" in cols:
        return np.asarray(sources["snr"], dtype=np.float64)
    return None


def _present_bits(exposure: Exposure, planes: Sequence[str]) -> list[tuple[str, int]]:
    return [(p, 1 << exposure.mask_planes[p]) for p in planes if p in exposure.mask_planes]


def make_candidate_list(
    template: Exposure,
    science: Exposure,
    sources: Table,
    kernel_size: int,
    config: PsfMatchConfig | None = None,
) -> list[KernelCandidate]:
    """Select kernel candidates from a source catalog and cut their stamps.

    A source is kept when it has a finite position, none of ``config.bad_flags`` set, an S/N in
    ``[min_snr, max_snr]``, no other source within ``isolation_radius`` pixels, and a stamp
    (``candidate_stamp_size``, centred on its pixel) that lies inside both images with no pixel
    of ``bad_mask_planes`` set and no non-finite value in either image or variance.  The stamp
    is the fitted region grown by the kernel half-width on every side, so this is the mask check
    "grown by the kernel size".  If more than ``max_candidates`` remain, an evenly spread subset is
    kept: the image is divided into a grid of cells and the brightest source of every cell is
    taken first, then the second brightest, and so on.

    Parameters
    ----------
    template : Exposure
        The image that will be convolved, in the science image's pixel frame (warped).
    science : Exposure
        The image to match.
    sources : astropy.table.Table
        Catalog with ``x``, ``y`` (parent pixels) and optionally ``psfFlux``/``psfFluxErr`` (or
        ``snr``), ``id`` and the flag columns.
    kernel_size : int
        Odd kernel size, pixels.
    config : PsfMatchConfig, optional

    Returns
    -------
    list of KernelCandidate
        Unsolved candidates with float64 copies of the stamps.

    Raises
    ------
    NoKernelCandidatesError
        If no source survives; the message and ``.rejected`` give the count for each reason.
    """
    cfg = config or PsfMatchConfig()
    if "x" not in sources.colnames or "y" not in sources.colnames:
        raise PsfMatchConfigError(f"the source catalog needs 'x' and 'y' columns; it has {sources.colnames}")
    stamp = candidate_stamp_size(kernel_size, cfg)
    n = len(sources)
    reasons = np.full(n, "", dtype=object)
    x = np.asarray(sources["x"], dtype=np.float64)
    y = np.asarray(sources["y"], dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    reasons[~finite] = "non-finite position"

    for flag in cfg.bad_flags:
        if flag in sources.colnames:
            hit = np.asarray(sources[flag], dtype=bool) & (reasons == "")
            reasons[hit] = f"flag {flag}"

    snr = _signal_to_noise(sources)
    if snr is None:
        _log.warning("source catalog has neither psfFlux/psfFluxErr nor snr: no S/N cut applied")
        snr_rank = np.zeros(n)
    else:
        todo = reasons == ""
        reasons[todo & ~np.isfinite(snr)] = "non-finite S/N"
        reasons[(reasons == "") & (snr < cfg.min_snr)] = f"S/N below {cfg.min_snr:g}"
        reasons[(reasons == "") & (snr > cfg.max_snr)] = f"S/N above {cfg.max_snr:g}"
        snr_rank = np.where(np.isfinite(snr), snr, 0.0)

    radius = cfg.isolation_radius if cfg.isolation_radius is not None else kernel_size / 2.0
    if radius > 0 and np.count_nonzero(finite) > 1:
        tree = cKDTree(np.column_stack([x[finite], y[finite]]))
        counts = np.zeros(n, dtype=np.int64)
        counts[finite] = tree.query_ball_point(np.column_stack([x[finite], y[finite]]), r=radius, return_length=True)
        reasons[(reasons == "") & (counts > 1)] = "not isolated"

    half = stamp // 2
    ix = np.where(finite, np.round(np.where(finite, x, 0.0)), 0).astype(np.int64)
    iy = np.where(finite, np.round(np.where(finite, y, 0.0)), 0).astype(np.int64)
    tb, sb = template.bbox, science.bbox
    inside = (
        (ix - half >= max(tb.x0, sb.x0))
        & (iy - half >= max(tb.y0, sb.y0))
        & (ix - half + stamp <= min(tb.x1, sb.x1))
        & (iy - half + stamp <= min(tb.y1, sb.y1))
    )
    reasons[(reasons == "") & ~inside] = "stamp off image"

    t_bits = _present_bits(template, cfg.bad_mask_planes)
    s_bits = _present_bits(science, cfg.bad_mask_planes)
    boxes: dict[int, Box] = {}
    for idx in np.flatnonzero(reasons == ""):
        box = Box(int(ix[idx] - half), int(iy[idx] - half), stamp, stamp)
        t_sl, s_sl = box.slices(tb), box.slices(sb)
        t_mask, s_mask = template.mask[t_sl], science.mask[s_sl]
        reason = ""
        for plane, bit in s_bits:
            if np.any(s_mask & bit):
                reason = f"masked {plane}"
                break
        if not reason:
            for plane, bit in t_bits:
                if np.any(t_mask & bit):
                    reason = f"masked {plane} (template)"
                    break
        if not reason:
            arrays = (template.image[t_sl], template.variance[t_sl], science.image[s_sl], science.variance[s_sl])
            if not all(np.all(np.isfinite(a)) for a in arrays):
                reason = "non-finite pixels"
        if reason:
            reasons[idx] = reason
        else:
            boxes[int(idx)] = box

    keep = np.array(sorted(boxes), dtype=np.int64)
    if keep.size > cfg.max_candidates:
        keep = _spread_subset(keep, x, y, snr_rank, sb, cfg)
        dropped = set(boxes) - set(keep.tolist())
        for idx in dropped:
            reasons[idx] = f"not selected (max_candidates={cfg.max_candidates})"
    rejected = Counter(r for r in reasons if r)
    if keep.size == 0:
        raise NoKernelCandidatesError(
            f"no kernel candidates among {n} sources for a {kernel_size} px kernel ({stamp} px stamps): "
            f"{format_rejections(rejected)}. Check the source catalog, the masks, or relax min_snr/"
            "isolation_radius/bad_mask_planes.",
            rejected=rejected,
            n_input=n,
        )
    ids = np.asarray(sources["id"]) if "id" in sources.colnames else np.arange(n)
    out = []
    for idx in keep:
        box = boxes[int(idx)]
        t_sl, s_sl = box.slices(tb), box.slices(sb)
        out.append(
            KernelCandidate(
                x=float(x[idx]),
                y=float(y[idx]),
                xy0=(box.x0, box.y0),
                template=template.image[t_sl].astype(np.float64),
                science=science.image[s_sl].astype(np.float64),
                template_variance=template.variance[t_sl].astype(np.float64),
                science_variance=science.variance[s_sl].astype(np.float64),
                source_id=int(ids[idx]),
                snr=float(snr[idx]) if snr is not None else float("nan"),
            )
        )
    _log.info(
        "selected %d of %d sources as kernel candidates (%d px stamps); rejected: %s",
        len(out), n, stamp, format_rejections(rejected),
    )
    return out


def _spread_subset(
    keep: np.ndarray, x: np.ndarray, y: np.ndarray, rank: np.ndarray, bbox: Box, cfg: PsfMatchConfig
) -> np.ndarray:
    grid = cfg.candidate_grid or max(1, math.ceil(math.sqrt(cfg.max_candidates)))
    cx = np.clip(((x[keep] - bbox.x0) / max(bbox.width, 1) * grid).astype(np.int64), 0, grid - 1)
    cy = np.clip(((y[keep] - bbox.y0) / max(bbox.height, 1) * grid).astype(np.int64), 0, grid - 1)
    cell = cy * grid + cx
    order = np.lexsort((-rank[keep], cell))  # by cell, brightest first
    within = np.empty(keep.size, dtype=np.int64)
    sorted_cells = cell[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_cells)) + 1]
    for a, b in zip(starts, np.r_[starts[1:], sorted_cells.size], strict=True):
        within[order[a:b]] = np.arange(b - a)
    pick = np.lexsort((-rank[keep], within))[: cfg.max_candidates]
    return np.sort(keep[pick])


def max_model_kernel_size(psf_size: int) -> int:
    """Largest kernel size (odd, pixels) for PSF images of ``psf_size`` pixels: ``psf_size // 2``, made odd."""
    size = int(psf_size) // 2
    if size % 2 == 0:
        size -= 1
    return max(size, 3)


def model_psf_matching_candidates(
    psf_in: Psf,
    psf_ref: Psf,
    bbox: Box,
    grid: tuple[int, int] | int,
    kernel_size: int,
    *,
    clamp_kernel_size: bool = True,
) -> tuple[list[KernelCandidate], int]:
    """Candidates from two PSF models realized at the centres of a grid of cells (ModelPsfMatchTask).

    At each cell centre the kernel image of ``psf_in`` (the image that will be convolved) and of
    ``psf_ref`` (the model to match) are placed in noise-free stamps with unit variance.  Both
    are padded to a common odd size ``P`` (the largest PSF image); the ``psf_in`` stamp is
    zero-padded by the kernel half-width on every side (a PSF model has no flux outside its
    image), so the fitted region is the whole ``P x P`` reference image.

    A kernel larger than ``P // 2`` is poorly constrained by a ``P``-pixel PSF image: it is
    clamped to :func:`max_model_kernel_size` with a warning (LSST raises instead).

    Parameters
    ----------
    psf_in, psf_ref : Psf
        The exposure's PSF and the reference (model) PSF.
    bbox : Box
        The exposure's box, parent pixels.
    grid : int or tuple of int
        Number of cells ``(nx, ny)`` (or one number for both).
    kernel_size : int
        Requested odd kernel size, pixels.
    clamp_kernel_size : bool
        Clamp the kernel size to :func:`max_model_kernel_size` (with a warning).  Without the clamp
        the PSF images are zero-padded to twice the kernel size, which is exact for models with no
        flux outside their images; the kernel's outer pixels are then constrained only by that.

    Returns
    -------
    candidates : list of KernelCandidate
        One unsolved candidate per cell (no sigma clipping should be applied to these).
    kernel_size : int
        The kernel size to build the basis with (clamped if needed).
    """
    nx, ny = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if nx < 1 or ny < 1:
        raise PsfMatchConfigError(f"model PSF grid must have >= 1 cell per axis, got {grid!r}")
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise PsfMatchConfigError(f"kernel_size must be odd and >= 3 pixels, got {kernel_size}")
    xs = bbox.x0 + (np.arange(nx) + 0.5) * bbox.width / nx - 0.5
    ys = bbox.y0 + (np.arange(ny) + 0.5) * bbox.height / ny - 0.5
    positions = [(float(xc), float(yc)) for yc in ys for xc in xs]
    images = [(psf_in.image(xc, yc), psf_ref.image(xc, yc)) for xc, yc in positions]
    psf_size = max(max(a.shape[0], a.shape[1], b.shape[0], b.shape[1]) for a, b in images)
    psf_size += 1 - psf_size % 2
    limit = max_model_kernel_size(psf_size)
    if not clamp_kernel_size:
        psf_size = max(psf_size, 2 * kernel_size + 1)
    elif kernel_size > limit:
        _log.warning(
            "kernel size %d px is too large for %d px PSF images (limit psfSize//2 = %d px); using %d px",
            kernel_size, psf_size, limit, limit,
        )
        kernel_size = limit
    half = kernel_size // 2
    stamp = psf_size + kernel_size - 1
    out = []
    for (xc, yc), (img_in, img_ref) in zip(positions, images, strict=True):
        tmpl = np.zeros((stamp, stamp))
        sci = np.zeros((stamp, stamp))
        _place_centred(tmpl, img_in)
        _place_centred(sci, img_ref)
        ix, iy = int(round(xc)), int(round(yc))
        out.append(
            KernelCandidate(
                x=xc,
                y=yc,
                xy0=(ix - stamp // 2, iy - stamp // 2),
                template=tmpl,
                science=sci,
                template_variance=np.zeros((stamp, stamp)),
                science_variance=np.ones((stamp, stamp)),
            )
        )
    _log.debug("%d model-PSF candidates, %d px PSF images, %d px kernel, stamp %d (fit region %d)",
               len(out), psf_size, kernel_size, stamp, stamp - 2 * half)
    return out, kernel_size


def _place_centred(target: np.ndarray, image: np.ndarray) -> None:
    ty, tx = target.shape
    iy, ix = image.shape
    oy, ox = (ty - iy) // 2, (tx - ix) // 2
    target[oy : oy + iy, ox : ox + ix] = image
