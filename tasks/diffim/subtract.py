"""ImageDifferenceTask (label ``subtractImages``): PSF-match a template to a science image and subtract.

After ``lsst.ip.diffim.AlardLuptonSubtractTask`` (and the older ``lsst.pipe.tasks.imageDifference``):

1. checks: both images have PSFs, the same band, and the template covers the science box in the
   science pixel frame (a template in another frame is warped with :func:`tasks.warp.warp_exposure`);
   a template covering less than ``requiredTemplateFraction`` of the science image raises
   ``NoWorkFound``;
2. mode ``auto`` convolves whichever image has the narrower PSF (mean FWHM over the science box):
   normally the template (``convolveTemplate``: ``D = S - (T (x) K + b)``), the science image when it
   is the sharper one (``convolveScience``: ``D = (S (x) K - (T - b)) / kappa`` with
   ``S (x) K + b ~= T``, so ``D`` stays in the science image's flux units, transients positive);
   the choice is logged and recorded in the metadata (``convolvedImage``); mode ``crossConvolve``
   convolves each image with the other's PSF model for the kernel fit and makes the difference
   with ZOGY's whitening filters (:mod:`.cross_convolve`; ``convolvedImage`` ``"both"``), for PSFs
   of different shapes;
3. the kernel comes from :class:`~tasks.diffim.make_kernel.MakeKernelTask` (kernel candidates from
   the science ``src`` catalog) and is applied cell by cell with FFTs
   (:func:`tasks.psfmatch.convolve_exposure`): image, variance (``V (x) K^2``) and mask (bits
   grown by the kernel; ``NO_DATA`` where non-finite input reached, ``EDGE`` on the border);
   with ``doScaleToKernelSources`` the matched template is then rescaled so that the kernel
   sources' PSF fluxes on the difference average zero (:mod:`.flux_scale`; the kernel returned is
   rescaled with it, and with the science image convolved so is ``kappa``);
4. optional decorrelation (:mod:`.decorrelate`, LSST's default) whitens the difference noise; the
   variance plane is then ``V_u (x) phi^2 + V_c (x) (phi (x) K)^2``;
5. the difference carries the science WCS, calibration and visit info and the PSF its transients
   have: ``science.psf`` with the template convolved, ``science.psf (x) K / sum(K)`` with the science
   image convolved (:mod:`.difference_psf`; LSST uses the template's PSF model there, which biases
   PSF fluxes wherever the model is not what the kernel turned the science PSF into), convolved
   with ``phi`` when decorrelated;
   ``NO_DATA`` pixels are NaN.

Kernel diagnostics (candidates used and rejected, kernel sums, condition numbers, the normalized
residual of the difference on blank sky) go to the task metadata; with ``doWriteDebugPlots`` PNG
displays of the kernel basis, the kernel mosaic, the candidates and the spatial model are written.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from butler.exposure import Exposure
from butler.geometry import Box
from butler.masks import add_plane
from pipeline.config import ConfigurableField, Field
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.errors import NoWorkFound
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from tasks.psfmatch import SpatialKernel, convolve_exposure

from .decorrelate import convolve_kernels, decorrelation_kernel
from .cross_convolve import convolve_with_image, psf_image_at_centre, zogy_filters
from .difference_psf import convolved_psf
from .errors import BandMismatchError, TemplateGeometryError, with_data_id
from .flux_scale import kernel_source_flux_scale
from .make_kernel import MakeKernelTask, psf_fwhm_over_box, require_psf
from .utils import clipped_std, convolve_constant, good_pixels, merge_mask_planes, plane_bits, remap_mask

__all__ = [
    "ImageDifferenceConnections",
    "ImageDifferenceConfig",
    "ImageDifferenceTask",
    "template_coverage",
    "check_template_geometry",
]

_log = logging.getLogger(__name__)

VISIT_DETECTOR = ("instrument", "visit", "detector")

#: Mask planes that make a pixel unusable for residual statistics.
_STATS_BAD_PLANES = ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "SUSPECT", "DETECTED", "DETECTED_NEGATIVE")
#: Mask planes left out of the typical variance of an image (noise of the empty sky).
_NOISE_BAD_PLANES = ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "INTRP", "DETECTED")


class ImageDifferenceConnections(
    PipelineTaskConnections,
    dimensions=VISIT_DETECTOR,
    defaultTemplates={"diffName": "goodSeeing"},
):
    template = Input(
        name="{diffName}Diff_templateExp",
        storageClass="Exposure",
        dimensions=VISIT_DETECTOR,
        doc="Template warped to the science image's WCS and box (getTemplate)",
    )
    science = Input(name="calexp", storageClass="Exposure", dimensions=VISIT_DETECTOR, doc="Science exposure")
    sources = Input(
        name="src", storageClass="SourceCatalog", dimensions=VISIT_DETECTOR, doc="Science sources: kernel candidates"
    )
    subtractedExposure = Output(  # noqa: N815 - LSST's name
        name="{diffName}Diff_differenceExp",
        storageClass="Exposure",
        dimensions=VISIT_DETECTOR,
        doc="Difference image (science minus PSF-matched template), science flux units",
    )
    matchedExposure = Output(  # noqa: N815
        name="{diffName}Diff_matchedExp",
        storageClass="Exposure",
        dimensions=VISIT_DETECTOR,
        doc="The template as subtracted: convolved (and background-added) when the template is convolved",
    )


class ImageDifferenceConfig(PipelineTaskConfig, pipelineConnections=ImageDifferenceConnections):
    """Configuration of :class:`ImageDifferenceTask`."""

    mode: str = Field(
        "auto",
        description="'auto', 'convolveTemplate', 'convolveScience' or 'crossConvolve' (each image first convolved "
        "with the other's PSF model, for PSFs that differ in shape: tasks.diffim.cross_convolve)",
    )
    makeKernel = ConfigurableField(target=MakeKernelTask, doc="PSF-matching kernel fit")
    doDecorrelation: bool = Field(True, description="Whiten the difference noise (LSST's afterburner)")
    decorrelationKernelScale: float = Field(
        2.0, description="Decorrelation kernel size, in units of the matching kernel size (made odd)"
    )
    requiredTemplateFraction: float = Field(
        0.1, description="Raise NoWorkFound when the template covers less than this fraction of the science image"
    )
    doWarpTemplate: bool = Field(
        True, description="Warp a template that is not in the science pixel frame (otherwise raise)"
    )
    warpingKernelName: str = Field("lanczos3", description="Warping kernel for doWarpTemplate")
    doScaleToKernelSources: bool = Field(
        True,
        description="Rescale the matched template so that the kernel sources' PSF fluxes on the difference average "
        "zero (tasks.diffim.flux_scale): the kernel sum alone scattered by 0.8% rms between visit-detectors of the "
        "demo survey",
    )
    maxFluxScaleCorrection: float = Field(
        0.05, description="A measured flux-scale correction larger than this fraction is not applied (warning)"
    )
    doScaleVariance: bool = Field(
        False, description="Rescale the difference variance so its blank-sky normalized residual std is 1"
    )
    doUseMatchedSciencePsf: bool = Field(
        True,
        description="With the science image convolved, give the difference the PSF its transients have, the science "
        "PSF convolved with the normalized kernel (tasks.diffim.difference_psf); False gives it the template's PSF "
        "model, as LSST does, which biases PSF fluxes wherever the kernel cannot turn one PSF into the other",
    )
    fftWorkers: int | None = Field(None, description="Threads for scipy.fft in the convolutions (None: scipy default)")
    convolutionCellSize: int = Field(512, description="Cell size of the FFT convolutions, pixels")
    residualStatsStep: int = Field(4, description="Subsampling step of the blank-sky residual statistics")
    doWriteDebugPlots: bool = Field(False, description="Write PNG displays of the kernel fit (basis, mosaic, candidates, spatial model)")
    debugPlotDir: str = Field("diffim_debug", description="Folder of the debug PNGs (created when needed)")

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("auto", "convolveTemplate", "convolveScience", "crossConvolve"):
            raise ValueError(
                f"mode must be 'auto', 'convolveTemplate', 'convolveScience' or 'crossConvolve', not {self.mode!r}"
            )
        if not 0.0 <= self.requiredTemplateFraction <= 1.0:
            raise ValueError(f"requiredTemplateFraction must be in [0, 1], got {self.requiredTemplateFraction}")
        if self.decorrelationKernelScale <= 0:
            raise ValueError("decorrelationKernelScale must be positive")


def template_coverage(template: Exposure, bbox: Box) -> float:
    """Fraction of ``bbox`` pixels where the template is finite and not ``NO_DATA``."""
    overlap = template.bbox.intersection(bbox)
    if overlap.is_empty:
        return 0.0
    sl = overlap.slices(template.bbox)
    ok = np.isfinite(template.image[sl])
    if "NO_DATA" in template.mask_planes:
        ok &= (template.mask[sl] & template.get_plane_bitmask("NO_DATA")) == 0
    return float(np.count_nonzero(ok)) / float(bbox.area)


def check_template_geometry(template: Exposure, science: Exposure, tolerance: float = 0.05) -> bool:
    """True when the template is in the science pixel frame (WCSs agree to ``tolerance`` pixels).

    Exposures without a WCS are assumed to share the frame.
    """
    if template.wcs is None or science.wcs is None:
        return True
    b = science.bbox
    xs = np.array([b.x0, b.x1 - 1, b.x0, b.x1 - 1, b.center[0]], dtype=float)
    ys = np.array([b.y0, b.y0, b.y1 - 1, b.y1 - 1, b.center[1]], dtype=float)
    ra, dec = science.pixel_to_sky(xs, ys)
    tx, ty = template.sky_to_pixel(ra, dec)
    return bool(np.all(np.hypot(tx - xs, ty - ys) < tolerance))


class ImageDifferenceTask(PipelineTask):
    """PSF-match the template to the science image (or the reverse) and subtract."""

    ConfigClass = ImageDifferenceConfig
    _DefaultName = "subtractImages"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.makeSubtask("makeKernel")

    # ------------------------------------------------------------------ pipeline entry
    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        inputs = butlerQC.get(inputRefs)
        try:
            outputs = self.run(**inputs)
        except Exception as exc:  # noqa: BLE001 - re-raised with the data ID
            raise with_data_id(exc, butlerQC.dataId) from exc
        except BaseException as exc:  # NoWorkFound
            new = with_data_id(exc, butlerQC.dataId)
            if new is exc:
                raise
            raise new from exc
        butlerQC.put(outputs, outputRefs)

    # ------------------------------------------------------------------ algorithm
    def run(self, template: Exposure, science: Exposure, sources: Table) -> Struct:
        """Subtract a PSF-matched template from a science exposure.

        Parameters
        ----------
        template : Exposure
            Template covering the science box (warped to the science WCS; another frame is warped
            here when ``doWarpTemplate``).
        science : Exposure
            Science exposure with PSF, variance and mask.
        sources : astropy.table.Table
            Science sources (``src``): the kernel candidates are chosen among them.

        Returns
        -------
        Struct
            ``subtractedExposure`` (= ``difference``), ``matchedExposure`` (= ``matchedTemplate``:
            the template as subtracted), ``matchedScience`` (the science image as subtracted),
            ``psfMatchingKernel``, ``backgroundModel``, ``kernelSources`` (the candidates' rows of
            ``sources``), ``convolvedImage`` (``"template"`` or ``"science"``), ``decorrelationKernel``
            (or None), ``subtractRes`` (a Struct of the kernel fit: kernel, background, diagnostics,
            basis, candidates), and ``diaSources`` = None (detection is ``detectAndMeasure``).

        Raises
        ------
        MissingPsfError, BandMismatchError, TemplateGeometryError, InsufficientKernelSourcesError,
        KernelSolutionError
            Clear errors for data this algorithm cannot handle.
        NoWorkFound
            The template covers less than ``requiredTemplateFraction`` of the science image.
        """
        t_start = time.perf_counter()
        require_psf(science, "science")
        require_psf(template, "template")
        if template.band is not None and science.band is not None and template.band != science.band:
            raise BandMismatchError(
                f"template band {template.band!r} differs from science band {science.band!r}; "
                "subtract a template of the science image's band"
            )
        template = self._prepareTemplate(template, science)
        fwhm_t = psf_fwhm_over_box(template.psf, science.bbox, self.makeKernel.config.fwhmExposureGrid)
        fwhm_s = psf_fwhm_over_box(science.psf, science.bbox, self.makeKernel.config.fwhmExposureGrid)
        with self.timer("subtract"):
            if self.config.mode == "crossConvolve":
                self.metadata["mode"] = "crossConvolve"
                self.metadata["convolvedImage"] = "both"
                result = self.runCrossConvolve(template, science, sources)
            elif self._chooseConvolvedImage(fwhm_t, fwhm_s):
                result = self.runConvolveTemplate(template, science, sources)
            else:
                result = self.runConvolveScience(template, science, sources)
        self.metadata["fwhmTemplate"] = fwhm_t
        self.metadata["fwhmScience"] = fwhm_s
        self.metadata["elapsed"] = time.perf_counter() - t_start
        if self.config.doWriteDebugPlots:
            self._writeDebugPlots(result, science)
        result.subtractedExposure = result.difference
        result.matchedExposure = result.matchedTemplate
        result.diaSources = None
        return result

    def _chooseConvolvedImage(self, fwhm_t: float, fwhm_s: float) -> bool:  # noqa: N802
        """True to convolve the template; records the decision."""
        mode = self.config.mode
        if mode == "convolveTemplate":
            convolve_template = True
        elif mode == "convolveScience":
            convolve_template = False
        else:
            convolve_template = fwhm_t <= fwhm_s
        which = "template" if convolve_template else "science"
        self.metadata["mode"] = mode
        self.metadata["convolvedImage"] = which
        self.log.info(
            "mode %s: PSF FWHM template %.2f px, science %.2f px: convolving the %s", mode, fwhm_t, fwhm_s, which
        )
        if mode != "auto" and ((fwhm_t > fwhm_s) == convolve_template):
            self.log.warning(
                "mode %s convolves the image with the wider PSF (%.2f px vs %.2f px): the kernel must deconvolve",
                mode, max(fwhm_t, fwhm_s), min(fwhm_t, fwhm_s),
            )
        return convolve_template

    def _prepareTemplate(self, template: Exposure, science: Exposure) -> Exposure:  # noqa: N802
        """The template in the science frame and box; NoWorkFound when it covers too little."""
        if not check_template_geometry(template, science):
            if not self.config.doWarpTemplate:
                raise TemplateGeometryError(
                    "the template is not in the science image's pixel frame (WCSs differ) and doWarpTemplate "
                    "is False; run getTemplate or warp it first"
                )
            try:
                from tasks.warp import warp_exposure
            except ImportError as exc:
                raise TemplateGeometryError(
                    f"the template is not in the science pixel frame and tasks.warp is unavailable ({exc})"
                ) from None
            self.log.info("warping the template to the science WCS (%s)", self.config.warpingKernelName)
            template = warp_exposure(template, science.wcs, science.bbox, method=self.config.warpingKernelName)
        if not template.bbox.contains(science.bbox):
            coverage = template_coverage(template, science.bbox)
            if template.bbox.overlaps(science.bbox):
                template = _pad_to_box(template, science.bbox)
            else:
                raise NoWorkFound(f"the template {template.bbox} does not overlap the science image {science.bbox}")
        elif template.bbox != science.bbox:
            template = template.subexposure(science.bbox)
        coverage = template_coverage(template, science.bbox)
        self.metadata["templateCoverage"] = coverage
        if coverage < self.config.requiredTemplateFraction:
            raise NoWorkFound(
                f"the template covers {100 * coverage:.1f}% of the science image, below "
                f"requiredTemplateFraction={self.config.requiredTemplateFraction:g}"
            )
        return template

    # ------------------------------------------------------------------ the two directions
    def runConvolveTemplate(self, template: Exposure, science: Exposure, sources: Table) -> Struct:  # noqa: N802
        """Convolve the template: ``D = S - (T (x) K + b)``."""
        return self._subtractConvolvedTemplate(template, science, sources)

    def runCrossConvolve(self, template: Exposure, science: Exposure, sources: Table) -> Struct:  # noqa: N802
        """Cross-convolve (:mod:`.cross_convolve`): the kernel ``K`` is fit between ``T (x) P_S`` and
        ``S (x) P_T``; the difference is ``S (x) g_S - T (x) g_T - b`` with ZOGY's whitening filters
        (``K``, ``P_S``, ``P_T`` at the image centre), or without ``doDecorrelation`` the plain
        ``S (x) P_T - (T (x) P_S (x) K + b)``."""
        p_t = psf_image_at_centre(template.psf, science.bbox)
        p_s = psf_image_at_centre(science.psf, science.bbox)
        opts = {"cell_size": self.config.convolutionCellSize, "workers": self.config.fftWorkers}
        with self.timer("crossConvolve"):
            science_x = convolve_with_image(science, p_t, **opts)
            template_x = convolve_with_image(template, p_s, **opts)
        science_x.psf = convolved_psf(science.psf, p_t, science.bbox)
        template_x.psf = convolved_psf(template.psf, p_s, science.bbox)
        if not self.config.doDecorrelation:
            return self._subtractConvolvedTemplate(template_x, science_x, sources, convolved="both")
        with self.timer("makeKernel"):
            kres = self.makeKernel.run(template_x, science_x, sources)
        del science_x, template_x
        kernel: SpatialKernel = kres.psfMatchingKernel
        cx, cy = science.bbox.center
        var_s, var_t = _median_variance(science), _median_variance(template)
        size = self._filterSize(max(kernel.kernel_size, p_s.shape[0], p_t.shape[0]))
        g_s, g_t = zogy_filters(p_s, p_t, kernel.kernel_image(cx, cy), var_s, var_t, size)
        self.metadata["decorrelation"] = {
            "varianceConvolved": var_t, "varianceUnconvolved": var_s, "kernelSize": size, "crossConvolution": True,
        }
        with self.timer("convolve"):
            matched_science = convolve_with_image(science, g_s, **opts)
            matched = convolve_with_image(template, g_t, **opts)
        psf = convolved_psf(science.psf, g_s, science.bbox)
        matched_science.psf = psf
        matched.psf = psf
        matched.photo_calib = science.photo_calib
        matched.metadata["DIFFIM_ROLE"] = "matchedTemplate"
        matched_science.metadata["DIFFIM_ROLE"] = "matchedScience"
        image, mask, variance, planes, kernel = self._subtractMatched(matched_science, matched, kres, kernel)
        difference = self._makeDifference(image, mask, variance, planes, science, psf, kernel, "both", 1.0)
        return Struct(
            difference=difference,
            matchedTemplate=matched,
            matchedScience=matched_science,
            psfMatchingKernel=kernel,
            backgroundModel=kres.backgroundModel,
            kernelSources=_candidate_rows(sources, kres.candidates),
            convolvedImage="both",
            decorrelationKernel=None,
            subtractRes=kres,
        )

    def _subtractConvolvedTemplate(  # noqa: N802
        self,
        template: Exposure,
        science: Exposure,
        sources: Table,
        *,
        convolved: str = "template",
    ) -> Struct:
        """``D = S - (T (x) K + b)``, decorrelated when configured; ``convolved`` names what was convolved."""
        with self.timer("makeKernel"):
            kres = self.makeKernel.run(template, science, sources)
        kernel: SpatialKernel = kres.psfMatchingKernel
        with self.timer("convolve"):
            matched = convolve_exposure(
                template, kernel, cell_size=self.config.convolutionCellSize, workers=self.config.fftWorkers
            )
        matched.psf = science.psf
        matched.photo_calib = science.photo_calib
        matched.metadata["DIFFIM_ROLE"] = "matchedTemplate"
        image, mask, variance, planes, kernel = self._subtractMatched(science, matched, kres, kernel)
        kappa = 1.0
        phi = None
        if self.config.doDecorrelation:
            with self.timer("decorrelate"):
                image, variance, mask, phi = self._decorrelate(
                    image, mask, planes, kernel, unconvolved=science, convolved=template, scale=1.0
                )
        psf = science.psf if phi is None else convolved_psf(science.psf, phi, science.bbox)
        difference = self._makeDifference(image, mask, variance, planes, science, psf, kernel, convolved, kappa)
        return Struct(
            difference=difference,
            matchedTemplate=matched,
            matchedScience=science,
            psfMatchingKernel=kernel,
            backgroundModel=kres.backgroundModel,
            kernelSources=_candidate_rows(sources, kres.candidates),
            convolvedImage=convolved,
            decorrelationKernel=phi,
            subtractRes=kres,
        )

    def _subtractMatched(  # noqa: N802
        self, science: Exposure, matched: Exposure, kres: Struct, kernel: SpatialKernel
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int], SpatialKernel]:
        """``science - matched - b`` with the flux-scale correction of ``matched`` (not of ``b``).

        Returns image, mask, variance, mask planes and the kernel rescaled with ``matched``;
        ``matched`` gets the background added back and its rescaling.
        """
        with self.timer("difference"):
            planes = merge_mask_planes(dict(science.mask_planes), matched.mask_planes)
            mask = remap_mask(science.mask, science.mask_planes, planes) | remap_mask(
                matched.mask, matched.mask_planes, planes
            )
            background = kres.backgroundModel.image(science.bbox)
            image = science.image - matched.image
            image -= background
            variance = science.variance + matched.variance
        if self.config.doScaleToKernelSources:
            with self.timer("fluxScale"):
                c = self._fluxScale(image, mask, variance, planes, science, matched, kres.candidates)
            if c != 1.0:
                # only the convolved template is rescaled, not the differential background
                _rescale_matched(image, matched, c)
                variance = science.variance + matched.variance
                kernel = kernel.scaled(c)
        matched.image += background
        return image, mask, variance, planes, kernel

    def runConvolveScience(self, template: Exposure, science: Exposure, sources: Table) -> Struct:  # noqa: N802
        """Convolve the science image: ``D = (S (x) K - (T - b)) / kappa`` with ``S (x) K + b ~= T``."""
        with self.timer("makeKernel"):
            kres = self.makeKernel.run(science, template, sources)
        kernel: SpatialKernel = kres.psfMatchingKernel
        cx, cy = science.bbox.center
        kappa = float(kernel.kernel_sum(cx, cy))
        if not (math.isfinite(kappa) and kappa > 0):
            from .errors import KernelSolutionError

            raise KernelSolutionError(f"the science-to-template kernel sums to {kappa:g}; cannot normalize the difference")
        with self.timer("convolve"):
            conv_science = convolve_exposure(
                science, kernel, cell_size=self.config.convolutionCellSize, workers=self.config.fftWorkers
            )
        inv = np.float32(1.0 / kappa)
        inv2 = np.float32(1.0 / kappa**2)
        background = kres.backgroundModel.image(science.bbox)
        matched = Exposure(
            (template.image - background) * inv,
            template.mask.copy(),
            template.variance * inv2,
            xy0=template.xy0,
            wcs=science.wcs,
            psf=template.psf,
            photo_calib=science.photo_calib,
            visit_info=template.visit_info,
            band=template.band,
            mask_planes=template.mask_planes,
            metadata={**template.metadata, "DIFFIM_ROLE": "matchedTemplate", "KERNEL_SUM": kappa},
        )
        del background
        with self.timer("difference"):
            planes = merge_mask_planes(dict(science.mask_planes), conv_science.mask_planes)
            merge_mask_planes(planes, template.mask_planes)
            mask = remap_mask(conv_science.mask, conv_science.mask_planes, planes) | remap_mask(
                template.mask, template.mask_planes, planes
            )
            image = conv_science.image * inv - matched.image
            variance = conv_science.variance * inv2 + matched.variance
        psf = self._matchedSciencePsf(science, template, kernel)
        if self.config.doScaleToKernelSources:
            with self.timer("fluxScale"):
                c = self._fluxScale(image, mask, variance, planes, science, matched, kres.candidates, psf=psf)
            if c != 1.0:
                # D = K (x) S / kappa - c (T - b) / kappa: the kernel K / c with its sum kappa / c
                _rescale_matched(image, matched, c)
                variance = conv_science.variance * inv2 + matched.variance
                kappa /= c
                kernel = kernel.scaled(1.0 / c)
                matched.metadata["KERNEL_SUM"] = kappa
        matched_science = conv_science
        matched_science.image *= inv
        matched_science.variance *= inv2
        matched_science.psf = psf
        matched_science.metadata["DIFFIM_ROLE"] = "matchedScience"
        phi = None
        if self.config.doDecorrelation:
            with self.timer("decorrelate"):
                image, variance, mask, phi = self._decorrelate(
                    image, mask, planes, kernel, unconvolved=template, convolved=science, scale=1.0 / kappa
                )
        psf = psf if phi is None else convolved_psf(psf, phi, science.bbox)
        difference = self._makeDifference(image, mask, variance, planes, science, psf, kernel, "science", kappa)
        return Struct(
            difference=difference,
            matchedTemplate=matched,
            matchedScience=matched_science,
            psfMatchingKernel=kernel,
            backgroundModel=kres.backgroundModel,
            kernelSources=_candidate_rows(sources, kres.candidates),
            convolvedImage="science",
            decorrelationKernel=phi,
            subtractRes=kres,
        )

    def _matchedSciencePsf(self, science: Exposure, template: Exposure, kernel: SpatialKernel) -> Any:  # noqa: N802
        """The PSF of the convolved science image: ``P_S (x) K / sum(K)``, or the template's (config)."""
        if not self.config.doUseMatchedSciencePsf:
            return template.psf
        with self.timer("matchedSciencePsf"):
            return convolved_psf(science.psf, kernel.kernel_image, science.bbox)

    def _fluxScale(  # noqa: N802
        self,
        image: np.ndarray,
        mask: np.ndarray,
        variance: np.ndarray,
        planes: dict[str, int],
        science: Exposure,
        matched: Exposure,
        candidates: list[Any],
        *,
        psf: Any = None,
    ) -> float:
        """The matched template's flux-scale correction (1 when not measured or too large); see ``flux_scale``."""
        good = [c for c in candidates if getattr(c, "status", "") == "good"]
        difference = Exposure(
            image, mask, variance, xy0=science.xy0, psf=science.psf if psf is None else psf, mask_planes=planes
        )
        result = kernel_source_flux_scale(
            difference, matched, [c.x for c in good], [c.y for c in good]
        )
        md = self.metadata
        md["fluxScaleSources"] = result.n_used
        if not result.measured:
            self.log.warning(
                "flux scale not measured: %d of %d kernel sources usable; the kernel sum sets the scale",
                result.n_used, result.n_input,
            )
            md["fluxScaleCorrection"] = 1.0
            return 1.0
        md["fluxScaleMeasured"] = result.scale
        md["fluxScaleError"] = result.error
        if abs(result.scale - 1.0) > self.config.maxFluxScaleCorrection:
            self.log.warning(
                "the kernel sources ask for a flux-scale correction of %.4f +- %.4f, more than maxFluxScaleCorrection=%g: "
                "not applied (are the kernel sources variable, or the template mis-calibrated?)",
                result.scale, result.error, self.config.maxFluxScaleCorrection,
            )
            md["fluxScaleCorrection"] = 1.0
            return 1.0
        self.log.info(
            "matched template rescaled by %.4f +- %.4f so that %d kernel sources vanish from the difference",
            result.scale, result.error, result.n_used,
        )
        md["fluxScaleCorrection"] = result.scale
        return result.scale

    # ------------------------------------------------------------------ decorrelation
    def _filterSize(self, size: int) -> int:  # noqa: N802
        """Odd size of a whitening filter: ``decorrelationKernelScale`` times ``size`` pixels."""
        out = int(round(self.config.decorrelationKernelScale * size))
        return out + 1 - out % 2

    def _decorrelate(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        planes: dict[str, int],
        kernel: SpatialKernel,
        *,
        unconvolved: Exposure,
        convolved: Exposure,
        scale: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Whiten the difference: returns image, variance, mask and ``phi``.

        ``image`` is already in the difference's units; ``scale`` (``1/kappa`` when the science
        image was convolved, else 1) brings the input variance planes, each in its own image's
        units, to the difference's units.  ``NO_DATA`` spreads over ``phi``'s significant support;
        the border ``phi`` reached past is marked ``EDGE``.
        """
        bbox = unconvolved.bbox
        cx, cy = bbox.center
        k_centre = kernel.kernel_image(cx, cy)
        var_c = _median_variance(convolved)
        var_u = _median_variance(unconvolved)
        size = self._filterSize(kernel.kernel_size)
        phi = decorrelation_kernel(k_centre, var_c, var_u, size)
        self.metadata["decorrelation"] = {
            "varianceConvolved": var_c,
            "varianceUnconvolved": var_u,
            "kernelSize": size,
            "phiCentre": float(phi[size // 2, size // 2]),
        }
        opts = {"workers": self.config.fftWorkers, "cell_size": self.config.convolutionCellSize}
        finite = np.isfinite(image)
        no_data = np.int32(1 << add_plane(planes, "NO_DATA"))
        edge = np.int32(1 << add_plane(planes, "EDGE"))
        if not finite.all():
            image = np.where(finite, image, np.float32(0))
            mask = mask | np.where(finite, np.int32(0), no_data)
        out_image = convolve_constant(image, phi, **opts)
        del image
        v_u = _finite_or_zero(unconvolved.variance)
        v_c = _finite_or_zero(convolved.variance)
        phi_k = convolve_kernels(phi, k_centre)
        out_var = convolve_constant(v_u, phi**2, **opts)
        if scale != 1.0:
            out_var *= np.float32(scale**2)
            part = convolve_constant(v_c, phi_k**2, **opts)
            part *= np.float32(scale**2)
            out_var += part
        else:
            out_var += convolve_constant(v_c, phi_k**2, **opts)
        del v_u, v_c
        np.maximum(out_var, 0, out=out_var)
        from tasks.psfmatch import grow_mask

        from .decorrelate import trim_kernel

        # phi's significant support (|phi| > 1e-3 of its peak): where NO_DATA spreads, and the
        # border where the zero padding outside the image enters is EDGE
        reach = trim_kernel(phi, 1.0e-3).shape[0] // 2
        if (mask & no_data).any() and reach > 0:
            mask = mask | grow_mask(mask & no_data, (-reach, reach, -reach, reach))
        if reach > 0:
            mask[:reach, :] |= edge
            mask[-reach:, :] |= edge
            mask[:, :reach] |= edge
            mask[:, -reach:] |= edge
        return out_image, out_var, mask, phi

    # ------------------------------------------------------------------ assembling
    def _makeDifference(  # noqa: N802
        self,
        image: np.ndarray,
        mask: np.ndarray,
        variance: np.ndarray,
        planes: dict[str, int],
        science: Exposure,
        psf: Any,
        kernel: SpatialKernel,
        convolved: str,
        kappa: float,
    ) -> Exposure:
        no_data_bit = 1 << planes["NO_DATA"] if "NO_DATA" in planes else 0
        if no_data_bit:
            nd = (mask & no_data_bit) != 0
            if nd.any():
                image[nd] = np.nan
                variance[nd] = np.nan
        self._recordResiduals(image, mask, variance, planes)
        # the science image's DETECTED planes describe the science image, not the difference
        clear = plane_bits(planes, ("DETECTED", "DETECTED_NEGATIVE"))
        if clear:
            mask &= np.int32(~clear)
        cx, cy = science.bbox.center
        metadata = dict(science.metadata)
        metadata.update(
            {
                "DIFFIM_CONVOLVED": convolved,
                "DIFFIM_KERNEL_SUM": float(kernel.kernel_sum(cx, cy)),
                "DIFFIM_KERNEL_SIZE": kernel.kernel_size,
                "DIFFIM_DECORRELATED": bool(self.config.doDecorrelation),
                "DIFFIM_NORM": kappa,
            }
        )
        diff = Exposure(
            image,
            mask,
            variance,
            xy0=science.xy0,
            wcs=science.wcs,
            psf=psf,
            photo_calib=science.photo_calib,
            visit_info=science.visit_info,
            band=science.band,
            mask_planes=planes,
            metadata=metadata,
        )
        if self.config.doScaleVariance:
            ratio = self.metadata.get("residualStdBlankSky", float("nan"))
            if math.isfinite(ratio) and ratio > 0:
                diff.variance *= np.float32(ratio**2)
                self.metadata["varianceScale"] = ratio**2
        return diff

    def _recordResiduals(  # noqa: N802
        self, image: np.ndarray, mask: np.ndarray, variance: np.ndarray, planes: dict[str, int]
    ) -> None:
        """Blank-sky statistics of ``difference / sqrt(variance)``: pixels with no mask bit of
        :data:`_STATS_BAD_PLANES` (the science image's DETECTED footprints included)."""
        probe = Exposure(image, mask, variance, mask_planes=planes)
        std = _normalized_residual_std(probe, self.config.residualStatsStep)
        mean, n = _normalized_residual_mean(probe, self.config.residualStatsStep)
        self.metadata["residualStdBlankSky"] = std
        self.metadata["residualMeanBlankSky"] = mean
        self.metadata["residualPixels"] = n
        self.log.info("difference / sqrt(variance) on unmasked pixels: mean %.4f, std %.4f (%d px)", mean, std, n)

    def _writeDebugPlots(self, result: Struct, science: Exposure) -> None:  # noqa: N802
        from . import debug_plots

        visit = science.visit_info.visit_id if science.visit_info is not None else None
        det = science.metadata.get("DETECTOR")
        prefix = f"{visit if visit is not None else 'visit'}_{det if det is not None else 'det'}"
        folder = Path(self.config.debugPlotDir)
        try:
            paths = debug_plots.write_kernel_plots(result.subtractRes, science.bbox, folder, prefix)
        except Exception as exc:  # noqa: BLE001 - plots never fail the quantum
            self.log.warning("debug plots failed: %s", exc)
            return
        self.metadata["debugPlots"] = [os.fspath(p) for p in paths]
        self.log.info("wrote %d debug plots to %s", len(paths), folder)


# ---------------------------------------------------------------------------------- helpers
def _candidate_rows(sources: Table, candidates: list[Any]) -> Table:
    used = {c.source_id for c in candidates if getattr(c, "status", "") == "good"}
    if "id" not in sources.colnames or not used:
        return sources[:0]
    keep = np.array([int(i) in used for i in sources["id"]], dtype=bool)
    return sources[keep]


def _rescale_matched(difference: np.ndarray, matched: Exposure, scale: float) -> None:
    """Multiply the matched template (image and variance) by ``scale`` and update ``difference = X - matched``, in place."""
    difference += np.float32(1.0 - scale) * matched.image
    matched.image *= np.float32(scale)
    matched.variance *= np.float32(scale * scale)


def _finite_or_zero(array: np.ndarray) -> np.ndarray:
    """``array`` itself when all finite, else a copy with non-finite values set to 0."""
    finite = np.isfinite(array)
    if finite.all():
        return array
    return np.where(finite, array, np.float32(0))


def _median_variance(exposure: Exposure) -> float:
    """Median variance-plane value over sky pixels (every 4th pixel per axis), counts^2."""
    ok = good_pixels(exposure, _NOISE_BAD_PLANES, step=4)
    values = exposure.variance[::4, ::4][ok]
    if values.size == 0:
        values = exposure.variance[np.isfinite(exposure.variance)]
    return float(np.median(values)) if values.size else float("nan")


def _normalized_residual_std(difference: Exposure, step: int) -> float:
    ok = good_pixels(difference, _STATS_BAD_PLANES, step=step)
    sl = (slice(None, None, step), slice(None, None, step))
    values = difference.image[sl][ok] / np.sqrt(difference.variance[sl][ok])
    return clipped_std(values)


def _normalized_residual_mean(difference: Exposure, step: int) -> tuple[float, int]:
    ok = good_pixels(difference, _STATS_BAD_PLANES, step=step)
    sl = (slice(None, None, step), slice(None, None, step))
    values = difference.image[sl][ok] / np.sqrt(difference.variance[sl][ok])
    return (float(np.median(values)) if values.size else float("nan")), int(values.size)


def _pad_to_box(template: Exposure, bbox: Box) -> Exposure:
    """The template on ``bbox``: its overlapping pixels, NaN + NO_DATA elsewhere."""
    planes = dict(template.mask_planes)
    no_data = 1 << add_plane(planes, "NO_DATA")
    image = np.full(bbox.shape, np.nan, dtype=np.float32)
    variance = np.full(bbox.shape, np.nan, dtype=np.float32)
    mask = np.full(bbox.shape, no_data, dtype=np.int32)
    overlap = template.bbox.intersection(bbox)
    dst, src = overlap.slices(bbox), overlap.slices(template.bbox)
    image[dst] = template.image[src]
    variance[dst] = template.variance[src]
    mask[dst] = template.mask[src]
    return Exposure(
        image, mask, variance, xy0=(bbox.x0, bbox.y0), wcs=template.wcs,
        psf=template.psf, photo_calib=template.photo_calib, visit_info=template.visit_info, band=template.band,
        mask_planes=planes, metadata=dict(template.metadata),
    )
