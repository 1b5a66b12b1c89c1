"""The ``pipetask`` command: ``qgraph`` (build, inspect, save a quantum graph), ``run`` and
``report``.

``pipetask run`` builds (or loads) the graph and hands it to the executor named by
:data:`pipeline.run_options.EXECUTOR_ENTRY_POINT` (:func:`pipeline.execution.execute_graph`);
``pipetask report -b REPO RUN`` re-reads the execution summaries saved in the repository.  User errors print one line on stderr and exit 1 (2 for usage errors), never a traceback.
This module imports only click and the error classes at import time, so ``pipetask --help``
stays fast (no numpy, astropy, dask or zarr).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from butler.errors import ButlerError

from .errors import PipelineError

__all__ = ["main", "cli"]

_log = logging.getLogger("pipetask")


def _split_collections(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return list(dict.fromkeys(out))


def _graph_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``qgraph`` and ``run`` (LSST's names)."""
    options = [
        click.option("-b", "--butler-config", "repo", required=True, metavar="REPO", help="Butler repository folder."),
        click.option("-p", "--pipeline", metavar="PIPELINE", help="Pipeline YAML, optionally 'file.yaml#label,subset'."),
        click.option("-g", "--qgraph", "qgraph_file", metavar="FILE", help="Load a saved quantum graph instead of building one."),
        click.option("-i", "--input", "inputs", multiple=True, metavar="COLL[,COLL]", help="Input collections, searched in order."),
        click.option("-o", "--output", metavar="COLL", help="Output CHAINED collection ([output run, *inputs])."),
        click.option("--output-run", metavar="RUN", help="Output RUN collection (default: OUTPUT/<UTC timestamp>)."),
        click.option("-d", "--data-query", "where", metavar="QUERY", default="", help="Where expression selecting data IDs."),
        click.option("-c", "--config", "config_overrides", multiple=True, metavar="LABEL:FIELD=VALUE", help="Config override."),
        click.option("-C", "--config-file", "config_files", multiple=True, metavar="LABEL:FILE", help="YAML/JSON config overrides."),
        click.option("--skip-existing-in", multiple=True, metavar="COLL", help="Skip quanta whose outputs exist in these collections."),
        click.option("--extend-run", is_flag=True, help="Write into the existing first run of the output chain."),
        click.option("--clobber-outputs", is_flag=True, help="Replace outputs that already exist in the output run."),
        click.option("--show", "show", multiple=True, type=click.Choice(["pipeline", "config", "graph"]), help="Print the expanded pipeline, configs (with provenance) or quanta."),
        click.option("--save-qgraph", metavar="FILE", help="Save the graph (JSON; .gz compresses)."),
        click.option("--qgraph-dot", metavar="FILE", help="Write a Graphviz drawing of the graph."),
        click.option("--qgraph-mermaid", metavar="FILE", help="Write a Mermaid drawing of the graph."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="WARNING", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), help="Logging level.")
