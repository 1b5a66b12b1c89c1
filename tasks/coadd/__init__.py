"""Coadds: warps of calexps onto skymap patches, their assembly, and detection on the coadd.

- :class:`.make_warp.MakeWarpTask` (``makeWarp``): ``calexp`` -> ``deepCoadd_directWarp`` and
  ``deepCoadd_psfMatchedWarp`` [skymap, tract, patch, visit];
- :class:`.assemble.AssembleCoaddTask` (``assembleCoadd``): warps -> ``deepCoadd``
  [skymap, tract, patch, band];
- :class:`.detect.DetectCoaddSourcesTask` (``detectCoaddSources``): ``deepCoadd`` -> ``deepCoadd_ref``
  [skymap, tract, patch].

The pipeline is ``pipelines/Coadd.yaml``.
"""

from .assemble import AssembleCoaddConfig, AssembleCoaddConnections, AssembleCoaddTask, assemble_coadd
from .detect import DetectCoaddSourcesConfig, DetectCoaddSourcesConnections, DetectCoaddSourcesTask
from .make_warp import MakeWarpConfig, MakeWarpConnections, MakeWarpTask, exposure_seeing, make_model_psf

__all__ = [
    "AssembleCoaddConfig",
    "AssembleCoaddConnections",
    "AssembleCoaddTask",
    "assemble_coadd",
    "DetectCoaddSourcesConfig",
    "DetectCoaddSourcesConnections",
    "DetectCoaddSourcesTask",
    "MakeWarpConfig",
    "MakeWarpConnections",
    "MakeWarpTask",
    "exposure_seeing",
    "make_model_psf",
]
