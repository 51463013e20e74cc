"""Eviction policies: LRU against a reference model; contracts every policy keeps; S3-FIFO resists
scans."""

from __future__ import annotations

import copy

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvtier.policy import POLICY_NAMES, EvictionPolicy, make_policy

KEYS = st.integers(0, 11)
LEASED = st.frozensets(KEYS)


class LRUModel(RuleBasedStateMachine):
    """LRU must behave exactly like a list ordered from least to most recently used."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = make_policy("lru", 8)
        self.order: list[int] = []

    @rule(key=KEYS)
    def insert(self, key: int) -> None:
        if key in self.order:
            with pytest.raises(ValueError):
                self.policy.insert(key)
            return
        self.policy.insert(key)
        self.order.append(key)

    @rule(key=KEYS)
    def touch(self, key: int) -> None:
        self.policy.touch(key)
        if key in self.order:
            self.order.remove(key)
            self.order.append(key)

    @rule(key=KEYS)
    def remove(self, key: int) -> None:
        self.policy.remove(key)
        if key in self.order:
            self.order.remove(key)

    @rule(leased=LEASED)
    def choose_victim(self, leased: frozenset[int]) -> None:
        expected = next((key for key in self.order if key not in leased), None)
        assert self.policy.choose_victim(lambda key: key not in leased) == expected
        if expected is not None:
            self.order.remove(expected)

    @invariant()
    def same_keys(self) -> None:
        assert len(self.policy) == len(self.order)
        assert all((key in self.policy) == (key in self.order) for key in range(12))


TestLRUModel = LRUModel.TestCase
TestLRUModel.settings = settings(max_examples=200, stateful_step_count=60)


def contract_machine(name: str) -> type[RuleBasedStateMachine]:
    """Properties every policy keeps, whatever its choices."""

    class Contract(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.policy: EvictionPolicy = make_policy(name, 6)
            self.held: set[int] = set()

        @precondition(lambda self: len(self.held) < 12)
        @rule(key=KEYS)
        def insert(self, key: int) -> None:
            if key not in self.held:
                self.policy.insert(key)
                self.held.add(key)

        @rule(key=KEYS)
        def touch(self, key: int) -> None:
            self.policy.touch(key)

        @rule(key=KEYS)
        def remove(self, key: int) -> None:
            self.policy.remove(key)
            self.held.discard(key)

        @rule(leased=LEASED)
        def choose_victim(self, leased: frozenset[int]) -> None:
            before = copy.deepcopy(vars(self.policy))
            victim = self.policy.choose_victim(lambda key: key not in leased)
            if victim is None:
                assert self.held <= leased, "None although an evictable key is held"
                assert vars(self.policy) == before, "None must leave the state unchanged"
                return
            assert victim in self.held and victim not in leased
            assert victim not in self.policy
            self.held.remove(victim)

        @invariant()
        def same_keys(self) -> None:
            assert len(self.policy) == len(self.held)
            assert all((key in self.policy) == (key in self.held) for key in range(12))

    Contract.__name__ = f"Contract_{name}"
    return Contract


TestLRUContract = contract_machine("lru").TestCase
TestLRUContract.settings = settings(max_examples=200, stateful_step_count=80)
TestS3FIFOContract = contract_machine("s3fifo").TestCase
TestS3FIFOContract.settings = settings(max_examples=300, stateful_step_count=80)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_all_leased_terminates_in_linear_predicate_calls(name: str) -> None:
    policy = make_policy(name, 1000)
    for key in range(1000):
        policy.insert(key)
        for _ in range(5):
            policy.touch(key)
    calls: list[int] = []

    def only(evictable: set[int]):
        def is_evictable(key: int) -> bool:
            calls.append(key)
            return key in evictable
        return is_evictable

    assert policy.choose_victim(only(set())) is None
    assert len(calls) <= 1000
    calls.clear()
    # Only the youngest key is evictable: found within a few passes over the keys.
    assert policy.choose_victim(only({999})) == 999
    assert len(calls) <= 6 * 1000
    assert len(policy) == 999


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_insert_present_raises_and_absent_ops_are_noops(name: str) -> None:
    policy = make_policy(name, 10)
    policy.insert("a")
    with pytest.raises(ValueError):
        policy.insert("a")
    policy.touch("b")
    policy.remove("b")
    assert len(policy) == 1 and "a" in policy and "b" not in policy


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="lru, s3fifo"):
        make_policy("arc", 10)
    with pytest.raises(ValueError):
        make_policy("lru", 0)


def run_cache(name: str, capacity: int, trace: list[int]) -> tuple[EvictionPolicy, int]:
    """A cache of ``capacity`` keys, nothing leased: a hit touches, a miss evicts if full and
    inserts. Returns the policy and the number of hits."""
    policy = make_policy(name, capacity)
    num_hits = 0
    for key in trace:
        if key in policy:
            policy.touch(key)
            num_hits += 1
            continue
        if len(policy) >= capacity:
            assert policy.choose_victim(lambda _: True) is not None
        policy.insert(key)
    return policy, num_hits


def test_s3fifo_is_scan_resistant() -> None:
    hot = list(range(50))
    warm_up = hot * 4
    scan = list(range(1000, 1500))  # one pass over 500 keys never seen again
    after_scan = hot * 2
    trace = warm_up + scan + after_scan
    kept = {}
    for name in POLICY_NAMES:
        policy, _ = run_cache(name, 100, warm_up + scan)
        kept[name] = sum(key in policy for key in hot)
    assert kept["lru"] == 0
    assert kept["s3fifo"] == len(hot)
    # And so it hits more over the whole trace.
    assert run_cache("s3fifo", 100, trace)[1] > run_cache("lru", 100, trace)[1]


def test_s3fifo_ghost_hit_goes_to_main() -> None:
    policy = make_policy("s3fifo", 10)
    for key in range(11):
        policy.insert(key)
    assert policy.choose_victim(lambda _: True) == 0  # oldest, never hit: out of small, into ghost
    policy.insert(0)  # seen recently: admitted to main
    scan = range(100, 130)
    for key in scan:
        policy.choose_victim(lambda _: True)
        policy.insert(key)
    # The scan evicted every small key but not the one in main (main was never chosen from
    # while small was over its target).
    assert 0 in policy
