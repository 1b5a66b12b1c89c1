"""From truth to pixels: sources convolved with the PSF, sky, noise, defects, cosmic rays, saturation.

The steps, in the order :func:`tasks.simulation.survey.simulate_visit_detector` applies them:

1. :func:`render_scene` -- the noiseless source image in counts: point sources (stars, variables,
   transients) are the analytic PSF at their exact sub-pixel positions; galaxies are Sersic-like
   Gaussian mixtures convolved analytically with the PSF (covariances add).
2. :func:`sky_background` -- a sky level with a linear gradient across the focal plane.
3. :func:`add_noise` -- Poisson noise on the electrons (``gain`` e-/count) plus Gaussian read noise
   (exact Poisson below 1000 electrons, its Gaussian limit above: every sky pixel of the presets).
   The variance plane is the *expected* variance ``(sky + sources) / gain + (read_noise / gain)^2``
   in counts^2 (the model, not the noisy pixels).
4. :func:`apply_saturation` -- pixels above the full-well level are clipped to it and, with bleed
   trails, the excess charge spills along the column (charge-conserving) into neighbours until
   they are full too; all of them, and the partly filled end of each trail, are masked SAT, and
   the mask is grown by one pixel (as LSST's ISR does).
5. :func:`add_cosmic_rays`, :func:`add_bad_columns` -- straight tracks of charge (CR) and dead or
   hot columns (BAD).
6. The calexp is sky-subtracted: ``image = raw - sky + residual`` where ``residual`` is a small
   plane (``background_residual`` counts; its coefficients are in the metadata ``BG_RESIDUAL``)
   standing for an imperfect background model.  As in an LSST calexp, cosmic rays and bad columns
   are interpolated along rows (:func:`interpolate_rows`) and additionally masked INTRP; saturated
   pixels are left clipped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from tasks.instruments.simcam import DetectorGeometry

from .gaussians import add_gaussians, covariance_from_shape, sersic_mixture
from .psf_field import PsfField

__all__ = [
    "SceneSources",
    "render_scene",
    "sky_background",
    "add_noise",
    "apply_saturation",
    "add_cosmic_rays",
    "add_bad_columns",
    "interpolate_rows",
]

_log = logging.getLogger("tasks.simulation.render")


@dataclass
class SceneSources:
    """Sources to draw on one detector, in its pixel frame.

    Attributes
    ----------
    x, y : numpy.ndarray
        Positions, parent-frame pixels.
    counts : numpy.ndarray
        Total flux, counts.
    is_point : numpy.ndarray of bool
        Point source (PSF) or galaxy.
    sersic_n, r_eff_px, axis_ratio, theta_deg : numpy.ndarray
        Galaxy shape in pixels: Sersic index, half-light radius along the major axis, axis ratio,
        major-axis angle from +x towards +y (ignored for point sources).
    """

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    counts: NDArray[np.float64]
    is_point: NDArray[np.bool_]
    sersic_n: NDArray[np.float64]
    r_eff_px: NDArray[np.float64]
    axis_ratio: NDArray[np.float64]
    theta_deg: NDArray[np.float64]


def render_scene(
    shape: tuple[int, int],
    sources: SceneSources,
    psf_field: PsfField,
    detector: DetectorGeometry,
    aperture_radius: NDArray[np.float64],
    *,
    xy0: tuple[int, int] = (0, 0),
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Noiseless image of the sources (counts), PSF-convolved.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(height, width)``.
    sources : SceneSources
        What to draw (positions may lie outside the image: their light that falls in is drawn).
    psf_field : PsfField
        The visit's PSF.
    detector : DetectorGeometry
        Maps detector pixels to the focal plane (where the PSF is defined).
    aperture_radius : numpy.ndarray
        Per source, the radius (pixels) of the circle in which its own flux is also returned.
    xy0 : (int, int)
        Parent pixel of ``image[0, 0]``.

    Returns
    -------
    image : numpy.ndarray
        float64 counts.
    own_aperture : numpy.ndarray
        Each source's own flux inside ``aperture_radius`` (counts).
    """
    image = np.zeros(shape, dtype=np.float64)
    n = sources.x.size
    own = np.zeros(n)
    if n == 0:
        return image, own
    fx, fy = detector.to_focal_plane(sources.x, sources.y)
    psf_comps = psf_field.components_at(fx, fy)

    point = np.flatnonzero(sources.is_point)
    for weight, cxx, cyy, cxy in psf_comps:
        own[point] += add_gaussians(
            image,
            sources.x[point],
            sources.y[point],
            sources.counts[point] * weight,
            cxx[point],
            cyy[point],
            cxy[point],
            xy0=xy0,
            aperture_radius=aperture_radius[point],
        )

    galaxies = np.flatnonzero(~sources.is_point)
    for n_value in np.unique(sources.sersic_n[galaxies]):
        members = galaxies[sources.sersic_n[galaxies] == n_value]
        mix = sersic_mixture(float(n_value))
        k = mix.weights.size
        # Galaxy component covariances: (sigma_k r_eff)^2 along the major axis, times q^2 across.
        re = np.repeat(sources.r_eff_px[members], k)
        sig = re * np.tile(mix.sigmas, members.size)
        gxx, gyy, gxy = covariance_from_shape(
            sig, np.repeat(sources.axis_ratio[members], k), np.repeat(sources.theta_deg[members], k)
        )
        frac = np.tile(mix.weights, members.size)
        owner = np.repeat(members, k)
        for weight, cxx, cyy, cxy in psf_comps:
            sums = add_gaussians(
                image,
                sources.x[owner],
                sources.y[owner],
                sources.counts[owner] * frac * weight,
                gxx + cxx[owner],
                gyy + cyy[owner],
                gxy + cxy[owner],
                xy0=xy0,
                aperture_radius=aperture_radius[owner],
            )
            np.add.at(own, owner, sums)
    return image, own


