"""The validation report: DIA outputs against the simulator's truth, as numbers and an HTML page.

:func:`build_report` reads a repository (the outputs of ``pipelines/DIA.yaml`` and the truth of
``python -m tasks.simulation``), computes the numbers of :mod:`.metrics`, draws the figures of
:mod:`.figures` and the PSF-matching kernel mosaic of one visit-detector, and writes
``index.html``, the PNG files it shows and ``summary.json`` into one folder.  Sections whose
datasets are missing (a pipeline subset was run) say so instead of failing.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from butler.butler import Butler
from butler.formats.atomic import atomic_write_bytes
from tasks.diffim import debug_plots
from tasks.diffim.subtract import ImageDifferenceConfig, ImageDifferenceTask

from . import figures
from .metrics import forced_coadd_accuracy, transient_recovery, variable_light_curves

__all__ = ["ReportSummary", "build_report"]

_log = logging.getLogger(__name__)


@dataclass
class ReportSummary:
    """What :func:`build_report` measured and wrote.

    Attributes
    ----------
    numbers : dict
        Section -> metric name -> value (JSON-ready; NaN as None).
    checks : list of dict
        ``{"name", "value", "target", "passed"}`` for each number with a target.
    images : list of Path
        The PNG files the page shows.
    html_path : Path
        ``index.html``.
    notes : list of str
        Sections that could not be made, and why.
    """

    numbers: dict[str, dict[str, Any]]
    checks: list[dict[str, Any]]
    images: list[Path]
    html_path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def all_passed(self) -> bool:
        """True when every check with a target passed."""
        return all(c["passed"] for c in self.checks)


def _clean(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _check(name: str, value: float, target: str, passed: bool) -> dict[str, Any]:
    return {"name": name, "value": _clean(value), "target": target, "passed": bool(passed and math.isfinite(value))}


def _kernel_mosaic(butler: Butler, data_id: dict[str, Any], diff_name: str, path: Path) -> Path:
    """Refit the PSF-matching kernel of one visit-detector with the run's config and draw its mosaic."""
    config_refs = list(butler.query_datasets("subtractImages_config"))
    config = ImageDifferenceConfig.from_dict(butler.get(config_refs[0])) if config_refs else ImageDifferenceConfig()
    task = ImageDifferenceTask(config=config)
    template = butler.get(f"{diff_name}Diff_templateExp", data_id)
    science = butler.get("calexp", data_id)
    sources = butler.get("src", data_id)
    result = task.run(template, science, sources)
    debug_plots.plot_kernel_mosaic(result.psfMatchingKernel, science.bbox, path)
    return path


