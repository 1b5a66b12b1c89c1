"""ForcedPhotCoaddTask (label ``forcedPhotCoadd``): forced photometry on coadds -> ``deepCoadd_forced_src``.

After ``lsst.meas.base.ForcedPhotCoaddTask``: one quantum per (skymap, tract, patch, band) measures
the band's coadd at the positions of the patch's reference catalog ``deepCoadd_ref`` (the same
objects in every band), so that colours compare like with like.

1. The coadd's smooth background is subtracted first (``doSubtractBackground``; photutils
   ``Background2D``, :mod:`tasks.measure.background`), as ``detectCoaddSources`` does before
   measuring the references: coadds keep what is left of each visit's sky.
2. :meth:`ForcedPhotCoaddTask.generateMeasCat` places every reference: its ``x``/``y`` (tract
   pixels) through ``refWcs`` (the tract WCS, from the skymap) to the sky, and into the coadd's
   pixels with the coadd's WCS.
3. :meth:`ForcedPhotCoaddTask.run` measures PSF and aperture fluxes and pixel flags
   (:class:`~.measurement.ForcedMeasurementTask`).  Coadds of PSF-matched warps have strongly
   correlated noise: the errors are scaled by the factor measured on blank sky for each
   measurement type (``doScaleErrors``; the factors are in the catalog metadata).

Columns (fluxes in nJy, the coadd's unit): ``id`` (the reference id), ``coord_ra``, ``coord_dec``
(deg), ``x``, ``y`` (pixels), ``psfFlux``, ``psfFluxErr``, ``psfFlux_flag``, ``apFlux_<r>_<f>``,
``...Err``, ``..._flag`` per aperture radius, ``pixelFlags_edge``, ``pixelFlags_nodata``,
``pixelFlags_saturated`` (see :mod:`.schemas`), and the reference columns of
``measurement.copyColumns`` (``parent``, ``detect_isPrimary``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from astropy.table import Table
from astropy.wcs import WCS

from butler.exposure import Exposure
from pipeline.config import ConfigurableField, Field
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from pipeline.task import timeMethod

from tasks.measure.background import subtract_background

from .errors import ForcedPhotometryError, format_data_id
from .measurement import ForcedMeasurementConfig, ForcedMeasurementTask

__all__ = [
    "ForcedPhotCoaddConnections",
    "ForcedPhotCoaddConfig",
    "ForcedPhotCoaddTask",
    "CoaddForcedMeasurementConfig",
    "CoaddForcedMeasurementTask",
]

PATCH_DIMENSIONS = ("skymap", "tract", "patch")
COADD_DIMENSIONS = ("skymap", "tract", "patch", "band")


class ForcedPhotCoaddConnections(
    PipelineTaskConnections, dimensions=COADD_DIMENSIONS, defaultTemplates={"coaddName": "deep"}
):
    exposure = Input(
        name="{coaddName}Coadd", storageClass="Exposure", dimensions=COADD_DIMENSIONS,
        doc="The band's coadd to measure",
    )
    refCat = Input(  # noqa: N815
        name="{coaddName}Coadd_ref", storageClass="SourceCatalog", dimensions=PATCH_DIMENSIONS,
        doc="The patch's reference catalog (positions in tract pixels)",
    )
    skyMap = Input(  # noqa: N815
        name="skyMap", storageClass="SkyMap", dimensions=("skymap",), doc="The skymap (the tract WCS is refWcs)"
    )
    measCat = Output(  # noqa: N815
        name="{coaddName}Coadd_forced_src", storageClass="SourceCatalog", dimensions=COADD_DIMENSIONS,
        doc="Forced photometry of the references on the band's coadd",
    )


class CoaddForcedMeasurementConfig(ForcedMeasurementConfig):
    """Forced measurement on coadds: also copies the reference's ``parent`` and ``detect_isPrimary``."""

    copyColumns: dict[str, str] = Field(
        default_factory=lambda: {"parent": "parent", "detect_isPrimary": "detect_isPrimary"},
        description="Reference catalog column -> measurement catalog column, copied as is",
    )


class CoaddForcedMeasurementTask(ForcedMeasurementTask):
    """:class:`~.measurement.ForcedMeasurementTask` with the coadd defaults."""

    ConfigClass = CoaddForcedMeasurementConfig


