"""The typed syntax tree of the butler's where-expression language, and what works on it.

:func:`butler.queries.grammar.parse` turns a string into a :class:`WhereExpression`, whose
``root`` is a tree of the frozen dataclasses defined here.  This module also holds the pieces
that do not need SQLAlchemy:

- :class:`InvalidQueryError` and :func:`format_caret`, which point at the offending column;
- :func:`identifiers`, the names a query must join tables for;
- :func:`evaluate`, which applies an expression to one plain-Python data ID (small in-memory
  filters, and the brute-force reference the SQL compiler is tested against);
- :func:`resolve_bind`, the bind-parameter rules shared with :mod:`butler.queries.sql`.

Positions
---------
Every node records ``start`` and ``end``, 0-based character offsets into the expression text
(``text[start:end]`` is the node's source).  "Column" in the public API is 1-based and counts
characters from the start of the expression, which is the usual column for the common
one-line expression; messages convert it to line and column for multi-line expressions.

Semantics (shared by :func:`evaluate` and the SQL compiler)
-----------------------------------------------------------
- SQL three-valued logic: a missing value is ``None`` (SQL ``NULL``); comparisons and
  arithmetic with ``None`` give ``None``; ``AND``/``OR``/``NOT`` follow SQL's truth tables;
  an expression that ends up ``None`` does not select the row.
- ``/`` is true division (SQLAlchemy 2 semantics); division by zero gives ``None``, as on
  SQLite.  ``%`` is meant for integers: as on SQLite, both operands are first truncated toward
  zero to integers, and the result takes the sign of the dividend (``-7 % 3`` is ``-1``,
  ``212.5 % 1`` is ``0``).
- A range ``a..b`` is inclusive; ``a..b:s`` selects ``a, a+s, ...`` up to ``b``; ``b < a``
  is an empty range.
"""

from __future__ import annotations

__all__ = [
    "InvalidQueryError",
    "format_caret",
    "unknown_identifier_error",
    "Node",
    "NumericLiteral",
    "StringLiteral",
    "TimeLiteral",
    "RangeLiteral",
    "Identifier",
    "BindName",
    "UnaryOp",
    "BinaryOp",
    "Comparison",
    "InList",
    "Not",
    "BoolOp",
    "WhereExpression",
    "BIND_SEQUENCE_TYPES",
    "resolve_bind",
    "is_bound",
    "identifiers",
    "bind_names",
    "evaluate",
    "time_to_tai_nsec",
]

import difflib
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from butler.errors import InvalidQueryError, format_caret

if TYPE_CHECKING:  # pragma: no cover
    import astropy.time


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def unknown_identifier_error(
    name: str,
    column: int | None,
    known: Iterable[str],
    *,
    expression: str | None = None,
) -> InvalidQueryError:
    """Build the error an identifier resolver raises for a name it does not know.

    Meant for the ``resolve_identifier`` callback of
    :func:`butler.queries.sql.compile_where`: raise the result, and the compiler adds the
    expression text so the message gets its caret line.

    Parameters
    ----------
    name : `str`
        The identifier as written, e.g. ``"visit.seeingg"``.
    column : `int` or `None`
        1-based character offset of the identifier (the value the compiler passed).
    known : iterable of `str`
        The names the resolver does know; close matches are suggested and all are listed.
    expression : `str`, optional
        The expression text, when the caller has it.

    Returns
    -------
    error : `InvalidQueryError`
        Not raised; the caller raises it.
    """
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    hint += "Known names: " + (", ".join(known) if known else "(none)") + "."
    return InvalidQueryError(
        f"unknown identifier {name!r}",
        expression=expression,
        column=column,
        width=len(name),
        hint=hint,
    )


# ---------------------------------------------------------------------------------------------
# Syntax tree
# ---------------------------------------------------------------------------------------------

# Precedence tiers, used to print a tree back to text with the fewest parentheses.
_P_OR, _P_AND, _P_NOT, _P_CMP, _P_ADD, _P_MUL, _P_UNARY, _P_ATOM = range(1, 9)


