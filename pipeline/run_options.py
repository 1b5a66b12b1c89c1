"""Options of ``pipetask run`` handed to the executor (kept free of click and Dask imports)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RunOptions", "EXECUTOR_ENTRY_POINT"]

#: ``module:function`` that executes a quantum graph: ``f(graph, butler_root, options) -> int``
#: (the process exit code).
EXECUTOR_ENTRY_POINT = "pipeline.execution:execute_graph"


@dataclass
class RunOptions:
    """What ``pipetask run`` asks of the executor.

    Attributes
    ----------
    processes : int
        ``-j``: number of workers (threads or processes).
    scheduler : str
        ``threads`` (default), ``processes`` or ``distributed``.
    address : str or None
        ``--address tcp://host:port`` of a dask.distributed scheduler.
    output : str or None
        ``-o``: the CHAINED collection to (re)define as ``[output_run, *inputs]``.
    output_run : str
        The RUN collection outputs are written to.
    input_collections : list of str
    skip_existing : bool
        Skip quanta whose outputs all exist in the output run (resume).
    extend_run : bool
        The output run already exists and is extended.
    clobber_outputs : bool
        Replace outputs that already exist in the output run.
    retries : int
        Times to retry a failed quantum (not for NoWorkFound or RepeatableQuantumError).
    fail_fast : bool
        Stop at the first failure.
    register_dataset_types : bool
        Register the graph's dataset types that are missing (LSST's option of that name).
    timeout : float or None
        ``--timeout``: wall seconds per quantum attempt.
    local_cluster : int or None
        ``--local-cluster N``: start a local dask.distributed cluster of N worker processes.
    connect_timeout : float
        Seconds to wait for the scheduler at ``address``.
    summary : str or None
        ``--summary FILE``: write the run summary as JSON there (it is always saved in the run).
    progress : bool
        Show the rich progress display and the summary table (the CLI's choice).
    """

    processes: int = 1
    scheduler: str = "threads"
    address: str | None = None
    output: str | None = None
    output_run: str = ""
    input_collections: list[str] = field(default_factory=list)
    skip_existing: bool = False
    extend_run: bool = False
    clobber_outputs: bool = False
    retries: int = 0
    fail_fast: bool = False
    register_dataset_types: bool = True
    timeout: float | None = None
    local_cluster: int | None = None
    connect_timeout: float = 10.0
    summary: str | None = None
    progress: bool = False
