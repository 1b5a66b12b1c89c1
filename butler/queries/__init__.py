"""The butler's where-expression language: parsing, SQL compilation and in-memory evaluation.

LSST ``daf_butler``'s user expression language (``visit > 100 AND band = 'r'``,
``detector IN (1..4)``, bind parameters, ...), parsed by a real grammar into a typed tree
(:mod:`butler.queries.grammar`, :mod:`butler.queries.expressions`) and compiled to
parameterized SQLAlchemy Core (:mod:`butler.queries.sql`).

Names are imported lazily (PEP 562) so that importing the package does not import lark or
SQLAlchemy until needed.
"""

from __future__ import annotations

from butler.lazy import attach

_LAZY: dict[str, str] = {
    "parse": "butler.queries.grammar",
    "parse_cached": "butler.queries.grammar",
    "InvalidQueryError": "butler.queries.expressions",
    "WhereExpression": "butler.queries.expressions",
    "format_caret": "butler.queries.expressions",
    "unknown_identifier_error": "butler.queries.expressions",
    "identifiers": "butler.queries.expressions",
    "bind_names": "butler.queries.expressions",
    "evaluate": "butler.queries.expressions",
    "time_to_tai_nsec": "butler.queries.expressions",
    "compile_where": "butler.queries.sql",
    "RANGE_EXPANSION_LIMIT": "butler.queries.sql",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
