"""AssembleCoaddTask: combine the warps of a patch into a coadd (LSST's ``assembleCoadd``).

One quantum per (skymap, tract, patch, band).  The inputs are the band's warps of the patch
(``deepCoadd_psfMatchedWarp`` by default: with one PSF for all inputs, outlier rejection cannot
mistake seeing differences for outliers, and the coadd has that PSF exactly).

Per pixel, with ``x_i``, ``v_i`` the warps' image and variance (nJy; see *Calibration*):

1. **Usable inputs**: finite, no ``NO_DATA``, none of ``badMaskPlanes`` (``BAD, SAT, CR, EDGE,
   SUSPECT`` by default: a cosmic ray or a saturated core in one visit is replaced by the others).
2. **Weights**: one per warp, ``w_i = 1 / median(v_i)`` over its usable pixels (LSST weights each
   warp by its inverse mean variance; per-pixel inverse-variance weights would bias the fluxes of
   stars low, because a pixel's variance includes its own Poisson signal).
3. **Sigma clipping** (where at least ``minInputsForClipping`` inputs are usable): inputs are
   compared with the median, then (``clipIter`` times) with the weighted mean of the inputs kept,
   in units of the *predicted* noise of the difference (``v_i`` and the variance of the centre; the
   sample scatter of 3-5 inputs is too noisy to clip with).  Inputs beyond ``sigmaClip`` are
   rejected; rejections are grown by ``clipGrow`` pixels in their input so that a transient's wings
   go with its core; no pixel loses all its inputs to clipping.  LSST's ``MEANCLIP`` uses the
   inputs' scatter, which cannot flag one outlier among three (its deviation is at most
   sqrt(2) sample sigmas).
4. **Coadd**: ``sum w_i x_i / sum w_i``, variance ``sum w_i^2 v_i / (sum w_i)^2`` over the inputs
   kept (exact for independent inputs; warps' pixel covariance is not tracked, see
   :mod:`tasks.warp`).

Masks: the OR of the masks of the inputs kept, without ``removeMaskPlanes`` (``DETECTED``,
``DETECTED_NEGATIVE``: per-visit products); ``CLIPPED`` where an input was sigma-clipped;
``REJECTED`` where an input with data was left out for its mask; ``NO_DATA`` (image and variance
NaN) where no input is usable, with the OR of the unusable inputs' bits (so a core saturated in
every visit stays ``SAT``).

PSF: a :class:`~butler.psf.CoaddPsf` of the inputs' PSFs (each warp's detector PSFs for direct
warps) weighted by the warp weights, collapsed to the single model when every input has the same
PSF (the PSF-matched case: the coadd PSF *is* the model).

Calibration: every warp is scaled by its ``photo_calib`` to nJy before combining; the coadd is in
nJy, ``photo_calib`` = 1 nJy per count.

The patch is processed in row chunks (warps are read with ``bbox`` parameters), so memory is
bounded by ``chunkMegabytes`` rather than by the number of inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from butler.errors import DatasetNotFoundError
from butler.exposure import Exposure, PhotoCalib, VisitInfo
from butler.geometry import Box
from butler.masks import add_plane
from butler.psf import CoaddPsf, CoaddPsfInput, Psf
from butler.skymap import SkyMap
from pipeline.config import Field
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.errors import NoWorkFound
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from pipeline.task import timeMethod

from .make_warp import WARP_DIMENSIONS

__all__ = [
    "AssembleCoaddConnections",
    "AssembleCoaddConfig",
    "AssembleCoaddTask",
    "assemble_coadd",
    "combine_stack",
    "COADD_DIMENSIONS",
]

#: Dimensions of coadds (LSST's).
COADD_DIMENSIONS = ("tract", "patch", "skymap", "band")


class AssembleCoaddConnections(
    PipelineTaskConnections,
    dimensions=COADD_DIMENSIONS,
    defaultTemplates={"coaddName": "deep", "warpType": "psfMatched"},
):
    inputWarps = Input(
        name="{coaddName}Coadd_{warpType}Warp",
        storageClass="Exposure",
        dimensions=WARP_DIMENSIONS,
        multiple=True,
        deferLoad=True,
        doc="The band's warps of the patch (read in row chunks)",
    )
    skyMap = Input(name="skyMap", storageClass="SkyMap", dimensions=("skymap",), doc="The skymap")
    coaddExposure = Output(
        name="{coaddName}Coadd",
        storageClass="Exposure",
        dimensions=COADD_DIMENSIONS,
        doc="The coadd (nJy), on the patch's outer box",
    )


class AssembleCoaddConfig(PipelineTaskConfig, pipelineConnections=AssembleCoaddConnections):
    """Configuration of :class:`AssembleCoaddTask`."""

    doSigmaClip: bool = Field(True, description="Reject outliers by sigma clipping")
    sigmaClip: float = Field(3.0, description="Clipping threshold, in predicted sigmas of the difference")
    clipIter: int = Field(2, description="Clipping iterations about the weighted mean (after one about the median)")
    minInputsForClipping: int = Field(3, description="Clip only where at least this many inputs are usable")
    clipGrow: int = Field(2, description="Grow each input's clipped footprints by this radius, pixels")
    clipTolerance: float = Field(
        0.1, description="Relative mismatch of bright sources tolerated by clipping (SWarp's CLIP_AMPFRAC is 0.3)"
    )
    doClipFootprints: bool = Field(
        True, description="Also reject footprints where an input's PSF-smoothed residual is significant"
    )
    footprintThreshold: float = Field(5.0, description="Footprint pass threshold, sigmas of the smoothed residual")
    footprintSigma: float | None = Field(
        None, description="Gaussian sigma of the footprint pass, pixels; None: the inputs' PSF sigma at the patch centre"
    )
    badMaskPlanes: list[str] = Field(
        default_factory=lambda: ["NO_DATA", "BAD", "SAT", "CR", "EDGE", "SUSPECT"],
        description="Input pixels with these planes are not used",
    )
    removeMaskPlanes: list[str] = Field(
        default_factory=lambda: ["DETECTED", "DETECTED_NEGATIVE"],
        description="Planes not propagated to the coadd mask",
    )
    chunkMegabytes: float = Field(256.0, description="Working memory per row chunk, MB (approximate)")

    def validate(self) -> None:
        super().validate()
        if not (self.sigmaClip > 0):
            raise ValueError(f"sigmaClip must be > 0, got {self.sigmaClip}")
        if self.clipIter < 0 or self.clipGrow < 0:
            raise ValueError("clipIter and clipGrow must be >= 0")
        if self.minInputsForClipping < 3:
            raise ValueError("minInputsForClipping must be >= 3 (two inputs cannot tell which one is the outlier)")


# ---------------------------------------------------------------------------------------- combining
def _nanmedian(x: np.ndarray) -> np.ndarray:
    # Columns with no finite input stay NaN without numpy's all-NaN warning: catching warnings is
    # not thread-safe, and quanta run on threads.
    covered = np.isfinite(x).any(axis=0)
    out = np.full(x.shape[1:], np.nan, dtype=x.dtype)
    out[covered] = np.nanmedian(x[:, covered], axis=0)
    return out


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + radius


def combine_stack(
    images: np.ndarray,
    variances: np.ndarray,
    masks: np.ndarray,
    weights: np.ndarray,
    *,
    bad_bits: int,
    remove_bits: int,
    no_data_bit: int,
    clipped_bit: int,
    rejected_bit: int,
    sigma_clip: float | None = 3.0,
    clip_iter: int = 2,
    min_inputs_for_clipping: int = 3,
    clip_grow: int = 0,
    footprint_sigma: float | None = None,
    footprint_threshold: float | None = None,
    tolerance: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Combine a stack of aligned inputs (see the module docstring).

    Parameters
    ----------
    images, variances : numpy.ndarray
        Shape ``(n, h, w)``, same units.
    masks : numpy.ndarray
        Shape ``(n, h, w)`` int32, one plane map.
    weights : numpy.ndarray
        Shape ``(n,)``, one weight per input.
    bad_bits, remove_bits, no_data_bit, clipped_bit, rejected_bit : int
        Bit masks (see the module docstring).
    sigma_clip : float or None
        Per-pixel threshold in sigmas; None disables clipping.
    clip_iter : int
        Iterations about the weighted mean after the one about the median.
    min_inputs_for_clipping : int
        Clip only pixels with at least this many usable inputs.
    clip_grow : int
        Radius in pixels by which each input's rejected footprints are grown.
    footprint_sigma, footprint_threshold : float or None
        Gaussian sigma (pixels) and threshold (sigmas) of the footprint pass (None: no footprint pass).
    tolerance : float
        Relative flux mismatch tolerated by both passes (see :func:`_clip_pixels`).

    Returns
    -------
    image, variance : numpy.ndarray
        float32 ``(h, w)``; NaN where no input is usable.
    mask : numpy.ndarray
        int32 ``(h, w)``.
    n_image : numpy.ndarray
        Inputs used per pixel, int16.
    """
    n = images.shape[0]
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(images) & np.isfinite(variances)
    has_data = finite & ((masks & no_data_bit) == 0)
    good = has_data & ((masks & bad_bits) == 0)
    x = np.where(good, images, np.float32(0)).astype(np.float32, copy=False)
    v = np.where(good, variances, np.float32(0)).astype(np.float32, copy=False)
    w = np.asarray(weights, np.float32).reshape(n, 1, 1)
    kept = good
    clipped = np.zeros(images.shape[1:], bool)
    if sigma_clip is not None and n >= min_inputs_for_clipping:
        n_good = good.sum(axis=0)
        can = n_good >= min_inputs_for_clipping
        if can.any():
            kept, centre, var_c = _clip_pixels(x, v, w, good, can, sigma_clip, clip_iter, tolerance)
            rejected = good & ~kept
            if footprint_sigma is not None and footprint_threshold is not None:
                footprints = _clip_footprints(
                    x, v, good, can, centre, var_c, footprint_sigma, footprint_threshold, tolerance
                )
                # Footprints (significant outliers) are grown so that their wings go too; isolated
                # per-pixel rejections (mostly noise) are not.
                if clip_grow > 0 and footprints.any():
                    disk = _disk(clip_grow)
                    for i in range(n):
                        if footprints[i].any():
                            footprints[i] = ndimage.binary_dilation(footprints[i], structure=disk)
                rejected |= footprints & good
            kept = _restore_empty(good & ~rejected, good)
            clipped = (good & ~kept).any(axis=0)
    wk = np.where(kept, w, np.float32(0))
    sk = wk.sum(axis=0)
    n_image = kept.sum(axis=0).astype(np.int16)
    empty = n_image == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        image = ((wk * x).sum(axis=0) / sk).astype(np.float32)
        variance = ((wk * wk * v).sum(axis=0) / (sk * sk)).astype(np.float32)
    image[empty] = np.nan
    variance[empty] = np.nan
    keep_bits = np.int32(~remove_bits)
    mask = np.bitwise_or.reduce(np.where(kept, masks & keep_bits, 0), axis=0).astype(np.int32)
    if empty.any():
        unusable = np.bitwise_or.reduce(np.where(has_data, masks & keep_bits, 0), axis=0).astype(np.int32)
        mask[empty] = unusable[empty] | np.int32(no_data_bit)
    mask[clipped] |= np.int32(clipped_bit)
    mask[(has_data & ~good).any(axis=0)] |= np.int32(rejected_bit)
    return image, variance, mask, n_image


