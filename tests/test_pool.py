"""Backend selection and the backend table (SPEC §3), without sockets."""

from __future__ import annotations

import threading

from fastlb.pool import DOWN, UP, Backend, BackendPool, choose_backend
from fastlb.settings import Address


def make_pool(count: int, requests: int = 5) -> BackendPool:
    return BackendPool([Address("127.0.0.1", 8000 + i, "127.0.0.1") for i in range(count)], requests)


def up(pool: BackendPool, *figures):
    """Apply a healthy probe to each backend in turn: figures are (errors, entries)."""
    for backend, result in zip(pool.backends, figures):
        assert pool.begin_probe(backend)
        pool.apply_probe(backend, result, "ok", 0.001)


def test_fewest_entries_wins():
    pool = make_pool(3)
    up(pool, (0, 9), (5, 2), (0, 4))
    assert pool.choose().index == 1


def test_ties_go_to_fewest_errors_then_command_line_order():
    pool = make_pool(3)
    up(pool, (3, 2), (1, 2), (1, 2))
    assert choose_backend(pool.backends).index == 1
    up(pool, (0, 2), (0, 2), (0, 2))
    assert choose_backend(pool.backends).index == 0


def test_unprobed_and_down_backends_are_never_chosen():
    pool = make_pool(3)
    assert pool.choose() is None
    up(pool, (0, 0))
    pool.mark_down(pool.backends[0], "connection refused")
    assert pool.choose() is None
    assert pool.no_backend == 2


def test_each_routed_connection_adds_one_entry_between_probes():
    pool = make_pool(2)
    up(pool, (0, 0), (0, 0))
    chosen = [pool.choose().index for _ in range(6)]
    assert chosen == [0, 1, 0, 1, 0, 1]


def test_probe_result_replaces_the_estimate_but_keeps_connections_routed_since_it_began():
    pool = make_pool(1)
    up(pool, (0, 0))
    backend = pool.backends[0]
    for _ in range(3):
        pool.choose()
    assert backend.entries == 3
    assert pool.begin_probe(backend)
    pool.choose()  # routed while the probe is in flight
    pool.apply_probe(backend, (0, 3), "ok", 0.001)
    assert backend.entries == 4


def test_exclude_skips_backends_already_tried():
    pool = make_pool(3)
    up(pool, (0, 0), (0, 1), (0, 2))
    first = pool.choose()
    pool.connect_failed(first, "connection refused")
    second = pool.choose(exclude=[first])
    assert (first.index, second.index) == (0, 1)
    assert first.state == DOWN and first.reason == "connection refused" and first.active == 0
    assert pool.choose(exclude=[first, second]).index == 2
    assert pool.choose(exclude=pool.backends) is None


def test_failed_probe_marks_down_and_a_healthy_one_brings_back():
    pool = make_pool(1)
    backend = pool.backends[0]
    up(pool, (0, 0))
    assert pool.begin_probe(backend)
    pool.apply_probe(backend, None, "status 404", 0.01)
    assert (backend.state, backend.reason) == (DOWN, "status 404")
    up(pool, (1, 7))
    assert (backend.state, backend.errors, backend.entries) == (UP, 1, 7)


def test_a_backend_is_not_probed_twice_at_once():
    pool = make_pool(1)
    backend = pool.backends[0]
    assert pool.begin_probe(backend)
    assert not pool.begin_probe(backend)
    pool.apply_probe(backend, (0, 0), "ok", 0.001)
    assert pool.begin_probe(backend)


def test_every_r_th_accept_triggers_a_round():
    pool = make_pool(1, requests=3)
    assert [pool.count_accept() for _ in range(7)] == [
        (False, 0), (False, 0), (True, 0), (False, 1), (False, 1), (True, 1), (False, 2)]


def test_a_ticket_is_ready_once_the_round_begun_after_its_trigger_is_applied():
    pool = make_pool(1, requests=1)
    woken = []
    pool.round_listeners.append(lambda: woken.append(1))
    _, first = pool.count_accept()
    assert first == 0 and pool.round_applied(first)      # no round asked before it
    _, second = pool.count_accept()
    # While the connection that asked for round 1 is open, the next one runs alongside it.
    assert second == 1 and pool.round_applied(second)
    pool.trigger_closed(1)
    assert not pool.round_applied(second)
    entry = pool.begin_round()
    assert not pool.round_applied(second)
    pool.finish_round(entry)
    assert pool.round_applied(second) and woken == [1]


def test_release_counts_bytes_and_status_classes():
    pool = make_pool(1)
    up(pool, (0, 0))
    backend = pool.choose()
    pool.release(backend, 10, 200, 404)
    snap = pool.snapshot()[0]
    assert (snap["active"], snap["bytes_up"], snap["bytes_down"]) == (0, 10, 200)
    assert snap["responses"]["4xx"] == 1 and snap["routed"] == 1


def test_concurrent_choices_keep_counts_exact():
    pool = make_pool(4)
    up(pool, (0, 0), (0, 0), (0, 0), (0, 0))

    def hammer():
        for _ in range(2500):
            pool.release(pool.choose(), 1, 1, 200)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    snap = pool.snapshot()
    assert sum(b["routed"] for b in snap) == 10000
    assert all(b["active"] == 0 for b in snap)
    # Load spread evenly: the +1 estimate keeps every backend within one of the others.
    assert max(b["routed"] for b in snap) - min(b["routed"] for b in snap) <= 1


def test_backend_repr_names_it():
    backend = Backend(Address("127.0.0.1", 8080, "127.0.0.1"), 0)
    assert "127.0.0.1:8080" in repr(backend)


def test_a_removed_backend_whose_last_connection_failed_to_connect_leaves_the_table():
    pool = make_pool(2)
    up(pool, (0, 0), (0, 5))
    first = pool.choose()
    assert first.index == 0
    pool.update([pool.backends[1].address], 5, 1, 1)
    assert first in pool.backends and first.removed
    pool.connect_failed(first, "connection refused")
    assert first not in pool.backends


def test_entries_never_go_negative_after_a_failed_connect():
    pool = make_pool(1)
    up(pool, (0, 0))
    backend = pool.choose()
    # A probe replaced the estimate while the connect was under way.
    assert pool.begin_probe(backend)
    pool.apply_probe(backend, (0, 0), "ok", 0.001)
    pool.connect_failed(backend, "connection refused")
    assert backend.entries == 0


def test_backends_without_checks_start_up_and_come_back_an_interval_after_going_down():
    from fastlb.settings import Check
    import dataclasses
    address = dataclasses.replace(Address("127.0.0.1", 8000, "127.0.0.1"), check=Check(kind="none"))
    pool = BackendPool([address], 5)
    backend = pool.backends[0]
    assert backend.state == UP and pool.choose() is backend
    pool.connect_failed(backend, "connection refused")
    assert backend.state == DOWN
    pool.retry_unchecked(60.0)
    assert backend.state == DOWN
    pool.retry_unchecked(0.0)
    assert backend.state == UP


def test_without_load_backends_no_accept_triggers_a_round():
    from fastlb.settings import Check
    import dataclasses
    address = dataclasses.replace(Address("127.0.0.1", 8000, "127.0.0.1"), check=Check(kind="http"))
    pool = BackendPool([address], 1)
    assert [pool.count_accept()[0] for _ in range(5)] == [False] * 5