@dataclass(frozen=True, slots=True)
class Node:
    """Base class of the syntax-tree nodes.

    Nodes compare equal when their content is equal; the source positions ``start`` and
    ``end`` (0-based, ``text[start:end]``) take no part in comparisons.
    """

    start: int = field(default=0, compare=False, repr=False, kw_only=True)
    end: int = field(default=0, compare=False, repr=False, kw_only=True)

    precedence: ClassVar[int] = _P_ATOM

    def children(self) -> tuple[Node, ...]:
        """Return the direct sub-nodes, left to right."""
        return ()

    @property
    def column(self) -> int:
        """1-based character offset of the node's first character."""
        return self.start + 1

    def __str__(self) -> str:  # pragma: no cover - every concrete class overrides
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class NumericLiteral(Node):
    """An integer or floating-point literal (a leading sign is folded into ``value``)."""

    value: int | float

    def __str__(self) -> str:
        return repr(self.value)


@dataclass(frozen=True, slots=True)
class StringLiteral(Node):
    """A single-quoted string literal, without its quotes."""

    value: str

    def __str__(self) -> str:
        return f"'{self.value}'"


@dataclass(frozen=True, slots=True)
class TimeLiteral(Node):
    """A time literal ``T'...'``; ``text`` is the string between the quotes.

    ``text`` is ``[format/]value[/scale]`` as in LSST: the format (``iso``, ``isot``,
    ``mjd``, ``fits``, ``yday``, or any astropy format) is guessed from the value when
    omitted, and the scale defaults to UTC for calendar formats and TAI for the others.
    """

    text: str

    def __str__(self) -> str:
        return f"T'{self.text}'"

    def to_astropy(self) -> astropy.time.Time:
        """Return the time as an `astropy.time.Time` (imports astropy on first use).

        Raises
        ------
        ValueError
            Raised if the string is not a time astropy understands.
        """
        return _parse_time_string(self.text)


@dataclass(frozen=True, slots=True)
class RangeLiteral(Node):
    """An inclusive integer range ``start..stop[:stride]``, allowed only inside ``IN``."""

    start_value: int
    stop_value: int
    stride: int = 1

    def values(self) -> range:
        """Return the integers the range stands for (empty when ``stop < start``)."""
        return range(self.start_value, self.stop_value + 1, self.stride)

    def __str__(self) -> str:
        text = f"{self.start_value}..{self.stop_value}"
        return text if self.stride == 1 else f"{text}:{self.stride}"


@dataclass(frozen=True, slots=True)
class Identifier(Node):
    """A name such as ``visit``, ``band`` or ``visit.seeing`` (case-sensitive).

    A simple (undotted) identifier that is a key of the ``bind`` mapping stands for the
    bound value, as in LSST; otherwise the registry maps it to a column.
    """

    name: str

    def __str__(self) -> str:
        return self.name

    @property
    def is_simple(self) -> bool:
        """True if the name has no dot (so it may name a bind parameter)."""
        return "." not in self.name


@dataclass(frozen=True, slots=True)
class BindName(Node):
    """An explicit bind parameter ``:name``; ``name`` is stored without the colon."""

    name: str

    def __str__(self) -> str:
        return f":{self.name}"


@dataclass(frozen=True, slots=True)
class UnaryOp(Node):
    """Unary arithmetic ``-x`` or ``+x`` (never applied directly to a numeric literal)."""

    op: Literal["-", "+"]
    operand: Node

    precedence: ClassVar[int] = _P_UNARY

    def children(self) -> tuple[Node, ...]:
        return (self.operand,)

    def __str__(self) -> str:
        inner = _wrap(self.operand, _P_UNARY)
        # "- -x" not "--x": keep the text re-parseable.
        sep = " " if inner.startswith(("-", "+")) else ""
        return f"{self.op}{sep}{inner}"


