"""Tests of the where-expression language: grammar, SQL compiler and in-memory evaluator.

The central check is brute-force agreement: for hand-written and hypothesis-generated
expressions, the rows an in-memory SQLite table returns for the compiled SQL are exactly the
rows :func:`evaluate` selects in Python.  Error messages are pinned verbatim.
"""

from __future__ import annotations

import pickle
import random
import time

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from butler.errors import ButlerError
from butler.queries import (
    InvalidQueryError,
    bind_names,
    compile_where,
    evaluate,
    format_caret,
    identifiers,
    parse,
    time_to_tai_nsec,
    unknown_identifier_error,
)
from butler.queries.expressions import (
    BinaryOp,
    BindName,
    BoolOp,
    Comparison,
    Identifier,
    InList,
    Not,
    NumericLiteral,
    RangeLiteral,
    StringLiteral,
    TimeLiteral,
    UnaryOp,
)

# ---------------------------------------------------------------------------------------------
# A small registry-like table
# ---------------------------------------------------------------------------------------------

BANDS = ["u", "g", "r", "i", "z", "y"]
ODD_BANDS = ["r's", "x' OR '1'='1"]  # values with quotes, reachable only through bind
N_ROWS = 500

metadata = sa.MetaData()
visit_detector = sa.Table(
    "visit_detector",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("visit", sa.Integer, nullable=False),
    sa.Column("detector", sa.Integer, nullable=False),
    sa.Column("band", sa.String(32), nullable=False),
    sa.Column("seeing", sa.Float, nullable=True),
)
dataset = sa.Table("dataset", metadata, sa.Column("id", sa.Integer, primary_key=True))

COLUMNS = {
    "visit": visit_detector.c.visit,
    "detector": visit_detector.c.detector,
    "band": visit_detector.c.band,
    "visit.seeing": visit_detector.c.seeing,
}


def resolve(name: str, column: int) -> sa.ColumnElement:
    try:
        return COLUMNS[name]
    except KeyError:
        raise unknown_identifier_error(name, column, COLUMNS) from None


def make_rows() -> list[dict]:
    rng = random.Random(20240611)
    rows = []
    for i in range(N_ROWS):
        band = ODD_BANDS[i % 2] if i % 97 == 5 else rng.choice(BANDS)
        seeing = None if i % 37 == 3 else round(rng.uniform(0.4, 2.0), 2)
        rows.append(
            {
                "id": i,
                "visit": rng.randint(1, 400),
                "detector": rng.randint(0, 9),
                "band": band,
                "seeing": seeing,
            }
        )
    return rows


ROWS = make_rows()


def data_id(row: dict) -> dict:
    return {
        "visit": row["visit"],
        "detector": row["detector"],
        "band": row["band"],
        "visit.seeing": row["seeing"],
    }


@pytest.fixture(scope="module")
def engine() -> sa.Engine:
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(visit_detector.insert(), ROWS)
        conn.execute(dataset.insert(), [{"id": i} for i in range(7)])
    return engine


def sql_ids(engine: sa.Engine, expression, bind=None, **kwargs) -> set[int]:
    clause = compile_where(expression, resolve, bind, **kwargs)
    with engine.connect() as conn:
        return set(conn.scalars(sa.select(visit_detector.c.id).where(clause)))


def python_ids(expression, bind=None) -> set[int]:
    ast = parse(expression) if isinstance(expression, str) else expression
    return {row["id"] for row in ROWS if evaluate(ast, data_id(row), bind)}


def assert_database_intact(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"visit_detector", "dataset"}
        assert conn.scalar(sa.select(sa.func.count()).select_from(visit_detector)) == N_ROWS
        assert conn.scalar(sa.select(sa.func.count()).select_from(dataset)) == 7


# ---------------------------------------------------------------------------------------------
# Parsing: the tree
# ---------------------------------------------------------------------------------------------

v, d, b, s = Identifier("visit"), Identifier("detector"), Identifier("band"), Identifier("visit.seeing")


def n(x):
    return NumericLiteral(x)


