"""Map where-expression identifiers onto registry columns.

``visit``, ``band`` ... are the dimension key columns; ``visit.seeing`` (or ``visit.id``) is a field
of a dimension record and adds a join with that dimension's table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..queries import compile_where, unknown_identifier_error
from ..refs import DatasetType

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["WhereCompiler"]


class WhereCompiler:
    """Compiles where expressions for one registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _known_names(self, dims: tuple[str, ...]) -> list[str]:
        u = self.registry.universe
        names = list(dims)
        for dim in dims:
            names.append(f"{dim}.{u[dim].key_name}")
            names.extend(f"{dim}.{f.name}" for f in u[dim].fields)
        return names

    def resolver(
        self, dims: tuple[str, ...], key_column: Callable[[str], Any], joins: dict[str, sa.Table]
    ) -> Callable[[str, int], Any]:
        """A resolver for dimensions ``dims`` whose key columns come from ``key_column``.

        Record fields add the dimension's table to ``joins``.
        """
        u = self.registry.universe
        tables = self.registry.tables.dimensions

        def resolve(name: str, column: int) -> Any:
            dim, _, field = name.partition(".")
            if dim not in dims:
                raise unknown_identifier_error(name, column, self._known_names(dims))
            if not field or field == u[dim].key_name:
                return key_column(dim)
            if field not in {f.name for f in u[dim].fields}:
                raise unknown_identifier_error(name, column, self._known_names(dims))
            table = joins.setdefault(dim, tables[dim])
            return table.c[field]

        return resolve

    def compile_for_datasets(
        self,
        where: str,
        bind: Mapping[str, Any] | None,
        dataset_type: DatasetType,
        dataset_table: sa.Table,
        joins: dict[str, sa.Table],
    ) -> Any:
        """Clause over the dataset table (its dimension columns), adding record joins to ``joins``."""
        dims = self.registry.universe.full_closure(dataset_type.dimensions)
        return compile_where(where, self.resolver(dims, lambda d: dataset_table.c[d], joins), bind)

    def compile_for_table(
        self, where: str, bind: Mapping[str, Any] | None, element: str, table: sa.Table
    ) -> Any:
        """Clause over one dimension (or spatial element) table: its keys and its own fields."""
        u = self.registry.universe
        own_fields = [c.name for c in table.c if c.name != "region"]

        def resolve(name: str, column: int) -> Any:
            head, _, field = name.partition(".")
            if field and head != element:
                raise unknown_identifier_error(name, column, own_fields)
            key = field or head
            if element in u.dimensions and key == u[element].key_name:
                key = element
            if key not in table.c or key == "region":
                raise unknown_identifier_error(name, column, own_fields)
            return table.c[key]

        return compile_where(where, resolve, bind)
