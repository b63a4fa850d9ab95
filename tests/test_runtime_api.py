"""Changes at run time (issue 14): the admin API over HTTP with a bearer token, and the
embeddable Python API (``fastlb.serve``), against real backends."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

import fastlb
from conftest import free_port, http_get, status_of, body_of, wait_until
from fastlb.backend import FileServer

TOKEN = "s3cret-token-for-the-tests"


@pytest.fixture
def named(tmp_path):
    """``make(name)``: a fastlb-backend (in-process) whose /who says ``name``."""
    made = []

    def make(name: str) -> FileServer:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "who").write_bytes(name.encode())
        server = FileServer(str(directory)).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def who(port: int) -> bytes:
    response = http_get(port, "/who", timeout=5)
    assert status_of(response) == 200, response[:200]
    return body_of(response)


def api(admin: int, method: str, path: str, body=None, token: str = TOKEN):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (admin, path), data=data, method=method)
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def lb_with_api(procs, tmp_path, named):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    a = named("A")
    admin = free_port()
    lb = procs.fastlb("--admin", admin, "--admin-token-file", token_file, "-R", 1000, a.port)
    return lb, admin, a


def test_the_api_needs_the_token(lb_with_api):
    lb, admin, a = lb_with_api
    assert api(admin, "GET", "/api/backends", token=None)[0] == 401
    assert api(admin, "GET", "/api/backends", token="wrong" + TOKEN)[0] == 401
    status, rows = api(admin, "GET", "/api/backends")
    assert status == 200 and [r["backend"] for r in rows] == ["127.0.0.1:%d" % a.port]


def test_add_drain_weigh_and_remove_backends_at_run_time(lb_with_api, named):
    lb, admin, a = lb_with_api
    b = named("B")
    status, added = api(admin, "POST", "/api/backends", {"address": "127.0.0.1:%d" % b.port})
    assert status == 201 and added[0]["state"] == "up", added
    lb.wait_for_log(r"api: backend 127\.0\.0\.1:%d added" % b.port)
    assert {who(lb.port) for _ in range(6)} == {b"A", b"B"}

    a_name = "127.0.0.1:%d" % a.port
    status, row = api(admin, "POST", "/api/backends/%s/state" % a_name, {"state": "drain"})
    assert status == 200 and row["admin_state"] == "drain"
    assert {who(lb.port) for _ in range(4)} == {b"B"}
    assert api(admin, "POST", "/api/backends/%s/state" % a_name, {"state": "ready"})[0] == 200

    status, row = api(admin, "POST", "/api/backends/127.0.0.1:%d/weight" % b.port, {"weight": 3})
    assert status == 200 and row["weight"] == 3

    status, _ = api(admin, "DELETE", "/api/backends/127.0.0.1:%d" % b.port)
    assert status == 202
    assert {who(lb.port) for _ in range(4)} == {b"A"}
    lb.wait_for_log(r"api: backend 127\.0\.0\.1:%d removed" % b.port)
    # Shown where operators look.
    page = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % admin, timeout=10).read().decode()
    assert 'fastlb_backend_admin_state{backend="%s",state="ready"} 1' % a_name in page


def test_bad_api_requests_get_a_clear_error(lb_with_api):
    lb, admin, a = lb_with_api
    assert api(admin, "POST", "/api/backends", {"address": "not a backend"})[0] == 400
    assert api(admin, "POST", "/api/backends", {"address": "127.0.0.1:%d" % a.port})[0] == 409
    assert api(admin, "POST", "/api/backends/127.0.0.1:1/state", {"state": "drain"})[0] == 404
    assert api(admin, "POST", "/api/backends/127.0.0.1:%d/state" % a.port, {"state": "asleep"})[0] == 400
    assert api(admin, "POST", "/api/backends/127.0.0.1:%d/weight" % a.port, {"weight": 0})[0] == 400


def test_without_a_token_file_the_api_is_off(procs, named):
    a = named("A")
    admin = free_port()
    procs.fastlb("--admin", admin, a.port)
    assert api(admin, "GET", "/api/backends")[0] == 404


def test_run_time_changes_last_until_the_next_reload(procs, tmp_path, named):
    import signal

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    a, b = named("A"), named("B")
    admin, port = free_port(), free_port()
    config = tmp_path / "fastlb.toml"
    config.write_text('listen = %d\nbackends = ["%d"]\nadmin = "127.0.0.1:%d"\nadmin-token-file = "%s"\n'
                      'requests = 1000\n' % (port, a.port, admin, token_file))
    lb = procs.fastlb("--config", config, port=port)
    assert api(admin, "POST", "/api/backends", {"address": "127.0.0.1:%d" % b.port})[0] == 201
    assert {who(lb.port) for _ in range(6)} == {b"A", b"B"}
    lb.signal(signal.SIGHUP)
    lb.wait_for_log(r"reload: 1 backend\(s\), 0 new")
    wait_until(lambda: {who(lb.port) for _ in range(4)} == {b"A"}, 10, message="B gone after the reload")


def test_the_embeddable_api_serves_changes_and_closes(named):
    a, b = named("A"), named("B")
    with fastlb.serve([a.port], threads=1, requests=1000) as lb:
        assert who(lb.port) == b"A"
        lb.add("127.0.0.1:%d" % b.port, weight=2)
        assert {who(lb.port) for _ in range(6)} == {b"A", b"B"}
        lb.drain("127.0.0.1:%d" % a.port)
        assert {who(lb.port) for _ in range(4)} == {b"B"}
        rows = {r["backend"]: r for r in lb.stats()["backends"]}
        assert rows["127.0.0.1:%d" % a.port]["admin_state"] == "drain"
        assert rows["127.0.0.1:%d" % b.port]["weight"] == 2
        port = lb.port
    # Closed: the port no longer accepts.
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_the_embeddable_api_refuses_a_bad_setting():
    from fastlb.settings import SettingError

    with pytest.raises(SettingError):
        fastlb.serve(["127.0.0.1:8080"], check="sometimes")
    with pytest.raises(TypeError):
        fastlb.serve(["127.0.0.1:8080"], chek="http")


def test_the_documented_example_runs(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, child_env

    text = (ROOT / "docs" / "embedding.md").read_text()
    program = text.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          env=child_env(), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "-> b'blue'" in done.stdout
    assert "after the switch: {b'green'}" in done.stdout
