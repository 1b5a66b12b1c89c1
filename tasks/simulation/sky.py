"""The simulated sky: truth catalogs of stars, galaxies, variable stars and transients.

A :class:`TruthSky` holds every source of the survey field as numpy columns.  Positions are on the
sky (ICRS degrees); brightness is in nJy through :meth:`TruthSky.flux_njy` ``(band, mjd)``, which
evaluates the light curves:

- ``star``: constant.  Magnitudes follow ``dN/dm ~ 10**(slope m)`` (a power law in flux,
  ``N(>F) ~ F**(-slope / 0.4)``), plus a few very bright stars that saturate.
- ``variable``: a star whose flux is ``base * (1 + amplitude * sin(2 pi mjd / period + phase))``.
- ``galaxy``: constant; a Sersic-like profile (index ``sersic_n``, half-light radius
  ``r_eff_arcsec``, ``axis_ratio``, position angle ``pa_deg`` east of north).
- ``transient``: a point source, zero before ``mjd_start`` and from ``mjd_end`` on; in between
  ``peak * exp(-(mjd - mjd_start) / tau_days)``.  Transients start during the science visits (never
  during the template visits); some sit on a host galaxy (``host_id``), some last a single epoch.

Ids are stable across visits: stars and variables ``10_000_000 + i``, galaxies ``20_000_000 + i``,
transients ``30_000_000 + i``.  Colours: ``g - r`` and ``r - i`` per source; the flux in band b is the
r-band flux shifted by the colour.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from numpy.typing import NDArray

from butler.exposure import PhotoCalib

from .presets import SimulationConfig

__all__ = ["TruthSky", "make_truth_sky", "SOURCE_TYPES", "tangent_wcs"]

_log = logging.getLogger("tasks.simulation.sky")

#: Source types, in the order of their id ranges.
SOURCE_TYPES = ("star", "variable", "galaxy", "transient")
ID_OFFSETS = {"star": 10_000_000, "variable": 10_000_000, "galaxy": 20_000_000, "transient": 30_000_000}

_SERSIC_CHOICES = np.array([1.0, 2.0, 4.0])
_SERSIC_PROBS = np.array([0.6, 0.15, 0.25])


def tangent_wcs(ra_deg: float, dec_deg: float, scale_arcsec: float = 1.0) -> WCS:
    """A TAN WCS centred on ``(ra, dec)``: pixel ``(0, 0)`` at the centre, x east, y north, arcsec units."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra_deg, dec_deg]
    wcs.wcs.crpix = [1.0, 1.0]
    wcs.wcs.cdelt = [scale_arcsec / 3600.0, scale_arcsec / 3600.0]
    return wcs


def _power_law_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> NDArray[np.float64]:
    """Magnitudes in [lo, hi] with dN/dm ~ 10**(slope m)."""
    a, b = 10.0 ** (slope * lo), 10.0 ** (slope * hi)
    return np.log10(a + rng.uniform(size=n) * (b - a)) / slope


