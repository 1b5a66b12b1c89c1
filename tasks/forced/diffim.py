"""ForcedPhotDiffimTask (label ``forcedPhotDiffim``): forced photometry of DIA objects -> ``diaForcedSource``.

After LSST's ``forcedPhotDiffim`` / ``forcedPhotCcdOnDiaObjects``: one quantum per visit-detector
measures the difference image ``goodSeeingDiff_differenceExp`` -- and, with ``doMeasureScience``,
the calexp -- at the position of every DIA object (``diaObject`` of the patches overlapping the
visit-detector, the graph's spatial join) that falls on the detector.  Together with the
associated DIA sources (``goodSeeingDiff_assocDiaSrc``) these are the light curves: a forced
measurement in *every* visit, detected or not.

The PSF flux on the difference image is the object's flux minus its flux in the template
(:class:`~.measurement.ForcedMeasurementTask`; PSF flux only by default, errors from the variance
plane scaled by the blank-sky factor, ~1 on a decorrelated difference image).  ``scienceFlux`` is
the PSF flux on the calexp: the total flux.

Columns (fluxes in nJy): ``id`` (unique within the catalog), ``diaObjectId``, ``visit``,
``detector``, ``midpointMjdTai`` (MJD TAI), ``band``, ``coord_ra``, ``coord_dec`` (deg; the object's
position), ``x``, ``y`` (pixels of the difference image), ``psfFlux``, ``psfFluxErr``,
``psfFlux_flag``, ``pixelFlags_edge``, ``pixelFlags_nodata``, ``pixelFlags_saturated``, and with
``doMeasureScience`` ``scienceFlux``, ``scienceFluxErr``, ``scienceFlux_flag`` (see :mod:`.schemas`).

A repository with several skymaps needs a data query that selects one (``skymap = 'name'``): the
DIA objects of different skymaps are different objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from astropy.table import Table, vstack
from astropy.wcs import WCS

from butler.exposure import Exposure
from pipeline.config import ConfigurableField, Field
from pipeline.connections import Input, Output, PipelineTaskConnections
from pipeline.errors import NoWorkFound
from pipeline.pipeline_task import PipelineTask, PipelineTaskConfig
from pipeline.struct import Struct
from pipeline.task import timeMethod

from .errors import ForcedPhotometryError, format_data_id
from .measurement import ForcedMeasurementConfig, ForcedMeasurementTask
from .schemas import DIA_VISIT_COLUMNS, SCIENCE_FLUX_COLUMNS

__all__ = [
    "ForcedPhotDiffimConnections",
    "ForcedPhotDiffimConfig",
    "ForcedPhotDiffimTask",
    "DiaForcedMeasurementConfig",
    "DiaForcedMeasurementTask",
]

VISIT_DETECTOR = ("instrument", "visit", "detector")

#: ``id = (visit * 1000 + detector) * SOURCES_PER_DETECTOR + k``, as the diaSrc ids.
SOURCES_PER_DETECTOR = 1_000_000


class ForcedPhotDiffimConnections(
    PipelineTaskConnections, dimensions=VISIT_DETECTOR, defaultTemplates={"diffName": "goodSeeing"}
):
    exposure = Input(
        name="{diffName}Diff_differenceExp", storageClass="Exposure", dimensions=VISIT_DETECTOR,
        doc="Difference image to measure",
    )
    science = Input(
        name="calexp", storageClass="Exposure", dimensions=VISIT_DETECTOR,
        doc="Science exposure (scienceFlux: total flux)",
    )
    refCat = Input(  # noqa: N815
        name="diaObject", storageClass="ArrowAstropy", dimensions=("skymap", "tract", "patch"), multiple=True,
        doc="DIA objects of the patches overlapping the visit-detector (spatial join)",
    )
    diaForcedSources = Output(  # noqa: N815
        name="diaForcedSource", storageClass="SourceCatalog", dimensions=VISIT_DETECTOR,
        doc="Forced PSF photometry of the DIA objects on the detector",
    )

    def __init__(self, *, config: Any = None) -> None:
        super().__init__(config=config)
        if config is not None and not config.doMeasureScience:
            del self.science


class DiaForcedMeasurementConfig(ForcedMeasurementConfig):
    """Forced measurement on difference images: PSF flux only (no apertures) by default."""

    apertureRadii: list[float] = Field(
        default_factory=list,
        description="Radii of the aperture fluxes, pixels (one apFlux_<r>_<f> column group each; [] for none)",
    )


class DiaForcedMeasurementTask(ForcedMeasurementTask):
    """:class:`~.measurement.ForcedMeasurementTask` with the difference-image defaults."""

    ConfigClass = DiaForcedMeasurementConfig


class ForcedPhotDiffimConfig(PipelineTaskConfig, pipelineConnections=ForcedPhotDiffimConnections):
    """Configuration of :class:`ForcedPhotDiffimTask`."""

    measurement = ConfigurableField(target=DiaForcedMeasurementTask, doc="PSF photometry and pixel flags")
    doMeasureScience: bool = Field(True, description="Also measure the PSF flux on the calexp (scienceFlux)")


class ForcedPhotDiffimTask(PipelineTask):
    """Forced PSF photometry of DIA objects on a difference image (see the module docstring)."""

    ConfigClass = ForcedPhotDiffimConfig
    _DefaultName = "forcedPhotDiffim"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.makeSubtask("measurement")

    def runQuantum(self, butlerQC: Any, inputRefs: Any, outputRefs: Any) -> None:  # noqa: N802, N803
        data_id = butlerQC.dataId
        skymaps = sorted({str(ref.data_id["skymap"]) for ref in inputRefs.refCat})
        if len(skymaps) > 1:
            raise ForcedPhotometryError(
                f"DIA objects of several skymaps {skymaps} overlap this visit-detector; select one with the data "
                f"query (skymap = '{skymaps[0]}') [data ID {format_data_id(data_id)}]"
            )
        inputs = butlerQC.get(inputRefs)
        exposure = inputs["exposure"]
        try:
            ref_cat = self.select_references(inputs["refCat"], exposure)
            meas_cat = self.generateMeasCat(data_id, exposure, ref_cat, None)
            outputs = self.run(meas_cat, exposure, ref_cat, None, science=inputs.get("science"))
        except ValueError as exc:
            raise ForcedPhotometryError(f"{exc} [data ID {format_data_id(data_id)}]") from exc
        except NoWorkFound as exc:
            raise NoWorkFound(f"{exc} [data ID {format_data_id(data_id)}]") from exc
        butlerQC.put(outputs, outputRefs)

    @staticmethod
    def select_references(refCats: Sequence[Table], exposure: Exposure) -> Table:  # noqa: N803
        """The DIA objects of several patches whose position falls on the exposure.

        Parameters
        ----------
        refCats : sequence of astropy.table.Table
            ``diaObject`` tables (``diaObjectId``, ``coord_ra``, ``coord_dec``).
        exposure : Exposure
            Its WCS and box decide what falls on it.

        Returns
        -------
        astropy.table.Table
            The objects on the exposure, sorted by ``diaObjectId``.

        Raises
        ------
        NoWorkFound
            If none does.
        ValueError
            If the exposure has no WCS or an object table has no ``diaObjectId``/``coord_*`` columns.
        """
        tables = [t for t in refCats if len(t)]
        for table in tables:
            missing = [c for c in ("diaObjectId", "coord_ra", "coord_dec") if c not in table.colnames]
            if missing:
                raise ValueError(f"a diaObject table lacks the column(s) {missing}; columns: {table.colnames}")
        if not tables:
            raise NoWorkFound("no DIA object in the patches overlapping the exposure")
        if exposure.wcs is None:
            raise ValueError("the difference image has no WCS: DIA objects cannot be placed on it")
        objects = vstack(tables, join_type="inner", metadata_conflicts="silent")
        x, y = exposure.sky_to_pixel(np.asarray(objects["coord_ra"], float), np.asarray(objects["coord_dec"], float))
        box = exposure.bbox
        on_image = (x >= box.x0 - 0.5) & (x < box.x0 + box.width - 0.5)
        on_image &= (y >= box.y0 - 0.5) & (y < box.y0 + box.height - 0.5)
        objects = objects[on_image]
        if len(objects) == 0:
            raise NoWorkFound("no DIA object falls on the exposure")
        ids = np.asarray(objects["diaObjectId"], dtype=np.int64)
        if np.unique(ids).size != ids.size:
            raise ValueError("the diaObject tables repeat a diaObjectId: each object must belong to one patch")
        return objects[np.argsort(ids, kind="stable")]

    def generateMeasCat(  # noqa: N802 - LSST's name
        self,
        exposureDataId: Mapping[str, Any],  # noqa: N803
        exposure: Exposure,
        refCat: Table,  # noqa: N803
        refWcs: WCS | None,  # noqa: N803
    ) -> Table:
        """The catalog to fill: one row per DIA object, at its position in the exposure's pixels.

        Parameters
        ----------
        exposureDataId : mapping
            Data ID of the visit-detector (``visit`` and ``detector`` make the ids and columns).
        exposure : Exposure
            The difference image (its WCS places the objects, its ``visit_info`` gives the epoch).
        refCat : astropy.table.Table
            DIA objects (``diaObjectId``, ``coord_ra``, ``coord_dec``).
        refWcs : astropy.wcs.WCS or None
            None: DIA objects have sky positions only.

        Returns
        -------
        astropy.table.Table
            Position, DIA-visit and measurement columns (see the module docstring).
        """
        visit = int(exposureDataId["visit"])
        detector = int(exposureDataId["detector"])
        id_base = (visit * 1000 + detector) * SOURCES_PER_DETECTOR
        ids = id_base + 1 + np.arange(len(refCat), dtype=np.int64)
        meas_cat = self.measurement.generateMeasCat(exposure, refCat, refWcs, ids=ids)
        mjd = exposure.visit_info.mjd if exposure.visit_info is not None else float("nan")
        values = {
            "diaObjectId": np.asarray(refCat["diaObjectId"], dtype=np.int64),
            "visit": visit,
            "detector": detector,
            "midpointMjdTai": mjd,
            "band": exposure.band or "",
        }
        for position, (name, spec) in enumerate(DIA_VISIT_COLUMNS.items(), start=1):
            meas_cat.add_column(np.broadcast_to(np.asarray(values[name], dtype=spec.dtype), len(refCat)).copy(),
                                name=name, index=position)
            if spec.unit:
                meas_cat[name].unit = spec.unit
            meas_cat[name].description = spec.description
        meas_cat.meta.update({"visit": visit, "detector": detector, "fluxUnit": "nJy"})
        return meas_cat

    @timeMethod
    def run(
        self,
        measCat: Table,  # noqa: N803
        exposure: Exposure,
        refCat: Table,  # noqa: N803
        refWcs: WCS | None,  # noqa: N803
        exposureId: int | None = None,  # noqa: N803
        science: Exposure | None = None,
    ) -> Struct:
        """Measure the difference image (and the science exposure) at the positions of ``measCat``.

        Parameters
        ----------
        measCat : astropy.table.Table
            From :meth:`generateMeasCat`; filled in place.
        exposure : Exposure
            The difference image.
        refCat : astropy.table.Table
            The DIA objects, row for row with ``measCat``.
        refWcs : astropy.wcs.WCS or None
            Unused (DIA objects have sky positions); LSST's signature.
        exposureId : int, optional
            Recorded in the catalog metadata.
        science : Exposure, optional
            The calexp: adds ``scienceFlux``, ``scienceFluxErr``, ``scienceFlux_flag``.

        Returns
        -------
        Struct
            ``diaForcedSources``: the filled catalog.
        """
        with self.timer("measure"):
            self.measurement.run(measCat, exposure, refCat, refWcs, exposureId=exposureId)
        if science is not None:
            x = np.asarray(measCat["x"], dtype=np.float64)
            y = np.asarray(measCat["y"], dtype=np.float64)
            with self.timer("measureScience"):
                flux, err, flag, _edge, scale = self.measurement.measure_psf_flux(science, x, y)
            for (name, spec), values in zip(SCIENCE_FLUX_COLUMNS.items(), (flux, err, flag), strict=True):
                measCat[name] = np.asarray(values, dtype=spec.dtype)
                if spec.unit:
                    measCat[name].unit = spec.unit
                measCat[name].description = spec.description
            measCat.meta["scienceFluxErrScale"] = scale
        n_flagged = int(np.count_nonzero(measCat["psfFlux_flag"])) if len(measCat) else 0
        self.metadata.update({"nDiaForcedSources": len(measCat), "nPsfFluxFlagged": n_flagged})
        self.log.info(
            "forced photometry of %d DIA objects (%d flagged; PSF flux error scale %s)",
            len(measCat), n_flagged, measCat.meta.get("psfFluxErrScale"),
        )
        return Struct(diaForcedSources=measCat)
