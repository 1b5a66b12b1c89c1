"""``query_data_ids``: data IDs from dimension tables, datasets and spatial joins.

The query joins, on shared key columns, the tables that enumerate valid values of the requested
dimensions: the dimension tables, the ``visit_detector_region`` element when visit and detector
are both present (so only observed combinations come back), and dataset tables when existence of
datasets is required.  When observation dimensions (visit/detector) meet skymap dimensions
(tract/patch), their HTM index tables are joined on the trixel id (a superset), and the
exact polygon overlap test of :mod:`butler.registry.spatial` removes the false matches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa

from ..dimensions import DataId
from ..errors import DataIdError
from ..queries import identifiers, parse_cached
from .database import fetch_rows, read_connection

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["DataIdQuery"]

_SKY_FAMILY = ("skymap", "tract", "patch")


def _opaque(column: Any) -> Any:
    """The column's value through a no-op expression, which SQLite cannot match to an index."""
    return column + "" if isinstance(column.type, sa.String) else column + 0


class DataIdQuery:
    """One data-ID query against a registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.universe = registry.universe
        self.tables = registry.tables

    def run(
        self,
        dimensions: Iterable[str],
        where: str | None,
        bind: Mapping[str, Any] | None,
        data_id: Mapping[str, Any] | None,
        datasets: str | Sequence[str] | None,
        collections: str | Sequence[str] | None,
    ) -> list[DataId]:
        u = self.universe
        requested = u.required_closure(dimensions)
        expression = parse_cached(where) if where else None
        referenced = {name.partition(".")[0] for name in identifiers(expression, bind)} if expression else set()
        data_id = dict(data_id or {})
        for key in data_id:
            u[key]
        dataset_names = [datasets] if isinstance(datasets, str) else list(datasets or [])
        dataset_types = [self.registry.get_dataset_type(n) for n in dataset_names]
        all_dims = set(requested) | referenced | set(data_id)
        for dt in dataset_types:
            all_dims |= set(dt.dimensions)
        for name in referenced:
            u[name]
        dims = u.full_closure(all_dims)
        obs = [d for d in dims if d not in _SKY_FAMILY]
        sky = [d for d in dims if d in _SKY_FAMILY]
        spatial_join = bool(set(obs) & {"visit", "detector"}) and bool(set(sky) & {"tract", "patch"})

        key_columns: dict[str, Any] = {}
        from_clause: Any = None

        def add(table: Any, keys: Iterable[str], implied: Iterable[str] = ()) -> None:
            # Join on every key (and implied key column) already present; register the new ones.
            nonlocal from_clause
            columns = [*keys, *implied]
            shared = [k for k in columns if k in key_columns]
            if from_clause is None:
                from_clause = table
            else:
                on = sa.and_(*(table.c[k] == key_columns[k] for k in shared)) if shared else sa.true()
                from_clause = from_clause.join(table, on)
            for k in columns:
                key_columns.setdefault(k, table.c[k])

        obs_element = sky_element = None
        if spatial_join:
            obs_element = "visit_detector_region" if "detector" in obs and "visit" in obs else "visit"
            if obs_element == "visit" and "visit" not in obs:
                raise DataIdError("a spatial join needs a visit (detector alone has no sky region)")
            sky_element = "patch" if "patch" in sky else "tract"
            obs_htm = self.tables.htm[obs_element].alias("obs_htm")
            sky_htm = self.tables.htm[sky_element].alias("sky_htm")
            if obs_element in u.elements:
                obs_keys = u.required_closure(u.elements[obs_element].requires)
            else:
                obs_keys = u.required_closure([obs_element])
            sky_keys = u.required_closure([sky_element])
            # Candidate pairs sharing an HTM trixel, made distinct in a subquery first: joined
            # directly with the dimension tables, SQLite picked a join order 50x slower.  The keys
            # leave the subquery as expressions so that constraints pushed into it (instrument =
            # ?) cannot make SQLite answer them with the key index and drop the pixel join to a
            # nested scan (measured: 20 s instead of 1 s for a 12k-pair join).
            candidates = (
                sa.select(
                    *(_opaque(obs_htm.c[k]).label(k) for k in obs_keys),
                    *(_opaque(sky_htm.c[k]).label(k) for k in sky_keys),
                )
                .select_from(obs_htm.join(sky_htm, sky_htm.c.pix == obs_htm.c.pix))
                .distinct()
                .subquery("candidates")
            )
            add(candidates, (*obs_keys, *sky_keys))
        elif "visit" in dims and "detector" in dims:
            vdr = self.tables.regions["visit_detector_region"]
            add(vdr, u.required_closure(["visit", "detector"]))
        # When the candidate pairs alone hold every key asked for and constrained, the dimension
        # tables add nothing (the index rows exist only for existing records): skip them, which
        # also spares SQLite's planner a many-table join.
        bare_names = expression is None or all("." not in n for n in identifiers(expression, bind))
        self_contained = (
            spatial_join
            and not dataset_types
            and bare_names
            and {*requested, *referenced, *data_id} <= {*obs_keys, *sky_keys}
        )
        if self_contained:
            return self._pixel_join_in_memory(
                requested, expression, bind, data_id, obs_element, obs_keys, sky_element, sky_keys
            )
        for name in sorted(dims, key=lambda n: -len(u.required_closure([n]))):
            add(self.tables.dimensions[name], u.required_closure([name]), u[name].implies)

        conditions = [key_columns[k] == u.coerce_value(k, v) for k, v in data_id.items() if k in key_columns]
        implied_data_id = {k: v for k, v in data_id.items() if k not in key_columns}
        joins: dict[str, sa.Table] = {}
        for dt in dataset_types:
            type_id, _ = self.registry._dataset_type_row(dt.name)
            colls = self.registry.flatten_collections(collections or [])
            run_ids = [c.id for c in colls if c.type == "RUN"]
            tag_ids = [c.id for c in colls if c.type == "TAGGED"]
            d = self.tables.dataset.alias(f"ds_{dt.name}")
            in_collections = d.c.run_id.in_(run_ids)
            if tag_ids:
                tag = self.tables.dataset_tag
                tagged = sa.select(tag.c.dataset_id).where(tag.c.collection_id.in_(tag_ids))
                in_collections = sa.or_(in_collections, d.c.id.in_(tagged))
            from_clause = from_clause.join(
                d,
                sa.and_(
                    d.c.dataset_type_id == type_id,
                    in_collections,
                    *(d.c[k] == key_columns[k] for k in dt.dimensions),
                ),
            )
        if expression is not None:
            resolver = self.registry._where.resolver(u.full_closure(dims), self._column_for(key_columns), joins)
            from ..queries import compile_where

            conditions.append(compile_where(expression, resolver, bind))
        # Record fields (visit.seeing) resolve to the dimension tables already in the FROM clause.
        out_keys = list(requested)
        names = list(out_keys)
        if spatial_join:
            names += [k for k in (*obs_keys, *sky_keys) if k not in out_keys]
        query = sa.select(*(key_columns[k].label(k) for k in names)).select_from(from_clause)
        query = query.where(*conditions).distinct()
        with read_connection(self.registry.engine) as conn:
            rows = [tuple(r) for r in conn.execute(query)]
        if spatial_join:
            position = {k: i for i, k in enumerate(names)}
            rows = self._exact_overlaps(
                rows,
                obs_element,
                [position[k] for k in obs_keys],
                sky_element,
                [position[k] for k in sky_keys],
            )
        width = len(out_keys)
        unique = sorted({row[:width] for row in rows})
        out = [dict(zip(out_keys, key, strict=True)) for key in unique]
        if implied_data_id:
            out = [d for d in out if all(d.get(k, v) == v for k, v in implied_data_id.items())]
        return out

    def _column_for(self, key_columns: dict[str, Any]) -> Any:
        def key_column(dim: str) -> Any:
            return key_columns[dim]

        return key_column

    def _pixel_join_in_memory(
        self,
        requested: tuple[str, ...],
        expression: Any,
        bind: Mapping[str, Any] | None,
        data_id: Mapping[str, Any],
        obs_element: str,
        obs_keys: tuple[str, ...],
        sky_element: str,
        sky_keys: tuple[str, ...],
    ) -> list[DataId]:
        """Spatial join of two index tables by pixel with numpy, then the exact test.

        Used when every requested and constrained key is a key of the two spatial elements:
        reading the two index tables (tens of thousands of small rows) and joining them with a
        sort is ~5x faster than SQLite's join of the same tables.
        """
        sides = []
        with read_connection(self.registry.engine) as conn:
            for element, keys in ((obs_element, obs_keys), (sky_element, sky_keys)):
                sides.append(self._index_rows(conn, element, keys, data_id))
        (obs_list, obs_ids, obs_pix, obs_sorted), (sky_list, sky_ids, sky_pix, sky_sorted) = sides
        if not len(obs_ids) or not len(sky_ids):
            return []
        order = np.argsort(sky_pix, kind="stable")
        sky_pix_sorted, sky_ids_sorted = sky_pix[order], sky_ids[order]
        lo = np.searchsorted(sky_pix_sorted, obs_pix, side="left")
        hi = np.searchsorted(sky_pix_sorted, obs_pix, side="right")
        counts = hi - lo
        first = np.repeat(obs_ids, counts)
        starts = np.repeat(lo - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        second = sky_ids_sorted[np.arange(counts.sum()) + starts]
        pairs = np.sort(first * len(sky_list) + second)
        pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]
        first, second = pairs // len(sky_list), pairs % len(sky_list)
        obs_batch, obs_slots = self.registry.region_batch(obs_element, obs_list)
        sky_batch, sky_slots = self.registry.region_batch(sky_element, sky_list)
        keep = obs_batch.overlaps(sky_batch, obs_slots[first], sky_slots[second])
        names = (*obs_keys, *sky_keys)
        rows = [obs_list[i] + sky_list[j] for i, j in zip(first[keep].tolist(), second[keep].tolist(), strict=True)]
        if expression is not None:
            from ..queries import evaluate

            rows = [r for r in rows if evaluate(expression, dict(zip(names, r, strict=True)), bind)]
        if tuple(requested) != names:  # project, and drop the duplicates projection makes
            positions = [names.index(k) for k in requested]
            rows = sorted({tuple(r[p] for p in positions) for r in rows})
        elif not (obs_sorted and sky_sorted):
            rows.sort()
        # Otherwise the pairs come sorted by (obs index, sky index), that is by key.
        return [dict(zip(requested, key)) for key in rows]  # every key has len(requested) values

    def _index_rows(
        self, conn: Any, element: str, keys: tuple[str, ...], data_id: Mapping[str, Any]
    ) -> tuple[list[tuple], np.ndarray, np.ndarray, bool]:
        """The HTM index of a spatial element: its distinct keys, and a key index and pixel per row.

        Returns ``(keys, ids, pixels, keys_sorted)``.  Keys fixed by ``data_id`` are filtered in
        SQL and not fetched; when the others are integers, they are numbered with numpy (sorted),
        which the benchmark shows pays over a dict of tuples for tens of thousands of rows.
        """
        u = self.universe
        table = self.tables.htm[element]
        fixed = {k: u.coerce_value(k, data_id[k]) for k in keys if k in data_id}
        free = [k for k in keys if k not in fixed]
        query = sa.select(*(table.c[k] for k in free), table.c.pix).where(*(table.c[k] == v for k, v in fixed.items()))
        fetched = fetch_rows(conn, query)
        if not fetched:
            return [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), True
        columns = list(zip(*fetched))
        pixels = np.fromiter(columns[-1], dtype=np.int64, count=len(fetched))
        if keys[len(fixed) :] == tuple(free):  # the usual case: the fixed keys lead (instrument, skymap)
            prefix = tuple(fixed[k] for k in keys[: len(fixed)])

            def full_key(values: tuple) -> tuple:
                return (*prefix, *values)

        else:

            def full_key(values: tuple) -> tuple:
                given = dict(zip(free, values, strict=True))
                return tuple(given[k] if k in given else fixed[k] for k in keys)

        if free and all(u[k].key_type == "int" for k in free):
            # Mixed-radix numbers of the key columns (offsets from their minima) sort like the
            # key tuples; numbered with one 1-D np.unique.
            values = [np.fromiter(c, dtype=np.int64, count=len(fetched)) for c in columns[:-1]]
            lows = [int(v.min()) for v in values]
            spans = [int(v.max()) - low + 1 for v, low in zip(values, lows, strict=True)]
            if math.prod(spans) < 2**62:
                combined = np.zeros(len(fetched), dtype=np.int64)
                for v, low, span in zip(values, lows, spans, strict=True):
                    combined = combined * span + (v - low)
                distinct, ids = np.unique(combined, return_inverse=True)
                digits = []
                for low, span in zip(reversed(lows), reversed(spans), strict=True):
                    distinct, digit = np.divmod(distinct, span)
                    digits.append((digit + low).tolist())
                return [full_key(v) for v in zip(*reversed(digits))], ids.reshape(-1), pixels, True
        index: dict[tuple, int] = {}
        ids = np.fromiter((index.setdefault(row[:-1], len(index)) for row in fetched), dtype=np.int64, count=len(fetched))
        return [full_key(v) for v in index], ids, pixels, False

    def _exact_overlaps(
        self,
        rows: list[tuple],
        obs_element: str,
        obs_positions: list[int],
        sky_element: str,
        sky_positions: list[int],
    ) -> list[tuple]:
        """Keep the candidate rows whose two regions really overlap (keys at the given positions)."""
        if not rows:
            return rows
        obs_of = [tuple(r[i] for i in obs_positions) for r in rows]
        sky_of = [tuple(r[i] for i in sky_positions) for r in rows]
        obs_keys = list(dict.fromkeys(obs_of))
        sky_keys = list(dict.fromkeys(sky_of))
        obs_batch, obs_slots = self.registry.region_batch(obs_element, obs_keys)
        sky_batch, sky_slots = self.registry.region_batch(sky_element, sky_keys)
        obs_index = dict(zip(obs_keys, obs_slots.tolist(), strict=True))
        sky_index = dict(zip(sky_keys, sky_slots.tolist(), strict=True))
        first = np.fromiter((obs_index[k] for k in obs_of), dtype=np.int64, count=len(rows))
        second = np.fromiter((sky_index[k] for k in sky_of), dtype=np.int64, count=len(rows))
        keep = obs_batch.overlaps(sky_batch, first, second)
        return [r for r, k in zip(rows, keep, strict=True) if k]
