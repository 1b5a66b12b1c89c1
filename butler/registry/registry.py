"""The registry: dataset types, collections, dimension records and datasets in one SQL database.

Written with SQLAlchemy Core; dialect-specific SQL lives in :mod:`butler.registry.database`.
Every write runs in one transaction (``BEGIN IMMEDIATE`` on SQLite), so a failed call changes
nothing.  Read paths cache what cannot change under them (dataset types, collection ids, expanded
data IDs) because a put or get is dominated by round trips, not by SQL.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import operator
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..dimensions import DataId, DimensionUniverse
from ..errors import (
    CollectionTypeError,
    DatasetExistsError,
    DatasetTypeConflictError,
    DataIdError,
    DimensionNameError,
    DimensionRecordNotFoundError,
    MissingCollectionError,
    MissingDatasetTypeError,
)
from ..refs import DatasetRef, DatasetType, data_id_key
from .database import (
    fetch_rows,
    has_json_aggregates,
    insert_committed,
    insert_many,
    insert_or_ignore,
    json_columns,
    json_count_and_values,
    make_engine,
    positional_on_sqlite,
    read_connection,
    select_json_columns,
    select_rows,
    write_transaction,
)
from .schema import COLLECTION_TYPES, SCHEMA_VERSION, RegistryTables, tables_for
from .where import WhereCompiler

if TYPE_CHECKING:
    from ..regions import RegionBatch

__all__ = ["Registry", "CollectionInfo"]

_log = logging.getLogger(__name__)
_TYPE_NAMES = {code: name for name, code in COLLECTION_TYPES.items()}


#: One-run plans of :meth:`Registry.query_datasets` kept per registry (the cache is emptied when full).
_STATEMENT_CACHE_SIZE = 256


def _statement_key(
    type_id: int,
    run_id: int,
    where: str | None,
    bind: Mapping[str, Any] | None,
    data_id: Mapping[str, Any] | None,
    limit: int | None,
) -> tuple | None:
    """What decides a one-run dataset query's statement, or None when a value is not hashable.

    Values go in with their types: ``1``, ``1.0`` and ``True`` are equal keys but not equally
    valid data ID values.
    """
    key = (
        type_id,
        run_id,
        where,
        tuple(sorted((k, type(v), v) for k, v in (bind or {}).items())),
        tuple((k, type(v), v) for k, v in (data_id or {}).items()),
        limit,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


class CollectionInfo(tuple):
    """``(id, name, type)`` of a collection."""

    __slots__ = ()

    def __new__(cls, id: int, name: str, type: str) -> CollectionInfo:  # noqa: A002
        return super().__new__(cls, (id, name, type))

    @property
    def id(self) -> int:
        return self[0]

    @property
    def name(self) -> str:
        return self[1]

    @property
    def type(self) -> str:
        return self[2]


@dataclass(eq=False)
class _OneRunPlan:
    """How :meth:`Registry.query_datasets` fetches one statement key's datasets from one RUN collection.

    Attributes
    ----------
    rows : sqlalchemy.Select
        The varying dimension columns (those not in ``constants``), id and path, sorted (and
        limited) in SQL.
    constants : dict
        Data ID values every row shares (the data ID's, and ``key = value`` terms of the where).
    columns : sqlalchemy.Select or None
        The same datasets as one JSON array (SQLite, no limit): when there are ``implied``
        dimensions, first ``[how many datasets' implied values differ from one dataset's, *its
        values]``; then one array per required dimension not in ``constants`` (in
        ``full_closure`` order), the ids and the paths.  None when ``rows`` is to be used, also
        after the columns did not suit the result once (see :meth:`Registry._refs_from_columns`).
    implied : tuple of str
        Implied dimensions not in ``constants``.
    sort_order : tuple of int
        Positions among those required arrays of the dataset type's dimensions, in its order
        (the ORDER BY of ``rows``).
    """

    rows: Any
    constants: dict[str, Any]
    columns: Any = None
    implied: tuple[str, ...] = ()
    sort_order: tuple[int, ...] = ()


def _in_data_id_order(columns: list[Any], keys: Sequence[int]) -> list[Any] | None:
    """``columns`` (one list per column) with their rows sorted by the columns at ``keys``.

    Returns None when Python cannot sort them as SQL's ORDER BY would.  Integers and text
    compare in Python as SQLite sorts them (text by code point, as BINARY collation compares
    UTF-8 bytes); values Python does not order (None, an integer with text) raise.  Rows
    already in order (the usual case: SQLite walks an index in data ID order) are checked in
    linear time by ``sorted``, a quarter of the time of comparing neighbours (measured).
    """
    key_columns = [columns[i] for i in keys]
    values = key_columns[0] if len(key_columns) == 1 else list(zip(*key_columns))
    try:
        if values == sorted(values):
            return columns
        order = sorted(range(len(values)), key=values.__getitem__)
    except TypeError:
        return None
    pick = operator.itemgetter(*order)  # two rows at least: it returns tuples
    return [pick(column) for column in columns]


class Registry:
    """A registry database.

    Use :meth:`create` for a new database and :meth:`open` for an existing one.
    """

    def __init__(self, engine: Engine, universe: DimensionUniverse) -> None:
        self.engine = engine
        self.universe = universe
        self.tables: RegistryTables = tables_for(universe)
        self._lock = threading.Lock()
        self._dataset_types: dict[str, tuple[int, DatasetType]] = {}
        self._collections: dict[str, CollectionInfo] = {}
        self._expanded: dict[tuple, DataId] = {}
        self._region_cache: dict[str, dict[tuple, Any]] = {}
        self._region_batches: dict[str, tuple[dict[tuple, int], RegionBatch]] = {}
        self._records: dict[str, dict[tuple, dict[str, Any]]] = {}
        self._record_statements: dict[str, Any] = {}
        self._find_statements: dict[int, Any] = {}
        self._expansions: dict[tuple[str, ...], tuple] = {}
        self._one_run_statements: dict[tuple, _OneRunPlan] = {}
        self._json_aggregates: bool | None = None  # the engine has SQLite's JSON functions; probed once
        self._where = WhereCompiler(self)
        self._dataset_dimensions = universe.sorted(universe.dimensions)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, db: str, universe: DimensionUniverse) -> Registry:
        """Create the tables of a new registry at ``db`` (SQLite path or SQLAlchemy URL)."""
        engine = make_engine(db)
        registry = cls(engine, universe)
        engine.raw_connection().close()  # connected once: the dialect knows the server's version
        # A new database: create_all's statements without asking whether each table exists, and
        # the attributes, in one transaction.
        insert_committed(
            engine,
            registry.tables.attributes,
            ["name", "value"],
            [("schema_version", str(SCHEMA_VERSION)), ("universe", json.dumps(universe.to_config()))],
            before=registry.tables.create_statements(engine.dialect),
        )
        return registry

    @classmethod
    def open(cls, db: str, *, synchronous: str = "NORMAL") -> Registry:
        """Open an existing registry; its universe is read from the database."""
        engine = make_engine(db, synchronous=synchronous)
        md = sa.MetaData()
        attributes = sa.Table("butler_attributes", md, sa.Column("name", sa.String), sa.Column("value", sa.Text))
        with read_connection(engine) as conn:
            rows = dict(conn.execute(sa.select(attributes.c.name, attributes.c.value)).all())
        version = int(rows.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise DataIdError(f"registry {db} has schema version {version}; this diapipe reads {SCHEMA_VERSION}")
        universe = DimensionUniverse.from_config(json.loads(rows["universe"]), source=f"{db} (universe)")
        return cls(engine, universe)

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    # ------------------------------------------------------------------ dataset types
    def register_dataset_type(self, dataset_type: DatasetType) -> bool:
        """Register a dataset type; returns False if an identical one exists.

        Raises
        ------
        DatasetTypeConflictError
            If the name is registered with other dimensions or storage class.
        """
        dims = self.universe.required_closure(dataset_type.dimensions)
        dataset_type = DatasetType(dataset_type.name, dims, dataset_type.storage_class)
        try:
            existing = self.get_dataset_type(dataset_type.name)
        except MissingDatasetTypeError:
            existing = None
        if existing is not None:
            if existing != dataset_type:
                raise DatasetTypeConflictError(
                    f"dataset type {dataset_type.name!r} is already registered as {existing.dimensions} / "
                    f"{existing.storage_class}; cannot register it as {dims} / {dataset_type.storage_class}"
                )
            return False
        table = self.tables.dataset_type
        with write_transaction(self.engine) as conn:
            conn.execute(
                insert_or_ignore(table).values(
                    name=dataset_type.name, dimensions=json.dumps(list(dims)), storage_class=dataset_type.storage_class
                )
            )
        self._dataset_types.pop(dataset_type.name, None)
        return self.get_dataset_type(dataset_type.name) == dataset_type

    def _dataset_type_row(self, name: str) -> tuple[int, DatasetType]:
        cached = self._dataset_types.get(name)
        if cached is not None:
            return cached
        table = self.tables.dataset_type
        with read_connection(self.engine) as conn:
            row = conn.execute(sa.select(table).where(table.c.name == name)).first()
        if row is None:
            known = [dt.name for dt in self.query_dataset_types()]
            raise MissingDatasetTypeError(
                f"dataset type {name!r} is not registered; registered: {', '.join(known) or 'none'}. "
                "Register it with register_dataset_type() or `butler register-dataset-type`."
            )
        entry = (row.id, DatasetType(row.name, tuple(json.loads(row.dimensions)), row.storage_class))
        self._dataset_types[name] = entry
        return entry

    def get_dataset_type(self, name: str) -> DatasetType:
        """A registered dataset type by name."""
        return self._dataset_type_row(name)[1]

    def query_dataset_types(self, pattern: str = "*") -> list[DatasetType]:
        """Registered dataset types whose names match a glob pattern, sorted by name."""
        table = self.tables.dataset_type
        with read_connection(self.engine) as conn:
            rows = conn.execute(sa.select(table).order_by(table.c.name)).all()
        return [
            DatasetType(r.name, tuple(json.loads(r.dimensions)), r.storage_class)
            for r in rows
            if fnmatch.fnmatchcase(r.name, pattern)
        ]

    # ------------------------------------------------------------------ collections
    def register_collection(self, name: str, type: str = "RUN", doc: str | None = None) -> bool:  # noqa: A002
        """Create a collection; returns False if one of that name and type exists.

        Raises
        ------
        CollectionTypeError
            If it exists with another type, or the type is unknown.
        """
        from ..datastore import validate_run_name

        cached = self._collections.get(name)
        if cached is not None and cached.type == type:
            return False
        if type not in COLLECTION_TYPES:
            raise CollectionTypeError(f"unknown collection type {type!r}; use one of {list(COLLECTION_TYPES)}")
        validate_run_name(name)
        table = self.tables.collection
        with write_transaction(self.engine) as conn:
            existing = conn.execute(sa.select(table.c.type).where(table.c.name == name)).scalar()
            if existing is not None:
                if existing != COLLECTION_TYPES[type]:
                    raise CollectionTypeError(
                        f"collection {name!r} already exists as {_TYPE_NAMES[existing]}, not {type}"
                    )
                return False
            conn.execute(table.insert().values(name=name, type=COLLECTION_TYPES[type], doc=doc))
        return True

    def get_collection(self, name: str) -> CollectionInfo:
        """``(id, name, type)`` of a collection.

        Raises
        ------
        MissingCollectionError
            With the list of existing collections.
        """
        info = self._collections.get(name)
        if info is not None:
            return info
        table = self.tables.collection
        with read_connection(self.engine) as conn:
            row = conn.execute(sa.select(table).where(table.c.name == name)).first()
        if row is None:
            known = [c for c, _ in self.query_collections()]
            raise MissingCollectionError(
                f"collection {name!r} does not exist; existing collections: {', '.join(known) or 'none'}"
            )
        info = CollectionInfo(row.id, row.name, _TYPE_NAMES[row.type])
        self._collections[name] = info
        return info

    def set_collection_chain(self, parent: str, children: Sequence[str]) -> None:
        """Define (replace) the ordered search path of a CHAINED collection.

        Raises
        ------
        CollectionTypeError
            If ``parent`` is not CHAINED or the chain would contain itself.
        """
        info = self.get_collection(parent)
        if info.type != "CHAINED":
            raise CollectionTypeError(f"collection {parent!r} is {info.type}, not CHAINED")
        child_infos = [self.get_collection(c) for c in children]
        for child in child_infos:
            if parent in [c.name for c in self.flatten_collections([child.name], include_chains=True)]:
                raise CollectionTypeError(f"chain {parent!r} cannot contain {child.name!r}: that would be a cycle")
        table = self.tables.collection_chain
        with write_transaction(self.engine) as conn:
            conn.execute(table.delete().where(table.c.parent == info.id))
            if child_infos:
                conn.execute(
                    table.insert(),
                    [{"parent": info.id, "position": i, "child": c.id} for i, c in enumerate(child_infos)],
                )

    def get_collection_chain(self, parent: str) -> list[str]:
        """The children of a CHAINED collection, in search order."""
        info = self.get_collection(parent)
        if info.type != "CHAINED":
            raise CollectionTypeError(f"collection {parent!r} is {info.type}, not CHAINED")
        chain, coll = self.tables.collection_chain, self.tables.collection
        with read_connection(self.engine) as conn:
            rows = conn.execute(
                sa.select(coll.c.name)
                .select_from(chain.join(coll, chain.c.child == coll.c.id))
                .where(chain.c.parent == info.id)
                .order_by(chain.c.position)
            ).all()
        return [r.name for r in rows]

    def query_collections(self, pattern: str = "*", types: Iterable[str] | None = None) -> list[tuple[str, str]]:
        """``(name, type)`` of collections matching a glob pattern, sorted by name."""
        wanted = set(types) if types else set(COLLECTION_TYPES)
        table = self.tables.collection
        with read_connection(self.engine) as conn:
            rows = conn.execute(sa.select(table.c.name, table.c.type).order_by(table.c.name)).all()
        return [
            (r.name, _TYPE_NAMES[r.type])
            for r in rows
            if _TYPE_NAMES[r.type] in wanted and fnmatch.fnmatchcase(r.name, pattern)
        ]

    def flatten_collections(self, collections: str | Sequence[str], *, include_chains: bool = False) -> list[CollectionInfo]:
        """Expand CHAINED collections into their RUN/TAGGED members, in search order, without repeats."""
        if isinstance(collections, str):
            collections = [collections]
        out: list[CollectionInfo] = []
        seen: set[int] = set()

        def visit(name: str, depth: int) -> None:
            if depth > 100:
                raise CollectionTypeError(f"collection chain through {name!r} is too deep (a cycle?)")
            info = self.get_collection(name)
            if info.type == "CHAINED":
                if include_chains and info.id not in seen:
                    seen.add(info.id)
                    out.append(info)
                for child in self.get_collection_chain(name):
                    visit(child, depth + 1)
            elif info.id not in seen:
                seen.add(info.id)
                out.append(info)

        for name in collections:
            visit(name, 0)
        return out

    def remove_runs(self, names: Sequence[str]) -> list[str]:
        """Delete RUN collections with their datasets and chain memberships.

        Returns
        -------
        list of str
            Datastore paths of the removed datasets (the caller deletes the files).
        """
        infos = [self.get_collection(n) for n in names]
        for info in infos:
            if info.type != "RUN":
                raise CollectionTypeError(f"collection {info.name!r} is {info.type}, not RUN")
        t = self.tables
        ids = [i.id for i in infos]
        with write_transaction(self.engine) as conn:
            paths = [
                r.path
                for r in conn.execute(sa.select(t.dataset.c.path).where(t.dataset.c.run_id.in_(ids))).all()
                if r.path
            ]
            dataset_ids = sa.select(t.dataset.c.id).where(t.dataset.c.run_id.in_(ids))
            conn.execute(t.dataset_tag.delete().where(t.dataset_tag.c.dataset_id.in_(dataset_ids)))
            conn.execute(t.dataset.delete().where(t.dataset.c.run_id.in_(ids)))
            conn.execute(t.collection_chain.delete().where(t.collection_chain.c.child.in_(ids)))
            conn.execute(t.collection.delete().where(t.collection.c.id.in_(ids)))
        for info in infos:
            self._collections.pop(info.name, None)
        return paths

    # ------------------------------------------------------------------ dimension records
    def insert_dimension_records(
        self, element: str, records: Iterable[Mapping[str, Any]], *, skip_existing: bool = False
    ) -> int:
        """Insert records of a dimension or spatial element; returns how many were new.

        Records name required and implied dimensions by dimension name, the element's own key by its
        key field (``id``/``name``) or its dimension name, other fields by field name, and the sky
        region (spatial elements) as ``region`` (a :class:`~butler.regions.SkyRegion` or its dict;
        dicts are validated together, see :meth:`SkyRegion.from_radec_many`).

        Raises
        ------
        DataIdError
            Missing keys, unknown fields, wrongly typed values.
        DatasetExistsError
            A record exists already and ``skip_existing`` is False.
        """
        columns, rows, index_rows, table, index_table = self._record_rows(element, records)
        if not rows:
            return 0
        keys = [c.name for c in table.primary_key.columns]
        index_columns = [*keys, "pix"]
        if not skip_existing:
            # Usually nothing exists yet: insert at once, and only after a conflict (which rolls
            # the transaction back) look for the existing records to explain it.
            try:
                with write_transaction(self.engine) as conn:
                    insert_many(conn, table, columns, rows)
                    if index_table is not None:
                        insert_many(conn, index_table, index_columns, index_rows)
            except sa.exc.IntegrityError:
                pass
            else:
                self._expanded.clear()
                return len(rows)
        positions = [columns.index(k) for k in keys]
        with write_transaction(self.engine) as conn:
            existing = self._existing_keys(conn, table, keys, [tuple(r[p] for p in positions) for r in rows])
            if existing and not skip_existing:
                raise DatasetExistsError(
                    f"{len(existing)} {element} record(s) already exist, e.g. "
                    f"{dict(zip(keys, sorted(existing)[0], strict=True))}; pass skip_existing=True to ignore them"
                )
            new_rows = [r for r in rows if tuple(r[p] for p in positions) not in existing]
            insert_many(conn, table, columns, new_rows)
            if index_table is not None and new_rows:
                index_new = [h for h in index_rows if h[:-1] not in existing] if existing else index_rows
                insert_many(conn, index_table, index_columns, index_new)
        self._expanded.clear()
        return len(new_rows)

    @staticmethod
    def _existing_keys(conn: Connection, table: sa.Table, keys: list[str], wanted: list[tuple]) -> set[tuple]:
        found: set[tuple] = set()
        cols = [table.c[k] for k in keys]
        batch = 400
        for start in range(0, len(wanted), batch):
            chunk = wanted[start : start + batch]
            cond = sa.tuple_(*cols).in_(chunk) if len(keys) > 1 else cols[0].in_([k[0] for k in chunk])
            found.update(tuple(row) for row in conn.execute(sa.select(*cols).where(cond)).all())
        return found

    def _record_rows(
        self, element: str, records: Iterable[Mapping[str, Any]]
    ) -> tuple[list[str], list[tuple], list[tuple], sa.Table, sa.Table | None]:
        """Columns and rows of the element's table, and ``(*keys, pix)`` rows of its HTM index."""
        u = self.universe
        if element in u.dimensions:
            dim = u[element]
            required = u.required_closure([element])
            implied = dim.implies
            fields = {f.name: f for f in dim.fields}
            table = self.tables.dimensions[element]
            own_key = dim.key_name
            spatial_el = dim.spatial
        elif element in u.elements:
            required = u.required_closure(u.elements[element].requires)
            implied, fields, own_key, spatial_el = (), {}, None, True
            table = self.tables.regions[element]
        else:
            raise DimensionNameError(
                f"unknown dimension element {element!r}; known: {', '.join([*u.dimensions, *u.elements])}"
            )
        key_names = (*required, *implied)
        columns = [*key_names, *fields, *(["region"] if spatial_el else [])]
        field_slot = {name: len(key_names) + i for i, name in enumerate(fields)}
        # Values already checked by coerce_value, per dimension: records repeat them (instrument).
        checked: dict[str, set] = {k: set() for k in key_names}
        key_types = {k: u[k].key_type for k in key_names}
        rows: list[list[Any]] = []
        region_values: list[Any] = []
        region_rows: list[int] = []
        for record in records:
            rec = dict(record)
            if own_key is not None and own_key in rec and own_key != element:
                if element in rec and rec[element] != rec[own_key]:
                    raise DataIdError(f"{element} record gives both {own_key}={rec[own_key]!r} and {element}={rec[element]!r}")
                rec[element] = rec.pop(own_key)
            row: list[Any] = [None] * len(columns)  # every row has every column, for executemany
            for slot, key in enumerate(key_names):
                if key not in rec:
                    raise DataIdError(f"{element} record {record!r} is missing {key!r}")
                value = rec.pop(key)
                if type(value) is int and key_types[key] == "int" or type(value) is str and value in checked[key]:
                    row[slot] = value
                else:
                    row[slot] = u.coerce_value(key, value)
                    if type(row[slot]) is str:
                        checked[key].add(row[slot])
            region = rec.pop("region", None)
            for name, value in rec.items():
                spec = fields.get(name)
                if spec is None:
                    raise DataIdError(
                        f"{element} record has unknown field {name!r}; fields: {[own_key, *fields] if own_key else list(fields)}"
                    )
                if value is not None:
                    if spec.type == "float" and isinstance(value, int | float):
                        value = float(value)
                    elif spec.type == "int" and hasattr(value, "__index__") and not isinstance(value, bool):
                        value = int(value)
                    elif not isinstance(value, spec.python_type):
                        raise DataIdError(f"{element}.{name} must be {spec.type}, got {value!r}")
                row[field_slot[name]] = value
            if spatial_el:
                if region is None and element in u.elements:
                    raise DataIdError(f"{element} record {record!r} needs a region")
                if region is not None:
                    region_values.append(region)
                    region_rows.append(len(rows))
            elif region is not None:
                raise DataIdError(f"{element} is not spatial; it takes no region")
            rows.append(row)
        index_rows: list[tuple] = []
        if region_values:
            from ..htm import htm_cover
            from .spatial import as_regions, region_bytes

            regions = as_regions(region_values)
            for i, sky_region in zip(region_rows, regions, strict=True):
                rows[i][-1] = region_bytes(sky_region)
            # One cover for all the regions: one by one it cost more than the rest of the insert.
            owner, pixels = htm_cover(regions, u.htm_level)
            n_keys = len(required)
            region_keys = [tuple(rows[i][:n_keys]) for i in region_rows]
            index_rows = [(*region_keys[i], p) for i, p in zip(owner.tolist(), pixels.tolist(), strict=True)]
        return columns, [tuple(r) for r in rows], index_rows, table, self.tables.htm.get(element)

    def query_dimension_records(
        self,
        element: str,
        *,
        where: str | None = None,
        bind: Mapping[str, Any] | None = None,
        data_id: Mapping[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Records of a dimension or spatial element, optionally filtered.

        The where expression may use the element's keys and fields (``visit.seeing < 0.8`` or
        ``seeing < 0.8``, ``instrument = 'SimCam'``).
        """
        u = self.universe
        if element in u.dimensions:
            table = self.tables.dimensions[element]
            own_key = u[element].key_name
        elif element in u.elements:
            table = self.tables.regions[element]
            own_key = None
        else:
            raise DimensionNameError(
                f"unknown dimension element {element!r}; known: {', '.join([*u.dimensions, *u.elements])}"
            )
        query = sa.select(table)
        for key, value in (data_id or {}).items():
            if key not in table.c:
                raise DataIdError(f"{element} records have no key {key!r}")
            query = query.where(table.c[key] == u.coerce_value(key, value))
        if where:
            query = query.where(self._where.compile_for_table(where, bind, element, table))
        query = query.order_by(*table.primary_key.columns)
        with read_connection(self.engine) as conn:
            rows = conn.execute(query).mappings().all()
        out = []
        for row in rows:
            rec = dict(row)
            if own_key is not None and own_key != element:
                rec[own_key] = rec.pop(element)
            if rec.get("region") is not None:
                from .spatial import region_from_bytes

                rec["region"] = region_from_bytes(rec["region"])
            out.append(rec)
        return out

    def region_vertices(self, element: str, keys: Sequence[tuple]) -> dict[tuple, Any]:
        """``[ra, dec]`` vertex arrays (degrees) of the regions of a spatial element, by key tuple.

        Regions are immutable once inserted, so they are cached for the life of the registry.
        Keys without a region are left out.
        """
        import numpy as np

        from .spatial import vertices_from_bytes

        cache = self._region_cache.setdefault(element, {})
        missing = [k for k in keys if k not in cache]
        if missing:
            u = self.universe
            if element in u.elements:
                table = self.tables.regions[element]
                names = u.required_closure(u.elements[element].requires)
            else:
                table = self.tables.dimensions[element]
                names = u.required_closure([element])
            cols = [table.c[n] for n in names]
            with read_connection(self.engine) as conn:
                for start in range(0, len(missing), 500):
                    chunk = missing[start : start + 500]
                    cond = sa.tuple_(*cols).in_(chunk) if len(cols) > 1 else cols[0].in_([c[0] for c in chunk])
                    for row in conn.execute(sa.select(*cols, table.c.region).where(cond)):
                        if row.region is not None:
                            ra, dec = vertices_from_bytes(row.region)
                            cache[tuple(row[: len(cols)])] = np.stack([ra, dec], axis=1)
        return {k: cache[k] for k in keys if k in cache}

    def region_batch(self, element: str, keys: Sequence[tuple]) -> tuple[RegionBatch, Any]:
        """A :class:`~butler.regions.RegionBatch` holding the regions of ``keys``, and their slots in it.

        The batch holds every region of the element read so far and is kept for the life of the
        registry (regions are immutable); it is rebuilt only when a key is new to it.  Building it
        cost a sixth of a spatial join of ~3k regions (measured).

        Raises
        ------
        KeyError
            A key has no region.
        """
        import numpy as np

        from ..regions import RegionBatch

        cached = self._region_batches.get(element)
        if cached is None or any(k not in cached[0] for k in keys):
            self.region_vertices(element, keys)
            vertices = self._region_cache[element]
            cached = ({k: i for i, k in enumerate(vertices)}, RegionBatch(list(vertices.values())))
            self._region_batches[element] = cached
        slots, batch = cached
        return batch, np.fromiter((slots[k] for k in keys), dtype=np.int64, count=len(keys))

    def _dimension_record(self, name: str, key: tuple) -> dict[str, Any] | None:
        """One dimension record by its key values; records never change, so hits are cached."""
        cache = self._records.setdefault(name, {})
        record = cache.get(key)
        if record is not None:
            return record
        table = self.tables.dimensions[name]
        keys = self.universe.required_closure([name])
        statement = self._record_statements.get(name)
        if statement is None:
            statement = sa.select(table).where(*(table.c[k] == sa.bindparam(f"k_{k}") for k in keys))
            self._record_statements[name] = statement
        params = {f"k_{k}": v for k, v in zip(keys, key, strict=True)}
        rows = select_rows(self.engine, statement, params)
        if not rows:
            return None
        record = cache[key] = dict(zip(table.c.keys(), rows[0]))
        return record

    def _expansion(self, dims: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple]:
        """Required, implied and all dimensions of ``dims`` in order, and the record lookups.

        Each lookup is ``(dimension, its key dimensions, the dimensions it implies)``: required
        dimensions first, then implied ones in dependency order (physical_filter before band).
        Worked out once per set of dimensions; per data ID it was a tenth of a put (measured).
        """
        plan = self._expansions.get(dims)
        if plan is None:
            u = self.universe
            required, implied = u.required_closure(dims), u.implied_closure(dims)
            lookups = tuple((name, u.required_closure([name]), u[name].implies) for name in (*required, *implied))
            plan = self._expansions[dims] = (required, implied, u.sorted({*required, *implied}), lookups)
        return plan

    def expand_data_id(self, dimensions: Iterable[str], data_id: Mapping[str, Any], *, where: str = "data ID") -> DataId:
        """Validate a data ID and fill in implied dimensions from the records.

        Raises
        ------
        DataIdError
            Missing, unexpected or wrongly typed keys, or a given implied value that contradicts
            the records.
        DimensionRecordNotFoundError
            A key value has no record (e.g. an unknown visit).
        """
        dims = tuple(dimensions)
        normalized = self.universe.normalize(dims, data_id, where=where)
        cache_key = (dims, tuple(normalized.items()))
        cached = self._expanded.get(cache_key)
        if cached is not None:
            return dict(cached)
        required, implied, order, lookups = self._expansion(dims)
        expanded = {k: normalized[k] for k in required}
        for name, keys, implies in lookups:
            if name not in expanded:
                continue
            row = self._dimension_record(name, tuple([expanded[k] for k in keys]))
            if row is None:
                raise DimensionRecordNotFoundError(
                    f"{where}: no {name} record for {{{', '.join(f'{k}: {expanded[k]!r}' for k in keys)}}}; "
                    f"insert it first (butler register-instrument / insert_dimension_records)"
                )
            for imp in implies:
                expanded.setdefault(imp, row[imp])
        for key in implied:
            if key in normalized and key in expanded and normalized[key] != expanded[key]:
                raise DataIdError(
                    f"{where}: data ID says {key}={normalized[key]!r} but the records say {expanded[key]!r}"
                )
        ordered = {k: expanded[k] for k in order if k in expanded}
        self._expanded[cache_key] = ordered
        return dict(ordered)

    # ------------------------------------------------------------------ datasets
    def insert_datasets(self, refs: Sequence[DatasetRef], *, conn: Connection | None = None) -> None:
        """Record stored datasets (their files are complete) in one transaction.

        Raises
        ------
        DatasetExistsError
            A dataset of the same type and data ID is already in the run; nothing is inserted.
        CollectionTypeError
            The run is not a RUN collection.
        """
        if not refs:
            return
        dims = self._dataset_dimensions
        columns = ["id", "dataset_type_id", "run_id", "data_id_key", *dims, "path", "created"]
        rows = []
        now = time.time()
        for ref in refs:
            type_id, dt = self._dataset_type_row(ref.dataset_type.name)
            run = self.get_collection(ref.run)
            if run.type != "RUN":
                raise CollectionTypeError(f"datasets go into RUN collections; {ref.run!r} is {run.type}")
            data_id = ref.data_id
            key = data_id_key(data_id, dt.dimensions)
            rows.append((ref.id, type_id, run.id, key, *[data_id.get(k) for k in dims], ref.path, now))
        try:
            if conn is not None:
                insert_many(conn, self.tables.dataset, columns, rows)
            else:
                insert_committed(self.engine, self.tables.dataset, columns, rows)
        except sa.exc.IntegrityError as exc:
            raise self._explain_conflict(refs) from exc

    def _explain_conflict(self, refs: Sequence[DatasetRef]) -> DatasetExistsError:
        for ref in refs:
            found = self.find_dataset(ref.dataset_type.name, ref.data_id, [ref.run])
            if found is not None:
                return DatasetExistsError(
                    f"{ref.dataset_type.name} {ref.required_data_id} already exists in run {ref.run!r}; "
                    "write to a new run, or remove the run first (butler remove-runs)"
                )
        return DatasetExistsError(f"a dataset in {refs[0].run!r} conflicts with an existing one (same id?)")

    def remove_datasets(self, refs: Sequence[DatasetRef]) -> None:
        """Delete dataset rows (the caller removes the files)."""
        t = self.tables
        ids = [r.id for r in refs]
        with write_transaction(self.engine) as conn:
            conn.execute(t.dataset_tag.delete().where(t.dataset_tag.c.dataset_id.in_(ids)))
            conn.execute(t.dataset.delete().where(t.dataset.c.id.in_(ids)))

    def associate(self, tag: str, refs: Sequence[DatasetRef]) -> None:
        """Add datasets to a TAGGED collection (one per dataset type and data ID)."""
        info = self.get_collection(tag)
        if info.type != "TAGGED":
            raise CollectionTypeError(f"collection {tag!r} is {info.type}, not TAGGED")
        rows = []
        for ref in refs:
            type_id, dt = self._dataset_type_row(ref.dataset_type.name)
            rows.append(
                {
                    "collection_id": info.id,
                    "dataset_id": ref.id,
                    "dataset_type_id": type_id,
                    "data_id_key": data_id_key(ref.data_id, dt.dimensions),
                }
            )
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(self.tables.dataset_tag.insert(), rows)
        except sa.exc.IntegrityError as exc:
            raise DatasetExistsError(f"tagged collection {tag!r} already holds one of these datasets") from exc

    def query_datasets(
        self,
        dataset_type: str | DatasetType,
        collections: str | Sequence[str],
        *,
        where: str | None = None,
        bind: Mapping[str, Any] | None = None,
        data_id: Mapping[str, Any] | None = None,
        find_first: bool = True,
        limit: int | None = None,
    ) -> list[DatasetRef]:
        """Datasets of one type in the collections, filtered by data ID and a where expression.

        With ``find_first`` (the default) only the first match along the collection search path is
        returned for each data ID, as a get would find it.  Results are ordered by collection
        search order, then by data ID.
        """
        name = dataset_type if isinstance(dataset_type, str) else dataset_type.name
        type_id, dt = self._dataset_type_row(name)
        colls = self.flatten_collections(collections)
        rank = {c.id: i for i, c in enumerate(colls)}
        run_ids = [c.id for c in colls if c.type == "RUN"]
        tag_ids = [c.id for c in colls if c.type == "TAGGED"]
        one_run_key = None
        if len(colls) == 1 and run_ids:
            one_run_key = _statement_key(type_id, run_ids[0], where, bind, data_id, limit)
            cached = self._one_run_statements.get(one_run_key) if one_run_key is not None else None
            if cached is not None:
                return self._one_run_refs(dt, cached, run_ids[0])
        d = self.tables.dataset
        dims = self.universe.full_closure(dt.dimensions)
        conditions = [d.c.dataset_type_id == type_id]
        # Data ID values every row shares: the one-run path does not fetch them per row.
        constants: dict[str, Any] = {}
        for key, value in (data_id or {}).items():
            if key not in dims:
                raise DataIdError(f"{name} has no dimension {key!r}; its dimensions: {list(dims)}")
            constants[key] = self.universe.coerce_value(key, value)
            conditions.append(d.c[key] == constants[key])
        joins: dict[str, sa.Table] = {}
        if where:
            clause = self._where.compile_for_datasets(where, bind, dt, d, joins)
            conditions.append(clause)
            for key, value in self._equalities(clause, d, dims):
                constants.setdefault(key, value)
        # Columns: id, path, the data ID in canonical order, run id (and collection id for tags).
        columns = [d.c.id, d.c.path, *(d.c[k] for k in dims)]
        width = 2 + len(dims)

        def select(*extra: Any, leading: Sequence[Any] = columns) -> Any:
            query = sa.select(*leading, *extra).select_from(d)
            for dim_name, table in joins.items():
                keys = self.universe.required_closure([dim_name])
                query = query.join(table, sa.and_(*(table.c[k] == d.c[k] for k in keys)))
            return query.where(*conditions)

        if len(colls) == 1 and run_ids:
            in_run = d.c.run_id == run_ids[0]
            varying = tuple(k for k in dims if k not in constants)
            statement = select(leading=[*(d.c[k] for k in varying), d.c.id, d.c.path]).where(in_run)
            statement = statement.order_by(*(d.c[k] for k in dt.dimensions))
            plan = _OneRunPlan(statement if limit is None else statement.limit(limit), constants)
            if limit is None and self._has_json_aggregates():
                implied = tuple(k for k in varying if k not in dt.dimensions)
                required = tuple(k for k in varying if k in dt.dimensions)
                first: list[Any] = []
                if implied:
                    # The implied values of one dataset (any), and how many datasets differ from them.
                    one = [
                        select(leading=[d.c[k]]).where(in_run).limit(1).correlate(None).scalar_subquery()
                        for k in implied
                    ]
                    differ = sa.or_(*(d.c[k].is_not(value) for k, value in zip(implied, one, strict=True)))
                    first.append(json_count_and_values(differ, one))
                arrays = json_columns([*(d.c[k] for k in required), d.c.id, d.c.path], first=first)
                aggregate = select(leading=[arrays]).where(in_run)
                if positional_on_sqlite(self.engine, aggregate):
                    plan.columns, plan.implied = aggregate, implied
                    plan.sort_order = tuple(required.index(k) for k in dt.dimensions if k in required)
            if one_run_key is not None:
                if len(self._one_run_statements) >= _STATEMENT_CACHE_SIZE:
                    self._one_run_statements.clear()
                self._one_run_statements[one_run_key] = plan
            return self._one_run_refs(dt, plan, run_ids[0])
        # (collection rank, run id, row); a single RUN collection needs neither rank nor find-first.
        rows: list[tuple[int, int, tuple]] = []
        single_run = False
        with read_connection(self.engine) as conn:
            if run_ids:
                query = select(d.c.run_id).where(d.c.run_id.in_(run_ids))
                if limit is not None and not find_first and not tag_ids:
                    query = query.limit(limit)
                fetched = fetch_rows(conn, query)
                if single_run:
                    rows = [(0, run_ids[0], r) for r in fetched]
                else:
                    rows += [(rank[r[width]], r[width], r) for r in fetched]
            if tag_ids:
                tag = self.tables.dataset_tag
                query = select(d.c.run_id, tag.c.collection_id).join_from(d, tag, tag.c.dataset_id == d.c.id)
                query = query.where(tag.c.collection_id.in_(tag_ids))
                rows += [(rank[r[width + 1]], r[width], r) for r in fetch_rows(conn, query)]
        # Positions of the required dimensions in a row: they identify the data ID.
        key_positions = [2 + dims.index(k) for k in dt.dimensions]

        def data_id_of(row: tuple) -> tuple:
            return tuple(row[i] for i in key_positions)

        if find_first and not single_run:
            best: dict[tuple, tuple[int, int, tuple]] = {}
            for item in rows:
                key = data_id_of(item[2])
                current = best.get(key)
                if current is None or item[0] < current[0]:
                    best[key] = item
            rows = list(best.values())
        if single_run:
            rows.sort(key=lambda item: data_id_of(item[2]))
        else:
            rows.sort(key=lambda item: (item[0], data_id_of(item[2])))
        if limit is not None:
            rows = rows[:limit]
        run_names = {run_id: self._run_name(run_id) for run_id in {item[1] for item in rows}}
        make_ref = DatasetRef.from_registry
        refs = []
        for _, run_id, row in rows:
            values = row[2:width]
            if None in values:  # an implied dimension without a value: leave it out
                data_id = {k: v for k, v in zip(dims, values, strict=True) if v is not None}
            else:
                data_id = dict(zip(dims, values, strict=True))
            refs.append(make_ref(dt, data_id, run_names[run_id], row[0], row[1]))
        return refs

    def _has_json_aggregates(self) -> bool:
        """Whether the engine is SQLite with its JSON functions (probed on first use)."""
        if self._json_aggregates is None:
            self._json_aggregates = has_json_aggregates(self.engine)
        return self._json_aggregates

    def _one_run_refs(self, dt: DatasetType, plan: _OneRunPlan, run_id: int) -> list[DatasetRef]:
        """:meth:`query_datasets` in one RUN collection: sorted and limited by SQL, refs built in one pass.

        The rows hold the data ID values that vary (not ``plan.constants``: the values fixed by
        the data ID or by a ``key = value`` term of the where clause), then id and path; with
        the sort in SQL this is ~3x faster than the general path for thousands of refs
        (measured).  The plan is kept for the next identical query: building and running its
        statement through SQLAlchemy was ~60% of a query returning 100 refs (measured).

        On SQLite the datasets first come as ``plan.columns``, one JSON array of columns (see
        :meth:`_refs_from_columns`), and the rows statement runs only when those do not suit.
        """
        dims = self.universe.full_closure(dt.dimensions)
        run = self._run_name(run_id)
        if plan.columns is not None:
            refs = self._refs_from_columns(dt, dims, plan, run)
            if refs is not None:
                return refs
            plan.columns = None  # the same statement would not suit next time either
        rows = select_rows(self.engine, plan.rows, {})
        width = 2 + sum(1 for k in dims if k not in plan.constants)
        columns = list(zip(*rows)) if rows else [()] * width
        return DatasetRef.many_from_columns(dt, dims, plan.constants, columns, run)

    def _refs_from_columns(
        self, dt: DatasetType, dims: tuple[str, ...], plan: _OneRunPlan, run: str
    ) -> list[DatasetRef] | None:
        """Refs from ``plan.columns``, or None when its result does not give them exactly.

        One statement returns every dataset in one JSON array of columns: the driver makes one
        value, not a row per dataset (its per-row work was most of the fetch).  The same scan
        counts the datasets whose implied dimensions (band, physical_filter) differ from one
        dataset's; none, and those values go into every data ID without a column each.  For
        the 1,900 refs of ``visit > 100 AND detector = 5`` at 40k datasets, SQL and decoding
        took ~1.0 ms where fetching rows took ~1.4 ms (``DISTINCT`` of the implied values,
        then the rows without them, in one snapshot); counting the differing datasets cost
        ~0.2 ms in SQLite where ``json_group_array(DISTINCT ...)`` of the implied values cost
        ~0.3 ms (measured).

        The aggregate has no ORDER BY: SQLite aggregates the datasets in the order its index
        walks, usually data ID order (checked, not assumed); otherwise they are sorted here.
        For all 40k datasets of the benchmark (walked detector by detector) the query took
        ~0.11 s so, ~0.14 s with the rows statement sorted by SQLite (measured).

        Not exact, hence None (the rows statement then runs): implied values that differ; a
        REAL or BLOB value (see :func:`select_json_columns`); data ID values Python does not
        sort as SQL does (see :func:`_in_data_id_order`).
        """
        columns = select_json_columns(self.engine, plan.columns)
        if columns is None:
            return None
        constants = plan.constants
        if plan.implied:
            differ, *first = columns.pop(0)
            if differ:
                return None
            values = dict(zip(plan.implied, first, strict=True))
            # A value that is None is not in the data IDs: the dimension is left out of them.
            dims = tuple(k for k in dims if values.get(k, "") is not None)
            constants = {**constants, **values}
        columns = _in_data_id_order(columns, plan.sort_order)
        if columns is None:
            return None
        return DatasetRef.many_from_columns(dt, dims, constants, columns, run)

    def _equalities(self, clause: Any, table: sa.Table, dims: tuple[str, ...]) -> list[tuple[str, Any]]:
        """``(dimension, value)`` of the ``column = value`` terms ANDed at the top of a where clause.

        Only values of the dimension's own key type (``int``, ``str``): SQLite would match
        ``detector = 5.0`` or ``detector = '5'`` too, and the rows then hold ``5``, not the value.
        """
        from sqlalchemy.sql import operators
        from sqlalchemy.sql.elements import BindParameter, BooleanClauseList

        if isinstance(clause, BooleanClauseList):
            if clause.operator is not operators.and_:
                return []
            return [pair for term in clause.clauses for pair in self._equalities(term, table, dims)]
        if getattr(clause, "operator", None) is not operators.eq:
            return []
        left, right = clause.left, clause.right
        if isinstance(left, BindParameter):
            left, right = right, left
        if not isinstance(right, BindParameter) or getattr(left, "table", None) is not table or left.name not in dims:
            return []
        value = right.value
        if type(value) is not self.universe[left.name].python_type:
            return []
        return [(left.name, value)]

    def find_dataset(
        self, dataset_type: str | DatasetType, data_id: Mapping[str, Any], collections: str | Sequence[str]
    ) -> DatasetRef | None:
        """The first dataset along the collection search path with this type and data ID, or None."""
        name = dataset_type if isinstance(dataset_type, str) else dataset_type.name
        type_id, dt = self._dataset_type_row(name)
        normalized = self.universe.normalize(dt.dimensions, data_id, where=name)
        key = data_id_key(normalized, dt.dimensions)
        colls = self.flatten_collections(collections)
        rank = {c.id: i for i, c in enumerate(colls)}
        d, tag = self.tables.dataset, self.tables.dataset_tag
        run_ids = [c.id for c in colls if c.type == "RUN"]
        tag_ids = [c.id for c in colls if c.type == "TAGGED"]
        candidates: list[tuple[int, Any]] = []
        if run_ids:
            # One indexed lookup (the dataset_unique_in_run constraint); the search order is
            # applied in Python.
            params = {"type_id": type_id, "key": key, **{f"run_{i}": r for i, r in enumerate(run_ids)}}
            rows = select_rows(self.engine, self._find_statement(len(run_ids)), params)
            run_id = d.c.keys().index("run_id")
            candidates += [(rank[r[run_id]], r) for r in rows]
        if tag_ids:
            with read_connection(self.engine) as conn:
                rows = conn.execute(
                    sa.select(d, tag.c.collection_id)
                    .select_from(d.join(tag, tag.c.dataset_id == d.c.id))
                    .where(tag.c.dataset_type_id == type_id, tag.c.data_id_key == key, tag.c.collection_id.in_(tag_ids))
                ).all()
            candidates += [(rank[r.collection_id], tuple(r)) for r in rows]
        if not candidates:
            return None
        _, row = min(candidates, key=lambda item: item[0])
        ref = self._row_to_ref(row, dt)
        for implied_key in set(normalized) - set(dt.dimensions):
            if ref.data_id.get(implied_key) != normalized[implied_key]:
                raise DataIdError(
                    f"{name} {ref.required_data_id} has {implied_key}={ref.data_id.get(implied_key)!r}, "
                    f"not {normalized[implied_key]!r}"
                )
        return ref

    def _run_name(self, run_id: int) -> str:
        for info in self._collections.values():
            if info.id == run_id:
                return info.name
        table = self.tables.collection
        with read_connection(self.engine) as conn:
            name = conn.execute(sa.select(table.c.name).where(table.c.id == run_id)).scalar_one()
        self.get_collection(name)
        return name

    def _find_statement(self, n_runs: int) -> Any:
        """The dataset lookup of :meth:`find_dataset` in ``n_runs`` RUN collections, built once."""
        statement = self._find_statements.get(n_runs)
        if statement is None:
            d = self.tables.dataset
            statement = sa.select(d).where(
                d.c.dataset_type_id == sa.bindparam("type_id"),
                d.c.data_id_key == sa.bindparam("key"),
                d.c.run_id.in_([sa.bindparam(f"run_{i}") for i in range(n_runs)]),
            )
            self._find_statements[n_runs] = statement
        return statement

    def _row_to_ref(self, row: tuple, dt: DatasetType) -> DatasetRef:
        """A ref from a row of the dataset table's columns (in table order; more may follow)."""
        mapping = dict(zip(self.tables.dataset.c.keys(), row))
        did = {k: mapping[k] for k in self.universe.full_closure(dt.dimensions) if mapping[k] is not None}
        return DatasetRef(dt, did, self._run_name(mapping["run_id"]), mapping["id"], mapping["path"])

    # ------------------------------------------------------------------ data ID queries
    def query_data_ids(
        self,
        dimensions: Iterable[str],
        *,
        where: str | None = None,
        bind: Mapping[str, Any] | None = None,
        data_id: Mapping[str, Any] | None = None,
        datasets: str | Sequence[str] | None = None,
        collections: str | Sequence[str] | None = None,
    ) -> list[DataId]:
        """Data IDs of the given dimensions that exist in the registry and satisfy the constraints.

        Observation dimensions (visit, detector) and skymap dimensions (tract, patch) in one query
        are joined spatially: an HTM index prefilter, then an exact polygon overlap test.

        Parameters
        ----------
        dimensions : iterable of str
            Dimensions of the returned data IDs (their required dimensions are added).
        where, bind : optional
            A where expression over any dimension keys and record fields.
        data_id : mapping, optional
            Fixed key values.
        datasets, collections : optional
            Only data IDs for which these dataset types exist in these collections.
        """
        from .data_id_query import DataIdQuery

        return DataIdQuery(self).run(dimensions, where, bind, data_id, datasets, collections)
