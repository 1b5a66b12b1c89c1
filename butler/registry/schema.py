"""The registry's tables, generated from the dimension universe (SQLAlchemy Core)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ..dimensions import DimensionUniverse

__all__ = ["RegistryTables", "build_tables", "tables_for", "COLLECTION_TYPES", "SCHEMA_VERSION"]

#: 2: regions indexed by HTM trixels (``{element}_htm``), not HEALPix pixels, and stored as bytes
#: (:mod:`butler.registry.spatial`), not JSON; ``dataset_type_detector`` is a covering index.
SCHEMA_VERSION = 2

#: Collection type names and their stored codes.
COLLECTION_TYPES = {"RUN": 1, "TAGGED": 2, "CHAINED": 3}

_SQL_TYPES = {"str": sa.String, "int": sa.BigInteger, "float": sa.Float}


def _key_type(universe: DimensionUniverse, name: str) -> sa.types.TypeEngine:
    return _SQL_TYPES[universe[name].key_type]()


@dataclass
class RegistryTables:
    """All tables of one registry."""

    metadata: sa.MetaData
    attributes: sa.Table
    dimensions: dict[str, sa.Table]
    regions: dict[str, sa.Table]
    """Spatial element name -> table of regions (dimension tables hold their own region column)."""
    htm: dict[str, sa.Table]
    """Spatial element name -> its HTM index table: one row per (element keys, trixel touched)."""
    dataset_type: sa.Table
    collection: sa.Table
    collection_chain: sa.Table
    dataset: sa.Table
    dataset_tag: sa.Table
    _ddl: dict[tuple, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def create_statements(self, dialect: sa.engine.Dialect) -> tuple[str, ...]:
        """The ``CREATE TABLE`` / ``CREATE INDEX`` statements of ``metadata.create_all``, as text.

        SQLAlchemy's own create_all runs against a mock engine that records each DDL element,
        compiled for ``dialect``: the same statements in the same order, compiled once per dialect
        (and server version) and then reused.  Compiling them cost ~6 ms of a ~22 ms repository
        create (measured); executing the stored text costs SQLite's work alone.
        """
        key = (dialect.name, dialect.driver, getattr(dialect, "server_version_info", None))
        statements = self._ddl.get(key)
        if statements is None:
            collected: list[str] = []

            def record(ddl: Any, *_multiparams: Any, **_params: Any) -> None:
                collected.append(str(ddl.compile(dialect=dialect)).strip())

            mock = sa.create_mock_engine(sa.engine.make_url(f"{dialect.name}://"), record)
            self.metadata.create_all(mock, checkfirst=False)
            statements = self._ddl.setdefault(key, tuple(collected))
        return statements


_TABLES: dict[str, RegistryTables] = {}
_TABLES_LOCK = threading.Lock()


def tables_for(universe: DimensionUniverse) -> RegistryTables:
    """The table definitions of a universe, built once per distinct universe and then shared.

    Keyed by :attr:`DimensionUniverse.digest`, so equal universes (the default one, or one read
    back from a registry) share one set and different universes never do.  The tables are not
    changed after :func:`build_tables` returns, which makes sharing them safe.  Building them
    cost ~6 ms per registry opened or created (measured); a process sees few universes.
    """
    key = universe.digest
    with _TABLES_LOCK:
        tables = _TABLES.get(key)
        if tables is None:
            tables = _TABLES[key] = build_tables(universe)
    return tables


def build_tables(universe: DimensionUniverse) -> RegistryTables:
    """Create the table definitions for a universe (nothing is sent to a database)."""
    md = sa.MetaData()
    attributes = sa.Table(
        "butler_attributes",
        md,
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    dims: dict[str, sa.Table] = {}
    htm: dict[str, sa.Table] = {}
    regions: dict[str, sa.Table] = {}
    for name in universe.sorted(universe.dimensions):
        dim = universe[name]
        required = universe.required_closure([name])
        cols: list[sa.SchemaItem] = [
            sa.Column(r, _key_type(universe, r), primary_key=True, autoincrement=False) for r in required
        ]
        for implied in dim.implies:
            cols.append(sa.Column(implied, _key_type(universe, implied), nullable=False))
        for spec in dim.fields:
            cols.append(sa.Column(spec.name, _SQL_TYPES[spec.type](), nullable=True))
        if dim.spatial:
            cols.append(sa.Column("region", sa.LargeBinary, nullable=True))
        for parent in dim.requires:
            parent_keys = universe.required_closure([parent])
            cols.append(sa.ForeignKeyConstraint(list(parent_keys), [f"{parent}.{k}" for k in parent_keys]))
        for implied in dim.implies:
            implied_keys = universe.required_closure([implied])
            cols.append(sa.ForeignKeyConstraint(list(implied_keys), [f"{implied}.{k}" for k in implied_keys]))
        dims[name] = sa.Table(name, md, *cols)
        if dim.spatial:
            htm[name] = _htm_table(md, universe, name, required)
    for element in universe.elements.values():
        required = universe.required_closure(element.requires)
        cols = [sa.Column(r, _key_type(universe, r), primary_key=True, autoincrement=False) for r in required]
        cols.append(sa.Column("region", sa.LargeBinary, nullable=False))
        for parent in element.requires:
            parent_keys = universe.required_closure([parent])
            cols.append(sa.ForeignKeyConstraint(list(parent_keys), [f"{parent}.{k}" for k in parent_keys]))
        regions[element.name] = sa.Table(element.name, md, *cols)
        htm[element.name] = _htm_table(md, universe, element.name, required)

    dataset_type = sa.Table(
        "dataset_type",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String, nullable=False, unique=True),
        sa.Column("dimensions", sa.Text, nullable=False),
        sa.Column("storage_class", sa.String, nullable=False),
    )
    collection = sa.Table(
        "collection",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String, nullable=False, unique=True),
        sa.Column("type", sa.Integer, nullable=False),
        sa.Column("doc", sa.Text, nullable=True),
    )
    collection_chain = sa.Table(
        "collection_chain",
        md,
        sa.Column("parent", sa.Integer, sa.ForeignKey("collection.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("child", sa.Integer, sa.ForeignKey("collection.id"), nullable=False),
    )
    dim_cols = [
        sa.Column(name, _key_type(universe, name), nullable=True) for name in universe.sorted(universe.dimensions)
    ]
    dataset = sa.Table(
        "dataset",
        md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("dataset_type_id", sa.Integer, sa.ForeignKey("dataset_type.id"), nullable=False),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("collection.id", ondelete="CASCADE"), nullable=False),
        sa.Column("data_id_key", sa.String, nullable=False),
        *dim_cols,
        sa.Column("path", sa.String, nullable=True),
        sa.Column("file_size", sa.BigInteger, nullable=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.UniqueConstraint("dataset_type_id", "run_id", "data_id_key", name="dataset_unique_in_run"),
    )
    # Equality-then-range orders: "detector = 5 AND visit > 100" walks only one detector's rows.
    sa.Index("dataset_type_visit", dataset.c.dataset_type_id, dataset.c.visit, dataset.c.detector)
    # Covering for a visit-detector dataset query in one run (the data ID, id and path come from
    # the index alone): one detector's rows are scattered over the table, and reading them from it
    # cost 3x the whole query of ~2k rows out of 40k (measured).
    sa.Index(
        "dataset_type_detector",
        dataset.c.dataset_type_id,
        dataset.c.detector,
        dataset.c.visit,
        dataset.c.run_id,
        *(dataset.c[k] for k in universe.full_closure(["visit", "detector"]) if k not in ("visit", "detector")),
        dataset.c.id,
        dataset.c.path,
    )
    sa.Index("dataset_type_patch", dataset.c.dataset_type_id, dataset.c.tract, dataset.c.patch)
    sa.Index("dataset_run", dataset.c.run_id)
    dataset_tag = sa.Table(
        "dataset_tag",
        md,
        sa.Column("collection_id", sa.Integer, sa.ForeignKey("collection.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("dataset_id", sa.String(32), sa.ForeignKey("dataset.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("dataset_type_id", sa.Integer, nullable=False),
        sa.Column("data_id_key", sa.String, nullable=False),
        sa.UniqueConstraint("collection_id", "dataset_type_id", "data_id_key", name="tag_unique"),
    )
    return RegistryTables(md, attributes, dims, regions, htm, dataset_type, collection, collection_chain, dataset, dataset_tag)


def _htm_table(md: sa.MetaData, universe: DimensionUniverse, element: str, keys: tuple[str, ...]) -> sa.Table:
    cols: list[sa.SchemaItem] = [
        sa.Column(k, _key_type(universe, k), primary_key=True, autoincrement=False) for k in keys
    ]
    cols.append(sa.Column("pix", sa.BigInteger, primary_key=True, autoincrement=False))
    cols.append(sa.ForeignKeyConstraint(list(keys), [f"{element}.{k}" for k in keys], ondelete="CASCADE"))
    table = sa.Table(f"{element}_htm", md, *cols)
    sa.Index(f"{element}_htm_pix", table.c.pix)
    return table
