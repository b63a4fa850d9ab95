"""Backends as a user configures them, end to end: backups, per-backend checks, policies, errors.

Real fastlb processes (both twins, through ``procs``) in front of real
backends: ``fastlb-backend`` processes that serve different ``/who`` content,
and FaultServers that count the probes and requests they get.  Config files
are written to the test's directory.  Every wait polls until a deadline.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Proc, body_of, free_port, http_get, recv_all, status_of, wait_until
from faults import FaultServer, refused_port

V1_HEADER = b"PROXY TCP4 10.1.2.3 10.9.8.7 5555 80\r\n"


# -- helpers -----------------------------------------------------------------------


def make_dir(tmp_path: Path, name: str, files: dict) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    for filename, content in files.items():
        (directory / filename).write_bytes(content)
    return directory


def who(port: int) -> bytes:
    """GET /who through ``port``: the content tells which backend served it."""
    response = http_get(port, "/who")
    assert status_of(response) == 200, response[:200]
    return body_of(response)


def entries(port: int) -> int:
    """Requests the fastlb-backend on ``port`` has answered, as it reports them itself."""
    return int(body_of(http_get(port, "/healthcheck", timeout=5)).split()[1])


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    return path


def is_up(port: int) -> str:
    return r"backend 127\.0\.0\.1:%d is up" % port


def admin_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stats(port: int) -> dict:
    return json.loads(admin_get(port, "/stats.json")[1])


def rows(admin: int) -> dict:
    """stats.json's backend rows by port."""
    return {int(row["backend"].rsplit(":", 1)[1]): row for row in stats(admin)["backends"]}


def probe_connections(server: FaultServer) -> int:
    """Connections to ``server`` that were not requests: probes, whatever their kind."""
    with server._lock:
        return server.accepted - len(server.request_log)


@pytest.fixture
def backend_on(tmp_path):
    """Start a fastlb-backend on a given port (to bring a killed one back); killed at the end."""
    started: list[Proc] = []

    def start(directory: Path, port: int) -> Proc:
        proc = Proc([sys.executable, "-m", "fastlb.backend", str(port), "--dir", str(directory)],
                    tmp_path, "backend-again")
        started.append(proc)
        proc.wait_for_log(r"listening on [^:\s]+:%d" % port)
        proc.port = port
        return proc

    yield start
    for proc in started:
        proc.stop()


# -- backup backends ---------------------------------------------------------------


def test_backup_takes_traffic_only_while_the_primary_is_down(procs, backend_on, tmp_path):
    a_dir = make_dir(tmp_path, "a", {"who": b"A"})
    a, b = procs.backend(a_dir), procs.backend(make_dir(tmp_path, "b", {"who": b"B"}))
    config = write_config(tmp_path, 'backends = ["127.0.0.1:%d", {address = "127.0.0.1:%d", backup = true}]\n'
                          % (a.port, b.port))
    lb = procs.fastlb("--config", config, "--interval", "0.3")
    lb.wait_for_log(is_up(a.port))
    lb.wait_for_log(is_up(b.port))
    assert [who(lb.port) for _ in range(6)] == [b"A"] * 6
    assert entries(b.port) == 0, "the backup got traffic while the primary was up"

    a.stop()
    # The first client after the kill finds A refusing and is served by B.
    assert [who(lb.port) for _ in range(6)] == [b"B"] * 6
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is down \(was up\): connection refused" % a.port)

    back = backend_on(a_dir, a.port)
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is up \(was down\)" % a.port, timeout=10)
    assert [who(lb.port) for _ in range(6)] == [b"A"] * 6
    assert entries(back.port) == 6 and entries(b.port) == 6


# -- per-backend checks ------------------------------------------------------------


