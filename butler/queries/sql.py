"""Compile a parsed where expression into a SQLAlchemy Core boolean expression.

Every literal and bind value becomes a bound parameter (``sqlalchemy.literal`` /
expanding ``IN`` parameters); no user text is ever pasted into SQL.  Identifiers are
mapped to columns by a callback the registry supplies, which also decides which tables
are joined (see :func:`butler.queries.expressions.identifiers`).

Ranges in ``IN`` lists
----------------------
``lhs IN (a..b)`` becomes ``lhs BETWEEN a AND b``.  A stepped range ``a..b:s`` becomes
part of one ``lhs IN (...)`` list with the other single values when it has at most
:data:`RANGE_EXPANSION_LIMIT` elements, and ``(lhs BETWEEN a AND b) AND (lhs - a) % s = 0``
otherwise (so the statement size stays bounded whatever the range).  An empty range
(``b < a``) matches nothing, and an ``IN`` list with nothing in it is ``false`` (``NOT IN``:
``true``).  Ranges stand for integers: on a floating-point column ``BETWEEN`` would also
match non-integers, so use them on integer columns (as LSST intends).
"""

from __future__ import annotations

__all__ = ["RANGE_EXPANSION_LIMIT", "ResolveIdentifier", "compile_where"]

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from butler.queries.expressions import (
    BIND_SEQUENCE_TYPES,
    BinaryOp,
    BindName,
    BoolOp,
    Comparison,
    Identifier,
    InList,
    InvalidQueryError,
    Node,
    Not,
    NumericLiteral,
    RangeLiteral,
    StringLiteral,
    TimeLiteral,
    UnaryOp,
    WhereExpression,
    _bind_keys_hint,
    _to_python_scalar,
    is_bound,
    resolve_bind,
    time_to_tai_nsec,
)

if TYPE_CHECKING:  # pragma: no cover
    import astropy.time

RANGE_EXPANSION_LIMIT = 100
"""Stepped ranges with at most this many values are expanded into the ``IN`` list."""

ResolveIdentifier = Callable[[str, int], ColumnElement[Any]]
"""``resolve_identifier(name, column) -> column expression``; see :func:`compile_where`."""


def _literal(value: Any) -> ColumnElement[Any]:
    # A bound parameter with an explicit type, so PostgreSQL casts it sensibly.
    if isinstance(value, bool):
        return sa.literal(value, sa.Boolean())
    if isinstance(value, int):
        return sa.literal(value, sa.BigInteger())
    if isinstance(value, float):
        return sa.literal(value, sa.Float())
    if isinstance(value, str):
        return sa.literal(value, sa.String())
    return sa.literal(value)


_COMPARE: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_ARITHMETIC: dict[str, Callable[[Any, Any], ColumnElement[Any]]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "%": lambda a, b: a % b,
}


