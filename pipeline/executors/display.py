"""The progress display and the summary table (rich), the same for every scheduler.

The display is fed only by quantum outcomes (``update``), in the driver's thread, so it looks
the same whichever scheduler produced them.  It draws on stderr; the summary table goes to
stdout.  This is console output for the ``pipetask`` command: library callers leave
``RunOptions.progress`` off and get log records instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import QuantumOutcome, Status

if TYPE_CHECKING:
    from ..execution import ExecutionReport

__all__ = ["ProgressDisplay", "summary_table", "print_summary"]

_STATUS_STYLE = {
    Status.SUCCEEDED: "green",
    Status.NO_WORK: "cyan",
    Status.FAILED: "bold red",
    Status.BLOCKED: "yellow",
    Status.CANCELLED: "magenta",
}


class ProgressDisplay:
    """A rich progress bar per task and one for the whole run.

    Parameters
    ----------
    totals : mapping of str to int
        Quanta to run per task label (pipeline order).
    enabled : bool
        False makes every method a no-op.
    console : rich.console.Console, optional
        Where to draw (default: stderr).
    """

    def __init__(self, totals: Mapping[str, int], *, enabled: bool = True, console: Any = None) -> None:
        self.enabled = enabled and sum(totals.values()) > 0
        self.totals = dict(totals)
        self.counts: dict[str, dict[Status, int]] = {label: {s: 0 for s in Status} for label in totals}
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._console = console

    def start(self) -> None:
        """Start drawing."""
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = self._console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[states]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            redirect_stderr=False,
            redirect_stdout=False,
        )
        self._progress.start()
        width = 22
        for label, total in self.totals.items():
            if total:
                self._tasks[label] = self._progress.add_task(label[:width], total=total, states="")
        self._tasks["\0total"] = self._progress.add_task("[bold]all quanta", total=sum(self.totals.values()), states="")

    def message(self, text: str) -> None:
        """Print a line above the bars."""
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)

    def update(self, outcome: QuantumOutcome) -> None:
        """Count one finished quantum."""
        counts = self.counts.setdefault(outcome.task_label, {s: 0 for s in Status})
        counts[outcome.status] += 1
        if self._progress is None:
            return
        task_id = self._tasks.get(outcome.task_label)
        if task_id is not None:
            self._progress.update(task_id, advance=1, states=_states(counts))
        total = {s: sum(c[s] for c in self.counts.values()) for s in Status}
        self._progress.update(self._tasks["\0total"], advance=1, states=_states(total))

    def stop(self) -> None:
        """Stop drawing (the last state stays on screen)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _states(counts: Mapping[Status, int]) -> str:
    parts = []
    for status, short in ((Status.FAILED, "failed"), (Status.BLOCKED, "blocked"), (Status.NO_WORK, "no work"), (Status.CANCELLED, "cancelled")):
        if counts.get(status):
            parts.append(f"[{_STATUS_STYLE[status]}]{counts[status]} {short}[/]")
    return " ".join(parts)


def summary_table(report: ExecutionReport) -> Any:
    """A rich table: per task, quanta by status."""
    from rich.table import Table

    table = Table(title=f"Run {report.run}", title_justify="left")
    table.add_column("task")
    for header in ("quanta", "succeeded", "no work", "failed", "blocked", "cancelled", "skipped"):
        table.add_column(header, justify="right")
    totals = [0] * 7
    for label, row in report.tasks.items():
        values = [row["quanta"], row["succeeded"], row["no_work"], row["failed"], row["blocked"], row["cancelled"], row["skipped"]]
        totals = [a + b for a, b in zip(totals, values, strict=True)]
        table.add_row(label, *[_cell(v, i) for i, v in enumerate(values)])
    table.add_section()
    table.add_row("[bold]total", *[_cell(v, i) for i, v in enumerate(totals)])
    return table


def _cell(value: int, column: int) -> str:
    styles = {3: "bold red", 4: "yellow", 5: "magenta"}
    if value and column in styles:
        return f"[{styles[column]}]{value}[/]"
    return str(value)


def print_summary(report: ExecutionReport, console: Any = None, max_listed: int = 50) -> None:
    """Print the summary table, each failure (data ID and error) and the blocked quanta."""
    import sys

    from rich.console import Console

    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(summary_table(report))
    failures = report.failures
    for item in failures[:max_listed]:
        console.print(
            f"[bold red]FAILED[/] {item['task']} {{{item['data_id_text']}}}: {item['error_type_short']}: {item['error']}",
            highlight=False,
            soft_wrap=True,
        )
    if len(failures) > max_listed:
        console.print(f"... and {len(failures) - max_listed} more failures (see the JSON summary)")
    blocked = report.blocked
    if blocked:
        shown = ", ".join(f"{b['task']} {{{b['data_id_text']}}}" for b in blocked[:10])
        more = f" and {len(blocked) - 10} more" if len(blocked) > 10 else ""
        console.print(f"[yellow]BLOCKED[/] (an upstream quantum failed): {shown}{more}", highlight=False, soft_wrap=True)
    if report.interrupted:
        console.print("[magenta]interrupted[/]: rerun with --extend-run --skip-existing to finish", highlight=False)
    console.print(
        f"{report.status_line()}  ({report.seconds:.1f} s, {report.scheduler}, summary {report.summary_file})",
        highlight=False,
        soft_wrap=True,
    )
