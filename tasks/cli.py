"""The ``diapipe`` command: the science-side verbs that are not ``butler`` or ``pipetask``.

``diapipe validate REPO COLLECTION -o DIR`` compares a DIA run on a simulated survey with the
truth and writes an HTML report (:func:`tasks.validation.build_report`); ``diapipe demo`` is
``make demo``'s work (:mod:`tasks.demo`).  Errors print one line and exit 1.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import click

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """diapipe: simulate, validate and demonstrate difference-image analysis."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("repo", type=click.Path(file_okay=False))
@click.argument("collections", nargs=-1, required=True)
@click.option("-o", "--output", default="report", show_default=True, help="Folder for index.html, the PNGs and summary.json.")
@click.option("--diff-name", default="goodSeeing", show_default=True, help="The pipeline's diffName.")
@click.option("--coadd-name", default="deep", show_default=True, help="The pipeline's coaddName.")
def validate(repo: str, collections: tuple[str, ...], output: str, diff_name: str, coadd_name: str) -> None:
    """Compare the DIA outputs in COLLECTIONS of REPO with the simulator's truth; write an HTML report."""
    from tasks.validation import build_report

    names = [c for value in collections for c in value.split(",") if c]
    report = build_report(repo, names, output, diff_name=diff_name, coadd_name=coadd_name)
    for check in report.checks:
        value = "n/a" if check["value"] is None else f"{check['value']:.4f}"
        click.echo(f"{check['name']:<50} {value:>8}  target {check['target']:<14} {'pass' if check['passed'] else 'MISS'}")
    for note in report.notes:
        click.echo(f"not shown: {note}")
    click.echo(f"report: {Path(report.html_path)}")


@cli.command()
@click.option("--repo", default="demo_repo", show_default=True, help="Repository folder to (re)create.")
@click.option("--preset", default="small", show_default=True, help="Simulation preset: tiny, small or large.")
@click.option("-j", "--jobs", default=2, show_default=True, type=click.IntRange(min=1), help="Worker threads.")
def demo(repo: str, preset: str, jobs: int) -> None:
    """Simulate a survey, run pipelines/DIA.yaml on it and write the validation report."""
    from tasks.demo import run_demo

    status = run_demo(Path(repo), preset=preset, jobs=jobs)
    if status:
        raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diapipe`` console script; returns the exit status."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="diapipe", standalone_mode=False)
    except click.exceptions.Abort:
        sys.stderr.write("diapipe: aborted\n")
        return 1
    except click.ClickException as exc:
        sys.stderr.write(f"diapipe: error: {exc.format_message()}\n")
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except (LookupError, FileExistsError, ValueError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        sys.stderr.write(f"diapipe: error: {message}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
