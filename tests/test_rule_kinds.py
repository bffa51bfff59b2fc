"""Rule kinds are declared as data in two tables: the contract's wire part
(`opensense_contract.rules.RULE_KINDS`) and the server's behaviour
(`opensense.alarms.rule_kinds.BEHAVIOURS`). Every kind is in both, once."""

from __future__ import annotations

from opensense.alarms.rule_kinds import BEHAVIOURS
from opensense_contract.rules import RULE_KINDS


def test_every_contract_kind_has_exactly_one_behaviour_and_vice_versa() -> None:
    assert list(BEHAVIOURS) == list(RULE_KINDS)
    for name, b in BEHAVIOURS.items():
        assert b.name == name
