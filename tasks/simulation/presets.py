"""Simulation presets: every number that shapes a simulated survey, in one frozen dataclass.

Three presets are defined (:data:`PRESETS`); all observe the r band by default:

- ``tiny`` -- unit and integration tests (seconds): 5 visits (2 template + 3 science), detectors 4
  and 5 of 400x400 px, a 3x3-patch skymap of 330 px patches; crowded on purpose (150k stars and
  25k transients per deg^2) so that every detector holds saturated stars, transients and variables.
- ``small`` -- the demo (about 25 s): 10 visits (4 + 6), detectors 3, 4, 5 and 7 of 1024x1024 px,
  4x4 patches of 1000 px.
- ``large`` -- benchmarks: 8 visits (4 + 4), detectors 4 and 5 of 4096x4096 px (~2900 stars, ~1300
  galaxies and up to ~250 active transients per detector and visit), 3x3 patches of 4000 px.

Use :func:`get_preset` and :func:`dataclasses.replace` to derive variants, e.g.
``replace(get_preset("tiny"), bands=("g", "r"), seed=3)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["SimulationConfig", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of a simulated survey.

    Units are in the names or below: arcsec, pixels (px), degrees, days, AB magnitudes, counts
    (ADU).  Densities are per square degree.

    Attributes
    ----------
    name : str
        Preset name (recorded in exposure metadata and used in the default skymap name).
    seed : int
        Master random seed: the same seed gives identical pixels and catalogs.
    detector_size : int
        Width = height of each detector, px.
    detector_ids : tuple of int
        SimCam detectors to simulate (0..8; 4 is the centre of the 3x3 mosaic).
    bands : tuple of str
        Bands to observe; each band gets ``n_template_visits + n_science_visits`` visits.
    n_template_visits, n_science_visits : int
        Early good-seeing visits (no transients yet) and later visits (transients appear).
    visit_id_start : int
        First visit id; ids increase by one per visit.
    field_ra, field_dec : float
        Field centre (boresight of the undithered pointing), degrees.
    mjd_start : float
        MJD of the first visit.
    template_cadence_days, science_cadence_days, season_gap_days : float
        Spacing of template visits, of science visits, and the gap between the two groups.
    dither_arcsec : float
        Maximum pointing offset in RA and Dec (uniform), arcsec.
    rotation_deg : float
        Maximum sky rotation of the focal plane (uniform in +-), degrees.
    seeing_template, seeing_science : (float, float)
        Range of the delivered FWHM at the focal-plane centre, arcsec.
    psf_variation : float
        Fractional change of the PSF FWHM across the focal plane (0 = constant PSF).
    psf_ellipticity : float
        Largest PSF ellipticity ``1 - b/a`` (at the mosaic corners; a third of it at the centre).
    psf_wing_fraction : float
        Flux fraction of a second Gaussian of twice the core width (0 = single Gaussian).
    psf_grid : int
        Nodes per axis of each detector's GridPsf model.
    star_density : float
        Stars per deg^2 between ``star_mag_range``.
    star_mag_range : (float, float)
        r-band magnitude range of the power-law star counts.
    star_count_slope : float
        ``dN/dm ~ 10**(slope * m)``.
    bright_stars_per_detector : float
        Extra very bright stars (``bright_star_mag_range``, most saturate) per detector area.
    bright_star_mag_range : (float, float)
        Their magnitude range.
    variable_fraction : float
        Fraction of the (non-bright) stars that are sinusoidal variables.
    galaxy_density : float
        Galaxies per deg^2 between ``galaxy_mag_range``.
    galaxy_mag_range : (float, float)
        Their r-band magnitude range (power law with ``galaxy_count_slope``).
    galaxy_count_slope : float
        ``dN/dm ~ 10**(slope * m)``.
    transient_density : float
        Transients per deg^2 appearing during the science visits.
    transient_mag_range : (float, float)
        Peak magnitude range (uniform in magnitude).
    transient_host_fraction : float
        Fraction of transients placed on a galaxy (within about one half-light radius).
    transient_short_fraction : float
        Fraction of transients that last less than one science cadence (seen in one epoch).
    sky_jitter : float
        Sky level varies by a uniform factor in ``[1 - jitter, 1 + jitter]`` from visit to visit.
    sky_gradient : float
        Fractional linear gradient of the sky across the focal plane.
    background_residual : float
        Amplitude (counts) of the linear background left in the calexp after sky subtraction.
    zero_point_jitter : float
        Standard deviation of the per-visit zero point (transparency), magnitudes.
    airmass_range : (float, float)
        Visit airmass range.
    cosmic_rays_per_megapixel : float
        Mean number of cosmic-ray tracks per 10^6 pixels per exposure.
    bad_columns_per_detector : int
        Bad (dead or hot) columns per detector; masked BAD.
    repair_defects : bool
        Interpolate over cosmic rays and bad columns (masks CR/BAD plus INTRP), as a calexp is.
        When False the corrupted pixels are left in place (still masked CR/BAD).
    bleed_trails : bool
        Spill the charge above saturation along columns (charge-conserving bleed trails).
    patch_inner : int
        Skymap patch inner size, px.
    patch_border : int
        Skymap patch border, px.
    detection_threshold : float
        ``src`` detection threshold, in sigma of the PSF-smoothed image.
    """

    name: str
    seed: int = 1
    detector_size: int = 400
    detector_ids: tuple[int, ...] = (4,)
    bands: tuple[str, ...] = ("r",)
    n_template_visits: int = 2
    n_science_visits: int = 3
    visit_id_start: int = 1000
    field_ra: float = 150.1
    field_dec: float = 2.2
    mjd_start: float = 60300.1
    template_cadence_days: float = 1.0
    science_cadence_days: float = 3.0
    season_gap_days: float = 30.0
    dither_arcsec: float = 8.0
    rotation_deg: float = 1.0
    seeing_template: tuple[float, float] = (0.6, 0.75)
    seeing_science: tuple[float, float] = (0.8, 1.2)
    psf_variation: float = 0.12
    psf_ellipticity: float = 0.08
    psf_wing_fraction: float = 0.0
    psf_grid: int = 7
    star_density: float = 60000.0
    star_mag_range: tuple[float, float] = (16.0, 24.5)
    star_count_slope: float = 0.25
    bright_stars_per_detector: float = 2.0
    bright_star_mag_range: tuple[float, float] = (13.0, 15.5)
    variable_fraction: float = 0.03
    galaxy_density: float = 25000.0
    galaxy_mag_range: tuple[float, float] = (18.0, 24.5)
    galaxy_count_slope: float = 0.3
    transient_density: float = 6000.0
    transient_mag_range: tuple[float, float] = (19.5, 24.5)
    transient_host_fraction: float = 0.4
    transient_short_fraction: float = 0.15
    sky_jitter: float = 0.2
    sky_gradient: float = 0.05
    background_residual: float = 2.0
    zero_point_jitter: float = 0.03
    airmass_range: tuple[float, float] = (1.0, 1.4)
    cosmic_rays_per_megapixel: float = 12.0
    bad_columns_per_detector: int = 2
    repair_defects: bool = True
    bleed_trails: bool = True
    patch_inner: int = 240
    patch_border: int = 20
    detection_threshold: float = 5.0

    def __post_init__(self) -> None:
        from tasks.instruments.simcam import SimCam

        problems = []
        if self.detector_size < 64:
            problems.append(f"detector_size must be >= 64 px, got {self.detector_size}")
        if not self.detector_ids or any(d not in SimCam(self.detector_size).detector_ids for d in self.detector_ids):
            problems.append(f"detector_ids must be a non-empty subset of 0..8, got {self.detector_ids}")
        if len(set(self.detector_ids)) != len(self.detector_ids):
            problems.append(f"detector_ids has duplicates: {self.detector_ids}")
        if not self.bands:
            problems.append("bands must not be empty")
        for band in self.bands:
            try:
                SimCam(self.detector_size).filter_for_band(band)
            except KeyError as exc:
                problems.append(str(exc.args[0]))
        if self.n_template_visits < 0 or self.n_science_visits < 0 or self.n_visits_per_band < 1:
            problems.append("n_template_visits and n_science_visits must be >= 0 with at least one visit")
        for name in ("seeing_template", "seeing_science"):
            lo, hi = getattr(self, name)
            if not 0.2 <= lo <= hi <= 5.0:
                problems.append(f"{name} must be an increasing FWHM range in arcsec within [0.2, 5], got {(lo, hi)}")
        if not 0 <= self.psf_variation < 0.5:
            problems.append(f"psf_variation must be in [0, 0.5), got {self.psf_variation}")
        if not 0 <= self.psf_ellipticity < 0.5:
            problems.append(f"psf_ellipticity must be in [0, 0.5), got {self.psf_ellipticity}")
        if not 0 <= self.psf_wing_fraction < 0.5:
            problems.append(f"psf_wing_fraction must be in [0, 0.5), got {self.psf_wing_fraction}")
        if self.psf_grid < 2:
            problems.append(f"psf_grid must be >= 2 nodes per axis, got {self.psf_grid}")
        if self.patch_inner < 16 or self.patch_border < 0:
            problems.append(
                f"patch_inner must be >= 16 px and patch_border >= 0, got {self.patch_inner}, {self.patch_border}"
            )
        if problems:
            raise ValueError(f"invalid simulation config {self.name!r}: " + "; ".join(problems))

    @property
    def n_visits_per_band(self) -> int:
        """Template plus science visits in each band."""
        return self.n_template_visits + self.n_science_visits

    @property
    def n_visits(self) -> int:
        """Total number of visits."""
        return self.n_visits_per_band * len(self.bands)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able), e.g. for exposure metadata or a provenance file."""
        out = asdict(self)
        for f in fields(self):
            if isinstance(out[f.name], tuple):
                out[f.name] = list(out[f.name])
        return out


PRESETS: dict[str, SimulationConfig] = {
    "tiny": SimulationConfig(
        name="tiny",
        detector_size=400,
        detector_ids=(4, 5),
        n_template_visits=2,
        n_science_visits=3,
        visit_id_start=1000,
        dither_arcsec=6.0,
        star_density=150000.0,
        galaxy_density=60000.0,
        transient_density=25000.0,
        bright_stars_per_detector=2.5,
        psf_variation=0.2,
        bad_columns_per_detector=1,
        patch_inner=330,
        patch_border=20,
    ),
    "small": SimulationConfig(
        name="small",
        detector_size=1024,
        detector_ids=(3, 4, 5, 7),
        n_template_visits=4,
        n_science_visits=6,
        visit_id_start=2000,
        dither_arcsec=15.0,
        transient_density=8000.0,
        bright_stars_per_detector=3.0,
        bad_columns_per_detector=2,
        patch_inner=1000,
        patch_border=50,
    ),
    "large": SimulationConfig(
        name="large",
        detector_size=4096,
        detector_ids=(4, 5),
        n_template_visits=4,
        n_science_visits=4,
        visit_id_start=3000,
        dither_arcsec=40.0,
        rotation_deg=1.0,
        star_density=58000.0,
        transient_density=5500.0,
        bright_stars_per_detector=8.0,
        bad_columns_per_detector=4,
        patch_inner=4000,
        patch_border=100,
    ),
}


def get_preset(name: str, **overrides: Any) -> SimulationConfig:
    """A preset by name, optionally with some fields replaced.

    Raises
    ------
    KeyError
        If the preset does not exist (the message lists the presets).
    """
    from dataclasses import replace

    try:
        config = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown simulation preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return replace(config, **overrides) if overrides else config