def sky_background(
    shape: tuple[int, int],
    detector: DetectorGeometry,
    level: float,
    gradient: tuple[float, float],
    radius_px: float,
) -> NDArray[np.float64]:
    """Sky in counts per pixel: ``level * (1 + gx X / R + gy Y / R)`` over focal-plane ``(X, Y)``."""
    height, width = shape
    fx, _ = detector.to_focal_plane(np.arange(width, dtype=np.float64), 0.0)
    _, fy = detector.to_focal_plane(0.0, np.arange(height, dtype=np.float64))
    gx, gy = gradient
    return level * (1.0 + gx * fx[None, :] / radius_px + gy * fy[:, None] / radius_px)


def add_noise(
    expected: NDArray[np.floating],
    gain: float,
    read_noise_e: float,
    rng: np.random.Generator,
    *,
    exact_poisson_below: float = 1000.0,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """A noisy realization of an expected image (counts) and its expected variance (counts^2).

    Electrons have mean ``lam = gain * expected``; Gaussian read noise of ``read_noise_e`` electrons
    is added; the result is converted back to counts.  Pixels with ``lam < exact_poisson_below``
    get exact Poisson draws; brighter pixels (the sky of every preset: > 1300 electrons) get the
    Gaussian limit ``N(lam, lam + read_noise^2)``, whose skewness ``1/sqrt(lam)`` is below 3%.
    That is 5x faster than ``numpy``'s Poisson sampler on a 4096x4096 image (0.3 s instead of
    1.4 s); pass ``exact_poisson_below=numpy.inf`` for exact Poisson everywhere.

    Returns
    -------
    raw : numpy.ndarray
        float32 counts.
    variance : numpy.ndarray
        float32 ``expected / gain + (read_noise_e / gain)^2``.
    """
    lam = np.maximum(expected, 0.0, dtype=np.float32) * np.float32(gain)
    rn2 = np.float32(read_noise_e**2)
    z = rng.standard_normal(lam.shape, dtype=np.float32)
    low = lam < exact_poisson_below
    n_low = int(np.count_nonzero(low))
    raw = lam + np.sqrt(lam + rn2) * z
    if n_low:
        raw[low] = rng.poisson(lam[low]).astype(np.float32) + np.float32(read_noise_e) * z[low]
    raw *= np.float32(1.0 / gain)
    variance = (lam + rn2) * np.float32(1.0 / gain**2)
    return raw, variance


def apply_saturation(raw: NDArray[np.floating], level: float, bleed: bool, *, grow: int = 1) -> NDArray[np.bool_]:
    """Clip pixels at the saturation level, optionally bleeding the excess along columns.

    The charge above ``level`` in each run of over-full pixels of a column is removed and, with
    ``bleed``, poured half upwards and half downwards into the following pixels, filling each to
    ``level`` until the excess is used up (charge reaching the detector edge is lost).  ``raw`` is
    modified in place.

    Parameters
    ----------
    raw : numpy.ndarray
        Raw image in counts (sky included).
    level : float
        Saturation level, counts.
    bleed : bool
        Spill the excess charge along columns.
    grow : int
        Grow the mask by this many pixels (LSST's ``growSaturationFootprintSize``, default 1).

    Returns
    -------
    numpy.ndarray of bool
        The SAT mask: pixels at the level, pixels that received bleed charge (the partly filled
        end of a trail), grown by ``grow`` pixels.
    """
    over = raw > level
    sat = raw >= level
    if not over.any():
        return _grow(sat, grow)
    n_rows = raw.shape[0]
    for col in np.flatnonzero(over.any(axis=0)):
        column = raw[:, col]
        labels, n_runs = ndimage.label(column > level)
        for run in range(1, n_runs + 1):
            rows = np.flatnonzero(labels == run)
            a, b = int(rows[0]), int(rows[-1]) + 1
            excess = float((column[a:b] - level).sum())
            column[a:b] = level
            sat[a:b, col] = True
            if not bleed or excess <= 0:
                continue
            for start, step in ((b, 1), (a - 1, -1)):
                left = excess / 2.0
                row = start
                while left > 0 and 0 <= row < n_rows:
                    room = level - column[row]
                    if room > 0:
                        take = min(room, left)
                        column[row] += take
                        left -= take
                    sat[row, col] = True
                    row += step
        raw[:, col] = column
    return _grow(sat, grow)


def _grow(mask: NDArray[np.bool_], grow: int) -> NDArray[np.bool_]:
    """Dilate a sparse mask by ``grow`` pixels (8-connected), working only around its objects."""
    if not grow or not mask.any():
        return mask
    out = mask.copy()
    height, width = mask.shape
    labels, _ = ndimage.label(mask)
    for sl in ndimage.find_objects(labels):
        ys = slice(max(sl[0].start - grow, 0), min(sl[0].stop + grow, height))
        xs = slice(max(sl[1].start - grow, 0), min(sl[1].stop + grow, width))
        out[ys, xs] |= ndimage.binary_dilation(mask[ys, xs], structure=np.ones((3, 3), bool), iterations=grow)
    return out


def add_cosmic_rays(
    raw: NDArray[np.floating], rate_per_megapixel: float, gain: float, rng: np.random.Generator
) -> tuple[NDArray[np.bool_], int]:
    """Add straight cosmic-ray tracks (sharp, not PSF-convolved) to a raw image in counts, in place.

    Tracks are 1-12 px long at random angles, depositing 400-4000 electrons per pixel crossed.

    Returns
    -------
    mask : numpy.ndarray of bool
        Pixels hit, grown by one pixel (what a CR finder would mask).
    n_tracks : int
    """
    height, width = raw.shape
    n_tracks = int(rng.poisson(rate_per_megapixel * height * width / 1e6))
    mask = np.zeros(raw.shape, dtype=bool)
    if n_tracks == 0:
        return mask, 0
    x0 = rng.uniform(0, width - 1, n_tracks)
    y0 = rng.uniform(0, height - 1, n_tracks)
    length = rng.uniform(1.0, 12.0, n_tracks)
    angle = rng.uniform(0.0, math.pi, n_tracks)
    charge = rng.uniform(400.0, 4000.0, n_tracks)
    hit_x, hit_y = [], []
    for k in range(n_tracks):
        steps = max(2, int(length[k] * 4))
        t = np.linspace(0.0, length[k], steps)
        xs = np.rint(x0[k] + t * math.cos(angle[k])).astype(np.int64)
        ys = np.rint(y0[k] + t * math.sin(angle[k])).astype(np.int64)
        ok = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
        pix = np.unique(ys[ok] * width + xs[ok])
        deposit = charge[k] * rng.uniform(0.6, 1.4, pix.size) / gain
        np.add.at(raw.reshape(-1), pix, deposit.astype(raw.dtype))
        hit_y.append(pix // width)
        hit_x.append(pix % width)
    hy = np.concatenate(hit_y)
    hx = np.concatenate(hit_x)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            mask[np.clip(hy + dy, 0, height - 1), np.clip(hx + dx, 0, width - 1)] = True
    return mask, n_tracks


def add_bad_columns(
    raw: NDArray[np.float64], n_columns: int, read_noise_e: float, gain: float, rng: np.random.Generator
) -> tuple[NDArray[np.bool_], list[dict[str, int | str]]]:
    """Corrupt whole or partial columns: dead (read noise only) or hot (a large offset).

    Returns
    -------
    mask : numpy.ndarray of bool
        The BAD pixels.
    defects : list of dict
        ``{"x", "y0", "y1", "kind"}`` per column, for the exposure metadata.
    """
    height, width = raw.shape
    mask = np.zeros(raw.shape, dtype=bool)
    defects: list[dict[str, int | str]] = []
    for _ in range(n_columns):
        x = int(rng.integers(8, width - 8))
        if rng.uniform() < 0.5:
            y0, y1 = 0, height
        else:
            y0 = int(rng.integers(0, height // 2))
            y1 = height
        kind = "dead" if rng.uniform() < 0.5 else "hot"
        if kind == "dead":
            raw[y0:y1, x] = rng.normal(0.0, read_noise_e / gain, y1 - y0)
        else:
            raw[y0:y1, x] += rng.uniform(2000.0, 10000.0)
        mask[y0:y1, x] = True
        defects.append({"x": x, "y0": y0, "y1": y1, "kind": kind})
    return mask, defects


def interpolate_rows(image: NDArray[np.floating], mask: NDArray[np.bool_]) -> None:
    """Replace masked pixels, in place, by linear interpolation along their row.

    Each masked pixel takes the straight line between the nearest good pixels to its left and
    right; runs touching the image edge take the nearest good value; rows without good pixels are
    left alone.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return
    width = image.shape[1]
    cols = np.arange(width)
    for start in range(0, rows.size, 512):
        r = rows[start : start + 512]
        bad = mask[r]
        good = ~bad
        left = np.maximum.accumulate(np.where(good, cols[None, :], -1), axis=1)
        right = np.minimum.accumulate(np.where(good, cols[None, :], width)[:, ::-1], axis=1)[:, ::-1]
        rr, cc = np.nonzero(bad)
        lo, hi = left[rr, cc], right[rr, cc]
        has_lo, has_hi = lo >= 0, hi < width
        sub = image[r]
        v_lo = sub[rr, np.clip(lo, 0, width - 1)]
        v_hi = sub[rr, np.clip(hi, 0, width - 1)]
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(has_lo & has_hi, (cc - lo) / np.maximum(hi - lo, 1), 0.0)
        values = np.where(has_lo & has_hi, v_lo + t * (v_hi - v_lo), np.where(has_lo, v_lo, v_hi))
        ok = has_lo | has_hi
        sub[rr[ok], cc[ok]] = values[ok]
        image[r] = sub