def build_report(
    repo: str | Path,
    collections: str | list[str],
    output: str | Path,
    *,
    diff_name: str = "goodSeeing",
    coadd_name: str = "deep",
    band: str = "r",
) -> ReportSummary:
    """Compare a DIA run with the simulator's truth and write an HTML report.

    Parameters
    ----------
    repo : path
        Butler repository.
    collections : str or list of str
        Collections holding the DIA outputs and the truth (e.g. the output chain of the run).
    output : path
        Folder for ``index.html``, the PNGs and ``summary.json`` (created when missing).
    diff_name, coadd_name : str
        The pipeline's ``diffName`` and ``coaddName`` parameters.
    band : str
        Band of the light curves.

    Returns
    -------
    ReportSummary

    Raises
    ------
    LookupError
        When the collections hold no DIA sources at all.
    """
    t0 = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    butler = Butler(repo, collections=collections)
    numbers: dict[str, dict[str, Any]] = {}
    checks: list[dict[str, Any]] = []
    images: list[Path] = []
    notes: list[str] = []
    sections: list[tuple[str, str, list[Path]]] = []

    recovery = transient_recovery(butler, diff_name=diff_name)
    c_hi, n_hi = recovery.completeness(10.0)
    c_mid, n_mid = recovery.completeness(5.0, 10.0)
    n_det = len(recovery.data_ids)
    numbers["transients"] = {
        "visitDetectors": n_det,
        "diaSources": recovery.n_dia_sources,
        "transients": len(recovery.transients),
        "transientsOnFlaggedPixels": int(np.sum(~np.asarray(recovery.transients["onCleanPixels"], dtype=bool))),
        "completenessSnr10": c_hi,
        "nSnr10": n_hi,
        "completenessSnr5to10": c_mid,
        "nSnr5to10": n_mid,
        "unmatchedDiaSources": recovery.false_positives,
        "unmatchedPerVisitDetector": recovery.false_positives / max(n_det, 1),
        "fluxRatioMedianSnr10": recovery.flux_ratio_median(10.0),
    }
    checks.append(_check("transient completeness, S/N >= 10", c_hi, ">= 0.95", c_hi >= 0.95))
    ratio = numbers["transients"]["fluxRatioMedianSnr10"]
    checks.append(_check("transient PSF flux / true, S/N >= 10 (median)", ratio, "within 2%", abs(ratio - 1) <= 0.02))
    images.append(figures.plot_gallery(recovery, out / "gallery.png"))
    images.append(figures.plot_completeness(recovery, out / "completeness.png"))
    sections.append(("Transients", "Recovered (green) and missed (red) transients on the difference images; completeness against the S/N an ideal PSF fit would reach.", images[-2:]))

    try:
        accuracy = forced_coadd_accuracy(butler, coadd_name=coadd_name)
        numbers["forcedCoadd"] = {"stars": len(accuracy.matches), "starsSnr20": accuracy.count(20.0), "biasSnr20": accuracy.bias(20.0), "pullStd": accuracy.pull_std()}
        checks.append(_check("forced coadd flux bias, S/N > 20", accuracy.bias(20.0), "|bias| < 1%", abs(accuracy.bias(20.0)) < 0.01))
        checks.append(_check("forced coadd pull std", accuracy.pull_std(), "in [0.9, 1.2]", 0.9 <= accuracy.pull_std() <= 1.2))
        path = figures.plot_forced_flux(accuracy, out / "forced_flux.png")
        images.append(path)
        sections.append(("Forced photometry on the coadd", f"{coadd_name}Coadd_forced_src of isolated non-variable stars against their true fluxes.", [path]))
    except LookupError as exc:
        notes.append(f"forced coadd photometry: {exc}")

    try:
        curves = variable_light_curves(butler, band=band)
        objects = curves.objects
        true_amp = np.asarray(objects["trueAmplitude"], dtype=float)
        fit_amp = np.asarray(objects["fitAmplitude"], dtype=float)
        rel = np.abs(fit_amp / true_amp - 1.0)
        # a variable's amplitude can be recovered within 5% only where its own light curve measures
        # it that well: amplitude S/N >= 20 (statistical error <= 5%)
        precise = np.asarray(objects["fitAmplitudeErr"], dtype=float) <= 0.05 * np.abs(true_amp)
        pulls = (fit_amp - true_amp) / np.asarray(objects["fitAmplitudeErr"], dtype=float)
        numbers["lightCurves"] = {
            "variables": len(objects),
            "amplitudeErrorMedian": float(np.median(rel)) if len(rel) else math.nan,
            "variablesAmplitudeSnr20": int(precise.sum()),
            "amplitudeErrorMedianSnr20": float(np.median(rel[precise])) if precise.any() else math.nan,
            "amplitudeErrorMaxSnr20": float(np.max(rel[precise])) if precise.any() else math.nan,
            "amplitudePullMedianAbs": float(np.median(np.abs(pulls))) if len(pulls) else math.nan,
        }
        if precise.any():
            value = float(np.median(rel[precise]))
            checks.append(_check("light-curve amplitude error, amplitude S/N >= 20 (median)", value, "within 5%", value <= 0.05))
            worst = float(np.max(rel[precise]))
            checks.append(_check("light-curve amplitude error, amplitude S/N >= 20 (largest)", worst, "within 5%", worst <= 0.05))
        path = figures.plot_light_curves(curves, out / "light_curves.png")
        images.append(path)
        sections.append(("Light curves", "diaForcedSource fluxes of simulated variable stars; the line is the true light curve (offset by the template flux).", [path]))
    except LookupError as exc:
        notes.append(f"light curves: {exc}")

    by_count: dict[tuple[int, int], int] = {}
    for row in recovery.transients:
        key = (int(row["visit"]), int(row["detector"]))
        by_count[key] = by_count.get(key, 0) + 1
    if by_count:
        visit, detector = max(by_count, key=lambda k: (by_count[k], -k[0], -k[1]))
        data_id = next(d for d in recovery.data_ids if d["visit"] == visit and d["detector"] == detector)
        try:
            path = _kernel_mosaic(butler, data_id, diff_name, out / "kernel_mosaic.png")
            images.append(path)
            sections.append(("PSF-matching kernel", f"The spatially varying kernel of visit {visit}, detector {detector}, realized across the detector.", [path]))
        except Exception as exc:  # a refit failure must not hide the rest of the report
            notes.append(f"kernel mosaic of visit {visit} detector {detector}: {type(exc).__name__}: {exc}")

    summary = ReportSummary({k: {n: _clean(v) for n, v in d.items()} for k, d in numbers.items()}, checks, images, out / "index.html", notes)
    report = {"numbers": summary.numbers, "checks": checks, "notes": notes}
    atomic_write_bytes(out / "summary.json", json.dumps(report, indent=2).encode(), overwrite=True, fsync=False)
    page = _render_html(summary, sections, repo, collections, time.perf_counter() - t0)
    atomic_write_bytes(summary.html_path, page.encode(), overwrite=True, fsync=False)
    _log.info("report written to %s (%d images)", summary.html_path, len(images))
    return summary