def eq(lhs, rhs):
    return Comparison("=", lhs, rhs)


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("visit > 100", Comparison(">", v, n(100))),
        ("visit>100", Comparison(">", v, n(100))),
        ("band = 'r'", eq(b, StringLiteral("r"))),
        ("band = ''", eq(b, StringLiteral(""))),
        ("visit.seeing <= 1.5e-1", Comparison("<=", s, n(0.15))),
        ("visit != 1.", Comparison("!=", v, n(1.0))),
        ("visit >= .5", Comparison(">=", v, n(0.5))),
        ("visit < -3", Comparison("<", v, n(-3))),
        ("visit < - 3", Comparison("<", v, n(-3))),
        ("visit < +3", Comparison("<", v, n(3))),
        ("visit < -detector", Comparison("<", v, UnaryOp("-", d))),
        # precedence: NOT > AND > OR
        ("visit = 1 OR visit = 2 AND band = 'r'",
         BoolOp("OR", (eq(v, n(1)), BoolOp("AND", (eq(v, n(2)), eq(b, StringLiteral("r"))))))),
        ("(visit = 1 OR visit = 2) AND band = 'r'",
         BoolOp("AND", (BoolOp("OR", (eq(v, n(1)), eq(v, n(2)))), eq(b, StringLiteral("r"))))),
        ("NOT visit = 1 AND detector = 2", BoolOp("AND", (Not(eq(v, n(1))), eq(d, n(2))))),
        ("NOT (visit = 1 AND detector = 2)", Not(BoolOp("AND", (eq(v, n(1)), eq(d, n(2)))))),
        ("NOT NOT visit = 1", Not(Not(eq(v, n(1))))),
        ("visit = 1 AND detector = 2 AND band = 'g'",
         BoolOp("AND", (eq(v, n(1)), eq(d, n(2)), eq(b, StringLiteral("g"))))),
        ("visit = 1 or detector = 2 Or band = 'g'",
         BoolOp("OR", (eq(v, n(1)), eq(d, n(2)), eq(b, StringLiteral("g"))))),
        # arithmetic: * / % over + -, left-associative, unary minus binds tightest
        ("visit + detector * 2 = 7", eq(BinaryOp("+", v, BinaryOp("*", d, n(2))), n(7))),
        ("(visit + detector) * 2 = 7", eq(BinaryOp("*", BinaryOp("+", v, d), n(2)), n(7))),
        ("visit - detector - 1 = 0", eq(BinaryOp("-", BinaryOp("-", v, d), n(1)), n(0))),
        ("visit % 2 = 1", eq(BinaryOp("%", v, n(2)), n(1))),
        ("-visit / 2 > 1", Comparison(">", BinaryOp("/", UnaryOp("-", v), n(2)), n(1))),
        # comparisons of conditions (LSST allows = and != on booleans)
        ("(visit = 1) = (band = 'r')", eq(eq(v, n(1)), eq(b, StringLiteral("r")))),
        # IN lists
        ("visit IN (1, 2, 10..20, 30..40:5)",
         InList(v, (n(1), n(2), RangeLiteral(10, 20), RangeLiteral(30, 40, 5)))),
        ("visit NOT IN (-10..-1:2, -3)", InList(v, (RangeLiteral(-10, -1, 2), n(-3)), negated=True)),
        ("visit in (1 .. 5 : 2)", InList(v, (RangeLiteral(1, 5, 2),))),
        ("visit IN (5..1)", InList(v, (RangeLiteral(5, 1),))),
        ("band nOt In ('g', 'r')", InList(b, (StringLiteral("g"), StringLiteral("r")), negated=True)),
        ("visit IN (:visits, visits, 3)", InList(v, (BindName("visits"), Identifier("visits"), n(3)))),
        ("NOT visit IN (1)", Not(InList(v, (n(1),)))),
        # binds, dotted names, keyword-like identifiers, time literals
        ("visit > :my_visit", Comparison(">", v, BindName("my_visit"))),
        ("visit > my_visit", Comparison(">", v, Identifier("my_visit"))),
        ("visit.timespan.begin > T'2020-01-01'",
         Comparison(">", Identifier("visit.timespan.begin"), TimeLiteral("2020-01-01"))),
        ("order = 1 AND android = 2 AND notable = 3 AND index_ = 4",
         BoolOp("AND", tuple(eq(Identifier(x), n(i)) for i, x in
                             enumerate(["order", "android", "notable", "index_"], 1)))),
        ("visit = 1\n  AND\tband = 'r'", BoolOp("AND", (eq(v, n(1)), eq(b, StringLiteral("r"))))),
    ],
)  # fmt: skip
def test_parse_tree(text: str, tree) -> None:
    parsed = parse(text)
    assert parsed.root == tree
    assert parsed.text == text
    # The canonical spelling parses back to the same tree.
    assert parse(str(parsed)).root == tree


