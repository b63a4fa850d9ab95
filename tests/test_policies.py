"""The balancing policies (SPEC §3 and §7) as plain functions over backend data, without sockets."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest

from fastlb.policies import POLICIES, Policy, candidates
from fastlb.pool import Backend as PoolBackend
from fastlb.pool import choose_backend
from fastlb.settings import Address

from conftest import ROOT


@dataclass(eq=False)   # compared by identity, as the pool's backends are
class FakeBackend:
    name: str
    index: int
    state: str = "up"
    closed: bool = False
    weight: int = 1
    backup: bool = False
    entries: int = 0
    errors: int = 0
    active: int = 0
    reports_load: bool = True
    rr_current: int = 0


def make(count: int, **fields) -> list:
    """``count`` up backends; a field given as a list sets it per backend."""
    backends = []
    for i in range(count):
        own = {k: (v[i] if isinstance(v, (list, tuple)) else v) for k, v in fields.items()}
        backends.append(FakeBackend("10.0.0.%d:80" % (i + 1), i, **own))
    return backends


def indexes(policy: Policy, backends, picks: int, **kwargs) -> list:
    return [policy.choose(backends, **kwargs).index for _ in range(picks)]


def routed(policy: Policy, backends, exclude=(), everyone=()) -> set:
    """The indexes chosen for ``everyone`` in turn, each choice counted as the pool counts it."""
    chosen = set()
    for client in everyone:
        backend = policy.choose(backends, exclude, client=client)
        backend.entries += 1
        chosen.add(backend.index)
    return chosen


def clients(count: int) -> list:
    return ["192.0.%d.%d" % (i // 250, i % 250 + 1) for i in range(count)]


# -- every policy ------------------------------------------------------------------

def test_unknown_policy_name_is_a_value_error():
    with pytest.raises(ValueError, match="no-such-policy"):
        Policy("no-such-policy")


def test_policy_keeps_its_name():
    assert [Policy(name).name for name in POLICIES] == list(POLICIES)


@pytest.mark.parametrize("name", POLICIES)
def test_only_up_backends_are_chosen_never_down_unknown_or_removed(name):
    backends = make(5, state=["down", "up", "unknown", "up", "up"], closed=[False, False, False, True, False])
    assert routed(Policy(name, random.Random(1)), backends, everyone=clients(200)) == {1, 4}


@pytest.mark.parametrize("name", POLICIES)
def test_excluded_backends_are_never_chosen(name):
    backends = make(4)
    exclude = [backends[0], backends[2]]
    assert routed(Policy(name, random.Random(2)), backends, exclude, clients(200)) == {1, 3}


@pytest.mark.parametrize("name", POLICIES)
def test_no_candidate_left_gives_none(name):
    policy = Policy(name, random.Random(3))
    assert policy.choose([], client="192.0.2.1") is None
    backends = make(3, state=["down", "unknown", "up"], closed=[False, False, True])
    assert policy.choose(backends, client="192.0.2.1") is None
    backends = make(2)
    assert policy.choose(backends, exclude=backends, client="192.0.2.1") is None


@pytest.mark.parametrize("name", POLICIES)
def test_backups_take_no_traffic_while_a_primary_is_a_candidate(name):
    backends = make(4, backup=[False, True, False, True], state=["down", "up", "up", "up"])
    assert routed(Policy(name, random.Random(4)), backends, everyone=clients(200)) == {2}


@pytest.mark.parametrize("name", POLICIES)
def test_backups_share_the_traffic_by_the_policy_when_no_primary_is_left(name):
    backends = make(5, backup=[False, True, False, True, True], state=["down", "up", "up", "up", "down"])
    policy = Policy(name, random.Random(5))
    # The primary left is excluded (its connect failed): the backups that are up take over.
    chosen = collections.Counter()
    for c in clients(400):
        backend = policy.choose(backends, exclude=[backends[2]], client=c)
        chosen[backend.index] += 1
        backend.entries += 1     # as the pool counts a routed connection
    assert set(chosen) == {1, 3}
    assert min(chosen.values()) >= 100


@pytest.mark.parametrize("name", POLICIES)
def test_a_single_candidate_is_always_chosen(name):
    backends = make(3, state=["down", "up", "down"], weight=[1, 3, 1])
    assert routed(Policy(name, random.Random(6)), backends, everyone=clients(50)) == {1}


def test_candidates_are_the_routable_primaries_in_table_order():
    backends = make(6, state=["up", "down", "up", "up", "up", "up"], closed=[False] * 5 + [True],
                    backup=[False, False, False, True, False, False])
    assert candidates(backends, exclude=[backends[2]]) == [backends[0], backends[4]]


def test_candidates_fall_back_to_the_routable_backups_only_when_no_primary_is_left():
    backends = make(5, state=["down", "up", "up", "down", "up"], backup=[False, True, True, True, True])
    assert candidates(backends, exclude=[backends[2]]) == [backends[1], backends[4]]
    assert candidates(backends, exclude=[backends[1], backends[2], backends[4]]) == []


# -- least-loaded --------------------------------------------------------------------

def test_least_loaded_takes_the_fewest_entries():
    backends = make(3, entries=[9, 2, 4], errors=[0, 5, 0])
    assert Policy("least-loaded").choose(backends).index == 1


def test_least_loaded_ties_go_to_fewest_errors_then_smallest_index():
    policy = Policy("least-loaded")
    assert policy.choose(make(3, entries=2, errors=[3, 1, 1])).index == 1
    assert policy.choose(make(3, entries=2, errors=0)).index == 0
    # The index breaks the tie, not the position in the list.
    backends = make(3, entries=2)
    assert policy.choose(backends[::-1]).index == 0


def test_least_loaded_counts_entries_per_unit_of_weight():
    policy = Policy("least-loaded")
    # 5/2 < 3/1: the heavier backend takes more.
    assert policy.choose(make(2, entries=[3, 5], weight=[1, 2])).index == 1
    # 6/2 == 3/1: equal load, then errors and index decide.
    assert policy.choose(make(2, entries=[3, 6], weight=[1, 2], errors=[1, 0])).index == 1


def test_least_loaded_routing_spreads_by_weight_as_entries_grow():
    backends = make(3, weight=[1, 2, 1])
    policy = Policy("least-loaded")
    counts = collections.Counter()
    for _ in range(400):
        backend = policy.choose(backends)
        backend.entries += 1
        counts[backend.index] += 1
    assert counts == {0: 100, 1: 200, 2: 100}


def test_least_loaded_agrees_with_the_pools_choose_backend():
    rng = random.Random(7)
    policy = Policy("least-loaded")
    for _ in range(500):
        count = rng.randint(1, 6)
        addresses = [Address("127.0.0.1", 8000 + i, "127.0.0.1", weight=rng.randint(1, 3)) for i in range(count)]
        pool_backends = [PoolBackend(address, i) for i, address in enumerate(addresses)]
        fakes = []
        for backend in pool_backends:
            backend.state = rng.choice(["up", "up", "down", "unknown"])
            backend.closed = rng.random() < 0.1
            backend.entries, backend.errors = rng.randint(0, 6), rng.randint(0, 2)
            fakes.append(FakeBackend(backend.name, backend.index, backend.state, backend.closed,
                                     backend.weight, entries=backend.entries, errors=backend.errors))
        excluded = [i for i in range(count) if rng.random() < 0.2]
        expected = choose_backend(pool_backends, [pool_backends[i] for i in excluded])
        chosen = policy.choose(fakes, [fakes[i] for i in excluded])
        assert (chosen and chosen.index) == (expected and expected.index)


# -- leastconn ---------------------------------------------------------------------

def test_leastconn_takes_the_fewest_active_relays():
    backends = make(3, active=[4, 1, 2], entries=[0, 50, 0])
    assert Policy("leastconn").choose(backends).index == 1


def test_leastconn_counts_active_relays_per_unit_of_weight():
    policy = Policy("leastconn")
    assert policy.choose(make(2, active=[2, 3], weight=[1, 2])).index == 1    # 3/2 < 2/1
    assert policy.choose(make(2, active=[3, 2], weight=[3, 1])).index == 0    # 3/3 < 2/1


def test_leastconn_equal_loads_per_weight_tie_and_take_turns():
    # 1/3 == 2/6 < 3/8: the first two tie, the third is busier.
    backends = make(3, active=[1, 2, 3], weight=[3, 6, 8])
    assert indexes(Policy("leastconn"), backends, 4) == [0, 1, 0, 1]


def test_leastconn_sequential_clients_take_turns_over_all_backends_in_index_order():
    backends = make(4)
    policy = Policy("leastconn")
    assert indexes(policy, backends, 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_leastconn_turns_skip_busier_backends_and_wrap_around():
    backends = make(4, active=[0, 1, 0, 0])
    policy = Policy("leastconn")
    assert indexes(policy, backends, 6) == [0, 2, 3, 0, 2, 3]


def test_leastconn_concurrent_clients_fill_the_least_busy_first():
    backends = make(3, weight=[1, 2, 1])
    policy = Policy("leastconn")
    for _ in range(8):
        policy.choose(backends).active += 1    # relays stay open
    assert [b.active for b in backends] == [2, 4, 2]


def test_leastconn_turn_continues_after_the_last_chosen_when_it_leaves():
    backends = make(4)
    policy = Policy("leastconn")
    assert indexes(policy, backends, 2) == [0, 1]
    backends[1].state = "down"
    backends[2].state = "down"
    assert indexes(policy, backends, 3) == [3, 0, 3]


# -- roundrobin ----------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_roundrobin_equal_weights_spread_sequential_clients_exactly_evenly(count):
    backends = make(count)
    policy = Policy("roundrobin")
    picks = indexes(policy, backends, 10 * count)
    assert picks == list(range(count)) * 10


def test_roundrobin_weights_5_1_1_give_nginxs_smooth_sequence():
    backends = make(3, weight=[5, 1, 1])
    policy = Policy("roundrobin")
    names = "abc"
    sequence = "".join(names[i] for i in indexes(policy, backends, 14))
    assert sequence == "aabacaa" * 2
    # A full cycle brings every backend's scratch back to where it started.
    assert [b.rr_current for b in backends] == [0, 0, 0]


def test_roundrobin_shares_are_proportional_to_weights_over_every_cycle():
    backends = make(3, weight=[3, 2, 4])
    policy = Policy("roundrobin")
    counts = collections.Counter(indexes(policy, backends, 9 * 50))
    assert counts == {0: 150, 1: 100, 2: 200}


def test_roundrobin_ignores_load_figures():
    backends = make(2, entries=[0, 100], active=[0, 100], errors=[0, 9])
    assert indexes(Policy("roundrobin"), backends, 4) == [0, 1, 0, 1]


def test_roundrobin_goes_on_evenly_over_the_backends_left_when_one_goes_down():
    backends = make(3)
    policy = Policy("roundrobin")
    assert indexes(policy, backends, 3) == [0, 1, 2]
    backends[1].state = "down"
    counts = collections.Counter(indexes(policy, backends, 10))
    assert counts == {0: 5, 2: 5}


# -- source ----------------------------------------------------------------------------

def test_source_sends_the_same_client_to_the_same_backend_every_time():
    backends = make(5)
    policy = Policy("source")
    for client in clients(50):
        first = policy.choose(backends, client=client)
        assert all(policy.choose(backends, client=client) is first for _ in range(20))


def test_source_spreads_different_clients_over_all_backends():
    backends = make(5)
    policy = Policy("source")
    counts = collections.Counter(policy.choose(backends, client=c).index for c in clients(5000))
    assert set(counts) == set(range(5))
    assert all(800 <= n <= 1200 for n in counts.values()), counts


def test_source_ignores_load_and_table_order():
    backends = make(4)
    policy = Policy("source")
    before = [policy.choose(backends, client=c).name for c in clients(300)]
    for backend in backends:
        backend.entries, backend.active = random.Random(backend.index).randint(0, 99), 5
    after = [policy.choose(backends[::-1], client=c).name for c in clients(300)]
    assert before == after


def test_source_hashes_a_missing_client_address_as_the_empty_string():
    backends = make(6)
    policy = Policy("source")
    assert policy.choose(backends, client=None) is policy.choose(backends, client="")


def test_source_moves_only_the_clients_of_a_backend_that_goes_down_and_they_return():
    backends = make(5)
    policy = Policy("source")
    everyone = clients(1000)
    before = {c: policy.choose(backends, client=c).index for c in everyone}
    backends[2].state = "down"
    during = {c: policy.choose(backends, client=c).index for c in everyone}
    moved = {c for c in everyone if during[c] != before[c]}
    assert moved == {c for c in everyone if before[c] == 2}
    assert len(moved) > 100
    backends[2].state = "up"
    assert {c: policy.choose(backends, client=c).index for c in everyone} == before


def test_source_excluding_a_backend_moves_only_its_clients():
    backends = make(4)
    policy = Policy("source")
    everyone = clients(1000)
    before = {c: policy.choose(backends, client=c).index for c in everyone}
    during = {c: policy.choose(backends, exclude=[backends[0]], client=c).index for c in everyone}
    assert {c for c in everyone if during[c] != before[c]} == {c for c in everyone if before[c] == 0}


def test_source_share_of_clients_is_proportional_to_weight():
    weights = [1, 2, 3, 4]
    backends = make(4, weight=weights)
    policy = Policy("source")
    total = 20000
    counts = collections.Counter(policy.choose(backends, client=c).index for c in clients(total))
    for backend in backends:
        expected = total * backend.weight / sum(weights)
        assert abs(counts[backend.index] - expected) < 0.05 * expected, counts


_CHOICES_SCRIPT = """
import json, sys
from dataclasses import dataclass
from fastlb.policies import Policy

