"""How the accept loop hands clients to the -N engines: filled one after another, not spread."""

from __future__ import annotations

import socket
import threading

from conftest import free_port, wait_until
from faults import FaultServer


def test_engines_are_filled_one_after_another_then_the_least_busy_takes_the_next(engine_impl, monkeypatch):
    # A few connections spread over four engines wake four threads where one
    # would do (docs/benchmarks.md, "Engine fill"): the first engine takes
    # ENGINE_FILL of them before the second gets any.
    from fastlb import balancer as balancer_module
    from fastlb.cli import parse_config

    fill = balancer_module.ENGINE_FILL
    backend = FaultServer()
    monkeypatch.setattr(balancer_module.bridge, "Engine", engine_impl.Engine)
    monkeypatch.setattr(balancer_module.bridge, "accept_batch", engine_impl.accept_batch)
    config = parse_config(["--bind", "127.0.0.1", "-N", "4", "--interval", "60", "-R", "1000",
                           str(free_port()), str(backend.port)])
    lb = balancer_module.Balancer(config)
    lb.bind()
    runner = threading.Thread(target=lb.run, daemon=True)
    runner.start()
    clients: list[socket.socket] = []

    def hold(count: int) -> None:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", lb.port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\n")  # an unfinished request: the relay stays open
            clients.append(sock)

    def active() -> list[int]:
        return [engine.active for engine in lb.engines]

    try:
        hold(3)
        wait_until(lambda: sum(active()) == 3, 10, message="three relays")
        assert active() == [3, 0, 0, 0]
        hold(fill)
        wait_until(lambda: sum(active()) == fill + 3, 10, message="more relays")
        assert active() == [fill, 3, 0, 0]
        hold(2 * fill - 3)
        wait_until(lambda: sum(active()) == 3 * fill, 10, message="three engines full")
        assert active() == [fill, fill, fill, 0]
        hold(fill + 1)
        wait_until(lambda: sum(active()) == 4 * fill + 1, 10, message="all four full")
        assert sorted(active()) == [fill, fill, fill, fill + 1]  # then the least busy
    finally:
        for sock in clients:
            sock.close()
        lb.stop()
        runner.join(15)
        lb.close()
        backend.stop()
    assert not runner.is_alive()
