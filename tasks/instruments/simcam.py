"""SimCam: the simulated camera of diapipe's survey simulator.

A 3x3 mosaic of square CCDs at 0.2 arcsec/pixel with three filters.  The instrument is data: the
camera constants below, a focal-plane layout computed for any detector size (the simulator presets
choose 256 to 4096 pixel detectors), and :meth:`SimCam.to_config`, which ``butler
register-instrument REPO tasks.instruments.simcam.SimCam`` inserts into a repository.

Focal plane
-----------
Detector ``id = 3 * row + col`` (``row, col`` in 0..2) is named ``S{row}{col}``.  Focal-plane
pixel coordinates ``(X, Y)`` have the boresight at ``(0, 0)``; detector pixel ``(x, y)`` sits at
``X = x + offset_x``, ``Y = y + offset_y`` (no rotation between detectors), with the mosaic centred
on the boresight and ``gap`` pixels between neighbouring detectors.  The sky WCS of a visit maps
focal-plane pixels to the sky with a TAN projection about the boresight (see
:mod:`tasks.simulation.survey`).

Photometry
----------
Pixel values are ADU ("counts").  ``zero_point`` is the AB magnitude of a source giving 1 count in
a nominal 30 s exposure at airmass 1; ``sky_counts`` is the dark-sky level in counts per pixel per
30 s; ``extinction`` is in magnitudes per airmass.  ``gain`` converts counts to electrons (Poisson
statistics apply to electrons), ``read_noise`` is in electrons, and ``saturation`` is the raw
level (sky included) in counts at which a pixel saturates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from butler.geometry import Box

__all__ = ["SimCam", "FilterSpec", "DetectorGeometry"]


@dataclass(frozen=True)
class FilterSpec:
    """One physical filter of SimCam.

    Attributes
    ----------
    name : str
        Physical filter name (``r_sim``).
    band : str
        Abstract band (``r``).
    zero_point : float
        AB magnitude giving 1 count in a 30 s exposure at airmass 1.
    sky_counts : float
        Dark-sky background, counts per pixel per 30 s.
    extinction : float
        Atmospheric extinction, magnitudes per airmass.
    """

    name: str
    band: str
    zero_point: float
    sky_counts: float
    extinction: float


@dataclass(frozen=True)
class DetectorGeometry:
    """Position of one detector in the focal plane.

    Attributes
    ----------
    id : int
        Detector id (the butler's ``detector``).
    name : str
        Detector name (``S11`` is the central CCD).
    bbox : Box
        Pixel box of the detector, ``Box(0, 0, size, size)``.
    offset : tuple of float
        Focal-plane pixel coordinates ``(X, Y)`` of the detector's pixel ``(0, 0)``, relative to the
        boresight.
    """

    id: int
    name: str
    bbox: Box
    offset: tuple[float, float]

    def to_focal_plane(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Detector pixel coordinates -> focal-plane pixel coordinates (boresight at 0, 0)."""
        return x + self.offset[0], y + self.offset[1]


class SimCam:
    """The simulated camera: constants, filters and focal-plane layout.

    Parameters
    ----------
    detector_size : int
        Width and height of each (square) detector in pixels.
    gap : int, optional
        Pixels between neighbouring detectors; default ``max(8, detector_size // 50)``.
    """

    name: str = "SimCam"
    #: Pixel scale, arcsec per pixel.
    pixel_scale: float = 0.2
    #: Electrons per count.
    gain: float = 1.5
    #: Read noise, electrons.
    read_noise: float = 9.0
    #: Raw level (sky included) at which a pixel saturates, counts.
    saturation: float = 60000.0
    #: Nominal exposure time, seconds.
    exposure_time: float = 30.0
    #: Mosaic shape (columns, rows).
    mosaic: tuple[int, int] = (3, 3)
    filters: tuple[FilterSpec, ...] = (
        FilterSpec("g_sim", "g", zero_point=31.4, sky_counts=900.0, extinction=0.20),
        FilterSpec("r_sim", "r", zero_point=31.2, sky_counts=1500.0, extinction=0.12),
        FilterSpec("i_sim", "i", zero_point=30.9, sky_counts=2200.0, extinction=0.08),
    )

    def __init__(self, detector_size: int = 4096, gap: int | None = None) -> None:
        if int(detector_size) != detector_size or detector_size < 16:
            raise ValueError(f"SimCam detector_size must be an integer >= 16 pixels, got {detector_size!r}")
        self.detector_size = int(detector_size)
        self.gap = max(8, self.detector_size // 50) if gap is None else int(gap)
        if self.gap < 0:
            raise ValueError(f"SimCam gap must be >= 0 pixels, got {gap!r}")

    # ------------------------------------------------------------------ filters
    def filter_for_band(self, band: str) -> FilterSpec:
        """The physical filter of a band.

        Raises
        ------
        KeyError
            If SimCam has no filter in that band (the message lists the bands).
        """
        for spec in self.filters:
            if spec.band == band:
                return spec
        raise KeyError(f"SimCam has no filter in band {band!r}; bands: {[f.band for f in self.filters]}")

    # ------------------------------------------------------------------ focal plane
    @property
    def detector_ids(self) -> list[int]:
        """All detector ids, ``0 .. 8``."""
        ncol, nrow = self.mosaic
        return list(range(ncol * nrow))

    def detector(self, detector_id: int) -> DetectorGeometry:
        """Geometry of one detector.

        Raises
        ------
        KeyError
            If the id is not a SimCam detector.
        """
        ncol, nrow = self.mosaic
        if detector_id not in self.detector_ids:
            raise KeyError(f"SimCam has no detector {detector_id!r}; ids are 0..{ncol * nrow - 1}")
        row, col = divmod(int(detector_id), ncol)
        pitch = self.detector_size + self.gap
        # Pixel centres run from 0 to size-1; centre the mosaic's outer pixel edges on the boresight.
        total_x = ncol * self.detector_size + (ncol - 1) * self.gap
        total_y = nrow * self.detector_size + (nrow - 1) * self.gap
        offset = (col * pitch - total_x / 2.0 + 0.5, row * pitch - total_y / 2.0 + 0.5)
        return DetectorGeometry(
            id=int(detector_id),
            name=f"S{row}{col}",
            bbox=Box(0, 0, self.detector_size, self.detector_size),
            offset=offset,
        )

    def detectors(self) -> list[DetectorGeometry]:
        """Geometry of every detector, by id."""
        return [self.detector(i) for i in self.detector_ids]

    def focal_plane_half_size(self) -> float:
        """Half the mosaic's width (= height) in pixels."""
        ncol, _ = self.mosaic
        return (ncol * self.detector_size + (ncol - 1) * self.gap) / 2.0

    # ------------------------------------------------------------------ butler
    def to_config(self) -> dict[str, Any]:
        """The instrument definition ``butler register-instrument`` inserts.

        Returns
        -------
        dict
            ``{name, detectors: [{id, full_name, purpose}], physical_filters: [{name, band}],
            detector_max, visit_max}``.
        """
        return {
            "name": self.name,
            "detectors": [{"id": d.id, "full_name": d.name, "purpose": "SCIENCE"} for d in self.detectors()],
            "physical_filters": [{"name": f.name, "band": f.band} for f in self.filters],
            "detector_max": len(self.detector_ids),
            "visit_max": 10**8,
        }
