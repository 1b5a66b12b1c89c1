"""Grammar and parser of the butler's where-expression language.

The language is LSST ``daf_butler``'s user expression language (a subset of an SQL
``WHERE`` clause with a few extensions); :func:`parse` turns a string into a
:class:`~butler.queries.expressions.WhereExpression` holding a small typed syntax tree.

Summary of the language
-----------------------
- Boolean operators ``OR`` < ``AND`` < ``NOT`` (lowest to highest precedence), then the
  comparisons ``=  !=  <  <=  >  >=`` and ``[NOT] IN (...)``, then ``+ -``, then
  ``* / %``, then unary ``- +``.  Keywords are case-insensitive; identifiers are not.
  Comparisons do not chain: ``1 < visit < 5`` is an error (write ``visit > 1 AND visit < 5``).
- Literals: integers, floats (``1.``, ``.5``, ``1e-3``), strings in single quotes (no
  escapes, so a string cannot contain ``'``; double quotes are not allowed), time literals
  ``T'2020-01-01 12:00:00'``, and, inside ``IN`` lists only, inclusive integer ranges
  ``1..10`` and ``1..10:2`` (stride > 0; ``5..1`` is an empty range).
- Identifiers: ``visit``, ``band``, dotted ``visit.seeing``, ``visit.timespan.begin``.
- Bind parameters: ``:name`` always names a bind parameter; a simple identifier that is a
  key of the ``bind`` mapping also stands for its value (LSST's older spelling, still
  accepted there); inside ``IN (...)`` a simple identifier must be a bind key, whose value
  may be a list, tuple, set or range.
- Not supported (LSST has them): ``OVERLAPS``, tuples ``(a, b)`` for timespans, and the
  ``POINT``/``REGION``/``UUID`` function calls.  There is no ``NULL``, ``TRUE``/``FALSE``,
  ``<>``, ``==``, ``BETWEEN``, ``LIKE`` or SQL comments, as in LSST.

The parser is LALR(1) (lark, basic lexer) built once per process; a syntax error raises
:class:`~butler.queries.expressions.InvalidQueryError` with the column, a caret line and
what was expected there.  Nothing is ever evaluated with ``eval`` or pasted into SQL.
"""

from __future__ import annotations

__all__ = ["InvalidQueryError", "GRAMMAR", "MAX_DEPTH", "MAX_LENGTH", "parse", "parse_cached"]

import functools
import re
from collections.abc import Iterator
from typing import Any

import lark
import lark.lexer
from lark.exceptions import UnexpectedToken

from butler.queries.expressions import (
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
)

MAX_LENGTH = 100_000
"""Longest expression accepted, in characters."""

MAX_DEPTH = 100
"""Deepest syntax tree accepted (keeps evaluation and SQL compilation off the recursion limit)."""

_INT64 = (-(2**63), 2**63 - 1)

# The LALR grammar; its terminals are produced by the regex tokenizer `_tokenize` below
# (one compiled alternation: much faster than lark's generic lexer, and it lets keywords be
# case-insensitive words that never swallow a prefix of an identifier such as "order").
GRAMMAR = r"""
start: or_expr

?or_expr: and_expr
        | or_expr OR and_expr                  -> or_op
?and_expr: not_expr
         | and_expr AND not_expr               -> and_op
?not_expr: predicate
         | NOT not_expr                        -> not_op
?predicate: sum
          | sum (comp_op sum)+                 -> comparison
          | sum IN LPAR in_list RPAR           -> in_op
          | sum NOT IN LPAR in_list RPAR       -> in_op
          | sum OVERLAPS sum                   -> overlaps

?comp_op: EQ | NE | LT | LE | GT | GE

in_list: in_item (COMMA in_item)*
?in_item: NUMBER                               -> number
        | SUB NUMBER                           -> signed_number
        | ADD NUMBER                           -> signed_number
        | STRING                               -> string
        | TIME                                 -> time
        | RANGE                                -> range
        | BAD_RANGE                            -> bad_range
        | IDENT                                -> in_ident
        | BIND                                 -> bind

?sum: product
    | sum ADD product                          -> binop
    | sum SUB product                          -> binop
?product: unary
        | product MUL unary                    -> binop
        | product DIV unary                    -> binop
        | product MOD unary                    -> binop
?unary: atom
      | SUB unary                              -> unary_op
      | ADD unary                              -> unary_op
?atom: NUMBER                                  -> number
     | STRING                                  -> string
     | TIME                                    -> time
     | IDENT                                   -> ident
     | QIDENT                                  -> ident
     | BIND                                    -> bind
     | RANGE                                   -> misplaced_range
     | BAD_RANGE                               -> bad_range
     | LPAR or_expr RPAR                       -> parens

%declare OR AND NOT IN OVERLAPS TIME RANGE BAD_RANGE NUMBER STRING QIDENT IDENT BIND
%declare LE GE NE EQ LT GT ADD SUB MUL DIV MOD LPAR RPAR COMMA
"""

