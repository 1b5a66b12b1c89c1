"""MakeWarpTask: resample one visit's calexps onto a skymap patch (LSST's ``makeWarp``).

One quantum per (skymap, tract, patch, visit): the inputs are the visit's calexps whose detectors
overlap the patch (the graph builder's spatial join), the outputs

- ``{coaddName}Coadd_directWarp`` -- the calexps warped onto the patch's outer box
  (:func:`tasks.warp.warp_exposure`, Lanczos3 by default), with a :class:`~butler.psf.CoaddPsf`
  whose inputs are the detectors' PSFs mapped into the patch frame;
- ``{coaddName}Coadd_psfMatchedWarp`` -- the same, PSF-matched to a constant model PSF (a round
  Gaussian of ``modelPsfFwhm`` pixels) by :class:`~tasks.model_psf_match.ModelPsfMatchTask`.

Matching happens *after* warping, per detector, in the patch frame (as LSST's current
``MakePsfMatchedWarpTask`` does): each detector is warped onto its footprint in the patch (grown by
the largest kernel half-width, so that pixels on the patch edge are convolved with real data),
matched, and pasted where it has data.  Pixels whose matching kernel reaches beyond a detector are
``NO_DATA`` in the PSF-matched warp.

Both warps are calibrated to nJy (image times ``photo_calib.calibration``, variance times its
square; ``photo_calib`` = 1 nJy per count), so warps of different visits add directly (LSST's
warps are in nJy too).

Visit selection (templates from good-seeing visits only)
--------------------------------------------------------
``maxSeeing`` (arcsec, default 0.8) and ``visits`` (an explicit list) select the visits that get
warps; any other visit's quantum ends with :class:`~pipeline.errors.NoWorkFound` (no warps
written, so assembleCoadd never sees it).  The seeing is the calexp's ``visit_info.seeing``, or
the PSF FWHM at the detector centre times the pixel scale when that is missing.  LSST selects
with a separate ``selectGoodSeeingVisits`` task; a config cut here keeps the data query free for
the science visits of the DIA pipeline, which must not be filtered by seeing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from butler.exposure import Exposure, PhotoCalib
from butler.geometry import Box
from butler.masks import add_plane
from butler.psf import CoaddPsf, CoaddPsfInput, GaussianPsf, Psf
from butler.skymap import SkyMap
from pipeline.config import ConfigurableField, Field
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.errors import NoWorkFound
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from pipeline.task import timeMethod
from tasks.model_psf_match import ModelPsfMatchTask
from tasks.warp import WARP_METHODS, warp_with_variances

__all__ = [
    "MakeWarpConnections",
    "MakeWarpConfig",
    "MakeWarpTask",
    "WARP_DIMENSIONS",
    "make_model_psf",
    "exposure_seeing",
]

#: Dimensions of warps (LSST's).
WARP_DIMENSIONS = ("tract", "patch", "skymap", "instrument", "visit")


class MakeWarpConnections(
    PipelineTaskConnections,
    dimensions=WARP_DIMENSIONS,
    defaultTemplates={"coaddName": "deep", "calexpType": ""},
):
    calExpList = Input(
        name="{calexpType}calexp",
        storageClass="Exposure",
        dimensions=("instrument", "visit", "detector"),
        multiple=True,
        deferLoad=True,
        doc="The visit's calibrated exposures whose detectors overlap the patch",
    )
    skyMap = Input(
        name="skyMap",
        storageClass="SkyMap",
        dimensions=("skymap",),
        doc="The skymap defining the patch",
    )
    direct = Output(
        name="{coaddName}Coadd_directWarp",
        storageClass="Exposure",
        dimensions=WARP_DIMENSIONS,
        doc="Calexps warped onto the patch (nJy), CoaddPsf of the detectors' PSFs",
    )
    psfMatched = Output(
        name="{coaddName}Coadd_psfMatchedWarp",
        storageClass="Exposure",
        dimensions=WARP_DIMENSIONS,
        doc="Warp PSF-matched to the model PSF (nJy)",
    )

    def __init__(self, *, config: Any = None) -> None:
        super().__init__(config=config)
        if config is not None:
            if not config.makeDirect:
                del self.direct
            if not config.makePsfMatched:
                del self.psfMatched


class MakeWarpConfig(PipelineTaskConfig, pipelineConnections=MakeWarpConnections):
    """Configuration of :class:`MakeWarpTask`."""

    makeDirect: bool = Field(True, description="Write the direct warp (deepCoadd_directWarp)")
    makePsfMatched: bool = Field(True, description="Write the PSF-matched warp (deepCoadd_psfMatchedWarp)")
    warpingKernelName: str = Field("lanczos3", description=f"Interpolation kernel: one of {', '.join(WARP_METHODS)}")
    gridStep: int = Field(32, description="Spacing of the exact WCS evaluations, pixels")
    modelPsfFwhm: float = Field(
        4.5,
        description="FWHM of the round Gaussian model PSF of the PSF-matched warp, coadd pixels (0.9 arcsec for "
        "SimCam's 0.2 arcsec pixels); must be broader than every input PSF",
    )
    modelPsfSize: int | None = Field(
        None, description="Odd size of the model PSF image, pixels; None: 2*ceil(3.5*FWHM)+1 (bounds the kernel size)"
    )
    maxSeeing: float | None = Field(
        0.8,
        description="Only visits with seeing (arcsec) at most this get warps (templates from good seeing); None: all",
    )
    visits: list[int] | None = Field(None, description="Only these visit ids get warps (None: no list cut)")
    modelPsfMatch = ConfigurableField(target=ModelPsfMatchTask, doc="PSF matching of each warped detector")

    def validate(self) -> None:
        super().validate()
        if self.warpingKernelName not in WARP_METHODS:
            raise ValueError(
                f"warpingKernelName {self.warpingKernelName!r} is unknown; choose one of {', '.join(WARP_METHODS)}"
            )
        if not self.makeDirect and not self.makePsfMatched:
            raise ValueError("makeDirect and makePsfMatched are both False: the task would write nothing")
        if not (math.isfinite(self.modelPsfFwhm) and self.modelPsfFwhm > 0):
            raise ValueError(f"modelPsfFwhm must be a positive number of pixels, got {self.modelPsfFwhm}")
        if self.modelPsfSize is not None and (self.modelPsfSize < 3 or self.modelPsfSize % 2 == 0):
            raise ValueError(f"modelPsfSize must be odd and >= 3, got {self.modelPsfSize}")


def make_model_psf(fwhm: float, size: int | None = None) -> GaussianPsf:
    """The round Gaussian model PSF of ``fwhm`` pixels (size ``2*ceil(3.5*fwhm)+1`` by default)."""
    if size is None:
        size = 2 * math.ceil(3.5 * fwhm) + 1
    return GaussianPsf.from_fwhm(fwhm, size=size)


def exposure_seeing(exposure: Exposure) -> float:
    """Seeing of an exposure in arcsec: ``visit_info.seeing``, else PSF FWHM x pixel scale (NaN if unknown)."""
    info = exposure.visit_info
    if info is not None and math.isfinite(info.seeing):
        return float(info.seeing)
    if exposure.psf is not None and exposure.wcs is not None:
        cx, cy = exposure.bbox.center
        return float(exposure.psf.fwhm(cx, cy) * exposure.pixel_scale())
    return float("nan")


def _load(item: Any, **kwargs: Any) -> Exposure:
    """An Exposure, or a deferred handle's object."""
    return item if isinstance(item, Exposure) else item.get(**kwargs)