@dataclass(frozen=True, slots=True)
class BinaryOp(Node):
    """Binary arithmetic: ``+``, ``-``, ``*``, ``/`` or ``%``."""

    op: Literal["+", "-", "*", "/", "%"]
    lhs: Node
    rhs: Node

    @property
    def precedence(self) -> int:  # type: ignore[override]
        return _P_ADD if self.op in "+-" else _P_MUL

    def children(self) -> tuple[Node, ...]:
        return (self.lhs, self.rhs)

    def __str__(self) -> str:
        p = self.precedence
        # Left-associative: an equal-precedence right operand needs parentheses.
        return f"{_wrap(self.lhs, p)} {self.op} {_wrap(self.rhs, p + 1)}"


@dataclass(frozen=True, slots=True)
class Comparison(Node):
    """A comparison ``lhs op rhs``; comparisons do not chain."""

    op: Literal["=", "!=", "<", "<=", ">", ">="]
    lhs: Node
    rhs: Node

    precedence: ClassVar[int] = _P_CMP

    def children(self) -> tuple[Node, ...]:
        return (self.lhs, self.rhs)

    def __str__(self) -> str:
        return f"{_wrap(self.lhs, _P_CMP + 1)} {self.op} {_wrap(self.rhs, _P_CMP + 1)}"


@dataclass(frozen=True, slots=True)
class InList(Node):
    """``lhs IN (items)`` or, with ``negated``, ``lhs NOT IN (items)``.

    Items are literals, ranges, explicit binds (``:name``) and simple identifiers, which
    must name bind parameters (their value may be a list, tuple, set or range).
    """

    lhs: Node
    items: tuple[Node, ...]
    negated: bool = False

    precedence: ClassVar[int] = _P_CMP

    def children(self) -> tuple[Node, ...]:
        return (self.lhs, *self.items)

    def __str__(self) -> str:
        items = ", ".join(str(item) for item in self.items)
        keyword = "NOT IN" if self.negated else "IN"
        return f"{_wrap(self.lhs, _P_CMP + 1)} {keyword} ({items})"


@dataclass(frozen=True, slots=True)
class Not(Node):
    """Boolean negation ``NOT operand``."""

    operand: Node

    precedence: ClassVar[int] = _P_NOT

    def children(self) -> tuple[Node, ...]:
        return (self.operand,)

    def __str__(self) -> str:
        return f"NOT {_wrap(self.operand, _P_NOT)}"


@dataclass(frozen=True, slots=True)
class BoolOp(Node):
    """``AND`` or ``OR`` of two or more operands (nested runs of one operator are flattened)."""

    op: Literal["AND", "OR"]
    operands: tuple[Node, ...]

    @property
    def precedence(self) -> int:  # type: ignore[override]
        return _P_AND if self.op == "AND" else _P_OR

    def children(self) -> tuple[Node, ...]:
        return self.operands

    def __str__(self) -> str:
        p = self.precedence
        return f" {self.op} ".join(_wrap(operand, p + 1) for operand in self.operands)


def _wrap(node: Node, min_precedence: int) -> str:
    text = str(node)
    return f"({text})" if node.precedence < min_precedence else text


def _walk(node: Node) -> Iterator[Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children()))


@dataclass(frozen=True, slots=True)
class WhereExpression:
    """A parsed where expression: the source text and its syntax tree.

    Parameters
    ----------
    text : `str`
        The expression as the user wrote it.
    root : `Node` or `None`
        The syntax tree; `None` for an empty (all-whitespace) expression, which places no
        constraint.
    """

    text: str
    root: Node | None

    def __str__(self) -> str:
        """Return the canonical spelling (upper-case keywords, minimal parentheses)."""
        return "" if self.root is None else str(self.root)

    def error(self, node: Node, message: str, hint: str | None = None) -> InvalidQueryError:
        """Return an `InvalidQueryError` pointing at ``node`` in this expression.

        Parameters
        ----------
        node : `Node`
            The offending node; its whole source span is underlined.
        message : `str`
            What is wrong.
        hint : `str`, optional
            What to do about it.

        Returns
        -------
        error : `InvalidQueryError`
            Not raised; the caller raises it.
        """
        return InvalidQueryError(
            message,
            expression=self.text,
            column=node.start + 1,
            width=max(1, node.end - node.start),
            hint=hint,
        )