def test_canonical_spelling() -> None:
    text = "not (visit=1 or detector in (1..3)) and (visit.seeing*(2+detector))>-1"
    assert str(parse(text)) == "NOT (visit = 1 OR detector IN (1..3)) AND visit.seeing * (2 + detector) > -1"


def test_empty_expression() -> None:
    for text in ("", "   ", "\n\t"):
        expression = parse(text)
        assert expression.root is None
        assert str(expression) == ""
        assert evaluate(expression, {}) is True
        assert str(compile_where(expression, resolve)) == "true"


def test_positions() -> None:
    text = "band = 'r' AND visit.seeing > 1"
    root = parse(text).root
    seeing = root.operands[1].lhs
    assert seeing == s
    assert (seeing.start, seeing.end, seeing.column) == (15, 27, 16)
    assert text[seeing.start : seeing.end] == "visit.seeing"
    assert text[root.start : root.end] == text


def test_identifiers_and_binds() -> None:
    expression = parse("visit IN (vs, :more) AND band = b AND visit.seeing < :worst AND detector > 2")
    assert identifiers(expression) == {"visit", "band", "b", "visit.seeing", "detector"}
    assert identifiers(expression, bind={"b": "r"}) == {"visit", "band", "visit.seeing", "detector"}
    assert identifiers(parse("")) == set()
    assert bind_names(expression) == {"more", "worst"}


def test_parse_time() -> None:
    text = "visit > 100 AND band = 'r' AND detector IN (1..4) AND visit.seeing < 1.2"
    parse(text)  # builds and caches the parser
    timings = []
    for _ in range(200):
        t0 = time.perf_counter()
        parse(text)
        timings.append(time.perf_counter() - t0)
    assert min(timings) < 1e-3


# ---------------------------------------------------------------------------------------------
# SQL vs. brute force
# ---------------------------------------------------------------------------------------------

BIND = {
    "lo": 100,
    "hi": 300,
    "vs": [3, 5, 7, 250],
    "b": "r",
    "rg": range(10, 60, 7),
    "none": [],
    "worst": 1.2,
}

HAND_WRITTEN = [
    "visit > 100 AND band = 'r'",
    "visit > 100 and band = 'r' or detector = 3",
    "visit > 100 AND (band = 'r' OR detector = 3)",
    "NOT (visit > 100 AND band = 'r')",
    "NOT visit > 100 OR NOT band = 'r'",
    "detector IN (1..4)",
    "detector IN (0, 2, 4..6)",
    "detector NOT IN (0, 2, 4..6)",
    "visit IN (1..400:3)",
    "visit NOT IN (7..390:11, 5)",
    "visit IN (-10..-1, 400..1)",
    "visit NOT IN (5..1)",
    "visit IN (10..100:7, 200..390:50, 3)",
    "band IN ('g', 'r', 'i') AND visit.seeing < 0.8",
    "band NOT IN ('u')",
    "visit.seeing > 1.5",
    "NOT visit.seeing > 1.5",
    "visit.seeing IN (0.5, 0.75, 1.0)",
    "visit.seeing NOT IN (0.5, 0.75)",
    "visit.seeing * 2 > detector",
    "visit.seeing / 2 + 0.1 <= 0.5",
    "visit / 7 > 20.5",
    "visit / 8 = 10",
    "visit % 3 = 1 AND detector % 2 = 0",
    "-visit < -200",
    "visit - detector * 10 >= 100",
    "(visit = 100) = (band = 'r')",
    "(visit > 100) != (detector > 4)",
    "band < 'i'",
    "band >= 'r'",
    "visit > lo AND visit < :hi",
    "visit IN (vs) OR visit IN (:rg)",
    "visit NOT IN (:none)",
    "visit IN (none, 1..50)",
    "band = b AND visit.seeing < worst",
    "band = 'r' OR 1 = 1",
    "1 = 2",
    "'r' = band",
    "visit.seeing = visit.seeing",
    "NOT visit.seeing = visit.seeing",
    "visit.seeing != 0.5 OR visit > 200",
]


@pytest.mark.parametrize("text", HAND_WRITTEN)
def test_sql_matches_brute_force(engine: sa.Engine, text: str) -> None:
    assert sql_ids(engine, text, BIND) == python_ids(text, BIND)


def test_hand_written_cases_are_not_trivial() -> None:
    # Guard against a broken fixture making every comparison vacuous.
    sizes = {text: len(python_ids(text, BIND)) for text in HAND_WRITTEN}
    assert sum(0 < size < N_ROWS for size in sizes.values()) >= len(HAND_WRITTEN) - 8
    assert sizes["band = 'r' OR 1 = 1"] == N_ROWS
    assert sizes["1 = 2"] == 0
    nulls = sum(row["seeing"] is None for row in ROWS)
    assert sizes["visit.seeing = visit.seeing"] == N_ROWS - nulls
    assert sizes["NOT visit.seeing = visit.seeing"] == 0  # NULL, not TRUE


