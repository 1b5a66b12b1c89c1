"""The validation report's figures (PNG), drawn with matplotlib's object API (no pyplot state).

Each function draws one figure from a :mod:`.metrics` result, saves it to ``path`` and returns
the path.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .metrics import ForcedCoaddAccuracy, LightCurves, TransientRecovery, completeness_curve

__all__ = ["plot_gallery", "plot_completeness", "plot_forced_flux", "plot_light_curves"]

_DPI = 100


def _pick_spread(order: np.ndarray, n: int) -> np.ndarray:
    """``n`` entries of ``order`` spread evenly along it (all when there are fewer)."""
    if order.size <= n:
        return order
    return order[np.linspace(0, order.size - 1, n).round().astype(int)]


def plot_gallery(recovery: TransientRecovery, path: Path, n_per_row: int = 8) -> Path:
    """Difference-image cutouts of recovered (top row, green) and missed (bottom row, red) transients.

    Recovered ones are spread over their S/N range; missed ones are the highest-S/N misses on clean
    pixels (transients on SAT/BAD/NO_DATA/EDGE pixels are flagged, not reported, by design).
    """
    t = recovery.transients
    snr = np.asarray(t["expectedSnr"], dtype=float)
    found = np.asarray(t["found"], dtype=bool)
    finite = np.isfinite(snr)
    hits = np.flatnonzero(found & finite)
    hits = _pick_spread(hits[np.argsort(snr[hits])], n_per_row)
    misses = np.flatnonzero(~found & finite & np.asarray(t["onCleanPixels"], dtype=bool))
    misses = misses[np.argsort(-snr[misses])][:n_per_row]
    fig = Figure(figsize=(1.6 * n_per_row, 4.4))
    axes = fig.subplots(2, n_per_row, squeeze=False)
    for row, (indices, colour, label) in enumerate(((hits, "tab:green", "recovered"), (misses, "tab:red", "missed"))):
        for col in range(n_per_row):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(indices):
                ax.axis("off")
                continue
            r = t[indices[col]]
            stamp = recovery.cutouts[(int(r["visit"]), int(r["detector"]), int(r["id"]))]
            finite_px = stamp[np.isfinite(stamp)]
            lim = float(np.max(np.abs(finite_px))) if finite_px.size else 1.0
            ax.imshow(stamp, origin="lower", cmap="gray", vmin=-lim, vmax=lim)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)
            ax.set_title(f"{label}\nS/N {r['expectedSnr']:.1f}", fontsize=7, color=colour)
            ax.set_xlabel(f"v{r['visit']} d{r['detector']}", fontsize=6)
    fig.suptitle("Difference-image cutouts of simulated transients", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_completeness(recovery: TransientRecovery, path: Path) -> Path:
    """Completeness of transient detection against expected difference-image S/N."""
    edges = np.array([2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 50, 100, 300, 1e4], dtype=float)
    centres, frac, counts = completeness_curve(recovery, edges)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    ok = counts > 0
    err = np.sqrt(np.clip(frac * (1 - frac), 0, None) / np.maximum(counts, 1))
    ax.errorbar(centres[ok], frac[ok], yerr=err[ok], fmt="o-", color="tab:blue", capsize=2)
    for c, f, n in zip(centres[ok], frac[ok], counts[ok], strict=True):
        ax.annotate(str(int(n)), (c, f), textcoords="offset points", xytext=(0, 6), fontsize=6, ha="center")
    ax.axvline(5.0, color="grey", ls=":", lw=1)
    ax.axhline(0.95, color="tab:green", ls="--", lw=1, label="95%")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.08)
    ax.set_xlabel("expected S/N on the difference image")
    ax.set_ylabel("fraction detected")
    ax.set_title("Transient completeness (numbers: transients per bin)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_forced_flux(accuracy: ForcedCoaddAccuracy, path: Path) -> Path:
    """Forced coadd PSF flux / true flux against true flux, and the pull distribution."""
    t = accuracy.matches
    fig = Figure(figsize=(10.0, 4.0))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1.0]})
    true_flux = np.asarray(t["trueFlux"], dtype=float)
    ratio = np.asarray(t["psfFlux"], dtype=float) / true_flux
    snr = np.asarray(t["snr"], dtype=float)
    ax1.errorbar(true_flux, ratio, yerr=np.asarray(t["psfFluxErr"], dtype=float) / true_flux, fmt=".", ms=3, alpha=0.6, elinewidth=0.5)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhspan(0.99, 1.01, color="tab:green", alpha=0.15, label="±1%")
    ax1.set_xscale("log")
    ax1.set_ylim(0.8, 1.2)
    ax1.set_xlabel("true flux (nJy)")
    ax1.set_ylabel("forced PSF flux / true flux")
    ax1.set_title(f"deepCoadd forced photometry: bias {accuracy.bias() * 100:+.2f}% (S/N > 20)", fontsize=9)
    ax1.legend(fontsize=8)
    pull = (np.asarray(t["psfFlux"], dtype=float) - true_flux) / np.asarray(t["psfFluxErr"], dtype=float)
    pull = pull[np.isfinite(pull) & (snr > 0)]
    ax2.hist(np.clip(pull, -6, 6), bins=np.linspace(-6, 6, 49), density=True, color="tab:blue", alpha=0.7)
    xs = np.linspace(-6, 6, 200)
    ax2.plot(xs, np.exp(-0.5 * xs**2) / math.sqrt(2 * math.pi), "k-", lw=1, label="N(0, 1)")
    ax2.set_xlabel("(measured - true) / error")
    ax2.set_title(f"pulls: robust std {accuracy.pull_std():.3f}", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_light_curves(curves: LightCurves, path: Path, n: int = 4) -> Path:
    """Forced difference-image light curves of a few simulated variables, with their true curves.

    The true curve is ``F0 A sin(2 pi t / P + phi)`` plus the constant fitted to the points (the
    difference image measures flux relative to the template).
    """
    objects = curves.objects
    order = np.argsort(-np.asarray(objects["trueAmplitude"], dtype=float)) if len(objects) else np.array([], int)
    chosen = order[:n]
    cols = max(1, min(n, len(chosen)))
    fig = Figure(figsize=(4.0 * cols, 3.2))
    axes = fig.subplots(1, cols, squeeze=False)[0]
    if not len(chosen):
        axes[0].text(0.5, 0.5, "no variable star matched a DIA object", ha="center", va="center")
        axes[0].axis("off")
    for ax, k in zip(axes, chosen, strict=False):
        row = objects[k]
        object_id = int(row["diaObjectId"])
        pts = curves.points[object_id]
        tr = curves.truth[object_id]
        mjd = np.asarray(pts["mjd"], dtype=float)
        flux = np.asarray(pts["psfFlux"], dtype=float)
        wave = tr["baseFlux"] * tr["amplitude"] * np.sin(2 * np.pi * mjd / tr["period"] + tr["phase"])
        offset = float(np.average(flux - wave, weights=1.0 / np.asarray(pts["psfFluxErr"], dtype=float) ** 2))
        grid = np.linspace(mjd.min() - 1, mjd.max() + 1, 400)
        ax.plot(grid, offset + tr["baseFlux"] * tr["amplitude"] * np.sin(2 * np.pi * grid / tr["period"] + tr["phase"]), "k-", lw=0.8, label="truth")
        ax.errorbar(mjd, flux, yerr=pts["psfFluxErr"], fmt="o", ms=3, color="tab:orange", label="diaForcedSource")
        ax.set_xlabel("MJD")
        ax.set_ylabel("difference flux (nJy)")
        ax.set_title(
            f"object {object_id}: amplitude {row['fitAmplitude']:.0f} vs {row['trueAmplitude']:.0f} nJy", fontsize=8
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path