# ---------------------------------------------------------------------------------------------
# Bind parameters and identifiers
# ---------------------------------------------------------------------------------------------

BIND_SEQUENCE_TYPES: tuple[type, ...] = (list, tuple, set, frozenset, range)
"""Bound value types that stand for several values (allowed only as an item of ``IN``)."""

_NOT_BOUND = object()


def _bind_keys_hint(bind: Mapping[str, Any] | None) -> str:
    if not bind:
        return "No bind parameters were given (pass bind={'name': value})."
    return "Bind keys available: " + ", ".join(sorted(bind)) + "."


def resolve_bind(
    expression: WhereExpression,
    node: Node,
    bind: Mapping[str, Any] | None,
    *,
    in_list: bool = False,
) -> Any:
    """Return the value bound to ``node``, or a sentinel if ``node`` is not a bind.

    LSST's rules: ``:name`` must be a bind key; a simple identifier that is a bind key
    stands for the bound value (otherwise it is a column); inside an ``IN`` list a simple
    identifier must be a bind key.  Sequence values (`BIND_SEQUENCE_TYPES`) are allowed only
    inside ``IN`` lists.

    Parameters
    ----------
    expression : `WhereExpression`
        The expression ``node`` belongs to (for error messages).
    node : `Node`
        A `BindName` or `Identifier` (any other node is never a bind).
    bind : `~collections.abc.Mapping` or `None`
        The bind mapping.
    in_list : `bool`, optional
        True if ``node`` is an item of an ``IN`` list.

    Returns
    -------
    value : `object`
        The bound value, or a private sentinel meaning "not a bind parameter" (test the
        result with :func:`is_bound`).

    Raises
    ------
    InvalidQueryError
        Raised for an unknown bind name, or a sequence value outside ``IN``.
    """
    if isinstance(node, BindName):
        if not bind or node.name not in bind:
            raise expression.error(node, f"unknown bind parameter ':{node.name}'", _bind_keys_hint(bind))
        value = bind[node.name]
    elif isinstance(node, Identifier) and node.is_simple:
        if bind and node.name in bind:
            value = bind[node.name]
        elif in_list:
            raise expression.error(
                node,
                f"{node.name!r} in an IN list is not a bind parameter",
                "IN (...) accepts literals, ranges and bind parameters. " + _bind_keys_hint(bind),
            )
        else:
            return _NOT_BOUND
    else:
        return _NOT_BOUND
    if not in_list and isinstance(value, BIND_SEQUENCE_TYPES):
        raise expression.error(
            node,
            f"bind parameter {node.name!r} is a {type(value).__name__}; several values are only "
            "allowed as an item of IN (...)",
            f"Write e.g. 'visit IN ({node})'.",
        )
    return _to_python_scalar(value) if not isinstance(value, BIND_SEQUENCE_TYPES) else value


def is_bound(value: Any) -> bool:
    """Return True if ``value`` (from `resolve_bind`) is a bound value, not the sentinel."""
    return value is not _NOT_BOUND


def _to_python_scalar(value: Any) -> Any:
    # numpy scalars and the like -> builtins, so SQL drivers and type checks see int/float.
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "shape", None) == ():
        return item()
    return value


