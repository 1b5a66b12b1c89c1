"""Compare the outputs of ``pipelines/DIA.yaml`` with the simulator's truth.

Three comparisons, each read from a butler repository:

- :func:`transient_recovery`: every simulated transient active in a science visit-detector is
  matched to the ``{diffName}Diff_diaSrc`` of that visit-detector; its expected S/N is the PSF-fit
  S/N of its true flux on the difference image (variance plane and PSF of the difference).  Also
  counts DIA sources that match no changing source (false positives) and keeps a cutout of the
  difference image around every transient for the report's gallery.
- :func:`forced_coadd_accuracy`: ``{coaddName}Coadd_forced_src`` against the true static fluxes of
  isolated, non-variable stars (``truth_sky``).
- :func:`variable_light_curves`: ``diaForcedSource`` light curves of the DIA objects that are
  simulated variables, with the amplitude of a sinusoid of the true period fitted to them.

All fluxes are in nJy, positions in parent-frame pixels, radii in arcsec unless named ``_px``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table, vstack
from scipy.spatial import cKDTree

from butler.butler import Butler
from butler.exposure import Exposure
from tasks.diffim.testing import UNUSABLE_PLANES, clean_around, expected_difference_snr

__all__ = [
    "TransientRecovery",
    "ForcedCoaddAccuracy",
    "LightCurves",
    "transient_recovery",
    "forced_coadd_accuracy",
    "variable_light_curves",
    "completeness_curve",
]

_log = logging.getLogger(__name__)

#: Half size of the difference-image cutouts kept for the gallery, pixels.
CUTOUT_HALF = 12


@dataclass
class TransientRecovery:
    """Transients against DIA sources, over every visit-detector with a ``diaSrc``.

    Attributes
    ----------
    transients : Table
        One row per active transient per visit-detector: ``visit``, ``detector``, ``id``, ``x``,
        ``y``, ``trueFlux`` (nJy), ``expectedSnr`` (on the difference), ``onCleanPixels`` (no
        SAT/BAD/NO_DATA/EDGE pixel within 1 px: sources there are flagged and not reported by
        design, so completeness counts only these), ``found``,
        ``psfFlux``/``psfFluxErr`` of the matched DIA source (NaN when missed), ``separation_px``.
    n_dia_sources, false_positives : int
        DIA sources in all, and those matching no changing (transient or variable) truth source.
    cutouts : dict
        ``(visit, detector, id)`` -> difference-image cutout ``(2 CUTOUT_HALF + 1)^2`` (NaN padded).
    data_ids : list of dict
        The visit-detectors looked at.
    """

    transients: Table
    n_dia_sources: int
    false_positives: int
    cutouts: dict[tuple[int, int, int], np.ndarray] = field(repr=False)
    data_ids: list[dict[str, Any]]

    def completeness(self, snr_min: float, snr_max: float = math.inf) -> tuple[float, int]:
        """Fraction found of the transients on clean pixels with ``snr_min <= expectedSnr < snr_max``, and their number."""
        snr = np.asarray(self.transients["expectedSnr"], dtype=float)
        sel = (snr >= snr_min) & (snr < snr_max) & np.asarray(self.transients["onCleanPixels"], dtype=bool)
        n = int(sel.sum())
        return (float(np.mean(self.transients["found"][sel])) if n else math.nan), n

    def flux_ratio_median(self, snr_min: float = 10.0) -> float:
        """Median measured / true difference flux of found transients with S/N >= ``snr_min``."""
        t = self.transients
        sel = np.asarray(t["found"]) & (np.asarray(t["expectedSnr"]) >= snr_min) & np.asarray(t["onCleanPixels"])
        return float(np.median(t["psfFlux"][sel] / t["trueFlux"][sel])) if sel.any() else math.nan


@dataclass
class ForcedCoaddAccuracy:
    """Forced coadd PSF fluxes of isolated non-variable stars against their true fluxes.

    Attributes
    ----------
    matches : Table
        ``trueFlux``, ``psfFlux``, ``psfFluxErr`` (nJy), ``snr`` (true flux / error), ``band``.
    """

    matches: Table

    def bias(self, snr_min: float = 20.0) -> float:
        """Median (measured - true) / true for S/N > ``snr_min``."""
        t = self.matches
        sel = np.asarray(t["snr"]) > snr_min
        return float(np.median(t["psfFlux"][sel] / t["trueFlux"][sel] - 1.0)) if sel.any() else math.nan

    def pull_std(self, snr_min: float = 0.0) -> float:
        """Robust std (1.4826 MAD) of (measured - true) / error for S/N > ``snr_min``."""
        t = self.matches
        sel = np.asarray(t["snr"]) > snr_min
        if not sel.any():
            return math.nan
        pull = (np.asarray(t["psfFlux"][sel]) - np.asarray(t["trueFlux"][sel])) / np.asarray(t["psfFluxErr"][sel])
        return float(1.4826 * np.median(np.abs(pull - np.median(pull))))

    def count(self, snr_min: float = 20.0) -> int:
        """Number of matched stars with S/N > ``snr_min``."""
        return int(np.sum(np.asarray(self.matches["snr"]) > snr_min))


@dataclass
class LightCurves:
    """Forced difference-image light curves of DIA objects that are simulated variables.

    Attributes
    ----------
    objects : Table
        One row per matched variable: ``diaObjectId``, ``truthId``, ``trueAmplitude`` (nJy: mean
        flux times fractional amplitude), ``fitAmplitude`` (nJy), ``fitAmplitudeErr``, ``nPoints``.
    points : dict
        ``diaObjectId`` -> Table of ``mjd``, ``psfFlux``, ``psfFluxErr`` (nJy, difference image).
    truth : dict
        ``diaObjectId`` -> dict of the truth row's ``baseFlux``, ``amplitude``, ``period``, ``phase``.
    """

    objects: Table
    points: dict[int, Table] = field(repr=False)
    truth: dict[int, dict[str, float]] = field(repr=False)


def _refs(butler: Butler, name: str, where: str = "") -> list[Any]:
    """Refs of ``name`` in the butler's collections; LookupError naming what to run when there are none."""
    if not butler.query_dataset_types(name):
        raise LookupError(f"no {name} datasets in this repository (run the pipeline step that makes them)")
    refs = list(butler.query_datasets(name, where=where))
    if not refs:
        raise LookupError(f"no {name} datasets in collections {', '.join(butler.collections)}")
    return refs


