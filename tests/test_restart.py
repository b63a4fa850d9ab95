"""Several instances and restarts that refuse nobody (issue 14): --reuseport, socket activation,
and READY=1 / STOPPING=1 to the service manager."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, free_port, http_get, status_of, wait_until

RESTART = str(ROOT / "benchmarks" / "restart.py")


def restart_run(twin, *args: str, namespace: str = "") -> dict:
    argv = [sys.executable, RESTART, "--seconds", "2", "--restarts", "3", *args]
    if namespace:
        argv = ["ip", "netns", "exec", namespace] + argv
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=child_env(twin.env))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_restart_with_socket_activation_refuses_nobody(twin):
    result = restart_run(twin, "--mode", "socket-activation")
    assert result["requests"] > 100 and result["failures"] == 0, result


def test_a_restart_with_reuseport_and_request_migration_refuses_nobody(twin):
    from netns import missing_privilege

    lacking = missing_privilege()
    if lacking:
        pytest.skip("needs %s to make a network namespace" % lacking)
    name = "fastlb-restart-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        result = restart_run(twin, "--mode", "reuseport-migrate", namespace=name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert result["requests"] > 100 and result["failures"] == 0, result


def test_two_instances_share_a_port_with_reuseport(procs, faults):
    from test_operations import stats

    backend = faults()
    port, admins = free_port(), (free_port(), free_port())
    for admin in admins:
        procs.fastlb("--reuseport", "--admin", admin, backend.port, port=port)
    for _ in range(40):
        assert status_of(http_get(port, "/")) == 200
    # The kernel spreads the connections over both (by the clients' ports).
    assert all(stats(admin)["accepted"] > 0 for admin in admins)


def test_the_service_manager_hears_ready_then_stopping(procs, faults):
    backend = faults()
    name = "@fastlb-notify-" + secrets.token_hex(4)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name[1:])
        listener.settimeout(15)
        lb = procs.fastlb(backend.port, env={"NOTIFY_SOCKET": name})
        assert listener.recv(256) == b"READY=1"
        lb.signal(signal.SIGTERM)
        assert listener.recv(256) == b"STOPPING=1"
        assert lb.wait(15) == 0


def test_a_passed_descriptor_that_is_not_a_listener_is_a_clear_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as not_a_listener:
        fd = not_a_listener.fileno()
        done = subprocess.run(["/bin/sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh",
                               sys.executable, "-m", "fastlb", "9", "8080"],
                              capture_output=True, text=True, timeout=30, env=child_env(),
                              pass_fds=(3,), preexec_fn=lambda: os.dup2(fd, 3))
    assert done.returncode == 1
    assert "not a listening TCP socket" in done.stderr and "Traceback" not in done.stderr