@pytest.mark.parametrize("limit", [0, 3, 1000])
def test_stepped_ranges_expanded_or_modulo(engine: sa.Engine, limit: int) -> None:
    text = "visit IN (3..397:4, 1..30:9) OR detector NOT IN (1..9:2)"
    assert sql_ids(engine, text, range_expansion_limit=limit) == python_ids(text)
    sql = str(compile_where(text, resolve, range_expansion_limit=limit))
    assert ("%" in sql) == (limit < 99)


def test_literals_are_bound_parameters() -> None:
    clause = compile_where("band = 'r' AND visit IN (17, 31, 18..20) AND visit.seeing > 0.75", resolve)
    compiled = clause.compile(dialect=sqlite.dialect())
    sql = str(compiled)
    for fragment in ("'r'", "17", "31", "18", "20", "0.75"):
        assert fragment not in sql
    assert sorted(map(str, compiled.params.values())) == sorted(["r", "[17, 31]", "18", "20", "0.75"])


# Hypothesis: random expressions over the table's columns, rendered with random spelling.

_kw = {word: st.sampled_from([word, word.lower(), word.title()]) for word in ("AND", "OR", "NOT", "IN")}
_ints = st.integers(min_value=-5, max_value=420)
_int_literal = _ints.map(str)
_float_literal = st.floats(min_value=-3, max_value=3, allow_nan=False).map(lambda x: repr(round(x, 3)))
_int_column = st.sampled_from(["visit", "detector"])


def _numeric_expr(depth: int) -> st.SearchStrategy[str]:
    leaves = st.one_of(
        _int_column, st.just("visit.seeing"), _int_literal, _float_literal, st.sampled_from(["lo", ":hi"])
    )
    if depth == 0:
        return leaves
    sub = _numeric_expr(depth - 1)
    return st.one_of(
        leaves,
        st.tuples(sub, st.sampled_from(["+", "-", "*"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.integers(1, 9)).map(lambda t: f"{t[0]} / {t[1]}"),
        st.tuples(_int_column, st.integers(1, 9)).map(lambda t: f"{t[0]} % {t[1]}"),
        sub.map(lambda x: f"-({x})"),
    )


_range = st.tuples(_ints, _ints, st.integers(1, 40)).map(
    lambda t: f"{t[0]}..{t[1]}" + (f":{t[2]}" if t[2] > 1 else "")
)
_in_item = st.one_of(_int_literal, _range, st.sampled_from(["vs", ":rg", "none", "lo"]))
_cmp = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])

_predicate = st.one_of(
    st.tuples(_numeric_expr(2), _cmp, _numeric_expr(2)).map(" ".join),
    st.tuples(st.just("band"), _cmp, st.sampled_from([*BANDS, "a", "zz"]).map(lambda x: f"'{x}'")).map(
        " ".join
    ),
    st.tuples(
        _int_column, st.booleans(), _kw["NOT"], _kw["IN"], st.lists(_in_item, min_size=1, max_size=4)
    ).map(lambda t: f"{t[0]} {t[2] + ' ' if t[1] else ''}{t[3]} ({', '.join(t[4])})"),
    st.tuples(st.just("band"), _kw["IN"], st.lists(st.sampled_from(BANDS), min_size=1, max_size=3)).map(
        lambda t: f"band {t[1]} ({', '.join(repr(x) for x in t[2])})"
    ),
)

_condition = st.recursive(
    _predicate,
    lambda sub: st.one_of(
        st.tuples(sub, _kw["AND"], sub).map(" ".join),
        st.tuples(sub, _kw["OR"], sub).map(" ".join),
        st.tuples(_kw["NOT"], sub).map(lambda t: f"{t[0]} ({t[1]})"),
        sub.map(lambda x: f"({x})"),
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_condition)
def test_random_expressions_sql_matches_brute_force(engine: sa.Engine, text: str) -> None:
    expression = parse(text)
    assert parse(str(expression)).root == expression.root
    assert sql_ids(engine, expression, BIND) == python_ids(expression, BIND)


# ---------------------------------------------------------------------------------------------
# Injection attempts and quotes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "visit = 1; DROP TABLE dataset",
        "visit = 1;",
        "band = 'r' OR 1=1 --",
        "band = 'r' -- AND visit = 1",
        "band = 'x'' OR ''1''=''1'",
        "band = 'r''s'",
        "band = \"r\"",
        "visit = 1 UNION SELECT id FROM dataset",
        "visit = (SELECT 1)",
        "visit = 1 /* comment */",
        "band = 'r'; DELETE FROM visit_detector",
        "visit IN (1); DROP TABLE dataset; --",
        "band = `r`",
        "visit = 0x10",
    ],
)
def test_injection_attempts_are_syntax_errors(engine: sa.Engine, text: str) -> None:
    with pytest.raises(InvalidQueryError):
        compile_where(text, resolve)
    assert_database_intact(engine)