def identifiers(expression: WhereExpression | Node | None, bind: Mapping[str, Any] | None = None) -> set[str]:
    """Return the names of all identifiers the expression reads from the database.

    Bind parameters (``:name``, simple identifiers that are keys of ``bind``, and simple
    identifiers inside ``IN`` lists, which are always binds) are not included.

    Parameters
    ----------
    expression : `WhereExpression`, `Node` or `None`
        A parsed expression (or its root).
    bind : `~collections.abc.Mapping`, optional
        The bind mapping the expression will be compiled with.

    Returns
    -------
    names : `set` [`str`]
        E.g. ``{"visit", "band", "visit.seeing"}``.
    """
    root = expression.root if isinstance(expression, WhereExpression) else expression
    if root is None:
        return set()
    names: set[str] = set()
    in_list_items: set[int] = set()
    for node in _walk(root):
        if isinstance(node, InList):
            in_list_items.update(id(item) for item in node.items)
        elif isinstance(node, Identifier) and id(node) not in in_list_items:
            if not (node.is_simple and bind and node.name in bind):
                names.add(node.name)
    return names


def bind_names(expression: WhereExpression | Node | None) -> set[str]:
    """Return the names written as explicit bind parameters (``:name``, without the colon).

    Parameters
    ----------
    expression : `WhereExpression`, `Node` or `None`
        A parsed expression (or its root).

    Returns
    -------
    names : `set` [`str`]
    """
    root = expression.root if isinstance(expression, WhereExpression) else expression
    if root is None:
        return set()
    return {node.name for node in _walk(root) if isinstance(node, BindName)}


# ---------------------------------------------------------------------------------------------
# Time literals
# ---------------------------------------------------------------------------------------------

_TIME_RE = None


def _parse_time_string(text: str) -> astropy.time.Time:
    import re
    import warnings

    import astropy.time
    import astropy.utils.exceptions

    global _TIME_RE
    if _TIME_RE is None:
        _TIME_RE = re.compile(
            r"""^\s*(?:(?P<format>[a-z_]+)/)?
            (?P<value>
                (?P<number>[-+]?(?:\d+\.?\d*|\.\d+))
              | (?P<iso>\d+-\d+-\d+(?:[ T]\d+:\d+(?::\d+(?:\.\d*)?)?)?)
              | (?P<fits>\+\d+-\d+-\d+(?:T\d+:\d+:\d+(?:\.\d*)?)?)
              | (?P<yday>\d+:\d+(?::\d+:\d+(?::\d+(?:\.\d*)?)?)?)
            )
            (?:/(?P<scale>[a-z]+))?\s*$""",
            re.VERBOSE | re.IGNORECASE,
        )
    match = _TIME_RE.match(text.replace("+00:00", ""))
    if match is None:
        raise ValueError(
            "expected e.g. T'2020-01-01', T'2020-01-01T12:00:00', T'58938.5' (MJD), "
            "optionally with a format prefix and a scale suffix, as in T'mjd/58938.5/tai'"
        )
    fmt, scale, value = match.group("format"), match.group("scale"), match.group("value")
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in astropy.time.Time.FORMATS:
            raise ValueError(f"unknown time format {fmt!r}")
    if scale is not None:
        scale = scale.lower()
        if scale not in astropy.time.Time.SCALES:
            raise ValueError(f"unknown time scale {scale!r}")
    time_value: str | float = value
    if match.group("number") is not None:
        time_value = float(value)
        fmt = fmt or "mjd"
    elif fmt is None:
        if match.group("iso") is not None:
            fmt = "isot" if "T" in value.upper() else "iso"
        elif match.group("fits") is not None:
            fmt = "fits"
        else:
            fmt = "yday"
    if scale is None:
        scale = "utc" if fmt in ("iso", "isot", "fits", "yday", "unix") else "tai"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", astropy.utils.exceptions.AstropyWarning)
            return astropy.time.Time(time_value, format=fmt, scale=scale)
    except Exception as exc:  # astropy raises ValueError, TypeError, ErfaError ...
        raise ValueError(f"not a valid {fmt!r} time") from exc


