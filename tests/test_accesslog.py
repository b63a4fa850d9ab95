"""The access log's writer under failures: a full disk or a failed reopen never stops it or blocks anyone."""

from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import free_port, http_get, wait_until
from fastlb.accesslog import QUEUE_LIMIT, AccessLog

FULL = "/dev/full"   # every write fails with ENOSPC, as on a full disk


@pytest.fixture
def full_disk():
    if not os.path.exists(FULL):
        pytest.fail("%s is missing: the full-disk tests need it (Linux provides it)" % FULL)
    return FULL


def test_failed_writes_are_counted_and_the_writer_goes_on(full_disk, tmp_path):
    log = AccessLog(full_disk)
    try:
        for i in range(100):
            log.record("127.0.0.1:%d" % i, "b", 1, 2, 0.1, 200, "done")
        wait_until(lambda: log.errors > 0, 5, message="a failed write to be counted")
        assert log._thread.is_alive()
        # Repointed at a working file, the same writer writes again.
        log.target = str(tmp_path / "access.log")
        log.reopen()
        wait_until(lambda: (tmp_path / "access.log").exists(), 5, message="the reopen")
        log.record("127.0.0.9:1", "b", 1, 2, 0.1, 200, "done")
    finally:
        log.close()
    assert "client=127.0.0.9:1" in (tmp_path / "access.log").read_text()


def test_record_reopen_and_close_never_block_even_with_a_full_queue(full_disk):
    log = AccessLog(full_disk)
    started = time.monotonic()
    for i in range(QUEUE_LIMIT + 1000):
        log.record("127.0.0.1:1", "b", 1, 2, 0.1, 200, "done")
    for _ in range(5):
        log.reopen()
    log.close()
    assert time.monotonic() - started < 30   # a generous bound: a blocked call would hang forever


def test_a_failed_reopen_keeps_the_old_file(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    try:
        log.target = str(tmp_path / "no-such-dir" / "access.log")
        log.reopen()
        wait_until(lambda: log.errors == 1, 5, message="the failed reopen to be counted")
        log.record("127.0.0.7:1", "b", 1, 2, 0.1, 200, "done")
    finally:
        log.close()
    assert "client=127.0.0.7:1" in path.read_text()


def test_fastlb_with_its_access_log_on_a_full_disk_still_reloads_and_stops(procs, faults, full_disk):
    backend = faults()
    admin = free_port()
    lb = procs.fastlb("--access-log", full_disk, "--admin", admin, backend.port)
    for _ in range(20):
        http_get(lb.port, "/")
    lb.wait_for_log(r"access log /dev/full: No space left on device")
    for _ in range(3):
        lb.signal(signal.SIGHUP)
    lb.wait_for_log(r"SIGHUP: no --config file to re-read")
    assert http_get(lb.port, "/").startswith(b"HTTP/1.1 200")
    lb.signal(signal.SIGTERM)
    assert lb.wait(10) == 0