@pytest.mark.parametrize(
    ("text", "bind", "expected"),
    [
        ("band = 'r' OR 1=1", None, N_ROWS),  # a tautology the user is allowed to write
        ("band = 'DROP TABLE dataset'", None, 0),
        ("band = '; DROP TABLE dataset; --'", None, 0),
        ("band = :b", {"b": "x' OR '1'='1"}, sum(r["band"] == "x' OR '1'='1" for r in ROWS)),
        ("band = quoted", {"quoted": "r's"}, sum(r["band"] == "r's" for r in ROWS)),
        (
            "band IN (:bs)",
            {"bs": ["r's", "'); DROP TABLE dataset; --"]},
            sum(r["band"] == "r's" for r in ROWS),
        ),
    ],
)
def test_hostile_values_are_parameters(engine: sa.Engine, text: str, bind, expected: int) -> None:
    assert len(sql_ids(engine, text, bind)) == expected
    assert python_ids(text, bind) == sql_ids(engine, text, bind)
    assert_database_intact(engine)
    sql = str(compile_where(text, resolve, bind).compile(dialect=sqlite.dialect()))
    assert "DROP" not in sql and "'" not in sql


def test_odd_band_rows_exist() -> None:
    assert {r["band"] for r in ROWS} >= set(ODD_BANDS)


# ---------------------------------------------------------------------------------------------
# Error messages (pinned)
# ---------------------------------------------------------------------------------------------