@dataclass(eq=False)
class B:
    name: str
    index: int
    weight: int
    state: str = "up"
    closed: bool = False
    backup: bool = False

backends = [B("10.0.0.%d:80" % (i + 1), i, 1 + i % 3) for i in range(7)]
policy = Policy("source")
clients = json.loads(sys.stdin.read())
print(json.dumps([policy.choose(backends, client=c).index for c in clients]))
"""


def test_source_choices_do_not_depend_on_pythonhashseed():
    everyone = clients(300) + [None, "", "2001:db8::1", "é"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    results = []
    for seed in ("0", "12345"):
        done = subprocess.run([sys.executable, "-c", _CHOICES_SCRIPT], input=json.dumps(everyone),
                              capture_output=True, text=True, timeout=60,
                              env=dict(env, PYTHONHASHSEED=seed))
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
    backends = [FakeBackend("10.0.0.%d:80" % (i + 1), i, weight=1 + i % 3) for i in range(7)]
    policy = Policy("source")
    here = [policy.choose(backends, client=c).index for c in everyone]
    assert results[0] == results[1] == here
    assert len(set(here)) == 7


# -- p2c -------------------------------------------------------------------------------

def test_p2c_never_picks_the_most_loaded_when_others_are_less_loaded():
    backends = make(3, entries=[1, 9, 4])
    policy = Policy("p2c", random.Random(8))
    counts = collections.Counter(indexes(policy, backends, 600))
    assert 1 not in counts
    # Backend 0 wins every pair it is in (2 of 3), backend 2 only the pair without 0.
    assert set(counts) == {0, 2} and counts[0] > counts[2]


@pytest.mark.parametrize("count", [2, 3, 5, 10])
def test_p2c_never_picks_the_single_most_loaded_of_n(count):
    backends = make(count, entries=list(range(count)), reports_load=True)
    policy = Policy("p2c", random.Random(count))
    assert count - 1 not in indexes(policy, backends, 50 * count)


def test_p2c_equal_loads_go_to_the_smaller_index_of_the_pair():
    backends = make(5)
    policy = Policy("p2c", random.Random(9))
    counts = collections.Counter(indexes(policy, backends, 5000))
    # The last backend is the larger index of every pair it is drawn in.
    assert set(counts) == {0, 1, 2, 3}
    assert counts[0] > counts[1] > counts[2] > counts[3]


def test_p2c_spreads_over_all_candidates_as_routed_connections_add_load():
    backends = make(5)
    policy = Policy("p2c", random.Random(10))
    for _ in range(1000):
        policy.choose(backends).entries += 1
    assert max(b.entries for b in backends) - min(b.entries for b in backends) <= 3


def test_p2c_compares_entries_per_weight_then_errors_when_both_report_load():
    policy = Policy("p2c", random.Random(11))
    # 4/2 < 3/1: the heavier backend is the less loaded, whatever the active counts.
    assert set(indexes(policy, make(2, entries=[3, 4], weight=[1, 2], active=[0, 9]), 20)) == {1}
    # Equal entries: fewer errors wins.
    assert set(indexes(policy, make(2, entries=5, errors=[2, 1]), 20)) == {1}
    # Equal everything: the smaller index.
    assert set(indexes(policy, make(2, entries=5, errors=1), 20)) == {0}


def test_p2c_compares_active_relays_per_weight_without_reported_load():
    policy = Policy("p2c", random.Random(12))
    backends = make(2, reports_load=False, entries=[0, 99], active=[3, 4], weight=[1, 2])
    assert set(indexes(policy, backends, 20)) == {1}    # 4/2 < 3/1
    backends = make(2, reports_load=[True, False], entries=[0, 99], active=[2, 1])
    assert set(indexes(policy, backends, 20)) == {1}    # only one reports load: active decides


def test_p2c_with_a_seeded_generator_repeats_its_choices():
    backends = make(6, entries=[3, 1, 4, 1, 5, 9])
    first = indexes(Policy("p2c", random.Random(13)), backends, 100)
    assert first == indexes(Policy("p2c", random.Random(13)), backends, 100)