def _render_html(summary: ReportSummary, sections: list[tuple[str, str, list[Path]]], repo: Any, collections: Any, seconds: float) -> str:
    esc = html.escape
    rows = []
    for check in summary.checks:
        status = "pass" if check["passed"] else "miss"
        value = "n/a" if check["value"] is None else f"{check['value']:.4g}"
        rows.append(f"<tr class='{status}'><td>{esc(check['name'])}</td><td>{value}</td><td>{esc(check['target'])}</td><td>{status}</td></tr>")
    numbers = []
    for section, values in summary.numbers.items():
        cells = ", ".join(f"{esc(k)} = {'n/a' if v is None else (f'{v:.4g}' if isinstance(v, float) else v)}" for k, v in values.items())
        numbers.append(f"<li><b>{esc(section)}</b>: {cells}</li>")
    body = []
    for title, text, paths in sections:
        imgs = "".join(f"<img src='{esc(p.name)}' alt='{esc(title)}'>" for p in paths)
        body.append(f"<section><h2>{esc(title)}</h2><p>{esc(text)}</p>{imgs}</section>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in summary.notes)
    coll = collections if isinstance(collections, str) else ", ".join(collections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>diapipe validation report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
tr.pass td:last-child {{ color: #080; font-weight: bold; }} tr.miss td:last-child {{ color: #b00; font-weight: bold; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; border: 1px solid #ddd; }}
</style></head><body>
<h1>diapipe validation report</h1>
<p>Repository <code>{esc(str(repo))}</code>, collections <code>{esc(coll)}</code>; made in {seconds:.1f} s.</p>
<table><tr><th>check</th><th>value</th><th>target</th><th></th></tr>{''.join(rows)}</table>
<ul>{''.join(numbers)}</ul>
{'<h3>Not shown</h3><ul>' + notes + '</ul>' if notes else ''}
{''.join(body)}
</body></html>
"""