def _footprint_box(exposure: Exposure, target_wcs: Any, grow: int) -> Box:
    """Bounding box in the target frame of an exposure's pixels (sampled along its edges), grown."""
    b = exposure.bbox
    n = 9
    xs = np.concatenate([np.linspace(b.x0 - 0.5, b.x1 - 0.5, n), np.full(n, b.x1 - 0.5),
                         np.linspace(b.x1 - 0.5, b.x0 - 0.5, n), np.full(n, b.x0 - 0.5)])
    ys = np.concatenate([np.full(n, b.y0 - 0.5), np.linspace(b.y0 - 0.5, b.y1 - 0.5, n),
                         np.full(n, b.y1 - 0.5), np.linspace(b.y1 - 0.5, b.y0 - 0.5, n)])
    ra, dec = exposure.wcs.all_pix2world(xs, ys, 0)
    tx, ty = target_wcs.all_world2pix(ra, dec, 0)
    if not (np.all(np.isfinite(tx)) and np.all(np.isfinite(ty))):
        return Box(0, 0, 0, 0)
    return Box.from_corners(
        int(math.floor(tx.min())) - grow, int(math.floor(ty.min())) - grow,
        int(math.ceil(tx.max())) + 1 + grow, int(math.ceil(ty.max())) + 1 + grow,
    )