class _Compiler:
    def __init__(
        self,
        expression: WhereExpression,
        resolve_identifier: ResolveIdentifier,
        bind: Mapping[str, Any] | None,
        convert_time: Callable[[astropy.time.Time], Any],
        range_expansion_limit: int,
    ) -> None:
        self.expression = expression
        self.resolve_identifier = resolve_identifier
        self.bind = bind
        self.convert_time = convert_time
        self.range_expansion_limit = range_expansion_limit

    def sql(self, node: Node) -> ColumnElement[Any]:
        match node:
            case NumericLiteral(value=v) | StringLiteral(value=v):
                return _literal(v)
            case TimeLiteral():
                return _literal(self.convert_time(node.to_astropy()))
            case BindName():
                return _literal(resolve_bind(self.expression, node, self.bind))
            case Identifier():
                bound = resolve_bind(self.expression, node, self.bind)
                if is_bound(bound):
                    return _literal(bound)
                return self._column(node)
            case UnaryOp(op=op, operand=operand):
                inner = self.sql(operand)
                return -inner if op == "-" else inner
            case BinaryOp(op=op, lhs=lhs, rhs=rhs):
                return _ARITHMETIC[op](self.sql(lhs), self.sql(rhs))
            case Comparison(op=op, lhs=lhs, rhs=rhs):
                return _COMPARE[op](self.sql(lhs), self.sql(rhs))
            case InList():
                return self._in_list(node)
            case Not(operand=operand):
                return sa.not_(self.sql(operand))
            case BoolOp(op=op, operands=operands):
                combine = sa.and_ if op == "AND" else sa.or_
                return combine(*(self.sql(operand) for operand in operands))
        raise AssertionError(f"unexpected node {node!r}")  # pragma: no cover

    def _column(self, node: Identifier) -> ColumnElement[Any]:
        text = self.expression.text
        width = max(1, node.end - node.start)
        try:
            column = self.resolve_identifier(node.name, node.column)
        except InvalidQueryError as exc:
            located = exc.with_context(text, node.column, width)
            if node.is_simple and self.bind:
                hint = (located.hint + "\n" if located.hint else "") + (
                    f"{node.name!r} is not a bind parameter either. " + _bind_keys_hint(self.bind)
                )
                located = type(located)(
                    located.message,
                    expression=located.expression,
                    column=located.column,
                    width=located.width,
                    hint=hint,
                )
            if located is exc:
                raise
            raise located from exc
        except LookupError as exc:
            raise self.expression.error(node, f"unknown identifier {node.name!r}: {exc}") from exc
        if not isinstance(column, sa.ColumnElement):
            raise TypeError(
                f"resolve_identifier({node.name!r}, {node.column}) returned {column!r}, "
                "not a SQLAlchemy column expression"
            )
        return column

    def _in_list(self, node: InList) -> ColumnElement[bool]:
        lhs = self.sql(node.lhs)
        discrete: list[Any] = []
        terms: list[ColumnElement[bool]] = []

        def add_range(start: int, stop: int, stride: int) -> None:
            values = range(start, stop + 1, stride)
            if not values:
                return
            last = values[-1]
            if stride == 1:
                terms.append(lhs.between(_literal(start), _literal(last)))
            elif len(values) <= self.range_expansion_limit:
                discrete.extend(values)
            else:
                terms.append(
                    sa.and_(
                        lhs.between(_literal(start), _literal(last)),
                        (lhs - _literal(start)) % _literal(stride) == _literal(0),
                    )
                )

        for item in node.items:
            if isinstance(item, RangeLiteral):
                add_range(item.start_value, item.stop_value, item.stride)
            elif isinstance(item, (NumericLiteral, StringLiteral)):
                discrete.append(item.value)
            elif isinstance(item, TimeLiteral):
                discrete.append(self.convert_time(item.to_astropy()))
            else:
                value = resolve_bind(self.expression, item, self.bind, in_list=True)
                if isinstance(value, range):
                    if value.step < 0:
                        value = value[::-1]
                    if value:
                        add_range(value.start, value[-1], value.step)
                elif isinstance(value, BIND_SEQUENCE_TYPES):
                    discrete.extend(_to_python_scalar(v) for v in value)
                else:
                    discrete.append(value)
        if discrete:
            unique = list(dict.fromkeys(discrete))
            terms.insert(0, lhs == _literal(unique[0]) if len(unique) == 1 else lhs.in_(unique))
        result = sa.or_(*terms) if terms else sa.false()
        return sa.not_(result) if node.negated else result


def compile_where(
    expression: WhereExpression | str,
    resolve_identifier: ResolveIdentifier,
    bind: Mapping[str, Any] | None = None,
    *,
    convert_time: Callable[[astropy.time.Time], Any] | None = None,
    range_expansion_limit: int = RANGE_EXPANSION_LIMIT,
) -> ColumnElement[bool]:
    """Compile a where expression into a SQLAlchemy boolean clause.

    Parameters
    ----------
    expression : `~butler.queries.expressions.WhereExpression` or `str`
        A parsed expression, or text to parse (parsed results are cached).
    resolve_identifier : callable
        ``resolve_identifier(name, column) -> ColumnElement``: maps an identifier as written
        (``"visit"``, ``"visit.seeing"``, ``"band"``) to a column expression.  ``column`` is
        the 1-based character offset of the identifier in the expression.  For an unknown
        name it should raise `~butler.queries.expressions.InvalidQueryError` (e.g. built with
        `~butler.queries.expressions.unknown_identifier_error`); the compiler adds the
        expression text so the message shows a caret.  A `LookupError` is converted too.
        It is not called for bind parameters.
    bind : `~collections.abc.Mapping` [`str`, `object`], optional
        Bind parameters: ``:name`` and simple identifiers that are keys of this mapping stand
        for its values.  Inside ``IN (...)`` a value may be a list, tuple, set or range.
    convert_time : callable, optional
        Converts an `astropy.time.Time` from a time literal to the value compared with the
        database; default :func:`~butler.queries.expressions.time_to_tai_nsec`.
    range_expansion_limit : `int`, optional
        Stepped ranges with at most this many values become plain ``IN`` values; larger ones
        become ``BETWEEN`` plus a modulo test.

    Returns
    -------
    clause : `sqlalchemy.sql.ColumnElement` [`bool`]
        Usable in ``select(...).where(clause)``; ``sqlalchemy.true()`` for an empty
        expression.

    Raises
    ------
    InvalidQueryError
        Raised for syntax errors (when given text), unknown identifiers or bind names, and
        sequence bind values outside ``IN``.
    """
    if isinstance(expression, str):
        from butler.queries.grammar import parse_cached

        expression = parse_cached(expression)
    if expression.root is None:
        return sa.true()
    compiler = _Compiler(
        expression, resolve_identifier, bind, convert_time or time_to_tai_nsec, range_expansion_limit
    )
    return compiler.sql(expression.root)