@dataclass
class TruthSky:
    """All sources of the simulated field (one row per source; numpy columns).

    Attributes
    ----------
    id : numpy.ndarray of int64
        Stable source id.
    kind : numpy.ndarray of str
        ``star``, ``variable``, ``galaxy`` or ``transient``.
    ra, dec : numpy.ndarray
        ICRS position, degrees.
    mag_r : numpy.ndarray
        r-band AB magnitude (peak magnitude for transients).
    g_r, r_i : numpy.ndarray
        Colours, magnitudes.
    sersic_n, r_eff_arcsec, axis_ratio, pa_deg : numpy.ndarray
        Galaxy shape (NaN for point sources); ``pa_deg`` east of north.
    var_amplitude, var_period_days, var_phase : numpy.ndarray
        Variable-star light curves (0 / NaN otherwise).
    mjd_start, mjd_end, tau_days : numpy.ndarray
        Transient light curves (NaN otherwise; ``mjd_end`` is ``inf`` for long-lived ones).
    host_id : numpy.ndarray of int64
        Host galaxy id of a transient, 0 for none.
    """

    id: NDArray[np.int64]
    kind: NDArray[np.str_]
    ra: NDArray[np.float64]
    dec: NDArray[np.float64]
    mag_r: NDArray[np.float64]
    g_r: NDArray[np.float64]
    r_i: NDArray[np.float64]
    sersic_n: NDArray[np.float64]
    r_eff_arcsec: NDArray[np.float64]
    axis_ratio: NDArray[np.float64]
    pa_deg: NDArray[np.float64]
    var_amplitude: NDArray[np.float64]
    var_period_days: NDArray[np.float64]
    var_phase: NDArray[np.float64]
    mjd_start: NDArray[np.float64]
    mjd_end: NDArray[np.float64]
    tau_days: NDArray[np.float64]
    host_id: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.id.size)

    @property
    def is_point(self) -> NDArray[np.bool_]:
        """True for point sources (stars, variables, transients)."""
        return self.kind != "galaxy"

    def base_mag(self, band: str) -> NDArray[np.float64]:
        """Magnitude in ``band`` (peak magnitude for transients)."""
        if band == "r":
            return self.mag_r
        if band == "g":
            return self.mag_r + self.g_r
        if band == "i":
            return self.mag_r - self.r_i
        raise KeyError(f"no colours for band {band!r}; bands: g, r, i")

    def base_flux_njy(self, band: str) -> NDArray[np.float64]:
        """Static flux in nJy (mean flux of variables, 0 for transients)."""
        flux = PhotoCalib.mag_to_njy(self.base_mag(band))
        return np.where(self.kind == "transient", 0.0, flux)

    def flux_njy(self, band: str, mjd: float) -> NDArray[np.float64]:
        """True flux of every source in ``band`` at ``mjd``, nJy."""
        flux = np.asarray(PhotoCalib.mag_to_njy(self.base_mag(band)), dtype=np.float64).copy()
        var = self.kind == "variable"
        flux[var] *= 1.0 + self.var_amplitude[var] * np.sin(
            2.0 * np.pi * mjd / self.var_period_days[var] + self.var_phase[var]
        )
        tr = self.kind == "transient"
        active = self.active(mjd)
        decay = np.zeros(tr.sum())
        sel = active[tr]
        decay[sel] = np.exp(-(mjd - self.mjd_start[tr][sel]) / self.tau_days[tr][sel])
        flux[tr] *= decay
        return flux

    def active(self, mjd: float) -> NDArray[np.bool_]:
        """True for sources emitting at ``mjd`` (always, except transients outside their interval)."""
        with np.errstate(invalid="ignore"):
            tr_active = (self.mjd_start <= mjd) & (mjd < self.mjd_end)
        return np.where(self.kind == "transient", tr_active, True)

    def select(self, index: NDArray) -> TruthSky:
        """A subset of rows."""
        return TruthSky(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})

    def to_table(self) -> Table:
        """The full truth catalog as an astropy Table (``coord_ra``/``coord_dec`` in degrees)."""
        table = Table()
        table["id"] = self.id
        table["sourceType"] = self.kind.astype("U9")
        table["coord_ra"] = self.ra
        table["coord_ra"].unit = "deg"
        table["coord_dec"] = self.dec
        table["coord_dec"].unit = "deg"
        for band in ("g", "r", "i"):
            table[f"baseFlux_{band}"] = self.base_flux_njy(band)
            table[f"baseFlux_{band}"].unit = "nJy"
        table["peakMag_r"] = np.where(self.kind == "transient", self.mag_r, np.nan)
        table["g_r"] = self.g_r
        table["r_i"] = self.r_i
        for name in (
            "sersic_n",
            "r_eff_arcsec",
            "axis_ratio",
            "pa_deg",
            "var_amplitude",
            "var_period_days",
            "var_phase",
            "mjd_start",
            "mjd_end",
            "tau_days",
        ):
            table[name] = getattr(self, name)
        table["hostId"] = self.host_id
        return table


