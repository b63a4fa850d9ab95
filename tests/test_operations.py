"""Operations end to end: admin endpoint, metrics, access log, config file, reload, rise/fall."""

from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, http_get, port_accepts, status_of, wait_until
from faults import OK, STATUS_404, refused_port


def admin_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stats(port: int) -> dict:
    return json.loads(admin_get(port, "/stats.json")[1])


def state_of(admin_port: int, backend_port: int) -> str:
    for row in stats(admin_port)["backends"]:
        if row["backend"].endswith(":%d" % backend_port):
            return row["state"]
    return "absent"


def test_stats_json_and_page_show_every_backend_with_its_state(procs, faults):
    good, dead = faults(body=b"good\n"), refused_port()
    admin = free_port()
    lb = procs.fastlb(good.port, dead, "--admin", admin)
    for _ in range(5):
        assert status_of(http_get(lb.port, "/")) == 200
    data = wait_until(lambda: (d := stats(admin))["totals"]["routed"] == 5
                      and d["totals"]["active"] == 0 and d, 10,
                      message="5 finished connections in stats.json")
    rows = {row["backend"]: row for row in data["backends"]}
    assert rows["127.0.0.1:%d" % good.port]["state"] == "up"
    assert rows["127.0.0.1:%d" % good.port]["routed"] == 5
    assert rows["127.0.0.1:%d" % good.port]["responses"]["2xx"] == 5
    assert rows["127.0.0.1:%d" % good.port]["bytes_down"] > 0
    assert rows["127.0.0.1:%d" % dead]["state"] == "down"
    assert rows["127.0.0.1:%d" % dead]["reason"] == "connection refused"
    assert data["state"] == "running" and data["accepted"] >= 5

    status, page = admin_get(admin, "/")
    assert status == 200
    text = page.decode()
    assert "127.0.0.1:%d" % good.port in text and "127.0.0.1:%d" % dead in text
    assert 'http-equiv="refresh"' in text
    assert admin_get(admin, "/nope")[0] == 404


def test_metrics_are_valid_prometheus_text_with_per_backend_counters(procs, faults):
    one, two = faults(body=b"one\n"), faults(body=b"two\n")
    admin = free_port()
    # No probe between the requests: the +1 per routed connection alone alternates them.
    lb = procs.fastlb(one.port, two.port, "--admin", admin, "-R", "1000", "--interval", "60")
    for _ in range(6):
        assert status_of(http_get(lb.port, "/")) == 200
    wait_until(lambda: (d := stats(admin))["totals"]["routed"] == 6 and d["totals"]["active"] == 0,
               10, message="6 finished connections")
    status, body = admin_get(admin, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    routed = {s.labels["backend"]: s.value for s in families["fastlb_backend_connections"].samples}
    assert routed == {"127.0.0.1:%d" % one.port: 3, "127.0.0.1:%d" % two.port: 3}
    ups = {s.labels["backend"]: s.value for s in families["fastlb_backend_up"].samples}
    assert set(ups.values()) == {1}
    responses = [s for s in families["fastlb_backend_responses"].samples if s.labels["class"] == "2xx"]
    assert sum(s.value for s in responses) == 6
    counts = [s for s in families["fastlb_backend_connection_duration_seconds"].samples
              if s.name.endswith("_count")]
    assert sum(s.value for s in counts) == 6
    accepted = families["fastlb_accepted_connections"].samples[0].value
    assert accepted >= 6  # and the fixture's readiness check


def test_healthz_answers_503_while_draining(procs, faults):
    slow = faults(request="delay", delay=3.0)
    admin = free_port()
    lb = procs.fastlb(slow.port, "--admin", admin)
    assert admin_get(admin, "/healthz") == (200, b"running\n")
    client = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    client.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    wait_until(lambda: slow.requests == 1, 10, message="request at the slow backend")
    lb.signal(signal.SIGTERM)
    assert wait_until(lambda: admin_get(admin, "/healthz")[0] == 503, 5, message="503 from /healthz")
    client.settimeout(10)
    assert client.recv(12).startswith(b"HTTP/1.1 200")
    client.close()
    assert lb.wait(15) == 0


def test_bare_admin_port_listens_on_loopback_only(procs, faults):
    good = faults()
    admin = free_port()
    procs.fastlb(good.port, "--admin", admin)
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = [line.split()[1] for line in listening if line.split()[3] == "0A"]
    assert "0100007F:%04X" % admin in local
    assert "00000000:%04X" % admin not in local


def test_access_log_has_one_line_per_connection(procs, faults, tmp_path):
    good = faults()
    log_file = tmp_path / "access.log"
    lb = procs.fastlb(good.port, "--access-log", log_file, "--client-timeout", "0.5")
    for _ in range(3):
        http_get(lb.port, "/x")
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5):
        pass  # connects and closes without a byte
    lines = wait_until(lambda: len(log_file.read_text().splitlines()) >= 4 and
                       log_file.read_text().splitlines(), 10, message="4 access-log lines")
    served = [line for line in lines if "end=done" in line]
    assert len(served) == 3
    for line in served:
        assert "backend=127.0.0.1:%d" % good.port in line
        assert "status=200" in line and "client=127.0.0.1:" in line
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        assert int(fields["up"]) > 0 and int(fields["down"]) > 0 and float(fields["duration"]) >= 0
    assert any("end=client_closed" in line and "backend=-" in line for line in lines)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_sets_listen_backends_and_options(procs, faults, tmp_path):
    one = faults(body=b"one\n")
    port, admin = free_port(), free_port()
    config = write_config(tmp_path / "fastlb.toml", (
        'listen = "127.0.0.1:%d"\nbackends = ["%d"]\nthreads = 2\nadmin = "127.0.0.1:%d"\n'
        % (port, one.port, admin)))
    lb = procs.fastlb("--config", config, port=port)
    assert http_get(lb.port, "/").endswith(b"one\n")
    assert stats(admin)["threads"] == 2