ERRORS = [
    (
        "visit >",
        "unexpected end of expression: expected a value after '>' (at column 8 of the where expression):\n"
        "    visit >\n"
        "           ^",
    ),
    (
        "visit > AND band = 'r'",
        "expected a value after '>', got AND (at column 9 of the where expression):\n"
        "    visit > AND band = 'r'\n"
        "            ^^^",
    ),
    (
        "visit = 1 AND",
        "unexpected end of expression: expected a value after AND (at column 14 of the where expression):\n"
        "    visit = 1 AND\n"
        "                 ^",
    ),
    (
        "(visit = 1 OR detector = 2",
        "unbalanced parentheses: this '(' is never closed (at column 1 of the where expression):\n"
        "    (visit = 1 OR detector = 2\n"
        "    ^\n"
        "Add the missing ')'.",
    ),
    (
        "visit = 1)",
        "unbalanced parentheses: this ')' has no matching '(' (at column 10 of the where expression):\n"
        "    visit = 1)\n"
        "             ^",
    ),
    (
        "visit IN ()",
        "empty IN list (at column 10 of the where expression):\n"
        "    visit IN ()\n"
        "             ^^\n"
        "IN (...) needs at least one value, e.g. visit IN (1, 2).",
    ),
    (
        "visit IN (1..)",
        "incomplete range literal '1..': expected an integer after '..' (at column 11 of the where expression):\n"
        "    visit IN (1..)\n"
        "              ^^^\n"
        "Ranges are written start..stop or start..stop:stride, e.g. 1..10 or 1..10:2.",
    ),
    (
        "visit IN (1..9:0)",
        "range stride must be a positive integer, got 0 in 1..9:0 (at column 11 of the where expression):\n"
        "    visit IN (1..9:0)\n"
        "              ^^^^^^\n"
        "Write start..stop:stride with stride >= 1, e.g. 1..9:2.",
    ),
    (
        "visit = 1..5",
        "range literal 1..5 is only allowed inside IN (...) (at column 9 of the where expression):\n"
        "    visit = 1..5\n"
        "            ^^^^\n"
        "Write e.g. 'visit IN (1..5)'.",
    ),
    (
        "band = 'r",
        "unterminated string: no closing quote (at column 8 of the where expression):\n"
        "    band = 'r\n"
        "           ^^\n"
        "Strings are enclosed in single quotes and cannot span lines or contain a quote.",
    ),
    (
        "band = 'r''s'",
        "a string literal cannot contain a single quote (at column 10 of the where expression):\n"
        "    band = 'r''s'\n"
        "             ^^\n"
        "Strings are enclosed in single quotes and have no escape for a quote (as in LSST's expression "
        "language); use a bind parameter for such values.",
    ),
    (
        'band = "r"',
        "double quotes are not allowed (at column 8 of the where expression):\n"
        '    band = "r"\n'
        "           ^\n"
        "String literals use single quotes, e.g. band = 'r'.",
    ),
    (
        "visit = 1; DROP TABLE dataset",
        "unexpected ';' (at column 10 of the where expression):\n"
        "    visit = 1; DROP TABLE dataset\n"
        "             ^\n"
        "A where expression is a single condition; statement separators are not allowed.",
    ),
    (
        "band = 'r' OR 1=1 --",
        "unexpected end of expression: expected a value after '-' (at column 21 of the where expression):\n"
        "    band = 'r' OR 1=1 --\n"
        "                        ^\n"
        "SQL comments ('--') are not part of the language.",
    ),
    (
        "visit <> 1",
        "'<>' is not an operator (at column 7 of the where expression):\n"
        "    visit <> 1\n"
        "          ^^\n"
        "Use '!=' for 'not equal'.",
    ),
    (
        "1 < visit < 5",
        "comparisons cannot be chained: '<' is followed by '<' (at column 11 of the where expression):\n"
        "    1 < visit < 5\n"
        "              ^\n"
        "Combine two comparisons with AND, e.g. '1 < visit AND visit < ...'.",
    ),
    (
        "visit 5",
        "unexpected '5' after 'visit': expected a comparison (=, !=, <, <=, >, >=), an arithmetic operator "
        "(+, -, *, /, %), IN, AND, OR or the end of the expression (at column 7 of the where expression):\n"
        "    visit 5\n"
        "          ^",
    ),
    (
        "visit IN 1, 2",
        "expected '(' after IN, got '1' (at column 10 of the where expression):\n"
        "    visit IN 1, 2\n"
        "             ^\n"
        "IN takes a parenthesized list, e.g. visit IN (1, 2, 10..20).",
    ),
    (
        "visit AND band = 'r'",
        "AND needs a condition, but 'visit' is a value (at column 1 of the where expression):\n"
        "    visit AND band = 'r'\n"
        "    ^^^^^\n"
        "A condition is a comparison (visit > 10), an IN test (band IN ('g', 'r')), or conditions combined "
        "with AND, OR and NOT.",
    ),
    (
        "visit + 1",
        "the expression must be a condition, but 'visit + 1' is a value (at column 1 of the where expression):\n"
        "    visit + 1\n"
        "    ^^^^^^^^^\n"
        "Compare it with something, e.g. visit > 10 or band = 'r'.",
    ),
    (
        "band = 'r' AND 'a' + 1 > 2",
        "'+' needs numbers, but 'a' is a string (at column 16 of the where expression):\n"
        "    band = 'r' AND 'a' + 1 > 2\n"
        "                   ^^^",
    ),
    (
        "visit = 1 AND\n   detector > ",
        "unexpected end of expression: expected a value after '>' (at line 2, column 14 of the where "
        "expression):\n"
        "       detector > \n"
        "                 ^",
    ),
    (
        "visit IN (visit.id)",
        "expected a value after 'IN (', got 'visit.id' (at column 11 of the where expression):\n"
        "    visit IN (visit.id)\n"
        "              ^^^^^^^^\n"
        "IN (...) accepts literals, ranges and bind parameters, not column names.",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_syntax_error_messages(text: str, message: str) -> None:
    with pytest.raises(InvalidQueryError) as info:
        parse(text)
    assert str(info.value) == message
    error = info.value
    assert error.expression == text
    assert isinstance(error, ButlerError) and isinstance(error, ValueError)
    # The caret line is under the reported column.
    caret_line = str(error).split("\n")[2]
    assert caret_line.index("^") - 4 == error.line_column - 1


@pytest.mark.parametrize(
    "text",
    [
        "", ")", "(", "()", "AND", "visit =", "= 1", "visit = = 1", "visit IN (1,)", "visit IN (,1)",
        "visit IN (1 2)", "NOT", "visit NOT 1", "visit IN ('a'", "visit ^ 2 = 1", "visit = 1 AND AND",
        "a.b.c.d = 1", "visit = :", "visit IN (1..5:)", "T'2020-13-45' < visit", "visit = 1e999",
        "visit = 99999999999999999999", "x OVERLAPS y", "POINT(1, 2) = 1", "visit = é",
    ],
)  # fmt: skip
def test_every_bad_expression_has_a_located_message(text: str) -> None:
    if not text:
        assert parse(text).root is None
        return
    with pytest.raises(InvalidQueryError) as info:
        parse(text)
    error = info.value
    assert 1 <= error.column <= len(text) + 1
    assert "^" in str(error)


def test_too_deep_and_too_long() -> None:
    with pytest.raises(InvalidQueryError, match="nested too deeply"):
        parse("NOT " * 150 + "visit = 1")
    with pytest.raises(InvalidQueryError, match="too long"):
        parse("visit IN (" + ", ".join(["1"] * 40_000) + ")")
    # A long flat expression is fine.
    assert len(parse(" OR ".join(f"visit = {i}" for i in range(500))).root.operands) == 500


def test_unknown_identifier_points_at_it() -> None:
    with pytest.raises(InvalidQueryError) as info:
        compile_where("band = 'r' AND visit.seeingg < 1", resolve)
    assert str(info.value) == (
        "unknown identifier 'visit.seeingg' (at column 16 of the where expression):\n"
        "    band = 'r' AND visit.seeingg < 1\n"
        "                   ^^^^^^^^^^^^^\n"
        "Did you mean 'visit.seeing'? Known names: band, detector, visit, visit.seeing."
    )


def test_unknown_identifier_mentions_bind_keys() -> None:
    with pytest.raises(InvalidQueryError) as info:
        compile_where("visit > my_vist", resolve, bind={"my_visit": 5})
    assert str(info.value).endswith(
        "'my_vist' is not a bind parameter either. Bind keys available: my_visit."
    )
    assert info.value.column == 9


def test_lookup_error_from_resolver_is_converted() -> None:
    def strict(name: str, column: int) -> sa.ColumnElement:
        return {"visit": visit_detector.c.visit}[name]

    with pytest.raises(InvalidQueryError, match=r"unknown identifier 'band'") as info:
        compile_where("visit = 1 AND band = 'r'", strict)
    assert info.value.column == 15


def test_evaluate_errors() -> None:
    with pytest.raises(InvalidQueryError, match=r"(?s)unknown identifier 'tract'.*Known names: band, visit"):
        evaluate("tract = 1", {"visit": 1, "band": "r"})
    with pytest.raises(InvalidQueryError, match=r"cannot evaluate 'band > 1'") as info:
        evaluate("visit = 1 AND band > 1", {"visit": 1, "band": "r"})
    assert info.value.column == 15


def test_format_caret_and_pickling() -> None:
    assert format_caret("visit > 1", 7) == "    visit > 1\n          ^"
    assert format_caret("visit > 1", 1, width=5) == "    visit > 1\n    ^^^^^"
    assert format_caret("a = 1\nAND b", 7, width=99) == "    AND b\n    ^^^^^"
    error = unknown_identifier_error("tract", 3, ["visit"], expression="x  tract")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) and clone.column == 3
    # Without an expression, the compiler adds the context.
    bare = unknown_identifier_error("tract", 3, ["visit"])
    assert "^" not in str(bare)
    assert "^^^^^" in str(bare.with_context("x  tract", 3))


# ---------------------------------------------------------------------------------------------
# Bind parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bind"),
    [
        ("visit > my_visit", {"my_visit": 5}),
        ("visit > :my_visit", {"my_visit": 5}),
        ("visit > :my_visit", {"my_visit": np.int64(5)}),
        ("visit.seeing < :s", {"s": np.float32(0.75)}),
        ("visit IN (my_visits)", {"my_visits": [1, 2, 3, 200]}),
        ("visit IN (my_visits)", {"my_visits": (1, 2, 3, 200)}),
        ("visit IN (:my_visits, 7)", {"my_visits": {1, 2, 3, 200}}),
        ("visit NOT IN (:r)", {"r": range(300, 10, -3)}),
        ("visit IN (:r)", {"r": range(0)}),
        ("band = band_name AND visit IN (v)", {"band_name": "r", "v": list(np.arange(1, 400, 4))}),
        # A bind key shadows a column of the same name, as in LSST.
        ("visit > detector", {"detector": 390}),
    ],
)
def test_bind_parameters(engine: sa.Engine, text: str, bind: dict) -> None:
    assert sql_ids(engine, text, bind) == python_ids(text, bind)