class ForcedPhotCoaddConfig(PipelineTaskConfig, pipelineConnections=ForcedPhotCoaddConnections):
    """Configuration of :class:`ForcedPhotCoaddTask`."""

    measurement = ConfigurableField(target=CoaddForcedMeasurementTask, doc="PSF and aperture photometry, pixel flags")
    doSubtractBackground: bool = Field(True, description="Subtract a photutils Background2D before measuring")
    backgroundBoxSize: int = Field(128, description="Background2D box size, pixels (at most a third of the patch)")

    def validate(self) -> None:
        super().validate()
        if self.backgroundBoxSize < 16:
            raise ValueError(f"backgroundBoxSize must be >= 16 pixels, got {self.backgroundBoxSize}")


class ForcedPhotCoaddTask(PipelineTask):
    """Forced PSF and aperture photometry on a coadd at reference positions (see the module docstring)."""

    ConfigClass = ForcedPhotCoaddConfig
    _DefaultName = "forcedPhotCoadd"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.makeSubtask("measurement")

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        inputs = butlerQC.get(inputRefs)
        data_id = butlerQC.dataId
        skymap = inputs["skyMap"]
        try:
            ref_wcs = skymap[data_id["tract"]].wcs
        except Exception as exc:  # noqa: BLE001 - re-raised with the data ID
            raise ForcedPhotometryError(
                f"tract {data_id['tract']} is not in skymap {skymap.name!r} [data ID {format_data_id(data_id)}]"
            ) from exc
        try:
            meas_cat = self.generateMeasCat(data_id, inputs["exposure"], inputs["refCat"], ref_wcs)
            outputs = self.run(meas_cat, inputs["exposure"], inputs["refCat"], ref_wcs)
        except ValueError as exc:
            raise ForcedPhotometryError(f"{exc} [data ID {format_data_id(data_id)}]") from exc
        butlerQC.put(outputs, outputRefs)

    def generateMeasCat(  # noqa: N802 - LSST's name
        self,
        exposureDataId: Mapping[str, Any] | None,  # noqa: N803
        exposure: Exposure,
        refCat: Table,  # noqa: N803
        refWcs: WCS,  # noqa: N803
    ) -> Table:
        """The catalog to fill: one row per reference, at its position in the coadd's pixels.

        Parameters
        ----------
        exposureDataId : mapping or None
            Data ID of the coadd (recorded in the catalog metadata).
        exposure : Exposure
            The coadd.
        refCat : astropy.table.Table
            The reference catalog (``id``, ``x``, ``y`` in the ``refWcs`` frame).
        refWcs : astropy.wcs.WCS
            WCS of the reference positions (the tract WCS).

        Returns
        -------
        astropy.table.Table
            See :meth:`.measurement.ForcedMeasurementTask.generateMeasCat`.
        """
        meas_cat = self.measurement.generateMeasCat(exposure, refCat, refWcs)
        if exposureDataId:
            meas_cat.meta.update({k: v for k, v in exposureDataId.items() if k in COADD_DIMENSIONS})
        return meas_cat

    @timeMethod
    def run(
        self,
        measCat: Table,  # noqa: N803
        exposure: Exposure,
        refCat: Table,  # noqa: N803
        refWcs: WCS,  # noqa: N803
        exposureId: int | None = None,  # noqa: N803
    ) -> Struct:
        """Measure the coadd at the positions of ``measCat``.

        Parameters
        ----------
        measCat : astropy.table.Table
            From :meth:`generateMeasCat`; filled in place.
        exposure : Exposure
            The coadd (not modified: the background is subtracted from a copy).
        refCat : astropy.table.Table
            The references, row for row with ``measCat``.
        refWcs : astropy.wcs.WCS
            WCS of the references.
        exposureId : int, optional
            Recorded in the catalog metadata.

        Returns
        -------
        Struct
            ``measCat``: the filled catalog.
        """
        work = exposure
        if self.config.doSubtractBackground:
            with self.timer("background"):
                work, background = subtract_background(exposure, self.config.backgroundBoxSize)
            level = float(background.mean()) if background.size else 0.0
            measCat.meta["backgroundMean"] = level
            self.metadata["backgroundMean"] = level
        with self.timer("measure"):
            self.measurement.run(measCat, work, refCat, refWcs, exposureId=exposureId)
        measCat.meta["band"] = exposure.band
        self.metadata["nSources"] = len(measCat)
        self.log.info(
            "forced photometry of %d references on the %s coadd (PSF flux error scale %s)",
            len(measCat), exposure.band, measCat.meta.get("psfFluxErrScale"),
        )
        return Struct(measCat=measCat)
