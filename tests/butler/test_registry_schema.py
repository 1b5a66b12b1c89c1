"""The registry's table definitions: built once per universe, created from DDL compiled once."""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

from butler.butler import Butler
from butler.dimensions import DimensionUniverse, default_universe
from butler.registry.registry import Registry
from butler.registry.schema import build_tables, tables_for


def _universe_with_extra_visit_field() -> DimensionUniverse:
    config = default_universe().to_config()
    config["dimensions"]["visit"]["fields"]["airmass_bench"] = {"type": "float", "doc": "extra"}
    return DimensionUniverse.from_config(config)


def _schema(db) -> list[tuple]:
    """Every table and index of a database (create_all's index order follows a set: not compared)."""
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    finally:
        con.close()


def test_default_universe_is_read_once_and_equal_universes_share_tables():
    universe = default_universe()
    assert default_universe() is universe
    again = DimensionUniverse.from_config(universe.to_config())
    assert again is not universe and again.digest == universe.digest
    assert tables_for(again) is tables_for(universe)


def test_different_universes_do_not_share_tables():
    universe, other = default_universe(), _universe_with_extra_visit_field()
    assert other.digest != universe.digest
    ours, theirs = tables_for(universe), tables_for(other)
    assert ours is not theirs and ours.metadata is not theirs.metadata
    assert "airmass_bench" in theirs.dimensions["visit"].c
    assert "airmass_bench" not in ours.dimensions["visit"].c


def test_a_created_repository_matches_create_all_exactly(tmp_path):
    Butler.create(tmp_path / "repo")
    reference = tmp_path / "reference.sqlite3"
    engine = sa.create_engine(f"sqlite:///{reference}")
    build_tables(default_universe()).metadata.create_all(engine)
    engine.dispose()
    created = _schema(tmp_path / "repo" / "registry.sqlite3")
    assert created == _schema(reference)
    tables = tables_for(default_universe())
    names = {(kind, name) for kind, name, _, _ in created}
    assert {("table", t) for t in tables.metadata.tables} <= names
    assert {("index", i.name) for t in tables.metadata.tables.values() for i in t.indexes} <= names


def test_a_universe_of_its_own_gets_its_own_tables_in_the_database(tmp_path):
    other = _universe_with_extra_visit_field()
    db = str(tmp_path / "own.sqlite3")
    Registry.create(db, other).close()
    registry = Registry.open(db)
    try:
        assert registry.universe.digest == other.digest
        assert registry.tables is tables_for(other)
    finally:
        registry.close()
    visit_sql = next(sql for kind, name, _, sql in _schema(db) if kind == "table" and name == "visit")
    assert "airmass_bench" in visit_sql


def test_ddl_is_compiled_once_per_dialect():
    from sqlalchemy.dialects import postgresql, sqlite

    tables = tables_for(default_universe())
    lite = tables.create_statements(sqlite.dialect())
    assert tables.create_statements(sqlite.dialect()) is lite
    pg = tables.create_statements(postgresql.dialect())
    assert pg != lite and len(pg) == len(lite)
    assert all(s.startswith(("CREATE TABLE", "CREATE INDEX", "CREATE UNIQUE INDEX")) for s in lite)
