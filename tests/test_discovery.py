"""Backends found through DNS (issue 14): a real DNS server (dnsmasq) started by the tests, its
records rewritten while a real fastlb runs, backends on 127.0.0.2, 127.0.0.3, ... as pods would be.
"""

from __future__ import annotations

import socket

import pytest

from conftest import body_of, http_get, status_of, wait_until
from dnsserver import DnsServer
from fastlb.backend import FileServer
from fastlb.discovery import Discovery, Unanswered
from fastlb.settings import parse_resolvers


@pytest.fixture
def dns(tmp_path):
    server = DnsServer(tmp_path / "dns")
    yield server
    server.stop()


@pytest.fixture
def pods(tmp_path):
    """``make(ip, name, port=0)``: a fastlb-backend (in-process) on ``ip`` whose /who says ``name``."""
    made = []

    def make(ip: str, name: str, port: int = 0) -> FileServer:
        directory = tmp_path / ("pod-" + name)
        directory.mkdir()
        (directory / "who").write_bytes(name.encode())
        server = FileServer(str(directory), port=port, host=ip).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def free_port_on(*ips: str) -> int:
    """A port free on every one of these addresses: pods of one service share their port."""
    while True:
        with socket.socket() as sock:
            sock.bind((ips[0], 0))
            port = sock.getsockname()[1]
        try:
            for ip in ips:
                with socket.socket() as sock:
                    sock.bind((ip, port))
            return port
        except OSError:
            continue


def who(port: int, path: str = "/who") -> bytes:
    response = http_get(port, path, timeout=5)
    assert status_of(response) == 200, response[:200]
    return body_of(response)


# -- lookups, without fastlb ---------------------------------------------------------------


def test_a_name_is_one_backend_per_address_and_an_unknown_name_has_none(dns):
    dns.set_hosts({"web.test": ["127.0.0.2", "127.0.0.3"]})
    discovery = Discovery(parse_resolvers(dns.address))
    from fastlb.settings import backend

    spec = backend("web.test:8080")
    found = wait_until(lambda: discovery.expand([spec]) if len(discovery.expand([spec])) == 2 else None,
                       5, message="both addresses")
    assert [b.name for b in found] == ["web.test:8080@127.0.0.2", "web.test:8080@127.0.0.3"]
    assert discovery.expand([backend("nope.test:80")]) == []


def test_a_dns_server_that_does_not_answer_is_not_an_empty_answer(dns):
    from fastlb.settings import backend

    dns.set_hosts({"web.test": ["127.0.0.2"]})
    discovery = Discovery(parse_resolvers(dns.address))
    spec = backend("web.test:8080")
    wait_until(lambda: len(discovery.expand([spec])) == 1, 5, message="the address")
    dns.stop()
    with pytest.raises(Unanswered):
        discovery.addresses("web.test", 8080)
    # The last known backends are kept.
    assert [b.ip for b in discovery.expand([spec])] == ["127.0.0.2"]


# -- through fastlb ------------------------------------------------------------------------


def test_scale_up_a_new_address_gets_traffic_after_its_probe(procs, dns, pods):
    port = free_port_on("127.0.0.2", "127.0.0.3")
    pods("127.0.0.2", "A", port)
    dns.set_hosts({"web.test": ["127.0.0.2"]})
    lb = procs.fastlb("--resolvers", dns.address, "--resolve-interval", 0.3, "-R", 1000,
                      "web.test:%d" % port)
    assert {who(lb.port) for _ in range(4)} == {b"A"}
    pods("127.0.0.3", "B", port)
    dns.set_hosts({"web.test": ["127.0.0.2", "127.0.0.3"]})
    lb.wait_for_log(r"DNS: 2 backend\(s\), 1 new")
    lb.wait_for_log(r"backend web\.test:%d@127\.0\.0\.3 is up" % port)
    assert wait_until(lambda: b"B" in {who(lb.port) for _ in range(6)}, 10,
                      message="the new pod to get traffic")


def test_scale_down_no_new_traffic_and_the_relays_in_flight_finish(procs, dns, pods):
    port = free_port_on("127.0.0.2", "127.0.0.3")
    pods("127.0.0.2", "A", port)
    pods("127.0.0.3", "B", port)
    dns.set_hosts({"web.test": ["127.0.0.2", "127.0.0.3"]})
    lb = procs.fastlb("--resolvers", dns.address, "--resolve-interval", 0.3, "-R", 1000,
                      "web.test:%d" % port)
    lb.wait_for_log(r"@127\.0\.0\.3 is up")
    # A kept-alive connection held open on A, across A's removal.
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as held:
        request = b"GET /who HTTP/1.1\r\nHost: test\r\n\r\n"
        held.sendall(request)
        gone = held.recv(4096).rsplit(b"\r\n\r\n", 1)[1]     # the pod this relay is on
        dns.set_hosts({"web.test": ["127.0.0.3" if gone == b"A" else "127.0.0.2"]})
        lb.wait_for_log(r"DNS: 1 backend\(s\), 0 new")
        # New clients never reach the vanished address...
        assert {who(lb.port) for _ in range(6)} == {b"A", b"B"} - {gone}
        # ... while the relay already on it goes on.
        held.sendall(request)
        assert held.recv(4096).endswith(gone)


def test_srv_records_give_ports_and_weights(procs, dns, pods):
    a, b = pods("127.0.0.2", "A"), pods("127.0.0.3", "B")
    dns.set_hosts({"a.test": ["127.0.0.2"], "b.test": ["127.0.0.3"]})
    dns.set_srv([("_http._tcp.web.test", "a.test", a.port, 0, 3),
                 ("_http._tcp.web.test", "b.test", b.port, 0, 1)])
    lb = procs.fastlb("--resolvers", dns.address, "--balance", "roundrobin", "-R", 1000,
                      "srv:_http._tcp.web.test")
    lb.wait_for_log(r"backend a\.test:%d@127\.0\.0\.2 is up" % a.port)
    lb.wait_for_log(r"backend b\.test:%d@127\.0\.0\.3 is up" % b.port)
    served = [who(lb.port) for _ in range(8)]
    assert served.count(b"A") == 6 and served.count(b"B") == 2, served


def test_dns_server_down_the_last_known_backends_keep_serving(procs, dns, pods):
    port = free_port_on("127.0.0.2")
    pods("127.0.0.2", "A", port)
    dns.set_hosts({"web.test": ["127.0.0.2"]})
    lb = procs.fastlb("--resolvers", dns.address, "--resolve-interval", 0.3, "web.test:%d" % port)
    assert who(lb.port) == b"A"
    dns.stop()
    lb.wait_for_log(r"keeping 1 known backend\(s\) of web\.test:%d" % port, timeout=20)
    assert [who(lb.port) for _ in range(3)] == [b"A"] * 3


def test_a_name_that_does_not_resolve_yet_answers_500_until_it_does(procs, dns, pods):
    port = free_port_on("127.0.0.2")
    lb = procs.fastlb("--resolvers", dns.address, "--resolve-interval", 0.3, "web.test:%d" % port)
    lb.wait_for_log(r"web\.test:%d has no address \(yet\)" % port)
    assert status_of(http_get(lb.port, "/who", timeout=5)) == 500
    pods("127.0.0.2", "A", port)
    dns.set_hosts({"web.test": ["127.0.0.2"]})
    lb.wait_for_log(r"backend web\.test:%d@127\.0\.0\.2 is up" % port)
    assert who(lb.port) == b"A"
