"""Validation of DIA outputs against the simulator's truth: numbers, figures and an HTML report.

- :mod:`.metrics`: transient recovery (completeness against S/N, false positives, flux ratio),
  forced coadd photometry against true fluxes, light curves of variable stars;
- :mod:`.figures`: the report's PNG figures;
- :mod:`.report`: :func:`build_report` writes ``index.html``, the figures and ``summary.json``.

The ``diapipe validate`` command runs :func:`build_report`.
"""

from .report import ReportSummary, build_report

__all__ = ["ReportSummary", "build_report"]
