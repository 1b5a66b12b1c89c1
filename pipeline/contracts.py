"""Pipeline contracts (``label.field == other.field``) evaluated safely.

A contract is parsed with :mod:`ast` and interpreted by a small evaluator that allows only:
literals (numbers, strings, None/True/False, tuples/lists/sets), task labels and attribute access
on their configs (config fields only: no methods, nothing starting with ``_``), subscripts,
comparisons (``== != < <= > >= in not in is is not``), ``and``/``or``/``not``, arithmetic
(``+ - * / // % **`` with bounded operands) and ``a if cond else b``.  Calls, lambdas,
comprehensions and every other construct are rejected when the contract is read, so a pipeline
file can never run code.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import ContractError

__all__ = ["Contract", "parse_contract", "contract_names", "evaluate_contract", "check_contracts"]

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
_ALLOWED = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.BinOp,
    ast.Compare,
    ast.Constant,
    ast.Name,
    ast.Attribute,
    ast.Subscript,
    ast.Tuple,
    ast.List,
    ast.Set,
    ast.IfExp,
    ast.Load,
    *_BINOPS,
    *_CMPOPS,
    *_UNARY,
)
_MAX_POW = 256
_MAX_REPEAT = 10_000


@dataclass(frozen=True)
class Contract:
    """A contract as written in a pipeline file.

    Attributes
    ----------
    expression : str
        ``"isr.doWrite == calibrate.doRead"``.
    msg : str or None
        Shown when the contract fails.
    file, line : optional
        Where it was written.
    """

    expression: str
    msg: str | None = None
    file: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (as in the YAML)."""
        return {"contract": self.expression, **({"msg": self.msg} if self.msg else {})}


def parse_contract(contract: Contract) -> ast.Expression:
    """Parse and check a contract's syntax.

    Raises
    ------
    ContractError
        Syntax errors and forbidden constructs (calls, private attributes, ...), with file and line.
    """
    try:
        tree = ast.parse(contract.expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ContractError(
            f"contract {contract.expression!r} is not a valid expression: {exc.msg}", file=contract.file, line=contract.line
        ) from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ContractError(
                f"contract {contract.expression!r} uses {type(node).__name__}, which contracts do not allow "
                "(only literals, task config fields, comparisons, and/or/not and arithmetic)",
                file=contract.file,
                line=contract.line,
            )
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ContractError(
                f"contract {contract.expression!r} uses the private attribute {node.attr!r}",
                file=contract.file,
                line=contract.line,
            )
    return tree


def contract_names(contract: Contract) -> set[str]:
    """The task labels (bare names) a contract refers to."""
    return {node.id for node in ast.walk(parse_contract(contract)) if isinstance(node, ast.Name)}


class _Evaluator:
    def __init__(self, names: Mapping[str, Any], contract: Contract) -> None:
        self.names = names
        self.contract = contract

    def fail(self, problem: str) -> ContractError:
        return ContractError(
            f"contract {self.contract.expression!r} cannot be evaluated: {problem}",
            file=self.contract.file,
            line=self.contract.line,
        )

    def eval(self, node: ast.AST) -> Any:  # noqa: C901 - one branch per node type
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                raise self.fail(f"unknown task label {node.id!r} (labels: {', '.join(sorted(self.names)) or 'none'})")
            return self.names[node.id]
        if isinstance(node, ast.Attribute):
            value = self.eval(node.value)
            if not isinstance(value, Config):
                raise self.fail(f"attribute {node.attr!r} of a {type(value).__name__}: only config fields can be read")
            if node.attr not in type(value).model_fields:
                raise self.fail(f"{type(value).__name__} has no field {node.attr!r}")
            return getattr(value, node.attr)
        if isinstance(node, ast.Subscript):
            value = self.eval(node.value)
            index = self.eval(node.slice)
            if not isinstance(value, (dict, list, tuple, str)):
                raise self.fail(f"cannot index a {type(value).__name__}")
            try:
                return value[index]
            except (KeyError, IndexError, TypeError) as exc:
                raise self.fail(f"bad index {index!r}: {exc}") from None
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = [self.eval(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else (items if isinstance(node, ast.List) else set(items))
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                result: Any = True
                for value_node in node.values:
                    result = self.eval(value_node)
                    if not result:
                        return result
                return result
            result = False
            for value_node in node.values:
                result = self.eval(value_node)
                if result:
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self.eval(node.operand))
        if isinstance(node, ast.BinOp):
            left, right = self.eval(node.left), self.eval(node.right)
            if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > _MAX_POW:
                raise self.fail(f"exponent {right!r} is too large")
            if isinstance(node.op, ast.Mult):
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and count > _MAX_REPEAT:
                        raise self.fail("sequence repetition is too large")
            try:
                return _BINOPS[type(node.op)](left, right)
            except (TypeError, ZeroDivisionError, OverflowError, ValueError) as exc:
                raise self.fail(str(exc)) from None
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.eval(comparator)
                try:
                    ok = _CMPOPS[type(op)](left, right)
                except TypeError as exc:
                    raise self.fail(str(exc)) from None
                if not ok:
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        raise self.fail(f"{type(node).__name__} is not allowed")  # pragma: no cover - parse_contract filters


def evaluate_contract(contract: Contract, configs: Mapping[str, Config]) -> Any:
    """Evaluate a contract with task labels bound to their configs."""
    tree = parse_contract(contract)
    return _Evaluator(configs, contract).eval(tree)


def check_contracts(contracts: list[Contract], configs: Mapping[str, Config]) -> None:
    """Evaluate every contract whose labels are all in ``configs``; raise on the first failure.

    Contracts that name a label not in the pipeline (e.g. after taking a subset) are skipped.

    Raises
    ------
    ContractError
        ``"contract 'a.x == b.y' failed: <msg>"`` with the file and line of the contract.
    """
    for contract in contracts:
        names = contract_names(contract)
        if not names <= set(configs):
            continue
        if not evaluate_contract(contract, configs):
            detail = f": {contract.msg}" if contract.msg else ""
            values = _describe_values(contract, configs)
            raise ContractError(
                f"contract {contract.expression!r} failed{detail}{values}", file=contract.file, line=contract.line
            )


def _describe_values(contract: Contract, configs: Mapping[str, Config]) -> str:
    parts = []
    evaluator = _Evaluator(configs, contract)
    for node in ast.walk(parse_contract(contract)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            try:
                parts.append(f"{ast.unparse(node)}={evaluator.eval(node)!r}")
            except ContractError:
                continue
    return f" ({', '.join(dict.fromkeys(parts))})" if parts else ""