def _clip_pixels(
    x: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    good: np.ndarray,
    can: np.ndarray,
    sigma_clip: float,
    clip_iter: int,
    tolerance: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel clipping; returns (kept, centre, variance of the centre).

    A deviation is compared with ``sigma_clip * sqrt(var_d + (tolerance * centre)^2)``: the
    tolerance keeps the small relative mismatches of bright sources (PSF matching, astrometry)
    from being clipped (SWarp's ``CLIP_AMPFRAC``).
    """
    k2 = np.float32(sigma_clip * sigma_clip)
    t2 = np.float32(tolerance * tolerance)
    n_good = np.maximum(good.sum(axis=0), 1).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Round 0: about the median of the usable inputs; its variance is ~pi/2 that of their
        # unweighted mean (Gaussian noise), whatever the weights.
        centre = _nanmedian(np.where(good, x, np.nan))
        var_c = np.float32(math.pi / 2) * v.sum(axis=0) / (n_good * n_good)
        keep = good & ~(can & ((x - centre) ** 2 > k2 * (v + var_c + t2 * centre * centre)))
        for _ in range(clip_iter):
            keep = _restore_empty(keep, good)
            wk = np.where(keep, w, np.float32(0))
            sk = wk.sum(axis=0)
            centre = (wk * x).sum(axis=0) / sk
            var_c = (wk * wk * v).sum(axis=0) / (sk * sk)
            # var(x_i - mean) for an input inside / outside the mean.
            var_d = np.where(keep, v * (1 - 2 * wk / sk) + var_c, v + var_c)
            new_keep = good & ~(can & ((x - centre) ** 2 > k2 * (np.maximum(var_d, 0) + t2 * centre * centre)))
            if np.array_equal(new_keep, keep):
                break
            keep = new_keep
    keep = _restore_empty(keep, good)
    wk = np.where(keep, w, np.float32(0))
    sk = wk.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.where(sk > 0, (wk * x).sum(axis=0) / sk, 0).astype(np.float32)
        var_c = np.where(sk > 0, (wk * wk * v).sum(axis=0) / (sk * sk), 0).astype(np.float32)
    return keep, centre, var_c


def _clip_footprints(
    x: np.ndarray,
    v: np.ndarray,
    good: np.ndarray,
    can: np.ndarray,
    centre: np.ndarray,
    var_c: np.ndarray,
    sigma: float,
    threshold: float,
    tolerance: float = 0.0,
) -> np.ndarray:
    """Outlier footprints: where an input's residual from the centre, smoothed by a Gaussian of
    ``sigma`` pixels (the PSF's matched filter), is beyond ``threshold`` sigmas.

    Each input's smoothed residual is divided by its predicted noise ``sqrt((v + var_c) (x) g^2)``
    and then by the robust scatter (MAD) of that ratio over the chunk, which absorbs the pixel
    correlations that warping and PSF matching introduce.  This finds a faint transient whose
    pixels are each below the per-pixel threshold but whose total S/N is high (LSST's CompareWarp
    finds such artifacts by detecting on warp differences).
    """
    n = x.shape[0]
    out = np.zeros(x.shape, bool)
    radius = max(1, int(math.ceil(4.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()

    def smooth(a: np.ndarray, t: np.ndarray) -> np.ndarray:
        return ndimage.correlate1d(ndimage.correlate1d(a, t, axis=0, mode="constant"), t, axis=1, mode="constant")

    centre_sm = smooth(np.where(can, centre, np.float32(0)), taps)
    floor = np.float32(tolerance * tolerance) * centre_sm * centre_sm
    for i in range(n):
        use = good[i] & can
        if not use.any():
            continue
        resid = np.where(use, x[i] - centre, np.float32(0))
        noise = np.where(use, v[i] + var_c, np.float32(0))
        sm = smooth(resid, taps)
        sv = smooth(noise, taps**2)
        with np.errstate(invalid="ignore", divide="ignore"):
            sig = np.where(use & (sv > 0), sm / np.sqrt(sv), np.float32(0))
        vals = sig[use]
        scale = 1.4826 * float(np.median(np.abs(vals - np.median(vals)))) if vals.size > 100 else 1.0
        if not scale > 0:
            continue
        # The relative tolerance enters after the noise scale is measured (it is not noise).
        with np.errstate(invalid="ignore", divide="ignore"):
            limit = threshold * np.sqrt((scale * scale) * sv + floor)
        out[i] = use & (np.abs(sm) > limit)
    return out


def _restore_empty(keep: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Where clipping rejected every usable input, keep them all."""
    lost = ~keep.any(axis=0) & good.any(axis=0)
    if lost.any():
        keep = keep.copy()
        keep[:, lost] = good[:, lost]
    return keep


# ---------------------------------------------------------------------------------------- inputs
class _WarpInput:
    """One warp: reads chunks (from an Exposure or a deferred handle) and knows its weight."""

    def __init__(self, item: Any) -> None:
        self.item = item
        self.exposure: Exposure | None = item if isinstance(item, Exposure) else None
        self.meta: Exposure | None = self.exposure
        self.data_id = getattr(item, "dataId", None)
        self.missing = False

    def read(self, box: Box) -> Exposure | None:
        if self.exposure is not None:
            overlap = box.intersection(self.exposure.bbox)
            return None if overlap.is_empty else self.exposure.subexposure(overlap)
        if self.missing:
            return None
        try:
            sub = self.item.get(parameters={"bbox": box})
        except DatasetNotFoundError:
            # Its producing quantum found no work (e.g. a visit not selected): not an input.
            self.missing = True
            return None
        except Exception:  # noqa: BLE001 - the warp does not cover the box: read it whole once
            self.exposure = self.item.get()
            return self.read(box)
        if self.meta is None:
            self.meta = sub
        return sub


def _scale(exposure: Exposure) -> float:
    return exposure.photo_calib.calibration if exposure.photo_calib is not None else 1.0


def _remap(mask: np.ndarray, planes: dict[str, int], target: dict[str, int]) -> np.ndarray:
    if all(target.get(n) == b for n, b in planes.items()):
        return mask
    out = np.zeros_like(mask)
    for name, bit in planes.items():
        out |= np.where((mask >> bit) & 1, np.int32(1 << add_plane(target, name)), np.int32(0))
    return out


def assemble_coadd(
    warps: Sequence[Any],
    bbox: Box,
    wcs: Any,
    config: AssembleCoaddConfig | None = None,
    *,
    band: str | None = None,
    log: Any = None,
) -> Exposure:
    """Assemble a coadd on ``bbox`` from warps (Exposures or deferred handles); see the module docstring.

    Raises
    ------
    NoWorkFound
        If no warp has usable pixels.
    """
    import logging

    cfg = config or AssembleCoaddConfig()
    log = log or logging.getLogger("assembleCoadd")
    inputs = [_WarpInput(item) for item in warps]
    if not inputs:
        raise NoWorkFound("no warps to coadd")
    n = len(inputs)
    bytes_per_row = max(1, n * bbox.width * 48)
    rows = int(max(32, min(bbox.height, cfg.chunkMegabytes * 1e6 // bytes_per_row)))
    footprint_sigma = None
    if cfg.doSigmaClip and cfg.doClipFootprints:
        footprint_sigma = cfg.footprintSigma or _psf_sigma(inputs, bbox)
    halo = 0
    if cfg.doSigmaClip:
        halo = cfg.clipGrow + (int(math.ceil(4.0 * footprint_sigma)) if footprint_sigma else 0)

    planes: dict[str, int] | None = None
    image = np.full(bbox.shape, np.nan, np.float32)
    variance = np.full(bbox.shape, np.nan, np.float32)
    mask = np.zeros(bbox.shape, np.int32)
    n_image = np.zeros(bbox.shape, np.int16)
    weights: np.ndarray | None = None
    scales = np.ones(n)
    valid_rows: list[list[int]] = [[] for _ in range(n)]
    valid_cols: list[list[int]] = [[] for _ in range(n)]
    for r0 in range(bbox.y0, bbox.y1, rows):
        r1 = min(bbox.y1, r0 + rows)
        box = Box.from_corners(bbox.x0, max(bbox.y0, r0 - halo), bbox.x1, min(bbox.y1, r1 + halo))
        h, wdt = box.shape
        imgs = np.full((n, h, wdt), np.nan, np.float32)
        vars_ = np.full((n, h, wdt), np.nan, np.float32)
        msks = np.zeros((n, h, wdt), np.int32)
        for i, inp in enumerate(inputs):
            sub = inp.read(box)
            if sub is None:
                continue
            if planes is None:
                planes = dict(sub.mask_planes)
                for name in ("NO_DATA", "CLIPPED", "REJECTED"):
                    add_plane(planes, name)
            sl = sub.bbox.slices(box)
            s = _scale(sub)
            scales[i] = s
            imgs[i][sl] = sub.image * np.float32(s)
            vars_[i][sl] = sub.variance * np.float32(s * s)
            msks[i][sl] = _remap(sub.mask, sub.mask_planes, planes)
        if planes is None:
            raise NoWorkFound(f"none of the {n} warps could be read (their quanta found no work?)")
        if weights is None:
            weights = _weights(inputs, scales, log)
        bits = _bits(planes, cfg)
        for i in range(n):
            has = ((msks[i] & bits["no_data"]) == 0) & np.isfinite(imgs[i])
            rr = np.flatnonzero(has.any(axis=1))
            cc = np.flatnonzero(has.any(axis=0))
            if rr.size:
                valid_rows[i] += [box.y0 + int(rr[0]), box.y0 + int(rr[-1])]
                valid_cols[i] += [box.x0 + int(cc[0]), box.x0 + int(cc[-1])]
        img_c, var_c, msk_c, n_c = combine_stack(
            imgs, vars_, msks, weights,
            bad_bits=bits["bad"], remove_bits=bits["remove"], no_data_bit=bits["no_data"],
            clipped_bit=bits["clipped"], rejected_bit=bits["rejected"],
            sigma_clip=cfg.sigmaClip if cfg.doSigmaClip else None, clip_iter=cfg.clipIter,
            min_inputs_for_clipping=cfg.minInputsForClipping, clip_grow=cfg.clipGrow if cfg.doSigmaClip else 0,
            footprint_sigma=footprint_sigma, footprint_threshold=cfg.footprintThreshold,
            tolerance=cfg.clipTolerance,
        )
        inner = slice(r0 - box.y0, r0 - box.y0 + (r1 - r0))
        out = slice(r0 - bbox.y0, r1 - bbox.y0)
        image[out] = img_c[inner]
        variance[out] = var_c[inner]
        mask[out] = msk_c[inner]
        n_image[out] = n_c[inner]
    assert planes is not None and weights is not None
    if not (n_image > 0).any():
        raise NoWorkFound(f"none of the {n} warps has usable pixels in {bbox}")

    used = [i for i, inp in enumerate(inputs) if not inp.missing]
    metas = [inputs[i].meta for i in used]
    weights = weights[used]
    n = len(used)
    psf = _coadd_psf(metas, weights, [valid_rows[i] for i in used], [valid_cols[i] for i in used], bbox)
    visits = [m.metadata.get("WARP_VISIT") if m is not None else None for m in metas]
    infos = [m.visit_info for m in metas if m is not None and m.visit_info is not None]
    visit_info = None
    if infos:
        visit_info = VisitInfo(
            exposure_time=float(sum(i.exposure_time for i in infos)),
            mjd=float(np.mean([i.mjd for i in infos])),
        )
    n_clipped = int(np.count_nonzero(mask & (1 << planes["CLIPPED"])))
    coadd = Exposure(
        image,
        mask,
        variance,
        xy0=(bbox.x0, bbox.y0),
        wcs=wcs,
        psf=psf,
        photo_calib=PhotoCalib(1.0),
        visit_info=visit_info,
        band=band if band is not None else next((m.band for m in metas if m is not None), None),
        mask_planes=planes,
        metadata={
            "COADD_VISITS": [int(v) if v is not None else None for v in visits],
            "COADD_WEIGHTS": [float(w) for w in weights],
            "COADD_NINPUTS": n,
            "COADD_NIMAGE_MEDIAN": float(np.median(n_image)),
            "COADD_NCLIPPED": n_clipped,
        },
    )
    log.info(
        "coadd of %d warps on %s: median %.1f inputs per pixel, %d pixels with clipped inputs, %d without data",
        n, bbox, float(np.median(n_image)), n_clipped, int(np.count_nonzero(n_image == 0)),
    )
    return coadd


def _psf_sigma(inputs: Sequence[_WarpInput], bbox: Box) -> float | None:
    """Gaussian sigma (pixels) of the first input's PSF at the box centre (None without a PSF)."""
    from butler.psf import SIGMA_TO_FWHM

    cx, cy = bbox.center
    for inp in inputs:
        probe = inp.read(Box(int(cx), int(cy), 1, 1))
        if probe is not None and probe.psf is not None:
            try:
                return float(probe.psf.fwhm(cx, cy)) / SIGMA_TO_FWHM
            except Exception:  # noqa: BLE001 - e.g. a CoaddPsf with no input at the centre
                continue
    return None


def _bits(planes: dict[str, int], cfg: AssembleCoaddConfig) -> dict[str, int]:
    def bitmask(names: Sequence[str]) -> int:
        return int(sum(1 << planes[nm] for nm in set(names) if nm in planes))

    return {
        "bad": bitmask(cfg.badMaskPlanes),
        "remove": bitmask(cfg.removeMaskPlanes),
        "no_data": 1 << planes["NO_DATA"],
        "clipped": 1 << planes["CLIPPED"],
        "rejected": 1 << planes["REJECTED"],
    }


def _weights(inputs: Sequence[_WarpInput], scales: np.ndarray, log: Any) -> np.ndarray:
    weights = np.zeros(len(inputs))
    for i, inp in enumerate(inputs):
        if inp.missing:
            continue
        med = inp.meta.metadata.get("VARIANCE_MEDIAN") if inp.meta is not None else None
        if med is not None and math.isfinite(float(med)) and float(med) > 0:
            # MakeWarp records it in the warp's units (nJy^2 for calibrated warps).
            meta_scale = _scale(inp.meta) if inp.meta is not None else 1.0
            weights[i] = 1.0 / (float(med) * meta_scale * meta_scale)
            continue
        exposure = inp.exposure if inp.exposure is not None else inp.item.get()
        inp.exposure = exposure
        inp.meta = inp.meta or exposure
        good = ((exposure.mask & exposure.get_plane_bitmask("NO_DATA")) == 0) & np.isfinite(exposure.variance)
        if not good.any():
            weights[i] = 1e-30
            continue
        med_v = float(np.median(exposure.variance[good])) * scales[i] ** 2
        weights[i] = 1.0 / med_v if med_v > 0 else 1e-30
        log.debug("warp %d: weight from its variance plane (no VARIANCE_MEDIAN in its metadata)", i)
    return weights


def _coadd_psf(
    metas: Sequence[Exposure | None],
    weights: np.ndarray,
    valid_rows: list[list[int]],
    valid_cols: list[list[int]],
    bbox: Box,
) -> Psf | None:
    entries: list[CoaddPsfInput] = []
    plain: list[Psf] = []
    for meta, weight, rows, cols in zip(metas, weights, valid_rows, valid_cols, strict=True):
        if meta is None or meta.psf is None or not rows:
            continue
        box = Box.from_corners(min(cols), min(rows), max(cols) + 1, max(rows) + 1)
        psf = meta.psf
        if isinstance(psf, CoaddPsf):
            for inp in psf.inputs:
                entries.append(CoaddPsfInput(inp.psf, float(weight) * inp.weight, inp.bbox.intersection(box) if inp.bbox.overlaps(box) else inp.bbox, inp.transform))
        else:
            plain.append(psf)
            entries.append(CoaddPsfInput(psf, float(weight), box))
    if not entries:
        return None
    if plain and len(plain) == len(entries):
        first = plain[0].to_dict()
        if all(type(p) is type(plain[0]) for p in plain) and all(p.to_dict() == first for p in plain[1:]):
            return plain[0]
    return CoaddPsf(entries)


# ---------------------------------------------------------------------------------------- the task
class AssembleCoaddTask(PipelineTask):
    """Assemble the warps of a patch and band into a coadd (see the module docstring)."""

    ConfigClass = AssembleCoaddConfig
    _DefaultName = "assembleCoadd"

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        inputs = butlerQC.get(inputRefs)
        data_id = butlerQC.dataId
        outputs = self.run(
            inputs["inputWarps"], inputs["skyMap"], tract=data_id["tract"], patch=data_id["patch"], band=data_id.get("band")
        )
        butlerQC.put(outputs, outputRefs)

    @timeMethod
    def run(
        self,
        inputWarps: Sequence[Any],  # noqa: N803
        skyMap: SkyMap | None = None,  # noqa: N803 - (not bare SkyMap: the connection linter takes iterables for lists)
        tract: int | None = None,
        patch: int | None = None,
        band: str | None = None,
    ) -> Struct:
        """Coadd the warps of one patch.

        Parameters
        ----------
        inputWarps : sequence of Exposure or deferred handles
            Warps on the patch's outer box (from MakeWarpTask).  Handles whose dataset was not
            written (an upstream quantum found no work) are skipped.
        skyMap : SkyMap
        tract, patch : int
        band : str, optional

        Returns
        -------
        Struct
            ``coaddExposure``.
        """
        if skyMap is None or tract is None or patch is None:
            raise ValueError("AssembleCoaddTask.run needs the skymap and the tract and patch ids")
        patch_info = skyMap[tract].get_patch_info(patch)
        if not inputWarps:
            raise NoWorkFound(f"no warps for tract {tract} patch {patch} band {band}")
        coadd = assemble_coadd(inputWarps, patch_info.outer_bbox, patch_info.wcs, self.config, band=band, log=self.log)
        coadd.metadata.update({"COADD_TRACT": tract, "COADD_PATCH": patch})
        self.metadata.update(
            {"nInputs": coadd.metadata["COADD_NINPUTS"], "nClippedPixels": coadd.metadata["COADD_NCLIPPED"]}
        )
        return Struct(coaddExposure=coadd)

