"""Simulated instrument and survey: truth catalogs, PSF fields, rendering and a butler repository.

Quick use::

    from tasks.simulation import get_preset, plan_survey, simulate_visit_detector, write_repository

    write_repository("repo", get_preset("tiny"))             # or: python -m tasks.simulation ...
    plan = plan_survey(get_preset("tiny", seed=3))
    sim = simulate_visit_detector(plan, plan.visits[-1].id, 4, keep_model=True)
    sim.exposure, sim.src, sim.truth_sources, sim.truth_transients, sim.model

Modules: :mod:`.presets` (parameters), :mod:`.sky` (truth catalogs and light curves),
:mod:`.psf_field` (seeing and its variation; the GridPsf model), :mod:`.gaussians` (the vectorized
renderer and Sersic mixtures), :mod:`.render` (sky, noise, defects, saturation), :mod:`.measure`
(``src`` detection and measurement), :mod:`.survey` (visits, WCSs, the repository).
"""

from __future__ import annotations

from .measure import detect_and_measure
from .presets import PRESETS, SimulationConfig, get_preset
from .psf_field import PsfField
from .sky import TruthSky, make_truth_sky
from .survey import (
    DATASET_TYPES,
    INSTRUMENT_CLASS,
    TRUTH_COLUMNS,
    SimulatedExposure,
    SurveyPlan,
    VisitSpec,
    default_run,
    plan_survey,
    simulate_visit_detector,
    skymap_name,
    write_repository,
)

__all__ = [
    "DATASET_TYPES",
    "INSTRUMENT_CLASS",
    "PRESETS",
    "PsfField",
    "SimulatedExposure",
    "SimulationConfig",
    "SurveyPlan",
    "TRUTH_COLUMNS",
    "TruthSky",
    "VisitSpec",
    "default_run",
    "detect_and_measure",
    "get_preset",
    "make_truth_sky",
    "plan_survey",
    "simulate_visit_detector",
    "skymap_name",
    "write_repository",
]