# ------------------------------------------------------------------------------------ transients
def _cutout(exposure: Exposure, x: float, y: float, half: int = CUTOUT_HALF) -> np.ndarray:
    out = np.full((2 * half + 1, 2 * half + 1), np.nan, dtype=np.float32)
    ix, iy = int(round(x)) - exposure.xy0[0], int(round(y)) - exposure.xy0[1]
    h, w = exposure.shape
    ya, yb = max(iy - half, 0), min(iy + half + 1, h)
    xa, xb = max(ix - half, 0), min(ix + half + 1, w)
    if ya < yb and xa < xb:
        out[ya - (iy - half) : yb - (iy - half), xa - (ix - half) : xb - (ix - half)] = exposure.image[ya:yb, xa:xb]
    return out


def transient_recovery(
    butler: Butler,
    *,
    diff_name: str = "goodSeeing",
    where: str = "",
    match_radius_px: float = 2.0,
) -> TransientRecovery:
    """Match simulated transients to DIA sources, visit-detector by visit-detector.

    Parameters
    ----------
    butler : Butler
        With collections holding the DIA outputs and the simulator's truth tables.
    diff_name : str
        The ``diffName`` of the DIA pipeline (dataset types ``{diff_name}Diff_*``).
    where : str
        Restricts the visit-detectors (a where expression).
    match_radius_px : float
        Largest distance between a transient and its DIA source, pixels.

    Returns
    -------
    TransientRecovery

    Raises
    ------
    LookupError
        When the collections hold no DIA sources.
    """
    refs = sorted(_refs(butler, f"{diff_name}Diff_diaSrc", where), key=lambda r: (r.data_id["visit"], r.data_id["detector"]))
    rows: list[Table] = []
    cutouts: dict[tuple[int, int, int], np.ndarray] = {}
    n_dia = false_pos = 0
    data_ids = []
    for ref in refs:
        data_id = {k: ref.data_id[k] for k in ("instrument", "visit", "detector")}
        data_ids.append(data_id)
        dia = butler.get(ref)
        difference = butler.get(f"{diff_name}Diff_differenceExp", data_id)
        truth = butler.get("truth_transients", data_id)
        kind = np.asarray(truth["sourceType"])
        active = (kind == "transient") & np.asarray(truth["isActive"]) & (np.asarray(truth["trueFlux"]) > 0)
        changing = (kind == "variable") | active
        n_dia += len(dia)
        if len(dia) and changing.any():
            tree = cKDTree(np.column_stack([truth["x"][changing], truth["y"][changing]]))
            d, _ = tree.query(np.column_stack([dia["x"], dia["y"]]), distance_upper_bound=match_radius_px)
            false_pos += int(np.sum(~np.isfinite(d)))
        else:
            false_pos += len(dia)
        tt = truth[active]
        if not len(tt):
            continue
        calib = difference.photo_calib.calibration
        snr = expected_difference_snr(difference, np.asarray(tt["x"]), np.asarray(tt["y"]), np.asarray(tt["trueFlux"]) / calib)
        found = np.zeros(len(tt), dtype=bool)
        flux = np.full(len(tt), np.nan)
        flux_err = np.full(len(tt), np.nan)
        sep = np.full(len(tt), np.nan)
        positive = dia[~np.asarray(dia["isNegative"], dtype=bool)] if len(dia) else dia
        if len(positive):
            d, j = cKDTree(np.column_stack([positive["x"], positive["y"]])).query(
                np.column_stack([tt["x"], tt["y"]]), distance_upper_bound=match_radius_px
            )
            found = np.isfinite(d)
            flux[found] = positive["psfFlux"][j[found]]
            flux_err[found] = positive["psfFluxErr"][j[found]]
            sep[found] = d[found]
        table = Table(
            {
                "visit": np.full(len(tt), data_id["visit"]),
                "detector": np.full(len(tt), data_id["detector"]),
                "id": np.asarray(tt["id"]),
                "x": np.asarray(tt["x"]),
                "y": np.asarray(tt["y"]),
                "trueFlux": np.asarray(tt["trueFlux"], dtype=float),
                "expectedSnr": snr,
                "onCleanPixels": clean_around(difference, np.asarray(tt["x"]), np.asarray(tt["y"]), UNUSABLE_PLANES, 1),
                "found": found,
                "psfFlux": flux,
                "psfFluxErr": flux_err,
                "separation_px": sep,
            }
        )
        rows.append(table)
        for row in table:
            cutouts[(int(row["visit"]), int(row["detector"]), int(row["id"]))] = _cutout(difference, row["x"], row["y"])
    transients = (
        vstack(rows, metadata_conflicts="silent")
        if rows
        else Table(names=("visit", "detector", "id", "expectedSnr", "onCleanPixels", "found"), dtype=(int, int, int, float, bool, bool))
    )
    _log.info("%d transients over %d visit-detectors, %d DIA sources, %d unmatched", len(transients), len(refs), n_dia, false_pos)
    return TransientRecovery(transients, n_dia, false_pos, cutouts, data_ids)


