"""The registry's driver-level paths on SQLite behave like the SQLAlchemy ones they replace."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa

from butler.dimensions import DimensionUniverse, default_universe
from butler.errors import DimensionNameError
from butler.registry.database import insert_committed, select_rows
from butler.registry.registry import Registry


@pytest.fixture
def registry(tmp_path):
    reg = Registry.create(str(tmp_path / "reg.sqlite3"), default_universe())
    yield reg
    reg.close()


def _collections(db) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT name, type FROM collection ORDER BY name").fetchall()
    finally:
        con.close()


def test_insert_committed_commits_and_a_conflict_inserts_nothing(registry, tmp_path):
    table = registry.tables.collection
    insert_committed(registry.engine, table, ["name", "type"], [("a", 1), ("b", 2)])
    assert _collections(tmp_path / "reg.sqlite3") == [("a", 1), ("b", 2)]
    with pytest.raises(sa.exc.IntegrityError):
        insert_committed(registry.engine, table, ["type", "name"], [(1, "c"), (1, "a")])
    assert _collections(tmp_path / "reg.sqlite3") == [("a", 1), ("b", 2)]
    assert registry.engine.pool.checkedout() == 0


def test_insert_committed_rolls_back_when_interrupted(registry, tmp_path):
    def rows():
        yield ("x", 1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        insert_committed(registry.engine, registry.tables.collection, ["name", "type"], rows())
    assert _collections(tmp_path / "reg.sqlite3") == []
    insert_committed(registry.engine, registry.tables.collection, ["name", "type"], [("y", 1)])
    assert _collections(tmp_path / "reg.sqlite3") == [("y", 1)]


def test_select_rows_returns_what_sqlalchemy_returns(registry):
    table = registry.tables.collection
    insert_committed(registry.engine, table, ["name", "type"], [(n, 1 + i % 2) for i, n in enumerate("abcd")])
    statement = (
        sa.select(table.c.name, table.c.type)
        .where(table.c.type == sa.bindparam("type"), table.c.name != "c")
        .order_by(table.c.name)
    )
    with registry.engine.connect() as conn:
        expected = [tuple(r) for r in conn.execute(statement, {"type": 1})]
    assert select_rows(registry.engine, statement, {"type": 1}) == expected == [("a", 1)]
    assert select_rows(registry.engine, statement, {"type": 2}) == [("b", 2), ("d", 2)]
    expanding = sa.select(table.c.name).where(table.c.name.in_(sa.bindparam("names", expanding=True)))
    assert sorted(select_rows(registry.engine, expanding, {"names": ["a", "d"]})) == [("a",), ("d",)]
    assert registry.engine.pool.checkedout() == 0


def test_registry_connections_checkpoint_the_wal_less_often(registry):
    with registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 4000
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_memoized_closures_equal_fresh_ones_and_unknown_names_still_raise():
    universe = default_universe()
    fresh = DimensionUniverse.from_config(universe.to_config())
    for names in (["visit"], ["detector", "visit"], ["patch"], ["physical_filter"], []):
        for _ in range(2):
            assert universe.required_closure(iter(names)) == fresh._required(frozenset(names))
            assert universe.implied_closure(tuple(names)) == fresh._implied(frozenset(names))
            assert universe.full_closure(set(names)) == fresh._full(frozenset(names))
    assert universe.required_closure(["visit", "detector"]) == ("instrument", "visit", "detector")
    for _ in range(2):
        with pytest.raises(DimensionNameError, match="exposure_nope"):
            universe.required_closure(["visit", "exposure_nope"])