def time_to_tai_nsec(time: astropy.time.Time) -> int:
    """Convert a time to integer nanoseconds since 1970-01-01T00:00:00 TAI.

    This is the default representation of time literals in SQL and in :func:`evaluate`
    (it is LSST's timespan storage convention); pass ``convert_time=`` to use another.

    Parameters
    ----------
    time : `astropy.time.Time`
        Any scale.

    Returns
    -------
    nsec : `int`
    """
    tai = time.tai
    # Keep the two-part Julian date apart (jd1 is whole or half days, jd2 the fraction) so
    # the result is exact to well under a nanosecond; JD 2440587.5 is 1970-01-01T00:00.
    days1 = float(tai.jd1) - 2440587.5
    whole = math.floor(days1)
    fraction = (days1 - whole) + float(tai.jd2)
    return int(whole) * 86_400_000_000_000 + round(fraction * 86_400e9)


# ---------------------------------------------------------------------------------------------
# Evaluation against a data ID
# ---------------------------------------------------------------------------------------------


def _sql_div(a: Any, b: Any) -> Any:
    return None if b == 0 else a / b


def _sql_mod(a: Any, b: Any) -> Any:
    # SQLite converts both operands of % to integers (truncating toward zero) first:
    # 212.5 % 1 is 0 there, not 0.5.
    a, b = int(a), int(b)
    if b == 0:
        return None
    r = abs(a) % abs(b)
    return -r if a < 0 else r


_ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": _sql_div,
    "%": _sql_mod,
}
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _lookup_data_id(data_id: Mapping[str, Any], name: str) -> Any:
    if name in data_id:
        return data_id[name]
    element, dot, rest = name.partition(".")
    if dot and element in data_id:
        record = data_id[element]
        if isinstance(record, Mapping):
            return _lookup_data_id(record, rest)
        attribute, _, deeper = rest.partition(".")
        if not isinstance(record, (int, float, str)) and hasattr(record, attribute):
            value = getattr(record, attribute)
            return _lookup_data_id({attribute: value}, rest) if deeper else value
    raise KeyError(name)


class _Evaluator:
    def __init__(
        self,
        expression: WhereExpression,
        data_id: Mapping[str, Any],
        bind: Mapping[str, Any] | None,
        convert_time: Callable[[astropy.time.Time], Any],
    ) -> None:
        self.expression = expression
        self.data_id = data_id
        self.bind = bind
        self.convert_time = convert_time

    def value(self, node: Node) -> Any:
        match node:
            case NumericLiteral(value=v) | StringLiteral(value=v):
                return v
            case TimeLiteral():
                return self.convert_time(node.to_astropy())
            case BindName():
                return resolve_bind(self.expression, node, self.bind)
            case Identifier(name=name):
                bound = resolve_bind(self.expression, node, self.bind)
                if is_bound(bound):
                    return bound
                try:
                    return _to_python_scalar(_lookup_data_id(self.data_id, name))
                except KeyError:
                    raise unknown_identifier_error(
                        name, node.column, self._known_names(), expression=self.expression.text
                    ) from None
            case UnaryOp(op=op, operand=operand):
                v = self.value(operand)
                if v is None:
                    return None
                return self._guard(node, lambda: -v if op == "-" else +v)
            case BinaryOp(op=op, lhs=lhs, rhs=rhs):
                a, b = self.value(lhs), self.value(rhs)
                if a is None or b is None:
                    return None
                return self._guard(node, lambda: _ARITHMETIC[op](a, b))
            case Comparison(op=op, lhs=lhs, rhs=rhs):
                a, b = self.value(lhs), self.value(rhs)
                if a is None or b is None:
                    return None
                return self._guard(node, lambda: bool(_COMPARE[op](a, b)))
            case InList():
                return self._in_list(node)
            case Not(operand=operand):
                v = self.value(operand)
                return None if v is None else not v
            case BoolOp(op="AND", operands=operands):
                any_null = False
                for operand in operands:
                    v = self.value(operand)
                    if v is None:
                        any_null = True
                    elif not v:
                        return False
                return None if any_null else True
            case BoolOp(op="OR", operands=operands):
                any_null = False
                for operand in operands:
                    v = self.value(operand)
                    if v is None:
                        any_null = True
                    elif v:
                        return True
                return None if any_null else False
        raise AssertionError(f"unexpected node {node!r}")  # pragma: no cover

    def _in_list(self, node: InList) -> bool | None:
        # Mirrors the SQL: an IN list with nothing in it is false (NOT IN: true) even for a
        # NULL left side; otherwise NULL on the left, or no match with a NULL in the list,
        # gives NULL.
        checks: list[tuple[Node, range | Any]] = []
        for item in node.items:
            if isinstance(item, RangeLiteral):
                if item.values():
                    checks.append((item, item.values()))
            elif isinstance(item, (NumericLiteral, StringLiteral, TimeLiteral)):
                checks.append((item, self.value(item)))
            else:
                v = resolve_bind(self.expression, item, self.bind, in_list=True)
                if isinstance(v, range):
                    v = v if v.step > 0 else v[::-1]
                    if v:
                        checks.append((item, v))
                elif isinstance(v, BIND_SEQUENCE_TYPES):
                    checks.extend((item, _to_python_scalar(e)) for e in v)
                else:
                    checks.append((item, v))
        if not checks:
            return node.negated
        x = self.value(node.lhs)
        if x is None:
            return None
        found: bool | None = False
        for item, v in checks:
            if isinstance(v, range):
                r = v
                hit = self._guard(item, lambda: _in_range(x, r.start, r[-1], r.step))
            elif v is None:
                hit = None
            else:
                hit = self._guard(item, lambda: x == v)
            if hit:
                found = True
                break
            if hit is None:
                found = None
        return (None if found is None else not found) if node.negated else found

    def _guard(self, node: Node, compute: Callable[[], Any]) -> Any:
        try:
            return compute()
        except TypeError as exc:
            message = f"cannot evaluate {str(node)!r} for this data ID: {exc}"
            raise self.expression.error(node, message) from exc

    def _known_names(self) -> list[str]:
        return [str(k) for k in self.data_id]


