"""DetectCoaddSourcesTask: detect and measure sources on a patch's coadd -> ``deepCoadd_ref``.

One quantum per (skymap, tract, patch), as LSST's ``deepCoadd_ref`` (the patch's reference catalog,
one for all bands, which forced photometry measures in every band).  LSST gets there in four steps
(``detectCoaddSources`` per band, ``mergeCoaddDetections``, ``deblendCoaddSources``,
``measureCoaddSources`` and ``mergeCoaddMeasurements``); here detection and measurement run on one
*reference band*: the first of ``priorityList`` that has a coadd (LSST's merge priority).

Detection and measurement reuse the ``src`` machinery (:func:`tasks.simulation.detect_and_measure`:
photutils segmentation of the PSF-smoothed image, peaks as sources, windowed centroids, PSF flux
with the coadd PSF, Gaussian-weighted second moments), on the coadd after an optional photutils
``Background2D`` subtraction (the coadd keeps what is left of each visit's background).

Columns (see :mod:`butler.catalog`; fluxes in nJy, the coadd's unit):
``id, coord_ra, coord_dec, x, y, xErr, yErr, psfFlux, psfFluxErr, apFlux, apFluxErr`` (radius
``apertureRadius``), ``apFlux_<r>_<f>`` / ``...Err`` for each of ``apertureRadii`` (e.g.
``apFlux_6_0`` for 6 px), ``ixx, iyy, ixy, snr, parent, band``, the ``pixelFlags_*`` of ``src``
plus ``pixelFlags_nodata`` and ``pixelFlags_clipped``, and ``detect_isPatchInner``,
``detect_isTractInner`` and ``detect_isPrimary`` (inner patch and inner tract: each object is
primary in exactly one patch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.table import Table

from butler.exposure import Exposure
from butler.skymap import SkyMap
from pipeline.config import Field
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.errors import NoWorkFound
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from pipeline.task import timeMethod

from .assemble import COADD_DIMENSIONS

__all__ = ["DetectCoaddSourcesConnections", "DetectCoaddSourcesConfig", "DetectCoaddSourcesTask", "PATCH_DIMENSIONS"]

PATCH_DIMENSIONS = ("tract", "patch", "skymap")


class DetectCoaddSourcesConnections(
    PipelineTaskConnections, dimensions=PATCH_DIMENSIONS, defaultTemplates={"coaddName": "deep"}
):
    coadds = Input(
        name="{coaddName}Coadd",
        storageClass="Exposure",
        dimensions=COADD_DIMENSIONS,
        multiple=True,
        doc="The patch's coadds, one per band",
    )
    skyMap = Input(name="skyMap", storageClass="SkyMap", dimensions=("skymap",), doc="The skymap")
    refCat = Output(
        name="{coaddName}Coadd_ref",
        storageClass="SourceCatalog",
        dimensions=PATCH_DIMENSIONS,
        doc="Sources detected and measured on the reference band's coadd",
    )


class DetectCoaddSourcesConfig(PipelineTaskConfig, pipelineConnections=DetectCoaddSourcesConnections):
    """Configuration of :class:`DetectCoaddSourcesTask`."""

    thresholdValue: float = Field(5.0, description="Detection threshold, sigma of the PSF-smoothed image")
    priorityList: list[str] = Field(
        default_factory=lambda: ["i", "r", "z", "y", "g", "u"],
        description="Reference band: the first of these with a coadd (else the first band available)",
    )
    apertureRadius: float = Field(12.0, description="Radius of apFlux, pixels")
    apertureRadii: list[float] = Field(
        default_factory=lambda: [3.0, 6.0, 9.0, 12.0], description="Radii of the apFlux_<r> columns, pixels"
    )
    doSubtractBackground: bool = Field(True, description="Subtract a photutils Background2D before detecting")
    doScaleDetectionVariance: bool = Field(
        True,
        description="Scale the variance so that the PSF-smoothed image has unit significance scatter (coadd pixels "
        "are correlated: per-pixel variances under-predict the smoothed noise); also applied to flux errors",
    )
    backgroundBoxSize: int = Field(128, description="Background2D box size, pixels (at most a third of the patch)")


class DetectCoaddSourcesTask(PipelineTask):
    """Detect and measure sources on a coadd (see the module docstring)."""

    ConfigClass = DetectCoaddSourcesConfig
    _DefaultName = "detectCoaddSources"

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        inputs = butlerQC.get(inputRefs)
        data_id = butlerQC.dataId
        outputs = self.run(inputs["coadds"], inputs["skyMap"], tract=data_id["tract"], patch=data_id["patch"])
        butlerQC.put(outputs, outputRefs)

    def reference_coadd(self, coadds: Sequence[Exposure]) -> Exposure:
        """The coadd of the first band of ``priorityList`` present (else the first coadd)."""
        by_band = {c.band: c for c in coadds}
        for band in self.config.priorityList:
            if band in by_band:
                return by_band[band]
        return coadds[0]

    @timeMethod
    def run(
        self,
        coadds: Sequence[Exposure],
        skyMap: SkyMap | None = None,  # noqa: N803
        tract: int | None = None,
        patch: int | None = None,
    ) -> Struct:
        """Detect and measure on the reference band's coadd.

        Parameters
        ----------
        coadds : sequence of Exposure
            The patch's coadds (one per band).
        skyMap : SkyMap, optional
            With ``tract`` and ``patch``: sets the ``detect_is*`` flags and the id base.
        tract, patch : int, optional

        Returns
        -------
        Struct
            ``refCat`` (astropy Table).
        """
        from tasks.simulation.measure import detect_and_measure

        if not coadds:
            raise NoWorkFound("no coadds to detect on")
        cfg = self.config
        coadd = self.reference_coadd(list(coadds))
        if coadd.psf is None:
            raise ValueError(f"the {coadd.band} coadd {coadd.bbox} has no PSF; detection needs one")
        work = coadd.copy()
        if cfg.doSubtractBackground:
            with self.timer("background"):
                work.image -= self._background(work)
        scale = 1.0
        if cfg.doScaleDetectionVariance:
            scale = self._detection_variance_scale(work)
            work.variance *= np.float32(scale)
        id_base = 0 if tract is None or patch is None else (int(tract) * 10_000 + int(patch)) * 10_000_000
        with self.timer("detectAndMeasure"):
            catalog = detect_and_measure(
                work, threshold=cfg.thresholdValue, aperture_radius=cfg.apertureRadius, id_base=id_base,
                set_detected_mask=False,
            )
        self._add_columns(catalog, work, skyMap, tract, patch)
        catalog.meta.update(
            {"band": coadd.band, "tract": tract, "patch": patch, "fluxUnit": "nJy", "detectionVarianceScale": scale}
        )
        self.log.info(
            "%d sources on the %s coadd of tract %s patch %s (%d primary)",
            len(catalog), coadd.band, tract, patch, int(np.count_nonzero(catalog["detect_isPrimary"])),
        )
        self.metadata.update({"nSources": len(catalog), "band": coadd.band, "detectionVarianceScale": scale})
        return Struct(refCat=catalog)

    def _detection_variance_scale(self, exposure: Exposure) -> float:
        """Factor for the variance that makes ``(image (x) g) / sqrt(variance (x) g^2)`` unit-scatter.

        ``g`` is a Gaussian of the PSF's sigma (the detection filter).  The scatter is measured on
        the lower half of the distribution (median minus the 15.9th percentile), which sources do
        not reach.  Never below 1 (the variance plane is not reduced).
        """
        from scipy import ndimage

        from butler.psf import SIGMA_TO_FWHM

        cx, cy = exposure.bbox.center
        sigma = float(exposure.psf.fwhm(cx, cy)) / SIGMA_TO_FWHM
        good = np.isfinite(exposure.image) & np.isfinite(exposure.variance)
        good &= (exposure.mask & exposure.get_plane_bitmask("NO_DATA")) == 0
        if np.count_nonzero(good) < 1000:
            return 1.0
        radius = int(math.ceil(3.0 * sigma))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps /= taps.sum()

        def smooth(a: np.ndarray, t: np.ndarray) -> np.ndarray:
            return ndimage.correlate1d(ndimage.correlate1d(a, t, axis=0, mode="constant"), t, axis=1, mode="constant")

        image = np.where(good, exposure.image, 0.0).astype(np.float32)
        var = np.where(good, exposure.variance, 0.0).astype(np.float32)
        sm = smooth(image, taps)
        sv = smooth(var, taps**2)
        inner = ndimage.binary_erosion(good, iterations=radius)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = (sm / np.sqrt(sv))[inner & (sv > 0)]
        if snr.size < 1000:
            return 1.0
        spread = float(np.median(snr) - np.percentile(snr, 15.865))
        return max(1.0, spread * spread)

    def _background(self, exposure: Exposure) -> np.ndarray:
        from astropy.stats import SigmaClip
        from photutils.background import Background2D, MedianBackground

        height, width = exposure.shape
        box = int(max(16, min(self.config.backgroundBoxSize, height // 3, width // 3)))
        no_data = ((exposure.mask & exposure.get_plane_bitmask("NO_DATA")) != 0) | ~np.isfinite(exposure.image)
        if no_data.all():
            return np.zeros(exposure.shape, np.float32)
        data = np.where(no_data, 0.0, exposure.image)
        try:
            bkg = Background2D(
                data, box, filter_size=3, mask=no_data, sigma_clip=SigmaClip(sigma=3.0),
                bkg_estimator=MedianBackground(), exclude_percentile=50.0,
            )
        except ValueError as exc:
            # Too few pixels with data per box (a patch barely covered): one clipped median.
            from astropy.stats import sigma_clipped_stats

            level = float(sigma_clipped_stats(exposure.image[~no_data], sigma=3.0)[1])
            self.log.info("Background2D failed (%s); subtracting a constant %.3g instead", exc, level)
            return np.full(exposure.shape, level, np.float32)
        return np.asarray(bkg.background, dtype=np.float32)

    def _add_columns(
        self, catalog: Table, coadd: Exposure, skyMap: SkyMap | None, tract: int | None, patch: int | None
    ) -> None:
        from photutils.aperture import CircularAperture, aperture_photometry

        n = len(catalog)
        x0, y0 = coadd.xy0
        xs = np.asarray(catalog["x"], float)
        ys = np.asarray(catalog["y"], float)
        catalog["band"] = np.full(n, coadd.band or "", dtype="U8")
        image = np.where(np.isfinite(coadd.image), coadd.image, 0.0)
        error = np.sqrt(np.where(np.isfinite(coadd.variance), coadd.variance, 0.0))
        calib = coadd.photo_calib.calibration if coadd.photo_calib is not None else 1.0
        height, width = coadd.shape
        for radius in self.config.apertureRadii:
            name = f"apFlux_{int(radius)}_{int(round(10 * (radius - int(radius))))}"
            flux = np.full(n, np.nan)
            err = np.full(n, np.nan)
            if n:
                phot = aperture_photometry(image, CircularAperture(np.column_stack([xs - x0, ys - y0]), r=radius), error=error)
                flux = np.asarray(phot["aperture_sum"], float) * calib
                err = np.asarray(phot["aperture_sum_err"], float) * calib
            off = (xs - x0 - radius < -0.5) | (ys - y0 - radius < -0.5) | (xs - x0 + radius > width - 0.5) | (ys - y0 + radius > height - 0.5)
            catalog[name] = flux
            catalog[name + "Err"] = err
            catalog[name + "_flag"] = off | ~np.isfinite(flux)
        ix = np.clip(np.rint(xs - x0).astype(int), 0, width - 1) if n else np.zeros(0, int)
        iy = np.clip(np.rint(ys - y0).astype(int), 0, height - 1) if n else np.zeros(0, int)
        bits = np.zeros(n, np.int64)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                bits |= coadd.mask[np.clip(iy + dy, 0, height - 1), np.clip(ix + dx, 0, width - 1)]
        for plane, column in (("NO_DATA", "pixelFlags_nodata"), ("CLIPPED", "pixelFlags_clipped")):
            catalog[column] = (bits & (1 << coadd.mask_planes[plane])) != 0 if plane in coadd.mask_planes else np.zeros(n, bool)
        catalog["pixelFlags_edge"] = np.asarray(catalog["pixelFlags_edge"], bool) | np.asarray(catalog["pixelFlags_nodata"], bool)
        patch_inner = np.ones(n, bool)
        tract_inner = np.ones(n, bool)
        if skyMap is not None and tract is not None and patch is not None and n:
            tract_info = skyMap[tract]
            inner = tract_info.get_patch_info(patch).inner_bbox
            patch_inner = (xs >= inner.x0 - 0.5) & (xs < inner.x1 - 0.5) & (ys >= inner.y0 - 0.5) & (ys < inner.y1 - 0.5)
            ra = np.asarray(catalog["coord_ra"], float)
            dec = np.asarray(catalog["coord_dec"], float)
            tract_inner = np.array([skyMap.find_tract(r, d).tract_id == tract for r, d in zip(ra, dec, strict=True)], bool) if len(skyMap.tract_ids) > 1 else np.ones(n, bool)
        catalog["detect_isPatchInner"] = patch_inner
        catalog["detect_isTractInner"] = tract_inner
        catalog["detect_isPrimary"] = patch_inner & tract_inner