def _valid_box(mask: np.ndarray, no_data_bit: int, xy0: tuple[int, int]) -> Box:
    valid = (mask & no_data_bit) == 0
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return Box(xy0[0], xy0[1], 0, 0)
    return Box.from_corners(xy0[0] + int(cols[0]), xy0[1] + int(rows[0]), xy0[0] + int(cols[-1]) + 1, xy0[1] + int(rows[-1]) + 1)


class _Canvas:
    """A visit warp being assembled from per-detector pieces (nJy)."""

    def __init__(self, bbox: Box, planes: dict[str, int]) -> None:
        self.bbox = bbox
        self.planes = dict(planes)
        self.no_data = 1 << add_plane(self.planes, "NO_DATA")
        self.image = np.full(bbox.shape, np.nan, np.float32)
        self.variance = np.full(bbox.shape, np.nan, np.float32)
        self.mask = np.full(bbox.shape, self.no_data, np.int32)

    def paste(self, piece: Exposure, calibration: float) -> np.ndarray:
        """Copy the piece's pixels with data (not NO_DATA) inside the canvas; returns that mask."""
        overlap = piece.bbox.intersection(self.bbox)
        if overlap.is_empty:
            return np.zeros((0, 0), bool)
        src = overlap.slices(piece.bbox)
        dst = overlap.slices(self.bbox)
        bits = piece.mask[src]
        extra = set(piece.mask_planes) - set(self.planes)
        for name in sorted(extra):
            add_plane(self.planes, name)
        if any(self.planes[n] != b for n, b in piece.mask_planes.items()):
            # Remap bits (rare: pieces with different plane maps).
            remapped = np.zeros_like(bits)
            for name, bit in piece.mask_planes.items():
                remapped |= np.where((bits >> bit) & 1, np.int32(1 << self.planes[name]), np.int32(0))
            bits = remapped
        piece_no_data = 1 << self.planes["NO_DATA"]
        good = ((bits & piece_no_data) == 0) & np.isfinite(piece.image[src]) & np.isfinite(piece.variance[src])
        img = self.image[dst]
        var = self.variance[dst]
        msk = self.mask[dst]
        img[good] = piece.image[src][good] * np.float32(calibration)
        var[good] = piece.variance[src][good] * np.float32(calibration * calibration)
        msk[good] = bits[good]
        return good

    def exposure(self, template: Exposure, wcs: Any, psf: Psf | None, metadata: dict[str, Any]) -> Exposure:
        return Exposure(
            self.image,
            self.mask,
            self.variance,
            xy0=(self.bbox.x0, self.bbox.y0),
            wcs=wcs,
            psf=psf,
            photo_calib=PhotoCalib(1.0),
            visit_info=template.visit_info,
            band=template.band,
            mask_planes=self.planes,
            metadata=metadata,
        )


