"""Image differencing: templates from coadds, PSF matching, subtraction, DIA-source detection.

The three pipeline tasks of ``pipelines/DIA.yaml`` (LSST's labels and dataset types):

- :class:`.get_template.GetCoaddAsTemplateTask` (``getTemplate``): ``deepCoadd`` patches + ``skyMap``
  + ``calexp`` -> ``goodSeeingDiff_templateExp`` (the coadd pixels of the closest tract, copied in
  the tract frame and warped to the science WCS);
- :class:`.subtract.ImageDifferenceTask` (``subtractImages``): ``goodSeeingDiff_templateExp`` +
  ``calexp`` + ``src`` -> ``goodSeeingDiff_differenceExp``, ``goodSeeingDiff_matchedExp``
  (Alard--Lupton PSF matching with :class:`.make_kernel.MakeKernelTask`, mode ``auto``, optional
  decorrelation);
- :class:`.detect_measure.DetectAndMeasureTask` (``detectAndMeasure``): difference ->
  ``goodSeeingDiff_diaSrc`` (PSF matched-filter detection of positive and negative sources,
  centroids, PSF and aperture fluxes, shapes, dipoles, pixel flags).

Errors are in :mod:`.errors`; :mod:`.testing` makes simulated pairs with truth; :mod:`.debug_plots`
draws the kernel fit; :mod:`.external` prepares external (FITS) exposures that lack a PSF or a
variance plane.
"""

from .detect_measure import DetectAndMeasureConfig, DetectAndMeasureConnections, DetectAndMeasureTask
from .errors import (
    BandMismatchError,
    DiffimError,
    InsufficientKernelSourcesError,
    KernelSolutionError,
    MissingPsfError,
    TemplateGeometryError,
)
from .get_template import GetCoaddAsTemplateConfig, GetCoaddAsTemplateTask, GetTemplateConnections
from .make_kernel import BackgroundModel, MakeKernelConfig, MakeKernelTask
from .subtract import ImageDifferenceConfig, ImageDifferenceConnections, ImageDifferenceTask

__all__ = [
    "BackgroundModel",
    "BandMismatchError",
    "DetectAndMeasureConfig",
    "DetectAndMeasureConnections",
    "DetectAndMeasureTask",
    "DiffimError",
    "GetCoaddAsTemplateConfig",
    "GetCoaddAsTemplateTask",
    "GetTemplateConnections",
    "ImageDifferenceConfig",
    "ImageDifferenceConnections",
    "ImageDifferenceTask",
    "InsufficientKernelSourcesError",
    "KernelSolutionError",
    "MakeKernelConfig",
    "MakeKernelTask",
    "MissingPsfError",
    "TemplateGeometryError",
]
