"""No thread dies of one bad moment (issue 11 items 2 and 8): a raising router costs one
connection, and an engine whose loop dies anyway is replaced instead of becoming a black hole."""

from __future__ import annotations

import os
import threading


from conftest import free_port, http_get, status_of, wait_until
from faults import FaultServer
from test_engine import Router, echo, harness  # noqa: F401  (fixtures)


class Grumpy(Router):
    """A router whose choose raises on its first call and whose finished always raises."""

    def __init__(self, *ports):
        super().__init__(*ports)
        self.calls = 0

    def choose(self, tried, ticket, addr=None, source=None):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug hit by one odd connection")
        return super().choose(tried, ticket, addr, source)

    def finished(self, *args):
        super().finished(*args)
        raise RuntimeError("a bug in the report")


def test_a_router_that_raises_costs_one_connection_never_the_engine(harness, echo):
    router = Grumpy(echo.port)
    h = harness(router)
    with h.connect() as client:
        client.sendall(b"first\n")
        client.settimeout(10)
        answer = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 500")
    for i in range(3):
        with h.connect() as client:
            client.sendall(b"ping %d\n" % i)
            assert client.recv(100) == b"ping %d\n" % i
    assert h.threads[0].is_alive()


def _eventpoll_fds() -> set:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + name) == "anon_inode:[eventpoll]":
                found.add(int(name))
        except OSError:
            pass
    return found


def test_an_engine_whose_loop_dies_is_replaced_and_clients_are_still_served(engine_impl, monkeypatch):
    from fastlb import balancer as balancer_module
    from fastlb.cli import parse_config

    backend = FaultServer()
    monkeypatch.setattr(balancer_module.bridge, "Engine", engine_impl.Engine)
    monkeypatch.setattr(balancer_module.bridge, "accept_batch", engine_impl.accept_batch)
    config = parse_config(["--bind", "127.0.0.1", "-N", "1", "--interval", "60", str(free_port()),
                           str(backend.port)])
    before = _eventpoll_fds()
    lb = balancer_module.Balancer(config)
    lb.bind()
    runner = threading.Thread(target=lb.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: status_of(http_get(lb.port, "/", timeout=5)) == 200, 10,
                   message="the balancer to serve")
        dead = lb.engines[0]
        # The engine's epoll descriptor, closed under it: its next wait fails.
        engine_fds = _eventpoll_fds() - before - {lb.health._selector.fileno()}
        assert len(engine_fds) == 1, engine_fds
        os.close(engine_fds.pop())
        dead.wake()
        wait_until(lambda: lb.engines[0] is not dead, 10, message="the dead engine to be replaced")
        assert lb.internal_errors.count >= 1
        for _ in range(3):
            assert status_of(http_get(lb.port, "/", timeout=5)) == 200
    finally:
        lb.stop()
        runner.join(15)
        lb.close()
        backend.stop()
    assert not runner.is_alive()