class MakeWarpTask(PipelineTask):
    """Warp a visit's calexps onto a patch; optionally PSF-match them to a model PSF.

    See the module docstring for the algorithm, calibration and visit selection.
    """

    ConfigClass = MakeWarpConfig
    _DefaultName = "makeWarp"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.makeSubtask("modelPsfMatch")

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        inputs = butlerQC.get(inputRefs)
        data_id = butlerQC.dataId
        outputs = self.run(
            inputs["calExpList"], inputs["skyMap"], tract=data_id["tract"], patch=data_id["patch"], visit=data_id["visit"]
        )
        butlerQC.put(outputs, outputRefs)

    def select_visit(self, visit: int | None, seeing: float) -> str | None:
        """Why a visit is not warped (None when it is)."""
        cfg = self.config
        if cfg.visits is not None and visit not in cfg.visits:
            return f"visit {visit} is not in the configured visit list"
        if cfg.maxSeeing is not None and not (seeing <= cfg.maxSeeing):
            return f"seeing {seeing:.3f} arcsec exceeds maxSeeing = {cfg.maxSeeing:g} arcsec"
        return None

    @timeMethod
    def run(
        self,
        calExpList: Sequence[Any],  # noqa: N803
        skyMap: SkyMap | None = None,  # noqa: N803 - (not bare SkyMap: the connection linter takes iterables for lists)
        tract: int | None = None,
        patch: int | None = None,
        visit: int | None = None,
    ) -> Struct:
        """Warp (and PSF-match) the calexps of one visit onto one patch.

        Parameters
        ----------
        calExpList : sequence of Exposure or deferred handles
            The visit's calexps (handles are read one at a time).
        skyMap : SkyMap
        tract, patch : int
            The patch to warp onto.
        visit : int, optional
            The visit id (default: from the calexps' visit_info), for the selection.

        Returns
        -------
        Struct
            ``direct`` and ``psfMatched`` warps (either None when disabled).

        Raises
        ------
        NoWorkFound
            The visit is not selected, or no calexp pixel lands in the patch.
        """
        if skyMap is None or tract is None or patch is None:
            raise ValueError("MakeWarpTask.run needs the skymap and the tract and patch ids")
        cfg = self.config
        patch_info = skyMap[tract].get_patch_info(patch)
        wcs = patch_info.wcs
        outer = patch_info.outer_bbox
        margin = cfg.modelPsfMatch.kernelSizeMax // 2 + 2 if cfg.makePsfMatched else 0
        grown = outer.grow(margin)
        model_psf = make_model_psf(cfg.modelPsfFwhm, cfg.modelPsfSize) if cfg.makePsfMatched else None

        direct_canvas: _Canvas | None = None
        matched_canvas: _Canvas | None = None
        psf_inputs: list[CoaddPsfInput] = []
        first: Exposure | None = None
        detectors: list[Any] = []
        calibrations: dict[str, float] = {}
        for item in calExpList:
            calexp = _load(item)
            if first is None:
                first = calexp
                visit_id = visit if visit is not None else (calexp.visit_info.visit_id if calexp.visit_info else None)
                reason = self.select_visit(visit_id, exposure_seeing(calexp))
                if reason is not None:
                    raise NoWorkFound(reason)
                direct_canvas = _Canvas(outer, calexp.mask_planes)
                matched_canvas = _Canvas(outer, calexp.mask_planes) if cfg.makePsfMatched else None
            if calexp.wcs is None:
                raise ValueError(f"calexp {calexp.bbox} of visit {visit} has no WCS; it cannot be warped")
            target = _footprint_box(calexp, wcs, 3).intersection(grown)
            if target.is_empty:
                continue
            with self.timer("warp"):
                modes = ("squared", "interpolated") if matched_canvas is not None else ("squared",)
                piece, variances = warp_with_variances(
                    calexp, wcs, target, method=cfg.warpingKernelName, grid_step=cfg.gridStep, variances=modes
                )
            no_data_bit = piece.get_plane_bitmask("NO_DATA")
            valid = _valid_box(piece.mask, no_data_bit, piece.xy0)
            if valid.intersection(outer).is_empty:
                continue
            calibration = calexp.photo_calib.calibration if calexp.photo_calib is not None else 1.0
            data_id = getattr(item, "dataId", None) or {}
            det = data_id.get("detector", calexp.metadata.get("DETECTOR"))
            detectors.append(det)
            calibrations[str(det)] = float(calibration)
            assert direct_canvas is not None
            direct_canvas.paste(piece, calibration)
            if isinstance(piece.psf, CoaddPsf):
                src = piece.psf.inputs[0]
                psf_inputs.append(CoaddPsfInput(src.psf, 1.0, valid.intersection(outer), src.transform))
            if matched_canvas is not None:
                assert model_psf is not None
                crop = valid.grow(margin).intersection(piece.bbox)
                # The variance field resampled like an image: convolved with K^2 it gives the right
                # variance of the matched warp (per-pixel warp variances would under-estimate it by
                # ignoring the warp's pixel correlations; see tasks.warp.warp_exposure).
                to_match = piece.subexposure(crop, deep=True)
                to_match.variance = variances["interpolated"][crop.slices(piece.bbox)].copy()
                matched = self.modelPsfMatch.run(to_match, model_psf).psfMatchedExposure
                matched_canvas.paste(matched, calibration)
        if first is None or direct_canvas is None or not detectors:
            raise NoWorkFound(f"no calexp of visit {visit} has pixels in tract {tract} patch {patch}")
        meta = {
            "WARP_VISIT": visit if visit is not None else (first.visit_info.visit_id if first.visit_info else None),
            "WARP_TRACT": tract,
            "WARP_PATCH": patch,
            "WARP_DETECTORS": detectors,
            "WARP_CALIBRATIONS": calibrations,
            "WARP_KERNEL": cfg.warpingKernelName,
            "SEEING": exposure_seeing(first),
        }
        direct = None
        if cfg.makeDirect:
            psf = CoaddPsf(psf_inputs) if psf_inputs else None
            direct = direct_canvas.exposure(first, wcs, psf, {**meta, "WARP_TYPE": "direct"})
            direct.metadata.update(_variance_stats(direct))
        psf_matched = None
        if matched_canvas is not None:
            psf_matched = matched_canvas.exposure(
                first, wcs, model_psf, {**meta, "WARP_TYPE": "psfMatched", "MODEL_PSF_FWHM": cfg.modelPsfFwhm}
            )
            psf_matched.metadata.update(_variance_stats(psf_matched))
        n_good = int(np.count_nonzero((direct_canvas.mask & direct_canvas.no_data) == 0))
        self.log.info(
            "visit %s -> tract %d patch %d: %d detector(s), %d of %d pixels covered",
            meta["WARP_VISIT"], tract, patch, len(detectors), n_good, outer.area,
        )
        self.metadata.update({"nDetectors": len(detectors), "nGoodPixels": n_good})
        return Struct(direct=direct, psfMatched=psf_matched)


def _variance_stats(warp: Exposure) -> dict[str, float | int | None]:
    """Median variance (nJy^2) of the pixels with data: AssembleCoaddTask's weight is its inverse.

    None when no pixel has data (PSF matching can leave a sliver of overlap with none).
    """
    good = ((warp.mask & warp.get_plane_bitmask("NO_DATA")) == 0) & np.isfinite(warp.variance)
    n = int(np.count_nonzero(good))
    median = float(np.median(warp.variance[good])) if n else None
    return {"VARIANCE_MEDIAN": median, "N_GOOD_PIXELS": n}