# The tokens, tried in this order at each position (a regex alternation takes the first
# alternative that matches, so composite literals come before the numbers they start with).
_TOKEN_RE = re.compile(
    r"""
    (?P<WS>[ \t\r\n]+)
  | (?P<TIME>[tT]'[^'\n]*')
  | (?P<RANGE>-?\d+[ \t]*\.\.[ \t]*-?\d+(?:[ \t]*:[ \t]*-?\d+)?)
  | (?P<BAD_RANGE>-?\d+[ \t]*\.\.)
  | (?P<NUMBER>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<STRING>'[^'\n]*')
  | (?P<WORD>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<BIND>:[A-Za-z_][A-Za-z0-9_]*)
  | (?P<OP><=|>=|!=|[=<>+\-*/%(),])
    """,
    re.VERBOSE,
)
_KEYWORDS = frozenset({"OR", "AND", "NOT", "IN", "OVERLAPS"})
_OPERATORS = {
    "<=": "LE", ">=": "GE", "!=": "NE", "=": "EQ", "<": "LT", ">": "GT",
    "+": "ADD", "-": "SUB", "*": "MUL", "/": "DIV", "%": "MOD",
    "(": "LPAR", ")": "RPAR", ",": "COMMA",
}  # fmt: skip


class _LexError(Exception):
    def __init__(self, position: int, message: str | None = None) -> None:
        super().__init__(position)
        self.position = position
        self.message = message


def _tokenize(text: str) -> Iterator[lark.Token]:
    """Yield the tokens of ``text`` (whitespace skipped); raise `_LexError` on a bad character."""
    match = _TOKEN_RE.match
    Token = lark.Token
    pos, n = 0, len(text)
    while pos < n:
        m = match(text, pos)
        if m is None:
            raise _LexError(pos)
        kind = m.lastgroup
        end = m.end()
        if kind != "WS":
            value = m.group()
            if kind == "OP":
                kind = _OPERATORS[value]
            elif kind == "WORD":
                if "." in value:
                    if value.count(".") > 2:
                        raise _LexError(pos, f"identifier {value!r} has more than two dots")
                    kind = "QIDENT"
                else:
                    upper = value.upper()
                    kind = upper if upper in _KEYWORDS else "IDENT"
            yield Token(kind, value, pos, None, None, None, None, end)
        pos = end


class _Lexer(lark.lexer.Lexer):
    """Adapter that feeds `_tokenize` to lark's LALR parser."""

    def __init__(self, lexer_conf: Any) -> None:
        pass

    def lex(self, data: str) -> Iterator[lark.Token]:  # type: ignore[override]
        return _tokenize(data)


