"""The ``butler`` command: LSST's verbs and options over a diapipe repository.

Heavy modules (SQLAlchemy, numpy, astropy, zarr) are imported inside the commands, so that
``butler --help`` starts in a blink.  User errors print one line on stderr and exit 1; usage
errors exit 2 (click's convention).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click

_FORMATS = click.Choice(["table", "json", "csv"])


def _split(values: Iterable[str]) -> list[str]:
    """``--collections a,b --collections c`` -> ``[a, b, c]``."""
    out: list[str] = []
    for value in values:
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def _emit(rows: Sequence[dict[str, Any]], fmt: str, columns: Sequence[str] | None = None) -> None:
    columns = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    if fmt == "json":
        click.echo(json.dumps([{c: row.get(c) for c in columns} for row in rows], indent=1, default=str))
        return
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
        click.echo(buffer.getvalue(), nl=False)
        return
    if not rows:
        click.echo("(no results)")
        return
    text = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for r in text:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _parse_data_id(text: str | None) -> dict[str, Any]:
    """``instrument=SimCam,visit=12`` -> dict (integers converted)."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"bad data ID item {part!r}: use key=value,key=value")
        value = value.strip().strip("'\"")
        out[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _butler(repo: str, **kwargs: Any) -> Any:
    from .butler import Butler

    return Butler(repo, **kwargs)


where_option = click.option("--where", default=None, help="Where expression, e.g. \"visit > 10 AND band = 'r'\".")
collections_option = click.option(
    "--collections", multiple=True, help="Collections to search (comma-separated or repeated)."
)
limit_option = click.option("--limit", type=int, default=None, help="Return at most this many rows.")
format_option = click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Create, fill and query diapipe butler repositories."""


@cli.command()
@click.argument("repo")
@click.option("--exposure-format", type=click.Choice(["zarr", "fits"]), default="zarr", show_default=True,
              help="File format of Exposure datasets.")
@click.option("--db", default=None, help="Registry database URL (default: SQLite file in the repository).")
@click.option("--durability", type=click.Choice(["process", "power"]), default="process", show_default=True,
              help="'power' also syncs every file and commit to disk (survives power loss; slower puts).")
def create(repo: str, exposure_format: str, db: str | None, durability: str) -> None:
    """Create an empty repository at REPO."""
    from .butler import Butler

    Butler.create(
        repo,
        db=db,
        formatters={"Exposure": exposure_format} if exposure_format != "zarr" else None,
        durability=durability,
    )
    click.echo(f"created repository {repo}")


@cli.command("register-instrument")
@click.argument("repo")
@click.argument("instrument")
def register_instrument_cmd(repo: str, instrument: str) -> None:
    """Register INSTRUMENT (a YAML file or a dotted class name) and its detectors and filters."""
    from .instrument import load_instrument_config, register_instrument

    config = load_instrument_config(instrument)
    with _butler(repo) as butler:
        name = register_instrument(butler, config, class_name=None if instrument.endswith((".yaml", ".yml")) else instrument)
    click.echo(f"registered instrument {name} ({len(config['detectors'])} detectors)")


@cli.command("register-skymap")
@click.argument("repo")
@click.option("-C", "--config-file", required=True, help="Skymap YAML file.")
@click.option("--collection", default="skymaps", show_default=True, help="RUN collection for the skyMap dataset.")
def register_skymap_cmd(repo: str, config_file: str, collection: str) -> None:
    """Register a skymap (its tracts and patches) from a YAML config."""
    from .skymap import SkyMap
    from .skymap_records import register_skymap

    skymap = SkyMap.from_yaml(config_file)
    with _butler(repo) as butler:
        n_tracts, n_patches = register_skymap(butler, skymap, run=collection)
    click.echo(f"registered skymap {skymap.name}: {n_tracts} tracts, {n_patches} patches")


@cli.command("register-dataset-type")
@click.argument("repo")
@click.argument("name")
@click.argument("storage_class")
@click.argument("dimensions", nargs=-1)
def register_dataset_type_cmd(repo: str, name: str, storage_class: str, dimensions: tuple[str, ...]) -> None:
    """Register dataset type NAME with STORAGE_CLASS and DIMENSIONS."""
    with _butler(repo) as butler:
        new = butler.register_dataset_type(name, dimensions, storage_class)
    click.echo(f"{'registered' if new else 'already registered'}: {name}")


@cli.command()
@click.argument("repo")
@click.argument("dataset_type")
@click.argument("run")
@click.argument("files", nargs=-1, required=True)
@click.option("--data-id", "data_ids", multiple=True, required=True,
              help="Data ID of each file in order (key=value,...); one value applies to all files.")
@click.option("--transfer", type=click.Choice(["copy", "move", "symlink", "hardlink"]), default="copy", show_default=True)
def ingest(repo: str, dataset_type: str, run: str, files: tuple[str, ...], data_ids: tuple[str, ...], transfer: str) -> None:
    """Ingest external FILES (e.g. FITS exposures) as DATASET_TYPE into RUN."""
    if len(data_ids) not in (1, len(files)):
        raise click.UsageError(f"give one --data-id per file ({len(files)}) or one for all")
    parsed = [_parse_data_id(d) for d in data_ids]
    if len(parsed) == 1 and len(files) > 1:
        raise click.UsageError("several files need one --data-id each (data IDs must differ)")
    with _butler(repo) as butler:
        refs = butler.ingest(list(files), dataset_type, parsed, run=run, transfer=transfer)
    click.echo(f"ingested {len(refs)} file(s) into {run}")


@cli.command("query-collections")
@click.argument("repo")
@click.argument("pattern", default="*")
@click.option("--collection-type", "types", multiple=True, type=click.Choice(["RUN", "TAGGED", "CHAINED"]))
@format_option
def query_collections_cmd(repo: str, pattern: str, types: tuple[str, ...], fmt: str) -> None:
    """List collections matching PATTERN (glob)."""
    with _butler(repo) as butler:
        rows = [
            {"Name": name, "Type": kind, "Children": ",".join(butler.registry.get_collection_chain(name)) if kind == "CHAINED" else ""}
            for name, kind in butler.query_collections(pattern, types or None)
        ]
    _emit(rows, fmt, ["Name", "Type", "Children"])


@cli.command("query-dataset-types")
@click.argument("repo")
@click.argument("pattern", default="*")
@format_option
def query_dataset_types_cmd(repo: str, pattern: str, fmt: str) -> None:
    """List registered dataset types matching PATTERN (glob)."""
    with _butler(repo) as butler:
        rows = [
            {"name": dt.name, "dimensions": " ".join(dt.dimensions), "storageClass": dt.storage_class}
            for dt in butler.query_dataset_types(pattern)
        ]
    _emit(rows, fmt, ["name", "dimensions", "storageClass"])


@cli.command("query-datasets")
@click.argument("repo")
@click.argument("dataset_type")
@collections_option
@where_option
@limit_option
@click.option("--find-all", is_flag=True, help="All matches, not only the first along the search path.")
@format_option
def query_datasets_cmd(repo: str, dataset_type: str, collections: tuple[str, ...], where: str | None,
                       limit: int | None, find_all: bool, fmt: str) -> None:
    """List datasets of DATASET_TYPE."""
    with _butler(repo) as butler:
        colls = _split(collections) or [name for name, kind in butler.query_collections() if kind == "RUN"]
        refs = butler.query_datasets(dataset_type, collections=colls, where=where, limit=limit, find_first=not find_all)
        dims = butler.universe.full_closure(butler.registry.get_dataset_type(dataset_type).dimensions)
    rows = [{"type": r.dataset_type.name, "run": r.run, "id": r.id, **r.data_id, "path": r.path} for r in refs]
    _emit(rows, fmt, ["type", "run", "id", *dims, "path"])


@cli.command("query-data-ids")
@click.argument("repo")
@click.argument("dimensions", nargs=-1, required=True)
@where_option
@click.option("--datasets", multiple=True, help="Only data IDs with these datasets.")
@collections_option
@limit_option
@format_option
def query_data_ids_cmd(repo: str, dimensions: tuple[str, ...], where: str | None, datasets: tuple[str, ...],
                       collections: tuple[str, ...], limit: int | None, fmt: str) -> None:
    """List data IDs of DIMENSIONS (spatial joins between visits and patches included)."""
    with _butler(repo) as butler:
        ds = _split(datasets)
        colls = _split(collections) or ([n for n, k in butler.query_collections() if k == "RUN"] if ds else None)
        rows = butler.query_data_ids(list(dimensions), where=where, datasets=ds or None, collections=colls)
    _emit(rows[:limit] if limit is not None else rows, fmt)


@cli.command("query-dimension-records")
@click.argument("repo")
@click.argument("element")
@where_option
@limit_option
@format_option
def query_dimension_records_cmd(repo: str, element: str, where: str | None, limit: int | None, fmt: str) -> None:
    """List the records of a dimension ELEMENT (visit, detector, patch, ...)."""
    with _butler(repo) as butler:
        records = butler.query_dimension_records(element, where=where)
    rows = []
    for rec in records[:limit] if limit is not None else records:
        region = rec.pop("region", None)
        if region is not None:
            ra, dec = region.vertices_radec()
            rec["region"] = " ".join(f"({a:.5f},{d:.5f})" for a, d in zip(ra, dec, strict=True))
        rows.append(rec)
    _emit(rows, fmt)


@cli.command("remove-runs")
@click.argument("repo")
@click.argument("runs", nargs=-1, required=True)
@click.option("--no-confirm", is_flag=True, help="Do not ask for confirmation.")
def remove_runs_cmd(repo: str, runs: tuple[str, ...], no_confirm: bool) -> None:
    """Remove RUN collections with their datasets and files."""
    with _butler(repo) as butler:
        names = _split(runs)
        for name in names:
            butler.registry.get_collection(name)
        if not no_confirm and not click.confirm(f"Remove runs {names} and all their datasets?", default=False):
            click.echo("aborted")
            return
        n = butler.remove_runs(names)
    click.echo(f"removed {len(names)} run(s) and {n} dataset(s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``butler`` console script."""
    from .errors import ButlerError

    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="butler", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except ButlerError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        click.echo(f"butler: error: {first_line}", err=True)
        return 1
    except (OSError, ValueError, KeyError, LookupError) as exc:
        click.echo(f"butler: error: {type(exc).__name__}: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
