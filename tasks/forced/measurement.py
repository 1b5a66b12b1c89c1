"""ForcedMeasurementTask: measure an exposure at positions given by a reference catalog.

After ``lsst.meas.base.ForcedMeasurementTask``, the subtask of both forced-photometry pipeline
tasks: :meth:`ForcedMeasurementTask.generateMeasCat` makes the output catalog -- one row per
reference, at the reference position transformed into the exposure's pixels -- and
:meth:`ForcedMeasurementTask.run` fills it:

- PSF flux (:func:`tasks.measure.photometry.psf_flux`) -> :data:`~.schemas.PSF_FLUX_COLUMNS`;
- aperture fluxes for each of ``apertureRadii`` (:func:`tasks.measure.photometry.aperture_flux`)
  -> :func:`~.schemas.aperture_flux_columns`;
- pixel flags within ``flagRadius`` pixels of the position -> :data:`~.schemas.PIXEL_FLAG_COLUMNS`
  (``pixelFlags_edge`` also when the PSF stamp runs off the image).

Errors come from the variance plane.  With ``doScaleErrors`` each measurement type's errors are
multiplied by the factor :func:`tasks.measure.noise.noise_scale` measures on the exposure -- the
ratio of the true to the predicted scatter of that measurement on blank sky, which is ~1 for an
image with uncorrelated noise and several for a coadd of PSF-matched warps.  The factors are in the
catalog metadata (``psfFluxErrScale``, ``apFlux_6_0ErrScale``, ...).  Fluxes are in nJy through the
exposure's ``photo_calib``.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from numpy.typing import NDArray

from butler.catalog import ColumnSpec
from butler.exposure import Exposure
from pipeline.config import Config, Field
from pipeline.task import Task

from tasks.measure.noise import aperture_kernel, noise_scale, psf_weights
from tasks.measure.photometry import aperture_flux, pixel_flags, psf_flux

from .schemas import (
    PIXEL_FLAG_COLUMNS,
    PIXEL_FLAG_PLANES,
    POSITION_COLUMNS,
    PSF_FLUX_COLUMNS,
    aperture_flux_columns,
    aperture_name,
    make_catalog,
    merge_schemas,
)

__all__ = ["ForcedMeasurementConfig", "ForcedMeasurementTask", "reference_positions"]


class ForcedMeasurementConfig(Config):
    """Configuration of :class:`ForcedMeasurementTask`."""

    apertureRadii: list[float] = Field(
        default_factory=lambda: [3.0, 6.0, 9.0, 12.0],
        description="Radii of the aperture fluxes, pixels (one apFlux_<r>_<f> column group each; [] for none)",
    )
    badMaskPlanes: list[str] = Field(
        default_factory=lambda: ["NO_DATA", "BAD", "SAT"],
        description="Mask planes whose pixels the PSF flux does not use",
    )
    maxPsfMaskedFraction: float = Field(
        0.2, description="psfFlux_flag when more than this fraction of the PSF weight falls on unusable pixels"
    )
    flagRadius: int = Field(1, description="Pixel flags look at the (2r+1)^2 pixels around the position")
    doScaleErrors: bool = Field(
        True,
        description="Multiply each measurement type's errors by the ratio of its measured to predicted blank-sky "
        "scatter (correlated noise; see tasks.measure.noise)",
    )
    copyColumns: dict[str, str] = Field(
        default_factory=dict, description="Reference catalog column -> measurement catalog column, copied as is"
    )

    def validate(self) -> None:
        super().validate()
        if any(not (math.isfinite(r) and r > 0) for r in self.apertureRadii):
            raise ValueError(f"apertureRadii must be positive numbers of pixels, got {self.apertureRadii}")
        names = [aperture_name(r) for r in self.apertureRadii]
        if len(set(names)) != len(names):
            raise ValueError(f"apertureRadii {self.apertureRadii} give duplicate column names {names}")
        if not 0.0 <= self.maxPsfMaskedFraction <= 1.0:
            raise ValueError(f"maxPsfMaskedFraction must be in [0, 1], got {self.maxPsfMaskedFraction}")
        if self.flagRadius < 0:
            raise ValueError(f"flagRadius must be >= 0, got {self.flagRadius}")


def reference_positions(refCat: Table, refWcs: WCS | None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:  # noqa: N803
    """Sky positions (degrees) of a reference catalog's objects.

    With ``refWcs`` and ``x``/``y`` columns, the reference centroids transformed by ``refWcs``
    (LSST's forced centroid); otherwise the ``coord_ra``/``coord_dec`` columns.
    """
    if refWcs is not None and "x" in refCat.colnames and "y" in refCat.colnames:
        ra, dec = refWcs.all_pix2world(np.asarray(refCat["x"], float), np.asarray(refCat["y"], float), 0)
        return np.asarray(ra, dtype=np.float64) % 360.0, np.asarray(dec, dtype=np.float64)
    missing = [c for c in ("coord_ra", "coord_dec") if c not in refCat.colnames]
    if missing:
        raise ValueError(
            f"the reference catalog has no {missing} columns (and no x/y with a refWcs); columns: {refCat.colnames}"
        )
    return np.asarray(refCat["coord_ra"], dtype=np.float64), np.asarray(refCat["coord_dec"], dtype=np.float64)


class ForcedMeasurementTask(Task):
    """Measure PSF and aperture fluxes and pixel flags at reference positions (see the module docstring)."""

    ConfigClass = ForcedMeasurementConfig
    _DefaultName = "measurement"

    @property
    def schema(self) -> dict[str, ColumnSpec]:
        """The measurement columns, one group per measurement type (copied columns excluded)."""
        return merge_schemas(
            POSITION_COLUMNS, PSF_FLUX_COLUMNS, aperture_flux_columns(self.config.apertureRadii), PIXEL_FLAG_COLUMNS
        )

    def generateMeasCat(  # noqa: N802 - LSST's name
        self,
        exposure: Exposure,
        refCat: Table,  # noqa: N803
        refWcs: WCS | None,  # noqa: N803
        ids: NDArray[np.int64] | None = None,
    ) -> Table:
        """The catalog to measure: one row per reference, at its position in the exposure's pixels.

        Parameters
        ----------
        exposure : Exposure
            The exposure to be measured (its WCS maps the positions into its pixels).
        refCat : astropy.table.Table
            The references.
        refWcs : astropy.wcs.WCS or None
            WCS of the reference ``x``/``y`` (None: use ``coord_ra``/``coord_dec``).
        ids : numpy.ndarray, optional
            The ``id`` of each row; default the reference ``id`` column.

        Returns
        -------
        astropy.table.Table
            ``id``, ``coord_ra``, ``coord_dec`` (degrees), ``x``, ``y`` (parent-frame pixels of
            ``exposure``), the copied columns, and the measurement columns (NaN / False).

        Raises
        ------
        ValueError
            If the exposure has no WCS, or a column to copy (or ``id``) is missing.
        """
        if exposure.wcs is None:
            raise ValueError("forced measurement needs an exposure with a WCS to place the references")
        n = len(refCat)
        if ids is None:
            if "id" not in refCat.colnames:
                raise ValueError(f"the reference catalog has no 'id' column; columns: {refCat.colnames}")
            ids = np.asarray(refCat["id"], dtype=np.int64)
        ra, dec = reference_positions(refCat, refWcs)
        measCat = make_catalog(n, self.schema)  # noqa: N806
        measCat["id"][:] = np.asarray(ids, dtype=np.int64)
        measCat["coord_ra"][:] = ra
        measCat["coord_dec"][:] = dec
        if n:
            x, y = exposure.sky_to_pixel(ra, dec)
            measCat["x"][:] = x
            measCat["y"][:] = y
        missing = [src for src in self.config.copyColumns if src not in refCat.colnames]
        if missing:
            raise ValueError(
                f"copyColumns names {missing}, absent from the reference catalog; columns: {refCat.colnames}"
            )
        for src, dst in self.config.copyColumns.items():
            measCat[dst] = refCat[src].copy()
        return measCat

    def run(
        self,
        measCat: Table,  # noqa: N803
        exposure: Exposure,
        refCat: Table,  # noqa: N803
        refWcs: WCS | None,  # noqa: N803
        exposureId: int | None = None,  # noqa: N803
    ) -> None:
        """Fill ``measCat`` (made by :meth:`generateMeasCat`) in place.

        Parameters
        ----------
        measCat : astropy.table.Table
            The catalog to fill: its ``x``, ``y`` are the positions measured.
        exposure : Exposure
            Image (counts), variance, mask, PSF and ``photo_calib`` (nJy per count).
        refCat : astropy.table.Table
            The references (row for row with ``measCat``).
        refWcs : astropy.wcs.WCS or None
            WCS of the references (kept for LSST's signature; the positions are in ``measCat``).
        exposureId : int, optional
            Identifies the exposure in the metadata.

        Raises
        ------
        ValueError
            If the exposure lacks a PSF or a photo_calib, or the catalogs differ in length.
        """
        if len(measCat) != len(refCat):
            raise ValueError(f"measCat has {len(measCat)} rows but refCat {len(refCat)}; make it with generateMeasCat")
        if exposure.photo_calib is None:
            raise ValueError("forced measurement needs an exposure with a photo_calib (fluxes are in nJy)")
        cfg = self.config
        x = np.asarray(measCat["x"], dtype=np.float64)
        y = np.asarray(measCat["y"], dtype=np.float64)
        flux, err, flag, edge, scale = self.measure_psf_flux(exposure, x, y)
        measCat["psfFlux"][:] = flux
        measCat["psfFluxErr"][:] = err
        measCat["psfFlux_flag"][:] = flag
        measCat.meta["psfFluxErrScale"] = scale
        scales = {"psfFlux": scale}
        calib = exposure.photo_calib.calibration
        for radius in cfg.apertureRadii:
            name = aperture_name(radius)
            ap = aperture_flux(exposure, x, y, radius, bad_planes=cfg.badMaskPlanes)
            ap_scale = self._error_scale(exposure, aperture_kernel(radius), name)
            measCat[name][:] = ap.flux * calib
            measCat[name + "Err"][:] = ap.flux_err * calib * (ap_scale or 1.0)
            measCat[name + "_flag"][:] = ap.flag
            measCat.meta[name + "ErrScale"] = ap_scale
            scales[name] = ap_scale
        flags = pixel_flags(exposure, x, y, PIXEL_FLAG_PLANES, radius=cfg.flagRadius)
        for column in PIXEL_FLAG_COLUMNS:
            measCat[column][:] = flags[column]
        measCat["pixelFlags_edge"][:] |= edge
        measCat.meta["fluxUnit"] = "nJy"
        if exposureId is not None:
            measCat.meta["exposureId"] = int(exposureId)
        n_flagged = int(np.count_nonzero(measCat["psfFlux_flag"])) if len(measCat) else 0
        self.metadata.update({"nMeasured": len(measCat), "nPsfFluxFlagged": n_flagged, "errScales": scales})
        self.log.debug(
            "measured %d positions (%d PSF fluxes flagged); error scales %s", len(measCat), n_flagged, scales
        )

    def measure_psf_flux(
        self, exposure: Exposure, x: NDArray[np.float64], y: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_], float | None]:
        """PSF fluxes (nJy) at parent-frame positions with this task's settings.

        Returns
        -------
        flux, flux_err : numpy.ndarray
            nJy; errors multiplied by the error scale when ``doScaleErrors``.
        flag, edge : numpy.ndarray of bool
            Measurement failed / stamp off the image.
        scale : float or None
            The error scale applied (None when not measured or not measurable: errors unscaled).
        """
        if exposure.photo_calib is None:
            raise ValueError("forced measurement needs an exposure with a photo_calib (fluxes are in nJy)")
        result = psf_flux(
            exposure, x, y, bad_planes=self.config.badMaskPlanes, max_masked_fraction=self.config.maxPsfMaskedFraction
        )
        scale = self._error_scale(exposure, psf_weights(exposure), "psfFlux")
        calib = exposure.photo_calib.calibration
        return result.flux * calib, result.flux_err * calib * (scale or 1.0), result.flag, result.edge, scale

    def _error_scale(self, exposure: Exposure, weights: NDArray[np.float64], what: str) -> float | None:
        """The error scale of a measurement with ``weights``, or None (not asked for, or not measurable)."""
        if not self.config.doScaleErrors:
            return None
        scale = noise_scale(exposure, weights, bad_planes=self.config.badMaskPlanes)
        if not math.isfinite(scale):
            self.log.info("%s: too little blank sky to measure the error scale; errors from the variance plane", what)
            return None
        return scale