def test_bind_value_example() -> None:
    assert python_ids("visit > my_visit", {"my_visit": 5}) == {r["id"] for r in ROWS if r["visit"] > 5}


def test_unknown_bind_lists_keys() -> None:
    with pytest.raises(InvalidQueryError) as info:
        compile_where("visit > :my_vist", resolve, bind={"my_visit": 5, "other": 1})
    assert str(info.value) == (
        "unknown bind parameter ':my_vist' (at column 9 of the where expression):\n"
        "    visit > :my_vist\n"
        "            ^^^^^^^^\n"
        "Bind keys available: my_visit, other."
    )
    with pytest.raises(InvalidQueryError, match=r"No bind parameters were given"):
        evaluate("visit > :v", {"visit": 1})


def test_bare_identifier_in_in_list_must_be_bound() -> None:
    with pytest.raises(InvalidQueryError) as info:
        compile_where("visit IN (1, visits)", resolve, bind={"visit_ids": [1]})
    assert str(info.value) == (
        "'visits' in an IN list is not a bind parameter (at column 14 of the where expression):\n"
        "    visit IN (1, visits)\n"
        "                 ^^^^^^\n"
        "IN (...) accepts literals, ranges and bind parameters. Bind keys available: visit_ids."
    )


def test_sequence_bind_outside_in_is_an_error() -> None:
    with pytest.raises(InvalidQueryError, match=r"bind parameter 'vs' is a list; several values"):
        compile_where("visit = :vs", resolve, bind={"vs": [1, 2]})