def make_truth_sky(
    config: SimulationConfig,
    field_half_size_arcsec: tuple[float, float, float, float],
    science_mjds: NDArray[np.float64],
    detector_area_deg2: float,
    *,
    rng: np.random.Generator,
) -> TruthSky:
    """Draw the sources of a field.

    Parameters
    ----------
    config : SimulationConfig
        Densities, magnitude ranges and light-curve settings.
    field_half_size_arcsec : (xi_min, xi_max, eta_min, eta_max)
        Extent of the field in tangent-plane coordinates about ``(field_ra, field_dec)``, arcsec
        (xi east, eta north).
    science_mjds : numpy.ndarray
        Sorted distinct MJDs of the science epochs (transients start and end around them).
    detector_area_deg2 : float
        Area of one detector (scales ``bright_stars_per_detector``).
    rng : numpy.random.Generator
    """
    xi0, xi1, eta0, eta1 = field_half_size_arcsec
    area = (xi1 - xi0) * (eta1 - eta0) / 3600.0**2
    frame = tangent_wcs(config.field_ra, config.field_dec)

    def positions(n: int) -> tuple[NDArray, NDArray]:
        xi = rng.uniform(xi0, xi1, n)
        eta = rng.uniform(eta0, eta1, n)
        ra, dec = frame.all_pix2world(xi, eta, 0)
        return np.asarray(ra) % 360.0, np.asarray(dec)

    # Stars (a fraction variable) and bright stars.
    n_star = int(rng.poisson(config.star_density * area))
    n_bright = int(rng.poisson(config.bright_stars_per_detector * area / detector_area_deg2))
    star_mag = np.concatenate(
        [
            _power_law_mags(rng, n_star, *config.star_mag_range, config.star_count_slope),
            rng.uniform(*config.bright_star_mag_range, n_bright),
        ]
    )
    n_all_stars = star_mag.size
    star_ra, star_dec = positions(n_all_stars)
    star_kind = np.full(n_all_stars, "star", dtype="U9")
    is_var = np.zeros(n_all_stars, bool)
    is_var[:n_star] = rng.uniform(size=n_star) < config.variable_fraction
    star_kind[is_var] = "variable"
    star_gr = rng.uniform(0.2, 1.4, n_all_stars)
    star_ri = 0.45 * star_gr + rng.normal(0.0, 0.05, n_all_stars)
    amp = np.where(is_var, rng.uniform(0.05, 0.5, n_all_stars), 0.0)
    period = np.where(is_var, 10.0 ** rng.uniform(-0.5, 1.5, n_all_stars), np.nan)
    phase = np.where(is_var, rng.uniform(0.0, 2.0 * math.pi, n_all_stars), np.nan)

    # Galaxies.
    n_gal = int(rng.poisson(config.galaxy_density * area))
    gal_mag = _power_law_mags(rng, n_gal, *config.galaxy_mag_range, config.galaxy_count_slope)
    gal_ra, gal_dec = positions(n_gal)
    gal_n = rng.choice(_SERSIC_CHOICES, size=n_gal, p=_SERSIC_PROBS)
    # Brighter galaxies are bigger: median r_eff 0.8" at m=19, 0.35" at m=24.
    median_re = 0.8 * 10.0 ** (-0.072 * (gal_mag - 19.0))
    gal_re = np.clip(median_re * np.exp(rng.normal(0.0, 0.35, n_gal)), 0.15, 2.5)
    gal_q = rng.uniform(0.35, 1.0, n_gal)
    gal_pa = rng.uniform(0.0, 180.0, n_gal)
    gal_gr = rng.uniform(0.3, 1.0, n_gal)
    gal_ri = rng.uniform(0.2, 0.5, n_gal)

    # Transients.
    n_tr = int(rng.poisson(config.transient_density * area)) if science_mjds.size else 0
    tr_mag = rng.uniform(*config.transient_mag_range, n_tr)
    tr_ra, tr_dec = positions(n_tr)
    host = np.zeros(n_tr, np.int64)
    candidates = np.flatnonzero(gal_mag < 23.0)
    on_host = (rng.uniform(size=n_tr) < config.transient_host_fraction) & (candidates.size > 0)
    if on_host.any():
        hosts = rng.choice(candidates, size=int(on_host.sum()))
        host[on_host] = ID_OFFSETS["galaxy"] + hosts
        # Offset from the host centre: a Gaussian of 0.5 r_eff along the host's ellipse.
        a = rng.normal(0.0, 0.5, hosts.size) * gal_re[hosts]
        b = rng.normal(0.0, 0.5, hosts.size) * gal_re[hosts] * gal_q[hosts]
        pa = np.radians(gal_pa[hosts])
        d_east = a * np.sin(pa) + b * np.cos(pa)
        d_north = a * np.cos(pa) - b * np.sin(pa)
        hx, hy = frame.all_world2pix(gal_ra[hosts], gal_dec[hosts], 0)
        ra_h, dec_h = frame.all_pix2world(np.asarray(hx) + d_east, np.asarray(hy) + d_north, 0)
        tr_ra[on_host] = np.asarray(ra_h) % 360.0
        tr_dec[on_host] = np.asarray(dec_h)
    t_start = np.full(n_tr, np.nan)
    t_end = np.full(n_tr, np.inf)
    tau = rng.uniform(15.0, 60.0, n_tr)
    if n_tr:
        mjds = np.sort(science_mjds)
        cadence = float(np.median(np.diff(mjds))) if mjds.size > 1 else 3.0
        # Long-lived: start uniformly in (t_1 - cadence, t_N): active from one science epoch on.
        t_start = rng.uniform(mjds[0] - cadence, mjds[-1] - 0.02, n_tr)
        short = rng.uniform(size=n_tr) < config.transient_short_fraction
        epoch = rng.integers(0, mjds.size, n_tr)
        t_start[short] = mjds[epoch[short]] - rng.uniform(0.05, 0.45, short.sum()) * cadence
        t_end[short] = mjds[epoch[short]] + rng.uniform(0.1, 0.45, short.sum()) * cadence
        tau[short] = rng.uniform(2.0, 5.0, short.sum())
    tr_gr = rng.normal(0.0, 0.3, n_tr)
    tr_ri = rng.normal(0.0, 0.2, n_tr)

    nan_s, nan_g, nan_t = np.full(n_all_stars, np.nan), np.full(n_gal, np.nan), np.full(n_tr, np.nan)
    sky = TruthSky(
        id=np.concatenate(
            [
                ID_OFFSETS["star"] + np.arange(n_all_stars),
                ID_OFFSETS["galaxy"] + np.arange(n_gal),
                ID_OFFSETS["transient"] + np.arange(n_tr),
            ]
        ).astype(np.int64),
        kind=np.concatenate([star_kind, np.full(n_gal, "galaxy", "U9"), np.full(n_tr, "transient", "U9")]),
        ra=np.concatenate([star_ra, gal_ra, tr_ra]),
        dec=np.concatenate([star_dec, gal_dec, tr_dec]),
        mag_r=np.concatenate([star_mag, gal_mag, tr_mag]),
        g_r=np.concatenate([star_gr, gal_gr, tr_gr]),
        r_i=np.concatenate([star_ri, gal_ri, tr_ri]),
        sersic_n=np.concatenate([nan_s, gal_n, nan_t]),
        r_eff_arcsec=np.concatenate([nan_s, gal_re, nan_t]),
        axis_ratio=np.concatenate([nan_s, gal_q, nan_t]),
        pa_deg=np.concatenate([nan_s, gal_pa, nan_t]),
        var_amplitude=np.concatenate([amp, np.zeros(n_gal), np.zeros(n_tr)]),
        var_period_days=np.concatenate([period, nan_g, nan_t]),
        var_phase=np.concatenate([phase, nan_g, nan_t]),
        mjd_start=np.concatenate([nan_s, nan_g, t_start]),
        mjd_end=np.concatenate([nan_s, nan_g, t_end]),
        tau_days=np.concatenate([nan_s, nan_g, tau]),
        host_id=np.concatenate([np.zeros(n_all_stars + n_gal, np.int64), host]),
    )
    _log.info(
        "truth sky: %d stars (%d variable, %d bright), %d galaxies, %d transients (%d on hosts) over %.4f deg^2",
        n_all_stars,
        int(is_var.sum()),
        n_bright,
        n_gal,
        n_tr,
        int(on_host.sum()) if n_tr else 0,
        area,
    )
    return sky