def test_command_line_overrides_the_config_file(procs, faults, tmp_path):
    one, two = faults(body=b"one\n"), faults(body=b"two\n")
    port, admin = free_port(), free_port()
    config = write_config(tmp_path / "fastlb.toml", (
        'listen = %d\nbackends = ["%d"]\nthreads = 2\nadmin = "127.0.0.1:%d"\n'
        % (free_port(), one.port, admin)))
    lb = procs.fastlb("--config", config, "-N", "3", two.port, port=port)
    assert http_get(lb.port, "/").endswith(b"two\n")
    assert stats(admin)["threads"] == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ('listen = 8000\nbackends = ["8001"]\nthreads = 0\n', "fastlb.toml:3: key 'threads': must be at least 1"),
        ('listen = 8000\nbackends = ["8001"]\n\nthread = 2\n', "fastlb.toml:4: key 'thread': unknown key"),
        ('listen = 8000\nbackends = [{address = "127.0.0.1:8001", weight = 0}]\n',
         "fastlb.toml:2: key 'backends': weight must be"),
        ('listen = 8000\nbackends = ["8001"\n', "fastlb.toml: "),
        ('listen = 70000\nbackends = ["8001"]\n', "fastlb.toml:1: key 'listen': port out of range"),
    ],
)
def test_config_file_errors_name_file_line_and_key(procs, tmp_path, text, message):
    config = write_config(tmp_path / "fastlb.toml", text)
    result = procs.run("--config", config)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr.splitlines()[-1], result.stderr


def test_sighup_reload_swaps_backends_under_load_without_losing_a_request(procs, faults, tmp_path):
    old, new = faults(body=b"old\n"), faults(body=b"new\n")
    port, admin = free_port(), free_port()
    config = tmp_path / "fastlb.toml"
    write_config(config, 'listen = %d\nbackends = ["%d"]\nadmin = "127.0.0.1:%d"\n'
                 % (port, old.port, admin))
    lb = procs.fastlb("--config", config, "--interval", "0.3", port=port)
    answers, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                response = http_get(lb.port, "/")
                (answers if status_of(response) == 200 else failures).append(response)
            except (OSError, AssertionError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answers) >= 40, 20, message="traffic on the old backend")
        write_config(config, 'listen = %d\nbackends = ["%d"]\nadmin = "127.0.0.1:%d"\n'
                     % (port, new.port, admin))
        lb.signal(signal.SIGHUP)
        lb.wait_for_log(r"reload: 1 backend\(s\), 1 new")
        wait_until(lambda: sum(a.endswith(b"new\n") for a in answers) >= 40, 20,
                   message="traffic on the new backend")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    rows = stats(admin)["backends"]
    assert [row["backend"] for row in rows] == ["127.0.0.1:%d" % new.port]
    # The new backend got traffic only after its first healthy probe.
    first_request = min(t for t, _ in new.request_log)
    assert new.probe_times() and min(new.probe_times()) < first_request