class _SemanticError(Exception):
    """Raised by the tree builder; converted to `InvalidQueryError` with the text."""

    def __init__(self, start: int, end: int, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.start, self.end, self.message, self.hint = start, end, message, hint


def _span(token: lark.Token) -> dict[str, int]:
    return {"start": token.start_pos, "end": token.end_pos}


def _between(first: Node | lark.Token, last: Node | lark.Token) -> dict[str, int]:
    start = first.start if isinstance(first, Node) else first.start_pos
    end = last.end if isinstance(last, Node) else last.end_pos
    return {"start": start, "end": end}


def _number(token: lark.Token, sign: str = "") -> NumericLiteral:
    text = sign + str(token)
    value: int | float
    if any(c in text for c in ".eE"):
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise _SemanticError(token.start_pos, token.end_pos, f"number {text} is out of range")
    else:
        value = int(text)
        if not _INT64[0] <= value <= _INT64[1]:
            raise _SemanticError(
                token.start_pos, token.end_pos, f"integer {text} does not fit in 64 bits"
            )
    return NumericLiteral(value, **_span(token))


class _Builder(lark.Transformer):
    """Inline LALR callbacks that build the typed tree (no intermediate parse tree)."""

    def start(self, children: list[Node]) -> Node:
        return children[0]

    # -- boolean -------------------------------------------------------------------------
    def _bool(self, op: str, lhs: Node, rhs: Node) -> BoolOp:
        operands: list[Node] = []
        for operand in (lhs, rhs):
            if isinstance(operand, BoolOp) and operand.op == op:
                operands.extend(operand.operands)
            else:
                operands.append(operand)
        return BoolOp(op, tuple(operands), **_between(lhs, rhs))  # type: ignore[arg-type]

    def or_op(self, c: list[Any]) -> BoolOp:
        return self._bool("OR", c[0], c[2])

    def and_op(self, c: list[Any]) -> BoolOp:
        return self._bool("AND", c[0], c[2])

    def not_op(self, c: list[Any]) -> Not:
        return Not(c[1], **_between(c[0], c[1]))

    # -- predicates ----------------------------------------------------------------------
    def comparison(self, c: list[Any]) -> Comparison:
        if len(c) > 3:
            op = c[3]
            raise _SemanticError(
                op.start_pos,
                op.end_pos,
                f"comparisons cannot be chained: '{c[1]}' is followed by '{op}'",
                f"Combine two comparisons with AND, e.g. '{c[0]} {c[1]} {c[2]} AND {c[2]} {op} ...'.",
            )
        return Comparison(str(c[1]), c[0], c[2], **_between(c[0], c[2]))  # type: ignore[arg-type]

    def in_op(self, c: list[Any]) -> InList:
        negated = c[1].type == "NOT"
        items: list[Node] = c[-2]
        return InList(c[0], tuple(items), negated, **_between(c[0], c[-1]))

    def in_list(self, c: list[Any]) -> list[Node]:
        return [item for item in c if isinstance(item, Node)]

    def overlaps(self, c: list[Any]) -> Node:
        tok = c[1]
        raise _SemanticError(
            tok.start_pos, tok.end_pos, "OVERLAPS is not supported by this butler's where expressions"
        )

    # -- arithmetic ----------------------------------------------------------------------
    def binop(self, c: list[Any]) -> BinaryOp:
        return BinaryOp(str(c[1]), c[0], c[2], **_between(c[0], c[2]))  # type: ignore[arg-type]

    def unary_op(self, c: list[Any]) -> Node:
        op, operand = str(c[0]), c[1]
        if isinstance(operand, NumericLiteral):
            # A signed number is a literal, as in LSST (so "--5" is 5).
            value = -operand.value if op == "-" else operand.value
            return NumericLiteral(value, **_between(c[0], operand))
        return UnaryOp(op, operand, **_between(c[0], operand))  # type: ignore[arg-type]

    def parens(self, c: list[Any]) -> Node:
        return c[1]

    # -- leaves --------------------------------------------------------------------------
    def number(self, c: list[lark.Token]) -> NumericLiteral:
        return _number(c[0])

    def signed_number(self, c: list[lark.Token]) -> NumericLiteral:
        literal = _number(c[1], "-" if c[0] == "-" else "")
        return NumericLiteral(literal.value, **_between(c[0], c[1]))

    def string(self, c: list[lark.Token]) -> StringLiteral:
        return StringLiteral(str(c[0])[1:-1], **_span(c[0]))

    def time(self, c: list[lark.Token]) -> TimeLiteral:
        tok = c[0]
        node = TimeLiteral(str(tok)[2:-1], **_span(tok))
        try:
            node.to_astropy()
        except ValueError as exc:
            raise _SemanticError(
                tok.start_pos, tok.end_pos, f"invalid time literal {str(tok)}: {exc}"
            ) from None
        return node

    def ident(self, c: list[lark.Token]) -> Identifier:
        return Identifier(str(c[0]), **_span(c[0]))

    def in_ident(self, c: list[lark.Token]) -> Identifier:
        return Identifier(str(c[0]), **_span(c[0]))

    def bind(self, c: list[lark.Token]) -> BindName:
        return BindName(str(c[0])[1:], **_span(c[0]))

    def range(self, c: list[lark.Token]) -> RangeLiteral:
        tok = c[0]
        text = "".join(str(tok).split())
        bounds, _, stride_text = text.partition(":")
        start_text, _, stop_text = bounds.partition("..")
        stride = int(stride_text) if stride_text else 1
        if stride <= 0:
            raise _SemanticError(
                tok.start_pos,
                tok.end_pos,
                f"range stride must be a positive integer, got {stride} in {text}",
                "Write start..stop:stride with stride >= 1, e.g. 1..9:2.",
            )
        start, stop = int(start_text), int(stop_text)
        for value in (start, stop):
            if not _INT64[0] <= value <= _INT64[1]:
                raise _SemanticError(
                    tok.start_pos, tok.end_pos, f"range bound {value} does not fit in 64 bits"
                )
        return RangeLiteral(start, stop, stride, **_span(tok))

    def misplaced_range(self, c: list[lark.Token]) -> Node:
        tok = c[0]
        raise _SemanticError(
            tok.start_pos,
            tok.end_pos,
            f"range literal {''.join(str(tok).split())} is only allowed inside IN (...)",
            f"Write e.g. 'visit IN ({''.join(str(tok).split())})'.",
        )

    def bad_range(self, c: list[lark.Token]) -> Node:
        tok = c[0]
        raise _SemanticError(
            tok.start_pos,
            tok.end_pos,
            f"incomplete range literal '{str(tok).strip()}': expected an integer after '..'",
            "Ranges are written start..stop or start..stop:stride, e.g. 1..10 or 1..10:2.",
        )


@functools.cache
def _parser() -> lark.Lark:
    return lark.Lark(
        GRAMMAR,
        parser="lalr",
        lexer=_Lexer,
        transformer=_Builder(),
        maybe_placeholders=False,
    )


# ---------------------------------------------------------------------------------------------
# Static checks on the tree: boolean-ness and operand kinds
# ---------------------------------------------------------------------------------------------

_KIND_NAMES = {"num": "a number", "str": "a string", "time": "a time", "bool": "a condition"}


def _quote_source(text: str, node: Node) -> str:
    # The node's source, quoted for messages; string literals already carry their quotes.
    source = text[node.start : node.end]
    return source if isinstance(node, StringLiteral) else f"'{source}'"


def _kind(node: Node, text: str) -> str:
    """Return "bool", "num", "str", "time" or "any" (identifiers and binds); check operands."""

    def fail(bad: Node, message: str, hint: str | None = None) -> _SemanticError:
        return _SemanticError(bad.start, bad.end, message, hint)

    def src(n: Node) -> str:
        return _quote_source(text, n)

    def need_bool(n: Node, context: str) -> None:
        if _kind(n, text) != "bool":
            raise fail(
                n,
                f"{context} needs a condition, but {src(n)} is a value",
                "A condition is a comparison (visit > 10), an IN test (band IN ('g', 'r')), "
                "or conditions combined with AND, OR and NOT.",
            )

    match node:
        case NumericLiteral():
            return "num"
        case StringLiteral():
            return "str"
        case TimeLiteral():
            return "time"
        case Identifier() | BindName():
            return "any"
        case UnaryOp(op=op, operand=operand):
            kind = _kind(operand, text)
            if kind not in ("num", "any"):
                raise fail(node, f"unary '{op}' needs a number, but {src(operand)} is {_KIND_NAMES[kind]}")
            return "num"
        case BinaryOp(op=op, lhs=lhs, rhs=rhs):
            for operand in (lhs, rhs):
                kind = _kind(operand, text)
                if kind not in ("num", "any"):
                    raise fail(
                        operand, f"'{op}' needs numbers, but {src(operand)} is {_KIND_NAMES[kind]}"
                    )
            return "num"
        case Comparison(op=op, lhs=lhs, rhs=rhs):
            a, b = _kind(lhs, text), _kind(rhs, text)
            if "bool" in (a, b):
                if a != b or op not in ("=", "!="):
                    what = "compared with '=' or '!='" if a == b else "compared with a value"
                    raise fail(node, f"conditions can only be {what}: {src(node)}")
            elif a != "any" and b != "any" and a != b:
                raise fail(
                    node,
                    f"cannot compare {_KIND_NAMES[a]} with {_KIND_NAMES[b]}: {src(node)}",
                )
            return "bool"
        case InList(lhs=lhs, items=items):
            if _kind(lhs, text) == "bool":
                raise fail(lhs, f"the left side of IN must be a value, but {src(lhs)} is a condition")
            for item in items:
                if not isinstance(item, RangeLiteral):
                    _kind(item, text)
            return "bool"
        case Not(operand=operand):
            need_bool(operand, "NOT")
            return "bool"
        case BoolOp(op=op, operands=operands):
            for operand in operands:
                need_bool(operand, op)
            return "bool"
    raise AssertionError(f"unexpected node {node!r}")  # pragma: no cover


def _check_depth(root: Node) -> None:
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _SemanticError(
                node.start,
                node.end,
                f"expression is nested too deeply (more than {MAX_DEPTH} levels)",
                "Use IN (...) lists instead of long chains of operators.",
            )
        stack.extend((child, depth + 1) for child in node.children())


# ---------------------------------------------------------------------------------------------
# Syntax errors -> messages
# ---------------------------------------------------------------------------------------------

_VALUE_TERMINALS = {"NUMBER", "STRING", "IDENT", "QIDENT", "BIND", "TIME"}
_COMPARISON_TERMINALS = {"EQ", "NE", "LT", "LE", "GT", "GE"}
_ARITHMETIC_TERMINALS = {"ADD", "SUB", "MUL", "DIV", "MOD"}
_TERMINAL_TEXT = {
    "EQ": "=", "NE": "!=", "LT": "<", "LE": "<=", "GT": ">", "GE": ">=",
    "ADD": "+", "SUB": "-", "MUL": "*", "DIV": "/", "MOD": "%",
    "LPAR": "(", "RPAR": ")", "COMMA": ",",
}  # fmt: skip


def _describe(token: lark.Token) -> str:
    if token.type == "$END":
        return "end of expression"
    if token.type in ("OR", "AND", "NOT", "IN", "OVERLAPS"):
        return token.type
    return f"'{token}'"


def _expected_phrase(expected: set[str]) -> str:
    parts = []
    if expected & _COMPARISON_TERMINALS:
        parts.append("a comparison (=, !=, <, <=, >, >=)")
    if expected & _ARITHMETIC_TERMINALS:
        parts.append("an arithmetic operator (+, -, *, /, %)")
    if "IN" in expected:
        parts.append("IN")
    if "AND" in expected or "OR" in expected:
        parts.append("AND, OR")
    if "COMMA" in expected:
        parts.append("','")
    if "RPAR" in expected:
        parts.append("')'")
    if "LPAR" in expected and not expected & _VALUE_TERMINALS:
        parts.append("'('")
    if "$END" in expected:
        parts.append("the end of the expression")
    if not parts:
        parts = sorted(_TERMINAL_TEXT.get(name, name) for name in expected)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _tokens_before(text: str, position: int) -> list[lark.Token]:
    tokens: list[lark.Token] = []
    try:
        for token in _tokenize(text):
            if token.start_pos >= position:
                break
            tokens.append(token)
    except _LexError:
        pass
    return tokens


def _syntax_error(text: str, exc: UnexpectedToken) -> InvalidQueryError:
    token = exc.token
    expected: set[str] = set(exc.expected)
    at_end = token.type == "$END"
    position = len(text.rstrip()) if at_end else token.start_pos
    before = _tokens_before(text, position)
    prev = before[-1] if before else None
    width = 1 if at_end else max(1, token.end_pos - token.start_pos)

    def error(
        message: str, pos: int = position, w: int = width, hint: str | None = None
    ) -> InvalidQueryError:
        return InvalidQueryError(message, expression=text, column=pos + 1, width=w, hint=hint)

    open_parens: list[lark.Token] = []
    for tok in before:
        if tok.type == "LPAR":
            open_parens.append(tok)
        elif tok.type == "RPAR" and open_parens:
            open_parens.pop()

    adjacent = prev is not None and not at_end and prev.end_pos == token.start_pos
    if adjacent and prev.type == "STRING" and token.type == "STRING":
        return error(
            "a string literal cannot contain a single quote",
            pos=token.start_pos - 1,
            w=2,
            hint="Strings are enclosed in single quotes and have no escape for a quote "
            "(as in LSST's expression language); use a bind parameter for such values.",
        )
    if adjacent and prev.type == "LT" and token.type == "GT":
        return error("'<>' is not an operator", pos=prev.start_pos, w=2, hint="Use '!=' for 'not equal'.")
    if adjacent and prev.type == "EQ" and token.type == "EQ":
        return error(
            "'==' is not an operator", pos=prev.start_pos, w=2, hint="Use a single '=' for equality."
        )
    if prev is not None and prev.type == "IN" and token.type != "LPAR":
        return error(
            f"expected '(' after IN, got {_describe(token)}",
            hint="IN takes a parenthesized list, e.g. visit IN (1, 2, 10..20).",
        )
    if (
        token.type == "RPAR"
        and prev is not None
        and prev.type == "LPAR"
        and len(before) >= 2
        and before[-2].type == "IN"
    ):
        return error(
            "empty IN list",
            pos=prev.start_pos,
            w=2,
            hint="IN (...) needs at least one value, e.g. visit IN (1, 2).",
        )
    if token.type == "RPAR" and not open_parens:
        return error("unbalanced parentheses: this ')' has no matching '('")
    if expected & _VALUE_TERMINALS:
        # An operand is missing.
        if prev is None:
            return error(f"expected a value at the start of the expression, got {_describe(token)}")
        after = _describe(prev) if prev.type in ("AND", "OR", "NOT", "IN") else f"'{prev}'"
        if prev.type == "COMMA":
            after = "',' in the IN list"
        elif prev.type == "LPAR" and len(before) >= 2 and before[-2].type == "IN":
            after = "'IN ('"
        message = f"expected a value after {after}"
        if not at_end:
            message += f", got {_describe(token)}"
        else:
            message = "unexpected end of expression: " + message
        hint = None
        if token.type == "QIDENT" and prev.type in ("COMMA", "LPAR") and "RANGE" in expected:
            hint = "IN (...) accepts literals, ranges and bind parameters, not column names."
        if (
            prev.type == "SUB"
            and len(before) >= 2
            and before[-2].type == "SUB"
            and before[-2].end_pos == prev.start_pos
        ):
            hint = "SQL comments ('--') are not part of the language."
        return error(message, hint=hint)
    if at_end and "RPAR" in expected and open_parens:
        paren = open_parens[-1]
        return error(
            "unbalanced parentheses: this '(' is never closed",
            pos=paren.start_pos,
            w=1,
            hint="Add the missing ')'.",
        )
    if not open_parens:
        expected.discard("RPAR")
    hint = None
    if token.type == "LPAR" and prev is not None and prev.type in ("IDENT", "QIDENT"):
        hint = "Function calls (LSST's POINT(), REGION(), UUID()) are not supported."
    after = f" after '{prev}'" if prev is not None else ""
    return error(f"unexpected {_describe(token)}{after}: expected {_expected_phrase(expected)}", hint=hint)


_CHARACTER_HINTS = {
    '"': ("double quotes are not allowed", "String literals use single quotes, e.g. band = 'r'."),
    ";": (
        "unexpected ';'",
        "A where expression is a single condition; statement separators are not allowed.",
    ),
    "&": ("unexpected '&'", "Use AND."),
    "|": ("unexpected '|'", "Use OR."),
    "!": ("unexpected '!'", "Use NOT for negation and '!=' for 'not equal'."),
    ":": (
        "':' must start a bind parameter name",
        "Bind parameters are written :name, e.g. visit = :my_visit.",
    ),
}


def _character_error(text: str, exc: _LexError) -> InvalidQueryError:
    pos = exc.position
    char = text[pos]
    if exc.message is not None:
        end = pos
        while end < len(text) and (text[end].isalnum() or text[end] in "._"):
            end += 1
        return InvalidQueryError(
            exc.message, expression=text, column=pos + 1, width=end - pos,
            hint="Identifiers are a name or element.field, e.g. visit or visit.seeing.",
        )
    if char == "'" or (char in "tT" and text[pos + 1 : pos + 2] == "'"):
        quote = pos if char == "'" else pos + 1
        return InvalidQueryError(
            "unterminated string: no closing quote",
            expression=text,
            column=quote + 1,
            width=len(text) - quote,
            hint="Strings are enclosed in single quotes and cannot span lines or contain a quote.",
        )
    message, hint = _CHARACTER_HINTS.get(char, (f"unexpected character {char!r}", None))
    if char == ":" and pos > 0 and text[:pos].rstrip()[-1:].isdigit():
        message, hint = "range stride must be a positive integer", "Write e.g. 1..9:2."
    return InvalidQueryError(message, expression=text, column=pos + 1, width=1, hint=hint)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def parse(text: str) -> WhereExpression:
    """Parse a where expression.

    Parameters
    ----------
    text : `str`
        E.g. ``"visit > 100 AND band IN ('g', 'r') AND detector NOT IN (0..3)"``.  An empty
        or all-whitespace string is valid and places no constraint.

    Returns
    -------
    expression : `~butler.queries.expressions.WhereExpression`
        The text and its syntax tree (``root`` is `None` for an empty expression).

    Raises
    ------
    InvalidQueryError
        Raised for a syntax error, a misplaced or malformed literal, or operands that cannot
        go together (e.g. ``NOT visit``, ``band = 1``, ``'a' + 1``); the message shows the
        column and a caret under the offending spot.
    """
    if not isinstance(text, str):
        raise TypeError(f"a where expression must be a str, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise InvalidQueryError(f"where expression is too long ({len(text)} > {MAX_LENGTH} characters)")
    if not text.strip():
        return WhereExpression(text, None)
    try:
        root: Node = _parser().parse(text)
        _check_depth(root)
        if _kind(root, text) != "bool":
            raise _SemanticError(
                root.start,
                root.end,
                f"the expression must be a condition, but {_quote_source(text, root)} is a value",
                "Compare it with something, e.g. visit > 10 or band = 'r'.",
            )
    except UnexpectedToken as exc:
        raise _syntax_error(text, exc) from None
    except _LexError as exc:
        raise _character_error(text, exc) from None
    except _SemanticError as exc:
        raise InvalidQueryError(
            exc.message,
            expression=text,
            column=exc.start + 1,
            width=max(1, exc.end - exc.start),
            hint=exc.hint,
        ) from None
    return WhereExpression(text, root)


@functools.lru_cache(maxsize=512)
def parse_cached(text: str) -> WhereExpression:
    """Same as :func:`parse`, memoized (the tree is immutable, so sharing it is safe).

    Parameters
    ----------
    text : `str`
        The expression.

    Returns
    -------
    expression : `~butler.queries.expressions.WhereExpression`
    """
    return parse(text)
