"""The registry's driver-level paths on SQLite behave like the SQLAlchemy ones they replace."""

from __future__ import annotations

import sqlite3
from typing import Any

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


def test_refs_from_registry_rows_leave_out_missing_values():
    from butler.refs import DatasetRef, DatasetType

    dt = DatasetType("calexp", ("instrument", "visit", "detector"), "Exposure")
    dims = ("instrument", "band", "visit", "detector")
    rows = [("Cam", "r", 1, 2, "a" * 32, "p/a.zarr"), ("Cam", None, 1, 3, "b" * 32, None)]
    refs = DatasetRef.many_from_registry(dt, dims, rows, "run")
    assert refs[0] == DatasetRef(dt, {"instrument": "Cam", "band": "r", "visit": 1, "detector": 2}, "run", "a" * 32)
    assert refs[0].path == "p/a.zarr" and refs[1].path is None
    assert refs[1].data_id == {"instrument": "Cam", "visit": 1, "detector": 3}


def test_a_repeated_dataset_query_sees_new_datasets_and_checks_its_values(butler):
    from butler.errors import DataIdError

    from .conftest import INSTRUMENT

    butler.register_dataset_type("info", ["visit", "detector"], "StructuredDataDict")
    butler.put({"a": 1}, "info", instrument=INSTRUMENT, visit=100, detector=0)

    def visits(**kwargs) -> list[tuple[int, int]]:
        return [(r.data_id["visit"], r.data_id["detector"]) for r in butler.query_datasets("info", **kwargs)]

    assert visits(where="visit > :v", bind={"v": 99}) == [(100, 0)]
    butler.put({"a": 2}, "info", instrument=INSTRUMENT, visit=101, detector=1)
    assert visits(where="visit > :v", bind={"v": 99}) == [(100, 0), (101, 1)]
    assert visits(where="visit > :v", bind={"v": 100}) == [(101, 1)]
    for _ in range(2):
        assert visits(where="detector IN (:dets)", bind={"dets": [1, 3]}) == [(101, 1)]
        assert visits(visit=100) == [(100, 0)]
        assert visits(limit=1) == [(100, 0)]
    with pytest.raises(DataIdError):
        visits(visit=True)
    assert len(butler.registry._one_run_statements) == 4


def test_statements_run_before_an_insert_share_its_transaction(registry, tmp_path):
    table = registry.tables.collection
    with pytest.raises(sa.exc.OperationalError):
        insert_committed(registry.engine, table, ["name", "type"], [("a", 1)], before=["CREATE TABLE x (a)"] * 2)
    assert _collections(tmp_path / "reg.sqlite3") == []
    insert_committed(registry.engine, table, ["name", "type"], [("a", 1)], before=["CREATE TABLE x (a)"])
    assert _collections(tmp_path / "reg.sqlite3") == [("a", 1)]
    with registry.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM x").scalar() == 0