def test_reload_keeps_counters_of_kept_backends(procs, faults, tmp_path):
    kept, added = faults(), faults()
    port, admin = free_port(), free_port()
    config = tmp_path / "fastlb.toml"
    write_config(config, 'listen = %d\nbackends = ["%d"]\nadmin = "127.0.0.1:%d"\n' % (port, kept.port, admin))
    lb = procs.fastlb("--config", config, port=port)
    for _ in range(4):
        http_get(lb.port, "/")
    write_config(config, 'listen = %d\nbackends = ["%d", {address = "127.0.0.1:%d", weight = 2}]\n'
                 'admin = "127.0.0.1:%d"\n' % (port, kept.port, added.port, admin))
    lb.signal(signal.SIGHUP)
    lb.wait_for_log(r"reload: 2 backend\(s\), 1 new")
    wait_until(lambda: state_of(admin, added.port) == "up", 10, message="added backend up")
    rows = {row["backend"]: row for row in stats(admin)["backends"]}
    assert rows["127.0.0.1:%d" % kept.port]["routed"] == 4
    assert rows["127.0.0.1:%d" % added.port]["weight"] == 2


def test_fall_needs_consecutive_failed_probes_and_rise_consecutive_good_ones(procs, faults):
    flaky = faults()
    admin = free_port()
    lb = procs.fastlb(flaky.port, "--admin", admin, "--interval", "0.2", "--fall", "3", "--rise", "2")
    assert state_of(admin, flaky.port) == "up"
    flaky.probe_mode = STATUS_404
    failing_since = flaky.probes
    wait_until(lambda: flaky.probes >= failing_since + 2, 10, message="two failed probes")
    flaky.probe_mode = OK
    healthy_since = len(flaky.probe_times(OK))
    wait_until(lambda: len(flaky.probe_times(OK)) > healthy_since, 10, message="a good probe")
    # Two failures in a row are below --fall 3: still up, and traffic still flows.
    assert state_of(admin, flaky.port) == "up"
    assert status_of(http_get(lb.port, "/")) == 200
    flaky.probe_mode = STATUS_404
    wait_until(lambda: state_of(admin, flaky.port) == "down", 10, message="down after 3 failures")
    bad = len(flaky.probe_times(STATUS_404))
    assert bad >= 5  # 2 earlier + 3 in a row
    flaky.probe_mode = OK
    good_since = flaky.probes
    wait_until(lambda: state_of(admin, flaky.port) == "up", 10, message="up after 2 good probes")
    assert flaky.probes >= good_since + 2
    lb.wait_for_log(r"is down \(was up\): status 404")


def test_refused_connect_marks_down_at_once_despite_fall(procs, faults):
    gone, good = faults(body=b"gone\n"), faults(body=b"good\n")
    admin = free_port()
    lb = procs.fastlb(gone.port, good.port, "--admin", admin, "--fall", "5", "--interval", "30")
    gone.stop()
    for _ in range(4):
        assert http_get(lb.port, "/").endswith(b"good\n")
    assert state_of(admin, gone.port) == "down"


def test_reload_applies_a_new_log_level(procs, faults, tmp_path):
    backend = faults()
    port = free_port()
    config = tmp_path / "fastlb.toml"
    write_config(config, 'listen = %d\nbackends = ["%d"]\nlog-level = "warning"\n' % (port, backend.port))
    lb = procs.fastlb("--config", config, port=port, wait=False)
    wait_until(lambda: port_accepts(port), 10, message="fastlb to accept")
    assert "first health round done" not in lb.output()
    write_config(config, 'listen = %d\nbackends = ["%d"]\nlog-level = "info"\n' % (port, backend.port))
    lb.signal(signal.SIGHUP)
    # An INFO line: shown only once the reload has applied the new level.
    lb.wait_for_log(r"reload: 1 backend\(s\), 0 new")