def completeness_curve(recovery: TransientRecovery, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Completeness in bins of expected S/N (transients on clean pixels).

    Returns
    -------
    centres, completeness, counts : ndarray
        Bin centres (geometric), found fraction (NaN in empty bins) and transients per bin.
    """
    clean = np.asarray(recovery.transients["onCleanPixels"], dtype=bool)
    snr = np.asarray(recovery.transients["expectedSnr"], dtype=float)[clean]
    found = np.asarray(recovery.transients["found"], dtype=bool)[clean]
    counts, _ = np.histogram(snr, edges)
    hits, _ = np.histogram(snr[found], edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    return np.sqrt(edges[:-1] * edges[1:]), frac, counts


# ----------------------------------------------------------------------------- forced photometry
def _truth_sky(butler: Butler) -> Table:
    refs = _refs(butler, "truth_sky")
    return vstack([butler.get(ref) for ref in refs], metadata_conflicts="silent") if len(refs) > 1 else butler.get(refs[0])


def _isolated(truth: Table, band: str, radius_arcsec: float, max_neighbour_ratio: float) -> np.ndarray:
    """Rows of ``truth`` with no other source brighter than ``max_neighbour_ratio`` times its flux nearby."""
    coords = SkyCoord(truth["coord_ra"], truth["coord_dec"], unit="deg")
    flux = np.asarray(truth[f"baseFlux_{band}"], dtype=float)
    peak = np.where(np.asarray(truth["sourceType"]) == "transient", np.inf, flux)
    i, j, _, _ = coords.search_around_sky(coords, radius_arcsec * u.arcsec)
    ok = np.ones(len(truth), dtype=bool)
    other = i != j
    spoil = other & (peak[j] > max_neighbour_ratio * flux[i])
    ok[i[spoil]] = False
    return ok


def forced_coadd_accuracy(
    butler: Butler,
    *,
    coadd_name: str = "deep",
    match_radius_arcsec: float = 0.3,
    isolation_arcsec: float = 3.0,
) -> ForcedCoaddAccuracy:
    """Forced coadd PSF fluxes of isolated non-variable stars against truth.

    Parameters
    ----------
    butler : Butler
        With collections holding ``{coadd_name}Coadd_forced_src`` and ``truth_sky``.
    coadd_name : str
        The ``coaddName``.
    match_radius_arcsec : float
        Largest separation between a reference source and its true star.
    isolation_arcsec : float
        No other source brighter than 1% of the star within this radius.

    Returns
    -------
    ForcedCoaddAccuracy
    """
    refs = _refs(butler, f"{coadd_name}Coadd_forced_src")
    truth = _truth_sky(butler)
    stars = np.asarray(truth["sourceType"]) == "star"
    pieces = []
    isolated: dict[str, np.ndarray] = {}
    for ref in refs:
        band = ref.data_id["band"]
        if band not in isolated:
            isolated[band] = stars & _isolated(truth, band, isolation_arcsec, 0.01)
        cat = butler.get(ref)
        if not len(cat):
            continue
        if "detect_isPrimary" in cat.colnames:
            cat = cat[np.asarray(cat["detect_isPrimary"], dtype=bool)]
        t = truth[isolated[band]]
        tc = SkyCoord(t["coord_ra"], t["coord_dec"], unit="deg")
        cc = SkyCoord(cat["coord_ra"], cat["coord_dec"], unit="deg")
        idx, sep, _ = cc.match_to_catalog_sky(tc)
        ok = (sep.arcsec < match_radius_arcsec) & np.isfinite(np.asarray(cat["psfFlux"], dtype=float))
        ok &= np.asarray(cat["psfFluxErr"], dtype=float) > 0
        true_flux = np.asarray(t[f"baseFlux_{band}"], dtype=float)[idx[ok]]
        err = np.asarray(cat["psfFluxErr"], dtype=float)[ok]
        pieces.append(
            Table(
                {
                    "trueFlux": true_flux,
                    "psfFlux": np.asarray(cat["psfFlux"], dtype=float)[ok],
                    "psfFluxErr": err,
                    "snr": true_flux / err,
                    "band": np.full(int(ok.sum()), band),
                }
            )
        )
    matches = vstack(pieces, metadata_conflicts="silent") if pieces else Table(names=("trueFlux", "psfFlux", "psfFluxErr", "snr", "band"))
    return ForcedCoaddAccuracy(matches)


# ----------------------------------------------------------------------------------- light curves
def _sinusoid_amplitude(mjd: np.ndarray, flux: np.ndarray, err: np.ndarray, period: float, phase: float) -> tuple[float, float]:
    """Weighted least-squares ``flux = a + b sin(2 pi mjd / period + phase)``; returns ``b`` and its error."""
    design = np.column_stack([np.ones_like(mjd), np.sin(2.0 * np.pi * mjd / period + phase)])
    w = 1.0 / err
    coef, *_ = np.linalg.lstsq(design * w[:, None], flux * w, rcond=None)
    cov = np.linalg.pinv((design * w[:, None]).T @ (design * w[:, None]))
    return float(coef[1]), float(math.sqrt(max(cov[1, 1], 0.0)))


def variable_light_curves(
    butler: Butler,
    *,
    band: str = "r",
    match_radius_arcsec: float = 0.5,
) -> LightCurves:
    """Light curves (``diaForcedSource``) of the DIA objects that are simulated variable stars.

    The simulated variables are sinusoids, ``F(t) = F0 (1 + A sin(2 pi t / P + phi))``; a sinusoid
    of the true period and phase plus a constant (the template's flux is unknown to the
    difference image) is fitted to each light curve, and its amplitude compared with ``F0 A``.

    Returns
    -------
    LightCurves
    """
    objects = [butler.get(ref) for ref in _refs(butler, "diaObject")]
    forced = [butler.get(ref) for ref in _refs(butler, "diaForcedSource")]
    objects = [o for o in objects if len(o)]
    forced = [f for f in forced if len(f)]
    if not objects or not forced:
        raise LookupError(f"no diaObject / diaForcedSource in collections {butler.collections}")
    dia_objects = vstack(objects, metadata_conflicts="silent")
    forced_all = vstack(forced, metadata_conflicts="silent")
    truth = _truth_sky(butler)
    var = truth[np.asarray(truth["sourceType"]) == "variable"]
    oc = SkyCoord(dia_objects["coord_ra"], dia_objects["coord_dec"], unit="deg")
    vc = SkyCoord(var["coord_ra"], var["coord_dec"], unit="deg")
    idx, sep, _ = vc.match_to_catalog_sky(oc)
    rows = []
    points: dict[int, Table] = {}
    truths: dict[int, dict[str, float]] = {}
    obj_ids = np.asarray(forced_all["diaObjectId"])
    for k in np.flatnonzero(sep.arcsec < match_radius_arcsec):
        object_id = int(dia_objects["diaObjectId"][idx[k]])
        sel = (obj_ids == object_id) & np.isfinite(np.asarray(forced_all["psfFlux"], dtype=float))
        sel &= np.asarray(forced_all["psfFluxErr"], dtype=float) > 0
        if sel.sum() < 4:
            continue
        lc = forced_all[sel]
        lc.sort("midpointMjdTai")
        mjd = np.asarray(lc["midpointMjdTai"], dtype=float)
        row = var[k]
        base, amp = float(row[f"baseFlux_{band}"]), float(row["var_amplitude"])
        period, phase = float(row["var_period_days"]), float(row["var_phase"])
        fit, fit_err = _sinusoid_amplitude(mjd, np.asarray(lc["psfFlux"], dtype=float), np.asarray(lc["psfFluxErr"], dtype=float), period, phase)
        rows.append((object_id, int(row["id"]), base * amp, fit, fit_err, len(lc)))
        points[object_id] = Table({"mjd": mjd, "psfFlux": lc["psfFlux"], "psfFluxErr": lc["psfFluxErr"]})
        truths[object_id] = {"baseFlux": base, "amplitude": amp, "period": period, "phase": phase}
    table = Table(rows=rows, names=("diaObjectId", "truthId", "trueAmplitude", "fitAmplitude", "fitAmplitudeErr", "nPoints"))
    return LightCurves(table, points, truths)