def test_each_backend_is_judged_by_its_own_check(procs, tmp_path):
    # X has no /health page but takes TCP connections: fine under its tcp check.
    # Y and Z follow the global http check of /health: Y has the page, Z not.
    x = procs.backend(make_dir(tmp_path, "x", {"who": b"X"}))
    y = procs.backend(make_dir(tmp_path, "y", {"who": b"Y", "health": b"ok\n"}))
    z = procs.backend(make_dir(tmp_path, "z", {"who": b"Z"}))
    admin = free_port()
    config = write_config(tmp_path, (
        'check = "http"\ncheck-path = "/health"\nadmin = "127.0.0.1:%d"\n'
        'backends = [{address = "127.0.0.1:%d", check = "tcp"}, "127.0.0.1:%d", "127.0.0.1:%d"]\n'
        % (admin, x.port, y.port, z.port)))
    lb = procs.fastlb("--config", config)
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is up \(was unknown\): ok \(connected\)" % x.port)
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is up \(was unknown\): ok \(status 200\)" % y.port)
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is down \(was unknown\): status 404" % z.port)
    served = [who(lb.port) for _ in range(6)]
    assert sorted(set(served)) == [b"X", b"Y"], served
    table = rows(admin)
    assert {port: (row["check"], row["state"]) for port, row in table.items()} == \
        {x.port: ("tcp", "up"), y.port: ("http", "up"), z.port: ("http", "down")}


def test_check_none_backend_refusing_is_down_at_once_and_retried_after_the_interval(procs, faults):
    late_port = refused_port()
    good = faults(body=b"good\n")
    admin = free_port()
    lb = procs.fastlb("--check", "none", "--interval", "1", "--admin", admin, late_port, good.port)
    assert {row["state"] for row in rows(admin).values()} == {"up"}  # up without any probe
    # The first client is routed to the refusing backend first and served by the other.
    assert http_get(lb.port, "/").endswith(b"good\n")
    refused_at = time.monotonic()
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is down \(was up\): connection refused" % late_port)
    assert rows(admin)[late_port]["state"] == "down"
    assert http_get(lb.port, "/").endswith(b"good\n")

    late = faults(body=b"late\n", port=late_port)
    lb.wait_for_log(r"backend 127\.0\.0\.1:%d is up \(was down\): no health check: "
                    r"trying it again after 1s" % late_port, timeout=5)
    # Not before the interval, and at the first timed round after it.
    assert 0.9 <= time.monotonic() - refused_at < 4.0
    answers = [http_get(lb.port, "/") for _ in range(4)]
    # Back in the rotation: leastconn takes turns among equals, but a client
    # sees its answer end before fastlb has counted that relay closed, so the
    # next one may find the backends unequal; both serve, not exactly 2 each.
    assert 1 <= sum(a.endswith(b"late\n") for a in answers) <= 3, answers
    # No probe ever reached either backend: every connection was a request.
    for server in (late, good):
        assert probe_connections(server) == 0 and server.probes == 0


@pytest.mark.parametrize("kind", ["http", "tcp"])
def test_http_and_tcp_checks_probe_on_the_interval_not_per_connection(procs, faults, kind):
    server = faults()
    interval = 1.5
    lb = procs.fastlb("--check", kind, "-R", "1", "--interval", interval, server.port)
    lb.wait_for_log(is_up(server.port))
    before, started = probe_connections(server), time.monotonic()
    for _ in range(20):
        assert status_of(http_get(lb.port, "/")) == 200
    elapsed = time.monotonic() - started
    during = probe_connections(server) - before
    # Only the timed rounds that fell in the window, not one per connection.
    assert during <= elapsed / interval + 1, (during, elapsed)
    assert server.requests == 20
    # The timed rounds do go on.
    after = probe_connections(server)
    wait_until(lambda: probe_connections(server) > after, interval + 3, message="a timed probe")


def test_load_check_with_r_1_probes_once_per_connection(procs, faults):
    # Each request takes a moment at the backend, so the probe its connection
    # asked for is over before the next one is accepted: a round finding the
    # previous probe still running would skip the backend (SPEC 2).
    server = faults(request="delay", delay=0.25)
    lb = procs.fastlb("--check", "load", "-R", "1", "--interval", "60", server.port)
    # The start-up round, and the one asked for by conftest's connect to see the port.
    wait_until(lambda: server.probes >= 2, 5, message="the first two probes")
    before = server.probes
    for _ in range(10):
        assert status_of(http_get(lb.port, "/")) == 200
    # No timed round falls in the window (--interval 60).
    wait_until(lambda: server.probes >= before + 10, 5, message="a probe per connection")
    assert server.probes == before + 10


