"""Contracts are evaluated by a restricted interpreter, never eval."""

from __future__ import annotations

import pytest

from pipeline.contracts import Contract, check_contracts, contract_names, evaluate_contract
from pipeline.errors import ContractError

from .example_tasks import DiffConfig, ScaleConfig


@pytest.fixture
def configs():
    a = ScaleConfig()
    a.factor = 3.0
    a.weights = {"g": 1.0}
    b = ScaleConfig()
    b.factor = 3.0
    return {"a": a, "b": b, "d": DiffConfig()}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("a.factor == b.factor", True),
        ("a.factor > 2 and b.mode == 'mul'", True),
        ("not a.enabled", False),
        ("a.factor * 2 + 1 == 7", True),
        ("a.mode in ('mul', 'add')", True),
        ("a.weights['g'] == 1.0", True),
        ("a.offset.offset == 0.0", True),
        ("d.connections.coaddName == 'patch'", True),
        ("a.factor if a.enabled else 0", 3.0),
        ("1 < a.factor < 2", False),
        ("a.factor ** 2 == 9", True),
    ],
)
def test_allowed_expressions(configs, expression, expected):
    assert evaluate_contract(Contract(expression), configs) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('echo hi')", "uses Call"),
        ("a.validate()", "uses Call"),
        ("a.__class__", "private attribute"),
        ("a._provenance", "private attribute"),
        ("(lambda: 1)()", "uses Call"),
        ("[x for x in a.weights]", "ListComp"),
        ("a.factor = 3", "not a valid expression"),
        ("a.model_fields", "has no field 'model_fields'"),
        ("a.to_dict", "has no field 'to_dict'"),
        ("zz.factor == 1", "unknown task label 'zz'"),
        ("2 ** 100000", "too large"),
        ("'x' * 10**6", "too large"),
    ],
)
def test_forbidden_expressions(configs, expression, message):
    with pytest.raises(ContractError, match=message):
        evaluate_contract(Contract(expression), configs)


def test_check_contracts_failure_message_and_skipping(configs):
    ok = Contract("a.factor == b.factor", file="p.yaml", line=3)
    bad = Contract("a.factor != b.factor", msg="factors must differ", file="p.yaml", line=7)
    skipped = Contract("missing.factor == 1")
    check_contracts([ok, skipped], configs)
    with pytest.raises(ContractError) as info:
        check_contracts([ok, bad], configs)
    assert str(info.value) == "p.yaml:7: contract 'a.factor != b.factor' failed: factors must differ (a.factor=3.0, b.factor=3.0)"
    assert contract_names(bad) == {"a", "b"}