def cli(log_level: str) -> None:
    """Build and run pipelines of PipelineTasks over a butler repository."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stderr:
            handler.setLevel(log_level.upper())  # task loggers run at INFO (captured into metadata)


def _resolve_output_run(butler: Any, output: str | None, output_run: str | None, extend_run: bool) -> str:
    if output_run:
        return output_run
    if output is None:
        raise click.UsageError("give -o/--output or --output-run: where the outputs go")
    if extend_run:
        try:
            chain = butler.registry.get_collection_chain(output)
        except ButlerError as exc:
            raise PipelineError(f"--extend-run: {exc}") from None
        if not chain:
            raise PipelineError(f"--extend-run: output chain {output!r} is empty")
        return chain[0]
    return f"{output}/{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def _obtain_graph(params: dict[str, Any], *, skip_output_run: bool = False) -> tuple[Any, Any]:
    """Build (or load) the graph; returns ``(graph, pipeline or None)``."""
    from butler.butler import Butler

    from .graph import QuantumGraph
    from .graph_builder import build_quantum_graph
    from .pipeline import Pipeline

    if params["qgraph_file"]:
        if params["pipeline"]:
            raise click.UsageError("give either -p/--pipeline or -g/--qgraph, not both")
        return QuantumGraph.load(params["qgraph_file"]), None
    if not params["pipeline"]:
        raise click.UsageError("give a pipeline (-p) or a saved graph (-g)")
    inputs = _split_collections(params["inputs"])
    if not inputs:
        raise click.UsageError("give the input collections (-i)")
    pipeline = Pipeline.from_uri(params["pipeline"])
    pipeline.apply_cli_overrides(params["config_overrides"], params["config_files"])
    with Butler(params["repo"]) as butler:
        output_run = _resolve_output_run(butler, params["output"], params["output_run"], params["extend_run"])
        skip_in = _split_collections(params["skip_existing_in"])
        if skip_output_run:  # --skip-existing = --skip-existing-in OUTPUT (LSST); the run itself too
            skip_in.extend(c for c in (params["output"], output_run) if c and c not in skip_in)
        graph = build_quantum_graph(
            pipeline,
            butler,
            input_collections=inputs,
            output_run=output_run,
            output=params["output"],
            where=params["where"] or None,
            skip_existing_in=skip_in,
            clobber_outputs=params["clobber_outputs"],
        )
    return graph, pipeline


def _report(graph: Any, params: dict[str, Any], pipeline: Any) -> None:
    for what in params["show"]:
        if what == "pipeline" and pipeline is not None:
            click.echo(pipeline.to_yaml())
        elif what == "config":
            for label in graph.task_labels:
                task_def = graph.task_def(label)
                click.echo(f"# {label}: {task_def.taskName}")
                provenance = task_def.config.provenance_dict()
                for path, value in _config_items(task_def.config):
                    note = f"  # {provenance[path]}" if path in provenance else ""
                    click.echo(f"{label}.{path} = {value!r}{note}")
        elif what == "graph":
            for quantum in graph:
                did = ", ".join(f"{k}={v}" for k, v in quantum.data_id.items())
                ins = ", ".join(f"{n}[{len(r)}]" for n, r in quantum.inputs.items())
                outs = ", ".join(n for n in quantum.outputs)
                click.echo(f"{quantum.task_label} {{{did}}} <- {ins} -> {outs}")
    summary = graph.summary()
    width = max([len(label) for label in summary] + [5])
    meta = graph.metadata
    click.echo(f"Quantum graph: {len(graph)} quanta, output run {meta.get('output_run')!r}, inputs {meta.get('input_collections')}")
    click.echo(f"{'task':<{width}}  quanta")
    for label, count in summary.items():
        click.echo(f"{label:<{width}}  {count:>6}")
    click.echo(f"{'total':<{width}}  {len(graph):>6}")
    for label, why in (meta.get("tasks_without_quanta") or {}).items():
        click.echo(f"warning: task {label!r} has no quanta: {why}")
    if params["save_qgraph"]:
        graph.save(params["save_qgraph"])
        click.echo(f"saved graph to {params['save_qgraph']}")
    if params["qgraph_dot"]:
        _write_text(params["qgraph_dot"], graph.to_dot())
        click.echo(f"wrote Graphviz drawing to {params['qgraph_dot']}")
    if params["qgraph_mermaid"]:
        _write_text(params["qgraph_mermaid"], graph.to_mermaid())
        click.echo(f"wrote Mermaid drawing to {params['qgraph_mermaid']}")


def _write_text(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(text)
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror}") from None


def _config_items(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    from .config import Config

    out = []
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Config):
            out.extend(_config_items(value, f"{prefix}{name}."))
        else:
            out.append((prefix + name, value))
    return out


@cli.command()
@_graph_options
def qgraph(**params: Any) -> None:
    """Build a quantum graph, print the quanta per task, optionally save and draw it."""
    graph, pipeline = _obtain_graph(params)
    _report(graph, params, pipeline)


@cli.command()
@_graph_options
@click.option("--dry-run", is_flag=True, help="Show what would run, run nothing.")
@click.option("-j", "--processes", default=1, show_default=True, type=click.IntRange(min=1), help="Number of workers.")
@click.option("--scheduler", default="threads", show_default=True, type=click.Choice(["threads", "processes", "distributed"]), help="Dask scheduler.")
@click.option("--address", metavar="URL", help="dask.distributed scheduler address (tcp://host:port).")
@click.option("--local-cluster", type=click.IntRange(min=1), metavar="N", help="Start a local dask.distributed cluster of N worker processes.")
@click.option("--connect-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1), metavar="SECONDS", help="Seconds to wait for the scheduler at --address.")
@click.option("--skip-existing", is_flag=True, help="Skip quanta that already ran (their metadata exists in the output collection) - resume.")
@click.option("--retries", default=0, type=click.IntRange(min=0), help="Retries of a failed quantum (never for RepeatableQuantumError).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed quantum.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS", help="Wall-time limit of one quantum attempt.")
@click.option("--summary", metavar="FILE", help="Also write the run summary (JSON) to FILE.")
@click.option("--no-progress", is_flag=True, help="No progress display or summary table.")
def run(**params: Any) -> None:
    """Build (or load) a quantum graph and execute it on Dask."""
    import os

    from .run_options import EXECUTOR_ENTRY_POINT, RunOptions

    if params["scheduler"] != "distributed" and (params["address"] or params["local_cluster"]):
        if params["scheduler"] != "threads":
            raise click.UsageError("--address and --local-cluster need --scheduler distributed")
        params["scheduler"] = "distributed"  # --address/--local-cluster imply the distributed scheduler
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(name, "1")  # before numpy loads: one BLAS thread per worker thread
    graph, pipeline = _obtain_graph(params, skip_output_run=params["skip_existing"])
    _report(graph, params, pipeline)
    if params["dry_run"]:
        _print_dry_run(graph)
        return
    module_name, _, func_name = EXECUTOR_ENTRY_POINT.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise PipelineError(
            "pipetask run: executing quantum graphs is not available yet (the Dask executor comes next); "
            "use --dry-run to see what would run"
        ) from None
    execute = getattr(module, func_name)
    meta = graph.metadata
    options = RunOptions(
        processes=params["processes"],
        scheduler=params["scheduler"],
        address=params["address"],
        output=meta.get("output") or params["output"],
        output_run=meta.get("output_run", ""),
        input_collections=list(meta.get("input_collections") or []),
        skip_existing=params["skip_existing"],
        extend_run=params["extend_run"],
        clobber_outputs=params["clobber_outputs"],
        retries=params["retries"],
        fail_fast=params["fail_fast"],
        timeout=params["timeout"],
        local_cluster=params["local_cluster"],
        connect_timeout=params["connect_timeout"],
        summary=params["summary"],
        progress=not params["no_progress"],
    )
    code = execute(graph, params["repo"], options)
    if code:
        raise click.exceptions.Exit(code)


@cli.command()
@click.option("-b", "--butler-config", "repo", required=True, metavar="REPO", help="Butler repository folder.")
@click.argument("collection")
@click.option("--json", "as_json", is_flag=True, help="Print the merged summary as JSON.")
@click.option("--tracebacks", is_flag=True, help="Print the traceback of each failure.")
def report(repo: str, collection: str, as_json: bool, tracebacks: bool) -> None:
    """Re-read the execution summary of a run (or output chain) from the repository."""
    import json

    from .execution import load_report

    data = load_report(repo, collection)
    if as_json:
        click.echo(json.dumps(data, indent=1, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        table = Table(title=f"{collection} ({len(data['executions'])} execution(s))", title_justify="left")
        table.add_column("task")
        columns = ("quanta", "succeeded", "no_work", "failed", "blocked", "cancelled")
        for column in columns:
            table.add_column(column.replace("_", " "), justify="right")
        for label, row in data["tasks"].items():
            table.add_row(label, *[str(row.get(c, 0)) for c in columns])
        console.print(table)
        for item in data["failures"]:
            short = (item.get("error_type") or "").rpartition(".")[2]
            console.print(f"FAILED {item['task']} {{{item['data_id_text']}}}: {short}: {item.get('error')}", highlight=False, markup=False)
            if tracebacks and item.get("traceback"):
                console.print(item["traceback"], highlight=False, markup=False)
        if data["blocked"]:
            console.print(f"BLOCKED: {len(data['blocked'])} quanta downstream of failures", highlight=False, markup=False)
        console.print("all succeeded" if data["succeeded"] else "NOT all succeeded", highlight=False, markup=False)
    if data["exit_code"]:
        raise click.exceptions.Exit(data["exit_code"])


def _print_dry_run(graph: Any, per_task: int = 20) -> None:
    click.echo("Dry run: nothing was executed or written. Would run, in order:")
    for label in graph.task_labels:
        quanta = graph.quanta_for_task(label)
        click.echo(f"  {label}: {len(quanta)} quanta")
        for quantum in quanta[:per_task]:
            did = ", ".join(f"{k}={v}" for k, v in quantum.data_id.items())
            n_in = sum(len(r) for r in quantum.inputs.values())
            outs = ", ".join(r.dataset_type.name for r in quantum.output_refs())
            click.echo(f"    {{{did}}}: {n_in} inputs -> {outs}")
        if len(quanta) > per_task:
            click.echo(f"    ... and {len(quanta) - per_task} more")


def _one_line(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pipetask`` console script; returns the exit code."""
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="pipetask", standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool):
            return result  # click returns (not raises) Exit codes when standalone_mode is off
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("pipetask: interrupted", err=True)
            return 130
        click.echo("pipetask: aborted", err=True)
        return 1
    except (PipelineError, ButlerError) as exc:
        click.echo(f"pipetask: error: {_one_line(exc)}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("pipetask: interrupted", err=True)
        return 130
    return 0