def test_importing_the_butler_class_leaves_sqlalchemy_for_the_first_repository(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from butler.butler import Butler; assert 'sqlalchemy' not in sys.modules; "
        f"Butler.create({str(tmp_path / 'repo')!r}); assert 'sqlalchemy' in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _fill_info(butler) -> None:
    """Dataset type ``info`` in ``run1`` (visit x detector; some stored without implied values)."""
    from butler.refs import DatasetRef

    from .conftest import INSTRUMENT, N_DETECTORS, N_VISITS

    butler.register_dataset_type("info", ["visit", "detector"], "StructuredDataDict")
    reg = butler.registry
    reg.register_collection("empty")
    dt = reg.get_dataset_type("info")
    refs = []
    for v in range(100, 100 + N_VISITS):
        for d in range(N_DETECTORS):
            data_id = reg.expand_data_id(dt.dimensions, {"instrument": INSTRUMENT, "visit": v, "detector": d})
            if (v + d) % 5 == 0:  # stored without its implied values
                data_id = {k: data_id[k] for k in dt.dimensions}
            refs.append(DatasetRef(dt, data_id, "run1", path=f"p/{v}_{d}" if d % 2 else None))
    reg.insert_datasets(refs[::-1])


def _assert_same_as_general_path(butler, **kwargs) -> list:
    """The one-run query (run1) and the general one (run1 + an empty run) return the same refs."""
    from butler.refs import DatasetRef

    fast = butler.query_datasets("info", **kwargs)
    general = butler.query_datasets("info", collections=["run1", "empty"], **kwargs)
    assert fast == general, kwargs
    assert [list(r.data_id.items()) for r in fast] == [list(r.data_id.items()) for r in general], kwargs
    assert [(r.run, r.path, r.dataset_type) for r in fast] == [(r.run, r.path, r.dataset_type) for r in general]
    assert all(type(r) is DatasetRef for r in fast)
    for ref, other in zip(fast, general, strict=True):
        assert [type(v) for v in ref.data_id.values()] == [type(v) for v in other.data_id.values()], kwargs
        assert type(ref.path) is type(other.path) and type(ref.id) is type(other.id)
    return fast


def test_one_run_queries_equal_the_general_path(butler, monkeypatch):
    """The one-run path (constant columns left out, JSON columns on SQLite) returns what the general path does."""
    from butler.registry.registry import Registry

    from .conftest import INSTRUMENT

    outcomes = []  # per query through the JSON columns: refs, or None (the rows statement ran instead)
    from_columns = Registry._refs_from_columns

    def recording(self, *args):
        refs = from_columns(self, *args)
        outcomes.append(refs)
        return refs

    monkeypatch.setattr(Registry, "_refs_from_columns", recording)
    _fill_info(butler)
    reg = butler.registry
    queries = [
        {},
        {"instrument": INSTRUMENT},
        {"where": "visit > 101 AND detector = 2", "instrument": INSTRUMENT},
        {"where": "2 = detector AND visit > 101"},
        {"where": "detector = 2.0"},
        {"where": "detector = '2'"},
        {"where": "detector = 2 OR visit = 103"},
        {"where": "NOT (detector = 2)"},
        {"where": "band = 'r' AND physical_filter = 'r_sim'"},
        {"where": "instrument = :i AND detector = :d", "bind": {"i": INSTRUMENT, "d": 1}},
        {"where": "visit.seeing > 0.75 AND detector = 3"},
        {"where": "visit = 103 AND detector = 1 AND instrument = 'SimCam'"},
        {"band": "g"},
        {"where": "visit = 105 AND detector = 0"},  # one row, stored without band: left out
        {"where": "visit = 105"},  # band 'r' and no band
        {"where": "visit >= 103 AND visit <= 103 AND detector > 0"},
        {"where": "visit > 102 AND physical_filter = 'r_sim'"},
        {"where": "detector IN (1, 2) AND visit > 101"},
        {"visit": 102, "detector": 0},
        {"where": "detector = 1", "limit": 3},
        {"limit": 5},
    ]
    for kwargs in queries:
        for _ in range(2):  # built, then from the statement cache
            fast = _assert_same_as_general_path(butler, **kwargs)
            assert fast, kwargs
            for ref in fast:  # 2, not 2.0 or '2'
                assert type(ref.data_id["visit"]) is int and type(ref.data_id["detector"]) is int
    assert butler.query_datasets("info", where="visit > 1000") == []
    assert any(refs for refs in outcomes) and None in outcomes  # both ways were taken
    assert [] in outcomes  # no datasets at all, from the columns
    constants = [plan.constants for plan in reg._one_run_statements.values()]
    assert {"instrument": INSTRUMENT, "detector": 2} in constants and {"detector": 2} in constants
    implied = [r for r in butler.query_datasets("info") if "band" in r.data_id]
    assert implied and all(r.data_id["physical_filter"] == r.data_id["band"] + "_sim" for r in implied)
    assert any("band" not in r.data_id for r in butler.query_datasets("info", where="detector = 0"))


def _plan_of(butler, where: str) -> Any:
    """The cached one-run plan of the query with this where expression."""
    plans = butler.registry._one_run_statements
    (key,) = [k for k in plans if k[2] == where]
    return plans[key]


def test_one_run_queries_keep_the_json_columns_only_while_they_suit(butler):
    """Implied values that differ: the rows statement runs, then and from then on."""
    from .conftest import INSTRUMENT

    _fill_info(butler)

    def plan_of(**kwargs):
        _assert_same_as_general_path(butler, **kwargs)
        return _plan_of(butler, kwargs["where"])

    # One detector, visits in order, one band (odd visits are r, and every row of detector 1 has it).
    where = "physical_filter = 'r_sim' AND detector = 1"
    assert plan_of(where=where, instrument=INSTRUMENT).columns is not None
    assert plan_of(where=where, instrument=INSTRUMENT).columns is not None
    assert {r.data_id["band"] for r in butler.query_datasets("info", where=where)} == {"r"}
    # Two filters: the implied values differ, so the rows statement runs (and will next time).
    assert plan_of(where="visit > 100 AND detector = 1").columns is None
    assert plan_of(where="visit > 100 AND detector = 1").columns is None


def test_one_run_queries_sort_the_json_columns_sqlite_did_not_walk_in_data_id_order(butler, monkeypatch):
    from butler.registry import registry as registry_module

    sorted_here = []
    in_order = registry_module._in_data_id_order

    def recording(columns, keys):
        result = in_order(columns, keys)
        sorted_here.append(result is not None and result is not columns)
        return result

    monkeypatch.setattr(registry_module, "_in_data_id_order", recording)
    _fill_info(butler)
    # SQLite walks its (dataset type, detector, visit, ...) index: detector by detector.
    where = "physical_filter = 'r_sim' AND detector > 0"
    refs = _assert_same_as_general_path(butler, where=where)
    assert [(r.data_id["visit"], r.data_id["detector"]) for r in refs][:4] == [(101, 1), (101, 2), (101, 3), (103, 1)]
    assert sorted_here == [True] and _plan_of(butler, where).columns is not None


def test_json_columns_are_sorted_as_sql_sorts_or_not_at_all():
    from butler.registry.registry import _in_data_id_order

    columns = [[2, 1, 1], ["b", "b", "a"], ["x", "y", "z"]]
    assert _in_data_id_order(columns, (0, 1)) == [(1, 1, 2), ("a", "b", "b"), ("z", "y", "x")]
    assert _in_data_id_order(columns, (1, 0)) == [(1, 1, 2), ("a", "b", "b"), ("z", "y", "x")]
    ordered = [[1, 2], ["\u00e9", "\U0001f600"]]  # code point order = UTF-8 byte order (SQLite's BINARY)
    assert _in_data_id_order(ordered, (1,)) is ordered
    assert _in_data_id_order([[2, "1"], ["x", "y"]], (0,)) is None  # SQLite puts integers before text
    assert _in_data_id_order([[None, 1], ["x", "y"]], (0,)) is None
    assert _in_data_id_order([[], [], []], (0, 1)) == [[], [], []]


def test_one_run_queries_return_what_the_driver_returns_for_any_stored_value(butler, tmp_path):
    """Values the JSON arrays cannot carry exactly (REAL, BLOB) and text of any kind."""
    from .conftest import INSTRUMENT

    _fill_info(butler)
    db = sqlite3.connect(tmp_path / "repo" / "registry.sqlite3")
    try:
        with db:
            db.execute("UPDATE dataset SET path = ? WHERE visit = 101 AND detector = 1", ('q/"\\,\n\u00e9\U0001f600',))
            db.execute("UPDATE dataset SET path = '' WHERE visit = 101 AND detector = 3")
        where = "visit = 101 AND detector > 0"
        fast = _assert_same_as_general_path(butler, where=where, instrument=INSTRUMENT)
        assert [r.path for r in fast] == ['q/"\\,\n\u00e9\U0001f600', None, ""]
        assert _plan_of(butler, where).columns is not None  # the text came through JSON
        with db:
            db.execute("UPDATE dataset SET path = ? WHERE visit = 103 AND detector = 1", (b"\x00p",))
        where = "visit = 103 AND detector = 1"
        assert _assert_same_as_general_path(butler, where=where)[0].path == b"\x00p"
        assert _plan_of(butler, where).columns is None
        where = "physical_filter = 'g_sim' AND detector = 2"  # visits 100, 102, 104, all with their band
        assert [r.data_id["visit"] for r in _assert_same_as_general_path(butler, where=where)] == [100, 102, 104]
        assert _plan_of(butler, where).columns is not None
        with db:
            db.execute("UPDATE dataset SET visit = 104.5 WHERE visit = 104 AND detector = 2")
        assert [r.data_id["visit"] for r in _assert_same_as_general_path(butler, where=where)] == [100, 102, 104.5]
        assert _plan_of(butler, where).columns is None
    finally:
        db.close()


def test_refs_are_frozen_and_pickle(butler):
    import copy
    import dataclasses
    import pickle

    _fill_info(butler)
    refs = butler.query_datasets("info", where="detector = 1")
    assert pickle.loads(pickle.dumps(refs)) == refs == copy.deepcopy(refs)
    assert [r.path for r in pickle.loads(pickle.dumps(refs))] == [r.path for r in refs]
    assert dataclasses.replace(refs[0], path="x").path == "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        refs[0].run = "other"


def test_select_json_columns_decodes_exactly_or_not_at_all(registry):
    from butler.registry.database import has_json_aggregates, json_columns, select_json_columns

    assert has_json_aggregates(registry.engine)
    table = registry.tables.collection
    names = ["a", 'b"\\\u00e9\n\t', "", "\U0001f600,x"]
    rows = [(n, 2**40 + i, None) for i, n in enumerate(names)]
    insert_committed(registry.engine, table, ["name", "type", "doc"], rows)
    statement = sa.select(json_columns([table.c.name, table.c.type, table.c.doc]))
    assert select_json_columns(registry.engine, statement) == [names, [2**40 + i for i in range(4)], [None] * 4]
    # A REAL is written with 15 significant digits; JSON cannot hold a BLOB.
    for column, value, before in (("type", 0.1 + 0.2, 2**40), ("doc", b"\x00", None)):
        with registry.engine.begin() as conn:
            conn.execute(table.update().where(table.c.name == "a").values({column: value}))
        assert select_json_columns(registry.engine, statement) is None
        with registry.engine.begin() as conn:
            conn.execute(table.update().where(table.c.name == "a").values({column: before}))
    empty = sa.select(json_columns([table.c.name], first=[sa.func.json_array(1, "a")])).where(table.c.name == "nope")
    assert select_json_columns(registry.engine, empty) == [[1, "a"], []]
    assert registry.engine.pool.checkedout() == 0