def test_count_triggered_rounds_probe_only_the_load_backends_of_a_mixed_table(procs, faults, tmp_path):
    reporting, plain = faults(request="delay", delay=0.25), faults(request="delay", delay=0.25)
    config = write_config(tmp_path, 'backends = ["127.0.0.1:%d", {address = "127.0.0.1:%d", check = "http"}]\n'
                          % (reporting.port, plain.port))
    lb = procs.fastlb("--config", config, "-R", "1", "--interval", "60")
    wait_until(lambda: reporting.probes >= 2, 5, message="the first two probes of the load backend")
    before = reporting.probes
    for _ in range(10):
        assert status_of(http_get(lb.port, "/")) == 200
    assert reporting.requests + plain.requests == 10 and plain.requests > 0
    wait_until(lambda: reporting.probes >= before + 10, 5, message="a load probe per connection")
    assert reporting.probes == before + 10
    # The http backend had its start-up probe and nothing since.
    assert plain.probes == 1


# -- the admin endpoint and the access log -------------------------------------------------


def test_admin_endpoint_and_access_log_show_checks_backups_and_bad_proxy_headers(
        procs, faults, tmp_path):
    main, spare = faults(body=b"main\n"), faults(body=b"spare\n")
    admin, access_log = free_port(), tmp_path / "access.log"
    config = write_config(tmp_path, (
        'check = "http"\naccept-proxy = true\nadmin = "127.0.0.1:%d"\naccess-log = "%s"\n'
        'backends = ["127.0.0.1:%d", {address = "127.0.0.1:%d", backup = true, check = "tcp"}]\n'
        % (admin, access_log, main.port, spare.port)))
    lb = procs.fastlb("--config", config)
    lb.wait_for_log(is_up(main.port))
    lb.wait_for_log(is_up(spare.port))

    with socket.create_connection(("127.0.0.1", lb.port), timeout=10,
                                  source_address=("127.0.0.2", 0)) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")  # no PROXY header
        try:
            assert recv_all(client, 10) == b""
        except ConnectionResetError:
            pass
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10,
                                  source_address=("127.0.0.3", 0)) as client:
        client.sendall(V1_HEADER + b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        assert recv_all(client, 10).endswith(b"main\n")

    data = wait_until(lambda: (d := stats(admin))["bad_proxy_header"] == 1
                      and d["totals"]["routed"] == 1 and d["totals"]["active"] == 0 and d,
                      10, message="the bad header and the relay in stats.json")
    table = {int(row["backend"].rsplit(":", 1)[1]): row for row in data["backends"]}
    assert (table[main.port]["check"], table[main.port]["backup"]) == ("http", False)
    assert (table[spare.port]["check"], table[spare.port]["backup"]) == ("tcp", True)
    assert table[main.port]["routed"] == 1 and table[spare.port]["routed"] == 0

    status, body = admin_get(admin, "/metrics")
    assert status == 200
    text = body.decode()
    assert 'fastlb_backend_check_info{backend="127.0.0.1:%d",check="http",backup="false"} 1' \
        % main.port in text.splitlines()
    assert 'fastlb_backend_check_info{backend="127.0.0.1:%d",check="tcp",backup="true"} 1' \
        % spare.port in text.splitlines()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["fastlb_bad_proxy_header"].samples[0].value == 1

    status, page = admin_get(admin, "/")
    assert status == 200
    page_text = page.decode()
    assert "<th rowspan=\"2\">check</th>" in page_text
    assert "<td class='check'>http</td>" in page_text and "<td class='check'>tcp</td>" in page_text
    assert "1 closed for a missing or bad PROXY header" in page_text

    lines = wait_until(lambda: len(access_log.read_text().splitlines()) >= 2
                       and access_log.read_text().splitlines(), 10, message="two access-log lines")
    bad = [line for line in lines if "end=bad_proxy_header" in line]
    assert len(bad) == 1 and "client=127.0.0.2:" in bad[0] and "backend=-" in bad[0]
    served = [line for line in lines if "end=done" in line]
    assert len(served) == 1, lines
    assert "client=10.1.2.3:5555" in served[0] and "backend=127.0.0.1:%d" % main.port in served[0]


# -- policies ------------------------------------------------------------------------------


def test_roundrobin_with_weights_2_and_1_serves_sequential_requests_exactly_2_to_1(procs, tmp_path):
    a = procs.backend(make_dir(tmp_path, "a", {"who": b"A"}))
    b = procs.backend(make_dir(tmp_path, "b", {"who": b"B"}))
    config = write_config(tmp_path, (
        'balance = "roundrobin"\nbackends = [{address = "127.0.0.1:%d", weight = 2}, '
        '{address = "127.0.0.1:%d", weight = 1}]\n' % (a.port, b.port)))
    lb = procs.fastlb("--config", config)
    lb.wait_for_log(is_up(a.port))
    lb.wait_for_log(is_up(b.port))
    served = [who(lb.port) for _ in range(12)]
    # Every cycle of three has two A and one B, whatever the backends report.
    for cycle in range(4):
        assert sorted(served[3 * cycle:3 * cycle + 3]) == [b"A", b"A", b"B"], served
    assert (entries(a.port), entries(b.port)) == (8, 4)


# -- configuration errors ------------------------------------------------------------------


BACKEND = '{address = "127.0.0.1:8001", %s}'


@pytest.mark.parametrize(
    "table, message",
    [
        ('chek = "tcp"', "fastlb.toml:3: key 'backends': backend 127.0.0.1:8001: unknown key 'chek'"),
        ('check = "htp"', "fastlb.toml:3: key 'backends': backend 127.0.0.1:8001: check: "
                          "check kind must be load, http, tcp or none (got 'htp')"),
        ('check = "tcp", check_send = \'PING\\q\'',
         "fastlb.toml:3: key 'backends': backend 127.0.0.1:8001: check_send: unknown escape"),
        ('check = "http", check_send = "PING"', "fastlb.toml:3: key 'backends': backend 127.0.0.1:8001: "
                                                "--check-send needs --check tcp (the check is http)"),
        ('check_expect = "PONG"', "fastlb.toml:3: key 'backends': backend 127.0.0.1:8001: "
                                  "--check-expect needs --check tcp or http (the check is load)"),
        ('backup = "yes"', "fastlb.toml:3: key 'backends': backup must be true or false (got 'yes')"),
        ('send_proxy = "v3"', "fastlb.toml:3: key 'backends': backend 127.0.0.1:8001: send_proxy: "
                              "PROXY protocol version must be v1 or v2 (got 'v3')"),
        ('check_status = "200-700"', "fastlb.toml:3: key 'backends': backend 127.0.0.1:8001: "
                                     "check_status: status range '200-700' is not within 100-599"),
        ('weight = 2.5', "fastlb.toml:3: key 'backends': weight must be a whole number"),
    ],
)
def test_backend_table_errors_are_one_line_naming_file_line_and_key(procs, tmp_path, table, message):
    config = write_config(tmp_path, 'listen = 8000\n# the backends\nbackends = ["8002", %s]\n'
                          % (BACKEND % table))
    result = procs.run("--config", config)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fastlb: error: ") and message in last, result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--check-status", "600"], "argument --check-status: status range '600' is not within 100-599"),
        (["--check", "http", "--check-status", "2xx"], "argument --check-status: status ranges are"),
        (["--balance", "fastest"], "argument --balance: balance policy must be least-loaded, "
                                   "leastconn, roundrobin, source or p2c (got 'fastest')"),
        (["--check-send", "x"], "--check-send needs --check tcp (the check is load)"),
        (["--check", "http", "--check-send", "x"], "--check-send needs --check tcp (the check is http)"),
        (["--check", "none", "--check-expect", "x"], "--check-expect needs --check tcp or http"),
        (["--check", "htp"], "argument --check: check kind must be load, http, tcp or none"),
        (["--send-proxy", "v3"], "argument --send-proxy: PROXY protocol version must be v1 or v2"),
        (["--check-port", "70000"], "argument --check-port: port out of range 1..65535: 70000"),
    ],
)
def test_bad_check_and_balance_options_exit_2_with_one_line_reason(procs, argv, message):
    result = procs.run(*argv, "8000", "8001")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fastlb: error: ") and message in last, result.stderr
