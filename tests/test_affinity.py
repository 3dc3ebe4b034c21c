"""The affinity state machine and the response chain, on their own (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from trioproxy.protocol.affinity import TRANSITIONS, Affinity, Event, InvalidTransition, Kind, step
from trioproxy.protocol.chain import Node, ResponseChain


def test_every_state_handles_every_event_but_created_before_a_bind() -> None:
    missing = {(k, e) for k in Kind for e in Event} - set(TRANSITIONS)
    assert missing == {(Kind.UNBOUND, Event.CREATED)}
    with pytest.raises(InvalidTransition):
        step(Affinity(), Event.CREATED)


def test_hard_affinity_never_moves_implicitly() -> None:
    hard = step(step(Affinity(), Event.BIND, "a"), Event.CREATED)
    assert hard == Affinity(Kind.HARD, "a") and not hard.may_move and hard.pinned_to() == "a"
    with pytest.raises(InvalidTransition):
        step(hard, Event.BIND, "b")
    assert step(hard, Event.CLOSED_BEFORE_CREATED) == hard  # a reconnect goes back to "a"
    assert step(hard, Event.REQUEST_FAILURE) == hard
    assert step(hard, Event.BIND, "a") == hard
    assert (
        step(hard, Event.ACCOUNT_FAILURE) == Affinity()
    )  # only the account failing resets the pin
    assert step(hard, Event.UNANCHORED_REQUEST) == Affinity(Kind.SOFT, "a")


def test_soft_affinity_may_move() -> None:
    soft = step(Affinity(), Event.BIND, "a")
    assert soft.may_move and soft.pinned_to() is None
    assert step(soft, Event.BIND, "b") == Affinity(Kind.SOFT, "b")
    assert step(soft, Event.CLOSED_BEFORE_CREATED) == Affinity()


class AffinityMachine(RuleBasedStateMachine):
    """Random event sequences against a model of the rules in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.state = Affinity()
        self.model_account: str | None = None
        self.model_hard = False

    @rule(account=st.sampled_from(["a", "b", "c"]))
    def bind(self, account: str) -> None:
        if self.model_hard and account != self.model_account:
            with pytest.raises(InvalidTransition):
                step(self.state, Event.BIND, account)
            return
        self.state = step(self.state, Event.BIND, account)
        self.model_account = account

    @rule()
    def created(self) -> None:
        if self.model_account is None:
            with pytest.raises(InvalidTransition):
                step(self.state, Event.CREATED)
            return
        self.state = step(self.state, Event.CREATED)
        self.model_hard = True

    @rule()
    def closed_before_created(self) -> None:
        self.state = step(self.state, Event.CLOSED_BEFORE_CREATED)
        if not self.model_hard:
            self.model_account = None

    @rule()
    def account_failure(self) -> None:
        self.state = step(self.state, Event.ACCOUNT_FAILURE)
        self.model_account, self.model_hard = None, False

    @rule()
    def request_failure(self) -> None:
        self.state = step(self.state, Event.REQUEST_FAILURE)

    @rule()
    def unanchored(self) -> None:
        self.state = step(self.state, Event.UNANCHORED_REQUEST)
        self.model_hard = False

    @invariant()
    def matches_the_model(self) -> None:
        assert self.state.account == self.model_account
        assert (self.state.kind is Kind.HARD) == self.model_hard
        assert self.state.may_move == (not self.model_hard)
        if self.state.kind is Kind.UNBOUND:
            assert self.state.account is None


TestAffinityMachine = AffinityMachine.TestCase


def msg(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def reasoning(account: str) -> dict[str, Any]:
    return {"type": "reasoning", "encrypted_content": f"from-{account}", "summary": []}


def done(item: dict[str, Any]) -> str:
    """A ``response.output_item.done`` event as upstream sends it."""
    return json.dumps({"type": "response.output_item.done", "output_index": 0, "item": item})


def test_full_input_rebuilds_the_conversation() -> None:
    chain = ResponseChain()
    chain.remember(
        "r1",
        Node.of(
            None,
            "a",
            [msg("one")],
            [done(reasoning("a")), done({"type": "function_call", "call_id": "c1"})],
        ),
    )
    chain.remember(
        "r2",
        Node.of(
            "r1",
            "a",
            [{"type": "function_call_output", "call_id": "c1"}],
            [done(reasoning("a")), done(msg("answer"))],
        ),
    )
    same = chain.full_input("r2", [msg("two")], "a")
    assert same == [
        msg("one"),
        reasoning("a"),
        {"type": "function_call", "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1"},
        reasoning("a"),
        msg("answer"),
        msg("two"),
    ]
    other = chain.full_input("r2", [msg("two")], "b")
    assert other is not None and not any(i["type"] == "reasoning" for i in other)
    assert len(other) == len(same) - 2
    assert chain.full_input("unknown", [], "a") is None


def test_eviction_makes_the_chain_unknown_not_wrong() -> None:
    one = Node.of(None, "a", [msg("1")], [])
    chain = ResponseChain(max_bytes=int(one.size * 2.5))
    for n in range(1, 5):
        chain.remember(f"r{n}", Node.of(f"r{n - 1}" if n > 1 else None, "a", [msg(str(n))], []))
    assert chain.size <= chain.max_bytes and chain.evicted == 2
    assert chain.full_input("r4", [], "a") is None  # r1, r2 are gone: never a partial history
    assert not chain.knows("r3")