def _in_range(x: Any, start: int, stop: int, stride: int) -> bool:
    # SQL form: x BETWEEN start AND stop [AND (x - start) % stride = 0]
    if not start <= x <= stop:
        return False
    return stride <= 1 or _sql_mod(x - start, stride) == 0


def evaluate(
    expression: WhereExpression | str,
    data_id: Mapping[str, Any],
    bind: Mapping[str, Any] | None = None,
    *,
    convert_time: Callable[[astropy.time.Time], Any] | None = None,
) -> bool:
    """Evaluate a where expression against one data ID held in a plain mapping.

    Follows the same semantics as the SQL the expression compiles to (see the module
    docstring), so that in-memory filtering and registry queries agree.

    Parameters
    ----------
    expression : `WhereExpression` or `str`
        A parsed expression, or text to parse (parsed results are cached).
    data_id : `~collections.abc.Mapping` [`str`, `object`]
        Values of the identifiers, e.g. ``{"visit": 12, "band": "r", "visit.seeing": 0.7}``.
        A dotted name ``a.b`` is looked up as the key ``"a.b"``, or as key/attribute ``b``
        of ``data_id["a"]`` when that is a mapping or a record object.  A value of `None`
        is SQL ``NULL``.
    bind : `~collections.abc.Mapping` [`str`, `object`], optional
        Bind parameters, as for :func:`butler.queries.sql.compile_where`.
    convert_time : callable, optional
        Converts an `astropy.time.Time` from a time literal to the representation used in
        ``data_id``; default :func:`time_to_tai_nsec`.

    Returns
    -------
    selected : `bool`
        True if the data ID satisfies the expression (an empty expression selects
        everything; an expression that evaluates to SQL ``NULL`` does not select).

    Raises
    ------
    InvalidQueryError
        Raised for an unknown identifier or bind name, or operands of incompatible types.
    """
    if isinstance(expression, str):
        from butler.queries.grammar import parse_cached

        expression = parse_cached(expression)
    if expression.root is None:
        return True
    evaluator = _Evaluator(expression, data_id, bind, convert_time or time_to_tai_nsec)
    return evaluator.value(expression.root) is True
