"""End to end with real servers nobody here wrote: uvicorn, gunicorn, redis-server, PostgreSQL,
nginx, HAProxy and ``websockets``, behind (or in front of) a real fastlb on both twins.

Each scenario asserts what a user of those servers would see through fastlb:
the redis and PostgreSQL benchmarks finish without an error, nginx and gunicorn
see the real client's address through the PROXY protocol, a killed server costs
only the requests it had in flight.  Clients bind to 127.0.0.2, 127.0.0.3, ...
to look like different hosts.  The servers come from ``tests/servers.py``; the
first tests check, without fastlb, the server behaviour the scenarios rely on.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import struct
import subprocess
import threading
import time

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from conftest import Proc, body_of, http_get, recv_all, status_of, wait_until
from servers import Server, Servers, http_get_from, require

HTTP_CHECK = ("--check", "http", "--check-path", "/health")
GET = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture
def servers(tmp_path):
    """Start real servers (``tests/servers.py``); each is stopped by its PID when the test ends."""
    made = Servers(tmp_path)
    yield made
    made.stop_all()


def wait_up(lb: Proc, *backends: Server) -> None:
    for backend in backends:
        lb.wait_for_log(r"backend 127\.0\.0\.1:%d is up" % backend.port)


def name_of(port: int, path: str = "/") -> bytes:
    response = http_get(port, path, timeout=5)
    assert status_of(response) == 200, response[:200]
    return body_of(response)


def answer_to(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send ``data`` from ``source`` and read until the server closes; a reset counts as closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        try:
            return recv_all(sock, timeout)
        except ConnectionResetError:
            return b""


def proxy_v2(command: int, source: str = "", destination: str = "") -> bytes:
    """A PROXY protocol v2 header: LOCAL (0) without addresses, or PROXY (1) over TCP/IPv4."""
    if command == 0:
        return PROXY_V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack(">H", 0)
    addresses = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack(">HH", 40000, 80)
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack(">H", len(addresses)) + addresses


# -- the servers themselves, without fastlb -------------------------------------------


def test_nginx_answers_the_proxy_header_address_and_takes_the_probe_headers(servers):
    nginx = servers.nginx_proxy()
    assert body_of(answer_to(nginx.port, b"PROXY TCP4 127.0.0.9 127.0.0.1 5000 80\r\n" + GET)) == b"127.0.0.9\n"
    assert body_of(answer_to(nginx.port, proxy_v2(1, "127.0.0.8", "127.0.0.1") + GET)) == b"127.0.0.8\n"
    # What fastlb's probes send with --send-proxy: a header without a client.
    for header in (b"PROXY UNKNOWN\r\n", proxy_v2(0)):
        response = answer_to(nginx.port, header + GET.replace(b"/ ", b"/health "))
        assert status_of(response) == 200 and body_of(response) == b"\n", (header, response)
    # Without a header nginx closes the connection and logs no request.
    logged = len(nginx.requests())
    assert answer_to(nginx.port, GET) == b""
    assert len(nginx.requests()) == logged == 4
    assert "broken header" in nginx.output()


def test_haproxy_passes_the_client_address_on_in_a_v2_header(servers):
    nginx = servers.nginx_proxy()
    haproxy = servers.haproxy(nginx.port, "send-proxy-v2")
    assert body_of(http_get_from("127.0.0.4", haproxy.port)) == b"127.0.0.4\n"


def test_gunicorn_takes_remote_addr_from_a_v1_header_and_refuses_proxy_unknown(servers):
    app = servers.gunicorn_proxy("v1")
    assert body_of(answer_to(app.port, b"PROXY TCP4 127.0.0.3 127.0.0.1 5000 80\r\n" + GET)) == b"127.0.0.3\n"
    # gunicorn wants six fields in a v1 line: the client-less header that an
    # HTTP probe would send is a 400, so gunicorn gets tcp checks below.
    assert status_of(answer_to(app.port, b"PROXY UNKNOWN\r\n" + GET)) == 400


def test_uvicorn_app_answers_its_name_and_the_health_status_it_was_given(servers):
    healthy, sick = servers.uvicorn("A", wait=False), servers.uvicorn("S", health_status=503, wait=False)
    for app in (healthy, sick):
        app.wait_ready()
    assert name_of(healthy.port) == name_of(healthy.port, "/who") == b"A"
    assert status_of(http_get(healthy.port, "/health", timeout=5)) == 200
    assert name_of(sick.port) == b"S"
    assert status_of(http_get(sick.port, "/health", timeout=5)) == 503


# -- HTTP apps under uvicorn ------------------------------------------------------------


def start_uvicorn_apps(servers, *names: str, health: dict | None = None) -> list:
    """Start one uvicorn app per name at once, then wait for all of them."""
    health = health or {}
    apps = [servers.uvicorn(name, health.get(name, 200), wait=False) for name in names]
    for app in apps:
        app.wait_ready()
    return apps


def test_http_check_sends_sequential_requests_to_all_three_uvicorn_apps(procs, servers):
    apps = start_uvicorn_apps(servers, "A", "B", "C")
    lb = procs.fastlb(*HTTP_CHECK, *(app.port for app in apps))
    wait_up(lb, *apps)
    # leastconn (the default with --check http) sees three idle apps before
    # each request; like HAProxy's it takes turns among equals.
    served = [name_of(lb.port) for _ in range(30)]
    assert set(served) == {b"A", b"B", b"C"}, served


def test_uvicorn_app_whose_health_answers_503_gets_no_traffic(procs, servers):
    a, b, sick = start_uvicorn_apps(servers, "A", "B", "S", health={"S": 503})
    lb = procs.fastlb(*HTTP_CHECK, a.port, b.port, sick.port)
    wait_up(lb, a, b)
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is down" % sick.port)
    served = [name_of(lb.port) for _ in range(30)]
    assert set(served) == {b"A", b"B"}, served
    # The probes reached it and heard 503; no request did.
    assert '"GET /health HTTP/1.1" 503' in sick.output()
    assert '"GET / HTTP/1.1"' not in sick.output()


def test_uvicorn_app_killed_under_load_fails_not_even_the_requests_in_flight(procs, servers):
    threads, per_thread = 8, 400
    apps = start_uvicorn_apps(servers, "A", "B", "C")
    victim = apps[1]
    lb = procs.fastlb(*HTTP_CHECK, *(app.port for app in apps))
    wait_up(lb, *apps)
    results: list = []  # (started, outcome): a name, or what went wrong
    stop = threading.Event()

    def client() -> None:
        for _ in range(per_thread):
            if stop.is_set():
                return
            started = time.monotonic()
            try:
                response = http_get(lb.port, "/", timeout=5)
                outcome = body_of(response) if status_of(response) == 200 else response[:60]
            except (OSError, AssertionError) as error:
                outcome = "%s: %s" % (type(error).__name__, str(error).splitlines()[0][:100] if str(error) else "")
            results.append((started, outcome))

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: len(results) >= 80, 20, message="80 requests before the kill")
        victim.kill()
        killed = time.monotonic()
        wait_until(lambda: sum(1 for started, _ in results if started > killed) >= 200
                   or not any(w.is_alive() for w in workers), 20, message="200 requests after the kill")
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)
    assert not any(worker.is_alive() for worker in workers)

    names = {b"A", b"B", b"C"}
    # Not even the requests in flight on the killed app fail: fastlb replays a
    # GET whose backend closed or reset before answering (--retry-on-empty).
    # uvicorn writes the head and the body of an answer separately, so a kill
    # between the two leaves a client with a 200 head and no body: bytes were
    # already relayed, nothing can replay that request (HAProxy neither).  At
    # most one request per client thread was in flight when B died.
    truncated = [(started, outcome) for started, outcome in results if outcome == b""]
    failed = [(started, outcome) for started, outcome in results if outcome not in names | {b""}]
    assert failed == [], failed
    assert len(truncated) <= threads, truncated
    assert all(abs(started - killed) < 5 for started, _ in truncated), (killed, truncated)
    before = [outcome for started, outcome in results if started < killed]
    after = [outcome for started, outcome in results if started > killed]
    assert b"B" in before
    assert len(after) >= 200 and set(after) == {b"A", b"C"}, collections.Counter(after)


# -- redis and PostgreSQL -----------------------------------------------------------------


def redis_calls(port: int) -> dict:
    """Calls per command as the redis-server on ``port`` counts them (``INFO commandstats``)."""
    done = subprocess.run([require("redis-cli", "redis-tools"), "-p", str(port), "info", "commandstats"],
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    return {name: int(calls) for name, calls in re.findall(r"cmdstat_(\w+):calls=(\d+)", done.stdout)}


def test_redis_benchmark_through_tcp_checks_on_two_redis_servers(procs, servers):
    first, second = servers.redis(), servers.redis()
    lb = procs.fastlb("--check", "tcp", "--check-send", r"PING\r\n", "--check-expect", "+PONG",
                      first.port, second.port)
    wait_up(lb, first, second)
    done = subprocess.run([require("redis-benchmark", "redis-tools"), "-h", "127.0.0.1", "-p", str(lb.port),
                           "-n", "20000", "-c", "8", "-t", "ping,set,get", "-q"],
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "error" not in output.lower(), output
    for test in ("PING_INLINE", "PING_MBULK", "SET", "GET"):
        assert re.search(r"\b%s: [\d.]+ requests per second" % test, output), output
    calls = [redis_calls(server.port) for server in (first, second)]
    # Both servers took part, and every SET and GET reached exactly one of them
    # (the probes send PING only).
    for command in ("set", "get"):
        assert all(counts.get(command, 0) > 0 for counts in calls), calls
        assert sum(counts.get(command, 0) for counts in calls) == 20000, calls


def test_redis_primary_only_check_sends_every_write_to_the_primary(procs, servers):
    # docs/recipes.md: a replica answers "role:slave" and fails the check, so
    # no write can meet its "-READONLY" refusal.  QUIT makes redis close after
    # answering, so the verdict comes at once instead of at the probe timeout.
    primary = servers.redis()
    replica = servers.redis(replica_of=primary.port)
    replica.wait_for_log("MASTER <-> REPLICA sync: Finished with success")
    lb = procs.fastlb("--check", "tcp", "--check-send", r"INFO replication\r\nQUIT\r\n",
                      "--check-expect", "role:master", replica.port, primary.port)
    wait_up(lb, primary)
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is down \(was unknown\): expected 'role:master'"
                    % replica.port)
    cli = require("redis-cli", "redis-tools")
    for i in range(10):
        done = subprocess.run([cli, "-p", str(lb.port), "set", "key%d" % i, "v"],
                              capture_output=True, text=True, timeout=10)
        assert done.stdout.strip() == "OK", done.stdout + done.stderr
    assert redis_calls(primary.port).get("set") == 10
    # The writes reached the replica only through replication.
    wait_until(lambda: subprocess.run([cli, "-p", str(replica.port), "get", "key9"], capture_output=True,
                                      text=True, timeout=10).stdout.strip() == "v", 10,
               message="the last write to be replicated")


def test_pgbench_through_a_tcp_check_has_no_failed_transaction(procs, servers):
    pg = servers.postgres()
    lb = procs.fastlb("--check", "tcp", pg.port)
    wait_up(lb, pg)
    done = subprocess.run([str(pg.bin / "pgbench"), "-h", "127.0.0.1", "-p", str(lb.port), "-U", pg.user,
                           "-c", "8", "-T", "5", pg.database], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    failed = re.search(r"number of failed transactions: (\d+)", output)
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    tps = re.search(r"tps = ([\d.]+)", output)
    assert failed and processed and tps, output
    assert int(failed.group(1)) == 0 and int(processed.group(1)) > 0 and float(tps.group(1)) > 0, output


# -- the PROXY protocol ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_behind_send_proxy_sees_the_client_address(procs, servers, version):
    nginx = servers.nginx_proxy()
    # The probes reach nginx too: their header carries no client, and nginx takes it.
    lb = procs.fastlb("--send-proxy", version, *HTTP_CHECK, nginx.port)
    wait_up(lb, nginx)
    for _ in range(3):
        response = http_get_from("127.0.0.2", lb.port)
        assert status_of(response) == 200 and body_of(response) == b"127.0.0.2\n", response


def test_gunicorn_behind_send_proxy_v1_sees_the_client_address_as_remote_addr(procs, servers):
    app = servers.gunicorn_proxy("v1")
    lb = procs.fastlb("--send-proxy", "v1", "--check", "tcp", app.port)
    wait_up(lb, app)
    for _ in range(3):
        response = http_get_from("127.0.0.3", lb.port)
        assert status_of(response) == 200 and body_of(response) == b"127.0.0.3\n", response


def test_client_address_travels_from_haproxy_through_fastlb_to_nginx(procs, servers):
    nginx = servers.nginx_proxy()
    lb = procs.fastlb("--accept-proxy", "--send-proxy", "v1", *HTTP_CHECK, nginx.port)
    wait_up(lb, nginx)
    haproxy = servers.haproxy(lb.port, "send-proxy-v2")
    for _ in range(3):
        response = http_get_from("127.0.0.4", haproxy.port)
        assert status_of(response) == 200 and body_of(response) == b"127.0.0.4\n", response

    # Straight to fastlb without a header: closed, and nothing reaches nginx.
    logged = len(nginx.requests())
    assert answer_to(lb.port, GET, source="127.0.0.5") == b""
    assert len(nginx.requests()) == logged
    assert body_of(http_get_from("127.0.0.4", haproxy.port)) == b"127.0.0.4\n"


# -- websockets ------------------------------------------------------------------------------


async def open_session(port: int, text: str):
    """A websocket session through ``port``; returns it and the name of the server that echoed ``text``."""
    session = await ws_connect("ws://127.0.0.1:%d/" % port, open_timeout=10, close_timeout=2,
                               ping_interval=None, proxy=None)
    return session, await echo(session, text)


async def echo(session, text: str) -> str:
    await asyncio.wait_for(session.send(text), 10)
    name, _, echoed = (await asyncio.wait_for(session.recv(), 10)).partition(":")
    assert echoed == text
    return name


def test_websocket_sessions_survive_the_death_of_another_echo_server(procs, servers):
    echoes = [servers.ws_echo(name, wait=False) for name in ("A", "B", "C")]
    for server in echoes:
        server.wait_ready(lambda s=server: "listening on" in s.output())
    victim = echoes[1]
    lb = procs.fastlb("--check", "tcp", *(server.port for server in echoes))
    wait_up(lb, *echoes)

    async def scenario() -> None:
        opened = await asyncio.gather(*(open_session(lb.port, "hello %d" % i) for i in range(100)))
        try:
            counts = collections.Counter(name for _, name in opened)
            assert set(counts) == {"A", "B", "C"}, counts
            victim.kill()
            # The killed server's sessions end; every other one still echoes, from the same server.
            for session, name in opened:
                if name == "B":
                    await asyncio.wait_for(session.wait_closed(), 10)
                    with pytest.raises(ConnectionClosed):
                        await asyncio.wait_for(session.recv(), 10)
            for i, (session, name) in enumerate(opened):
                if name != "B":
                    assert await echo(session, "again %d" % i) == name
            fresh = await asyncio.gather(*(open_session(lb.port, "new %d" % i) for i in range(20)))
            opened.extend(fresh)
            assert {name for _, name in fresh} <= {"A", "C"}, [name for _, name in fresh]
        finally:
            await asyncio.gather(*(session.close() for session, _ in opened), return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 90))


# -- balancing by source address -------------------------------------------------------------


def test_source_balancing_keeps_each_client_address_on_its_backend_until_that_one_dies(procs, servers):
    apps = start_uvicorn_apps(servers, "A", "B", "C")
    lb = procs.fastlb("--balance", "source", "--interval", 0.5, *HTTP_CHECK, *(app.port for app in apps))
    wait_up(lb, *apps)
    clients = ["127.0.0.%d" % i for i in range(2, 10)]

    def who_from(address: str) -> bytes:
        response = http_get_from(address, lb.port, "/who", timeout=5)
        assert status_of(response) == 200, (address, response[:200])
        return body_of(response)

    first = {address: who_from(address) for address in clients}
    for _ in range(3):
        assert {address: who_from(address) for address in clients} == first
    assert len(set(first.values())) >= 2, first
    victim_name = collections.Counter(first.values()).most_common(1)[0][0]
    victim = apps[[b"A", b"B", b"C"].index(victim_name)]
    victim.kill()
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is down" % victim.port)

    for address in clients:
        again = [who_from(address) for _ in range(3)]
        if first[address] != victim_name:
            assert again == [first[address]] * 3, (address, first, again)
        else:  # moved, to one survivor, and stays there
            assert again[0] != victim_name and again == [again[0]] * 3, (address, first, again)
