"""Forced photometry, DIA-source association and light curves.

The pipeline tasks (LSST's labels; dataset types with their dimensions):

- :class:`.coadd.ForcedPhotCoaddTask` (``forcedPhotCoadd``): ``deepCoadd`` + ``deepCoadd_ref`` +
  ``skyMap`` -> ``deepCoadd_forced_src`` [skymap, tract, patch, band];
- :class:`.association.AssociateDiaSourcesTask` (``associateDiaSources``): ``goodSeeingDiff_diaSrc``
  of the overlapping visit-detectors -> ``diaObject`` and ``goodSeeingDiff_assocDiaSrc``
  [skymap, tract, patch];
- :class:`.diffim.ForcedPhotDiffimTask` (``forcedPhotDiffim``): ``goodSeeingDiff_differenceExp`` (+
  ``calexp``) + the overlapping ``diaObject`` tables -> ``diaForcedSource`` [instrument, visit,
  detector].

:mod:`.measurement` holds the shared subtask (LSST's ``ForcedMeasurementTask``), :mod:`.schemas`
the column groups, :mod:`.errors` the error class.  The pixel-level measurements are in
:mod:`tasks.measure`.
"""

from .association import AssociateDiaSourcesConfig, AssociateDiaSourcesConnections, AssociateDiaSourcesTask
from .coadd import ForcedPhotCoaddConfig, ForcedPhotCoaddConnections, ForcedPhotCoaddTask
from .diffim import ForcedPhotDiffimConfig, ForcedPhotDiffimConnections, ForcedPhotDiffimTask
from .errors import ForcedPhotometryError
from .measurement import ForcedMeasurementConfig, ForcedMeasurementTask

__all__ = [
    "AssociateDiaSourcesConfig",
    "AssociateDiaSourcesConnections",
    "AssociateDiaSourcesTask",
    "ForcedMeasurementConfig",
    "ForcedMeasurementTask",
    "ForcedPhotCoaddConfig",
    "ForcedPhotCoaddConnections",
    "ForcedPhotCoaddTask",
    "ForcedPhotDiffimConfig",
    "ForcedPhotDiffimConnections",
    "ForcedPhotDiffimTask",
    "ForcedPhotometryError",
]
