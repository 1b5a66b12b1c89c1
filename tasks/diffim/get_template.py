"""GetCoaddAsTemplateTask (label ``getTemplate``): a template for one visit-detector from coadd patches.

After ``lsst.ip.diffim.GetCoaddAsTemplateTask`` / ``GetTemplateTask``:

1. **Tract** -- the coadd patches that overlap the science exposure arrive through the graph's
   spatial join (possibly from several tracts).  The tract whose *inner* region holds the science
   image's centre (closest centre first, the skymap's own rule) is chosen when it has coadds;
   otherwise the tract with coadds whose centre is closest.  The choice is logged.
2. **Assembly in the tract frame, no resampling** -- the box of the science image's sky corners in
   tract pixels, grown by ``templateBorderSize`` for the warping kernel, is filled from the
   patches: first every patch's *inner* box (the inner boxes tile the tract, so each pixel has one
   owner), then, where a pixel is still empty (its owner has no coadd, or no data there), from the
   patches' outer borders.  Overlapping coadd borders hold the same inputs, so they are consistent;
   preferring inner regions keeps the result independent of the patch order.  Pixels that nothing
   covers are NaN with ``NO_DATA``.  Patches with different calibrations are brought to the first
   one's (coadds are normally all in nJy).
3. **Coverage** -- ``NoWorkFound`` (not an error) when no patch overlaps, or when the covered
   fraction of the science image is below ``requiredTemplateFraction``.
4. **Warp** -- :func:`tasks.warp.warp_exposure` resamples the tract-frame template onto the science
   WCS and box (``warpingKernelName``, Lanczos3; the WCS evaluated on a coarse grid), mapping the
   PSF into the science frame -> ``goodSeeingDiff_templateExp``.

``run(tractInfo, patchList, skyCorners, availableCoaddRefs, ...)`` is the algorithm (as in LSST);
``availableCoaddRefs`` maps patch ids to coadd exposures or deferred handles (read with a
``bbox`` parameter, so only the overlapping part of each patch is loaded).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from butler.exposure import Exposure
from butler.geometry import Box
from butler.masks import add_plane
from butler.skymap import PatchInfo, SkyMap, TractInfo
from pipeline.config import Field
from pipeline.connections import Input, Output, PipelineTaskConnections, PrerequisiteInput
from pipeline.errors import NoWorkFound
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct

from .errors import BandMismatchError, with_data_id
from .subtract import template_coverage
from .utils import merge_mask_planes, remap_mask

__all__ = [
    "GetTemplateConnections",
    "GetCoaddAsTemplateConfig",
    "GetCoaddAsTemplateTask",
    "select_tract",
    "assemble_tract_template",
]

_log = logging.getLogger(__name__)

VISIT_DETECTOR = ("instrument", "visit", "detector")


class GetTemplateConnections(
    PipelineTaskConnections,
    dimensions=("instrument", "visit", "detector", "skymap"),
    defaultTemplates={"coaddName": "deep", "diffName": "goodSeeing"},
):
    skyMap = PrerequisiteInput(  # noqa: N815
        name="skyMap", storageClass="SkyMap", dimensions=("skymap",), doc="The skymap of the coadds"
    )
    calexp = Input(
        name="calexp", storageClass="Exposure", dimensions=VISIT_DETECTOR,
        doc="Science exposure (its WCS and box define the template's frame)",
    )
    coaddExposures = Input(  # noqa: N815
        name="{coaddName}Coadd",
        storageClass="Exposure",
        dimensions=("skymap", "tract", "patch", "band"),
        multiple=True,
        deferLoad=True,
        doc="Coadd patches overlapping the science exposure (spatial join)",
    )
    template = Output(
        name="{diffName}Diff_templateExp", storageClass="Exposure", dimensions=VISIT_DETECTOR,
        doc="Template warped to the science exposure's WCS and box",
    )


class GetCoaddAsTemplateConfig(PipelineTaskConfig, pipelineConnections=GetTemplateConnections):
    """Configuration of :class:`GetCoaddAsTemplateTask`."""

    templateBorderSize: int = Field(20, description="Pixels added around the science box in the tract frame")
    requiredTemplateFraction: float = Field(
        0.1, description="NoWorkFound when the template covers less than this fraction of the science image"
    )
    warpingKernelName: str = Field("lanczos3", description="Warping kernel: lanczos3, bicubic or bilinear")
    warpGridStep: int = Field(32, description="Spacing of the exact WCS evaluations of the warp, pixels")
    warpVariance: str = Field(
        "interpolated",
        description="Warped variance: 'interpolated' (the smooth variance field; right once the template "
        "is convolved with the matching kernel) or 'squared' (exact per-pixel variance of the warp)",
    )

    def validate(self) -> None:
        super().validate()
        if self.templateBorderSize < 0:
            raise ValueError("templateBorderSize must be >= 0")
        if not 0.0 <= self.requiredTemplateFraction <= 1.0:
            raise ValueError("requiredTemplateFraction must be in [0, 1]")
        if self.warpVariance not in ("interpolated", "squared"):
            raise ValueError(f"warpVariance must be 'interpolated' or 'squared', not {self.warpVariance!r}")


def _science_centre(wcs: WCS, bbox: Box) -> tuple[float, float]:
    cx, cy = bbox.center
    ra, dec = wcs.all_pix2world(np.array([cx]), np.array([cy]), 0)
    return float(ra[0]), float(dec[0])


def select_tract(skyMap: SkyMap, tractIds: Sequence[int], ra: float, dec: float) -> tuple[TractInfo, str]:  # noqa: N803
    """The tract for a science image centred at ``(ra, dec)`` among those with coadds.

    Returns the tract and a sentence saying why it was chosen (for the log).
    """
    available = sorted({int(t) for t in tractIds})
    if not available:
        raise NoWorkFound("no coadd patch overlaps the science exposure")
    try:
        owner = skyMap.find_tract(ra, dec)
    except Exception:  # noqa: BLE001 - SkyMapError: the centre is in no tract's inner region
        owner = None
    if owner is not None and owner.tract_id in available:
        why = (
            f"tract {owner.tract_id}: its inner region holds the science centre"
            + (f" (tracts with coadds: {available})" if len(available) > 1 else "")
        )
        return owner, why
    centre = SkyCoord(ra, dec, unit="deg")
    dists = []
    for tract_id in available:
        tra, tdec = skyMap[tract_id].ctr_coord
        dists.append((centre.separation(SkyCoord(tra, tdec, unit="deg")).deg, tract_id))
    dists.sort()
    best = dists[0][1]
    why = f"tract {best}: the closest centre ({60 * dists[0][0]:.1f} arcmin) among tracts with coadds {available}"
    return skyMap[best], why


def _read(handle: Any, box: Box) -> Exposure:
    """The part ``box`` of a coadd given as an Exposure or a deferred handle."""
    if isinstance(handle, Exposure):
        overlap = handle.bbox.intersection(box)
        return handle.subexposure(overlap)
    try:
        return handle.get(parameters={"bbox": box})
    except Exception:  # noqa: BLE001 - the stored box may differ from the patch's outer box
        exposure = handle.get()
        return exposure.subexposure(exposure.bbox.intersection(box))


def assemble_tract_template(
    region: Box,
    patches: Sequence[PatchInfo],
    coadds: Mapping[int, Any],
    *,
    log: logging.Logger | None = None,
) -> tuple[Exposure, dict[str, Any]]:
    """Copy coadd pixels into one tract-frame exposure covering ``region`` (no resampling).

    Inner boxes first, then outer borders where still empty (see the module docstring).

    Parameters
    ----------
    region : Box
        Tract-frame box to fill.
    patches : sequence of PatchInfo
        Patches of one tract.
    coadds : mapping of int to Exposure or handle
        Coadd per patch sequential index (patches without one are skipped).

    Returns
    -------
    template : Exposure
        NaN + ``NO_DATA`` where nothing covers; WCS, PSF, calibration and band of the coadds (the
        PSF of the patch contributing most pixels).
    info : dict
        ``pixels_per_patch``, ``psf_patch``, ``covered_fraction`` (of ``region``).
    """
    log = log or _log
    image = np.full(region.shape, np.nan, dtype=np.float32)
    variance = np.full(region.shape, np.nan, dtype=np.float32)
    mask = np.zeros(region.shape, dtype=np.int32)
    filled = np.zeros(region.shape, dtype=bool)
    planes: dict[str, int] | None = None
    reference: Exposure | None = None
    counts: dict[int, int] = {}
    cache: dict[int, Exposure] = {}
    order = [p for p in patches if p.sequential_index in coadds]
    for p in patches:
        if p.sequential_index not in coadds:
            log.warning("patch %d of tract %d overlaps but has no coadd; its area may be empty", p.sequential_index, p.tract_id)

    def load(patch: PatchInfo) -> Exposure | None:
        idx = patch.sequential_index
        if idx not in cache:
            box = patch.outer_bbox.intersection(region)
            if box.is_empty:
                return None
            cache[idx] = _read(coadds[idx], box)
        return cache[idx]

    for stage in ("inner", "outer"):
        for patch in order:
            box = (patch.inner_bbox if stage == "inner" else patch.outer_bbox).intersection(region)
            if box.is_empty:
                continue
            coadd = load(patch)
            if coadd is None:
                continue
            box = box.intersection(coadd.bbox)
            if box.is_empty:
                continue
            if reference is None:
                reference = coadd
                planes = dict(coadd.mask_planes)
                add_plane(planes, "NO_DATA")
            elif reference.band is not None and coadd.band is not None and coadd.band != reference.band:
                raise BandMismatchError(f"coadd patches in bands {reference.band!r} and {coadd.band!r}")
            assert planes is not None
            merge_mask_planes(planes, coadd.mask_planes)
            src = box.slices(coadd.bbox)
            dst = box.slices(region)
            img = coadd.image[src]
            var = coadd.variance[src]
            msk = coadd.mask[src]
            good = np.isfinite(img) & np.isfinite(var)
            if "NO_DATA" in coadd.mask_planes:
                good &= (msk & coadd.get_plane_bitmask("NO_DATA")) == 0
            take = good & ~filled[dst]
            if not take.any():
                continue
            scale = 1.0
            if reference.photo_calib is not None and coadd.photo_calib is not None:
                scale = coadd.photo_calib.calibration / reference.photo_calib.calibration
            sub_img = image[dst]
            sub_var = variance[dst]
            sub_msk = mask[dst]
            sub_img[take] = img[take] * np.float32(scale)
            sub_var[take] = var[take] * np.float32(scale**2)
            sub_msk[take] = remap_mask(msk, coadd.mask_planes, planes)[take]
            filled[dst] |= take
            counts[patch.sequential_index] = counts.get(patch.sequential_index, 0) + int(np.count_nonzero(take))
    if reference is None or planes is None:
        raise NoWorkFound(f"none of the {len(patches)} overlapping patches has coadd pixels in tract box {region}")
    no_data = np.int32(1 << planes["NO_DATA"])
    mask[~filled] |= no_data
    psf_patch = max(counts, key=lambda k: counts[k]) if counts else order[0].sequential_index
    psf_source = cache.get(psf_patch, reference)
    template = Exposure(
        image,
        mask,
        variance,
        xy0=(region.x0, region.y0),
        wcs=reference.wcs,
        psf=psf_source.psf,
        photo_calib=reference.photo_calib,
        visit_info=None,
        band=reference.band,
        mask_planes=planes,
        metadata={"TEMPLATE_PATCHES": sorted(counts), "TEMPLATE_PSF_PATCH": int(psf_patch)},
    )
    info = {
        "pixels_per_patch": {int(k): int(v) for k, v in counts.items()},
        "psf_patch": int(psf_patch),
        "covered_fraction": float(np.count_nonzero(filled)) / float(region.area),
    }
    return template, info


class GetCoaddAsTemplateTask(PipelineTask):
    """Build the template of one visit-detector from the coadd patches that overlap it."""

    ConfigClass = GetCoaddAsTemplateConfig
    _DefaultName = "getTemplate"

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        inputs = butlerQC.get(inputRefs)
        data_id = butlerQC.dataId
        try:
            result = self.getTemplate(inputs["calexp"], inputs["skyMap"], inputs["coaddExposures"])
        except Exception as exc:  # noqa: BLE001 - re-raised with the data ID
            raise with_data_id(exc, data_id) from exc
        except BaseException as exc:  # NoWorkFound
            new = with_data_id(exc, data_id)
            if new is exc:
                raise
            raise new from exc
        butlerQC.put(Struct(template=result.exposure), outputRefs)

    def getTemplate(self, calexp: Exposure, skyMap: SkyMap, coaddExposures: Sequence[Any]) -> Struct:  # noqa: N802, N803
        """Choose the tract, gather its patches and call :meth:`run` (what ``runQuantum`` does).

        Parameters
        ----------
        calexp : Exposure
            The science exposure (WCS and box).
        skyMap : SkyMap
        coaddExposures : sequence of handles
            Deferred coadd handles (or objects with ``dataId`` and ``get``), any tracts.
        """
        if calexp.wcs is None:
            raise ValueError("the science exposure has no WCS; cannot place it on the skymap")
        ra, dec = _science_centre(calexp.wcs, calexp.bbox)
        by_tract: dict[int, dict[int, Any]] = {}
        for handle in coaddExposures:
            did = handle.dataId
            by_tract.setdefault(int(did["tract"]), {})[int(did["patch"])] = handle
        tract, why = select_tract(skyMap, list(by_tract), ra, dec)
        self.log.info("template from %s", why)
        self.metadata["tract"] = tract.tract_id
        self.metadata["tractChoice"] = why
        refs = by_tract[tract.tract_id]
        patch_list = [tract.get_patch_info(p) for p in sorted(refs)]
        ras, decs = calexp.sky_corners()
        return self.run(
            tract,
            patch_list,
            list(zip(np.asarray(ras, float).tolist(), np.asarray(decs, float).tolist(), strict=True)),
            refs,
            scienceWcs=calexp.wcs,
            scienceBBox=calexp.bbox,
            band=calexp.band,
        )

    def run(
        self,
        tractInfo: TractInfo,  # noqa: N803
        patchList: Sequence[PatchInfo],  # noqa: N803
        skyCorners: Sequence[tuple[float, float]],  # noqa: N803
        availableCoaddRefs: Mapping[int, Any],  # noqa: N803
        *,
        scienceWcs: WCS | None = None,  # noqa: N803
        scienceBBox: Box | None = None,  # noqa: N803
        band: str | None = None,
    ) -> Struct:
        """Assemble the template in the tract frame and (optionally) warp it to the science frame.

        Parameters
        ----------
        tractInfo : TractInfo
            The chosen tract.
        patchList : sequence of PatchInfo
            Its patches that overlap the science exposure.
        skyCorners : sequence of (ra, dec)
            Corners of the science exposure, degrees.
        availableCoaddRefs : mapping of int to Exposure or deferred handle
            Coadd per patch sequential index.
        scienceWcs, scienceBBox : optional
            The science frame: when given, the template is warped onto it.
        band : str, optional
            The science band: coadds of another band raise :class:`BandMismatchError`.

        Returns
        -------
        Struct
            ``exposure`` (the template: in the science frame when ``scienceWcs`` is given, else in
            the tract frame), ``coaddExposure`` (tract frame), ``coveredFraction``,
            ``tractId``, ``patches`` (patch ids used).

        Raises
        ------
        NoWorkFound
            Nothing overlaps, or the coverage is below ``requiredTemplateFraction``.
        """
        cfg = self.config
        corners = np.asarray(skyCorners, dtype=np.float64)
        if corners.ndim != 2 or corners.shape[1] != 2 or corners.shape[0] < 3:
            raise ValueError(f"skyCorners must be a list of (ra, dec) pairs, got shape {corners.shape}")
        px, py = tractInfo.sky_to_pixel(corners[:, 0], corners[:, 1])
        if not (np.all(np.isfinite(px)) and np.all(np.isfinite(py))):
            raise NoWorkFound(f"the science exposure is on the far side of tract {tractInfo.tract_id}")
        b = cfg.templateBorderSize
        region = Box.from_corners(
            int(math.floor(px.min())) - b, int(math.floor(py.min())) - b,
            int(math.ceil(px.max())) + 1 + b, int(math.ceil(py.max())) + 1 + b,
        ).intersection(tractInfo.bbox)
        if region.is_empty:
            raise NoWorkFound(f"the science exposure does not overlap tract {tractInfo.tract_id}")
        patches = [p for p in patchList if p.outer_bbox.overlaps(region)]
        if not patches:
            raise NoWorkFound(f"no patch of tract {tractInfo.tract_id} overlaps the science exposure")
        coadd, info = assemble_tract_template(region, patches, availableCoaddRefs, log=self.log)
        if band is not None and coadd.band is not None and coadd.band != band:
            raise BandMismatchError(
                f"the coadds are in band {coadd.band!r} but the science exposure is in band {band!r}"
            )
        self.metadata["tractBox"] = region.to_list()
        self.metadata["pixelsPerPatch"] = {str(k): v for k, v in info["pixels_per_patch"].items()}
        self.metadata["psfPatch"] = info["psf_patch"]
        self.metadata["coveredFractionTract"] = info["covered_fraction"]
        self.log.info(
            "tract %d box %s from patches %s (%.1f%% covered)",
            tractInfo.tract_id, region, sorted(info["pixels_per_patch"]), 100 * info["covered_fraction"],
        )
        if info["covered_fraction"] == 0.0:
            raise NoWorkFound("the coadd patches have no data where the science exposure lies")
        exposure = coadd
        covered = info["covered_fraction"]
        if scienceWcs is not None and scienceBBox is not None:
            from tasks.warp import warp_exposure

            with self.timer("warp"):
                exposure = warp_exposure(
                    coadd, scienceWcs, scienceBBox, method=cfg.warpingKernelName, grid_step=cfg.warpGridStep,
                    variance=cfg.warpVariance,
                )
            covered = template_coverage(exposure, scienceBBox)
            exposure.metadata["TEMPLATE_TRACT"] = tractInfo.tract_id
            exposure.metadata["TEMPLATE_COVERAGE"] = covered
        self.metadata["coveredFraction"] = covered
        if covered < cfg.requiredTemplateFraction:
            raise NoWorkFound(
                f"the template covers {100 * covered:.1f}% of the science exposure, below "
                f"requiredTemplateFraction={cfg.requiredTemplateFraction:g}"
            )
        return Struct(
            exposure=exposure,
            template=exposure,
            coaddExposure=coadd,
            coveredFraction=covered,
            tractId=tractInfo.tract_id,
            patches=sorted(info["pixels_per_patch"]),
        )