# ---------------------------------------------------------------------------------------------
# Evaluation details: NULL logic, nested data IDs, time literals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x = 1", False),  # NULL
        ("NOT x = 1", False),  # NOT NULL is NULL
        ("x = 1 OR y = 2", True),
        ("x = 1 AND y = 2", False),
        ("NOT (x = 1 AND y = 3)", True),  # NULL AND FALSE is FALSE
        ("y IN (1, 2)", True),
        ("x IN (1, 2)", False),
        ("x NOT IN (1, 2)", False),
        ("x NOT IN (:empty)", True),  # empty list: TRUE even for NULL (as the SQL compiles)
        ("y / 0 = 1", False),  # division by zero is NULL
        ("-7 % 3 = -1", True),  # SQL modulo truncates toward zero
        ("7 / 2 = 3.5", True),  # true division
    ],
)
def test_evaluate_null_and_arithmetic(engine: sa.Engine, text: str, expected: bool) -> None:
    bind = {"empty": []}
    assert evaluate(text, {"x": None, "y": 2}, bind) is expected
    # ... and SQLite agrees.
    columns = {"x": sa.literal(None, sa.Integer), "y": sa.literal(2, sa.Integer)}
    with engine.connect() as conn:
        clause = compile_where(text, lambda name, column: columns[name], bind)
        result = conn.execute(sa.select(sa.literal(1)).where(clause)).all()
    assert bool(result) is expected


def test_evaluate_nested_data_id() -> None:
    class Record:
        seeing = 0.7

    assert evaluate("visit.seeing < 1", {"visit": {"seeing": 0.7}})
    assert evaluate("visit.seeing < 1", {"visit": Record()})
    assert evaluate("visit.seeing < 1", {"visit.seeing": 0.7})
    assert not evaluate("visit.seeing < 0.5", {"visit": Record()})


def test_time_literals(engine: sa.Engine) -> None:
    expression = parse("t >= T'2020-01-01' AND t < T'mjd/58900.0/tai'")
    begin = expression.root.operands[0].rhs.to_astropy()
    assert begin.scale == "utc" and begin.format == "iso"
    assert time_to_tai_nsec(parse("t = T'1970-01-01T00:00:00/tai'").root.rhs.to_astropy()) == 0
    assert time_to_tai_nsec(parse("t = T'mjd/40587/tai'").root.rhs.to_astropy()) == 0
    new_year = 1_577_836_800_000_000_000 + 37_000_000_000  # UTC 2020-01-01 is 37 s behind TAI
    assert time_to_tai_nsec(begin) == new_year
    assert evaluate(expression, {"t": new_year})
    assert not evaluate(expression, {"t": new_year - 1})
    clause = compile_where(expression, lambda name, column: sa.literal(new_year, sa.BigInteger))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.literal(1)).where(clause)).all() == [(1,)]
    with pytest.raises(InvalidQueryError, match=r"invalid time literal T'2020-13-45'"):
        parse("t > T'2020-13-45'")
