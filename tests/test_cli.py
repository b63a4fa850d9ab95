"""Command-line parsing: SPEC §1, as a user of the classic balancer types it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastlb.cli import parse_config
from fastlb.settings import SETTINGS


def test_options_interleave_with_positionals():
    config = parse_config(["-N", "7", "1234", "8080", "-R", "3", "8081"])
    assert config.port == 1234
    assert [b.port for b in config.backends] == [8080, 8081]
    assert config.threads == 7 and config.requests == 3


def test_defaults_match_spec():
    config = parse_config(["1234", "8080"])
    assert (config.threads, config.requests, config.interval) == (4, 5, 2.0)
    assert (config.server_timeout, config.idle_timeout, config.client_timeout) == (10.0, 60.0, 10.0)
    assert (config.max_queue, config.drain_timeout, config.probe_timeout) == (1024, 30.0, 5.0)


def test_bare_port_means_localhost_and_host_port_is_resolved():
    from fastlb.discovery import Discovery

    config = parse_config(["1234", "8080", "localhost:8081", "[::1]:8082"])
    first, second, third = Discovery().expand(config.backends)
    assert (first.host, first.ip, first.port) == ("127.0.0.1", "127.0.0.1", 8080)
    # A name stands for its addresses (IPv4 first): one backend each, named by both.
    assert (second.host, second.port, second.ip) == ("localhost", 8081, "127.0.0.1")
    assert second.name == "localhost:8081@127.0.0.1"
    assert (third.host, third.ip, third.port) == ("::1", "::1", 8082)


def test_same_backend_twice_is_accepted():
    config = parse_config(["1234", "8080", "8080"])
    assert [b.name for b in config.backends] == ["127.0.0.1:8080", "127.0.0.1:8080"]


@pytest.mark.parametrize(
    "argv, reason",
    [
        ([], "required: LB_PORT, SERVER"),
        (["1234"], "required: SERVER"),
        (["abc", "8080"], "not a port number"),
        (["1234", "x"], "not a port number"),
        (["0", "8080"], "out of range"),
        (["1234", "65536"], "out of range"),
        (["1234", "host:"], "not a port number"),
        (["1234", ":80"], "no host"),
        (["-N", "0", "1234", "8080"], "must be at least 1"),
        (["-R", "0", "1234", "8080"], "must be at least 1"),
        (["-N", "two", "1234", "8080"], "not a whole number"),
        (["--interval", "-1", "1234", "8080"], "positive number of seconds"),
        (["--server-timeout", "nan", "1234", "8080"], "positive number of seconds"),
        (["--bogus", "1234", "8080"], "unrecognized arguments"),
        (["--chek", "http", "1234", "8080"], "unrecognized arguments: --chek"),
        (["--thread", "2", "1234", "8080"], "unrecognized arguments: --thread"),
        (["--max-connections", "3000000000", "1234", "8080"], "must be at most"),
        (["--interval", "1e12", "1234", "8080"], "must be at most"),
        (["--probe-timeout", "1e12", "1234", "8080"], "must be at most"),
        (["-N", "100000", "1234", "8080"], "must be at most"),
        (["1234", "%s.example:80" % ("a" * 64)], "not a valid host name"),
        (["--check", "htp", "1234", "8080"], "check kind must be load, http, tcp or none"),
        (["--check-status", "600", "--check", "http", "1234", "8080"], "not within 100-599"),
        (["--balance", "fastest", "1234", "8080"], "balance policy must be"),
        (["--check-send", "x", "1234", "8080"], "--check-send needs --check tcp"),
        (["--check", "tcp", "--check-send", r"\q", "1234", "8080"], "unknown escape"),
        (["--send-proxy", "v3", "1234", "8080"], "PROXY protocol version must be"),
        (["-N"], "expected one argument"),
        (["--resolve-interval", "0", "1234", "no-such-host.invalid:80"], "cannot resolve"),
        (["--resolvers", "dns.example", "1234", "8080"], "a resolver is an IP address"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_reason_and_usage(argv, reason):
    result = subprocess.run([sys.executable, "-m", "fastlb"] + argv, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: fastlb")
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fastlb: error:") and reason in last, result.stderr


def test_help_documents_every_option_with_its_default():
    result = subprocess.run([sys.executable, "-m", "fastlb", "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for setting in SETTINGS:
        for flag in setting.flags:
            assert flag in text
        assert "default: %s" % setting.shown_default in text
    assert "--version" in text and "fastlb demo" in text


def test_version_names_the_active_bridge():
    result = subprocess.run([sys.executable, "-m", "fastlb", "--version"], capture_output=True,
                            text=True, timeout=30, env={"FASTLB_NO_EXTENSIONS": "1", "PATH": ""})
    assert result.returncode == 0
    assert result.stdout.startswith("fastlb ") and "(bridge: python)" in result.stdout


def test_option_tables_in_the_docs_match_the_settings_declaration():
    from conftest import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout


def test_config_reference_in_the_docs_is_a_valid_config_file(tmp_path):
    from conftest import ROOT
    from fastlb import configfile

    text = (ROOT / "docs" / "operations.md").read_text()
    reference = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "reference.toml"
    path.write_text(reference)
    values = configfile.load(str(path))
    assert values["port"] == 8000 and len(values["backends"]) == 3
    assert values["backends"][2].weight == 2
    assert {s.name for s in SETTINGS if s.shown_default != "off"} <= set(values)


def test_a_backend_with_a_check_kind_of_its_own_does_not_inherit_the_global_exchange(tmp_path):
    config = tmp_path / "fastlb.toml"
    config.write_text('listen = 9000\ncheck = "tcp"\ncheck-send = "PING\\\\r\\\\n"\ncheck-expect = "+PONG"\n'
                      'backends = ["6379", {address = "8001", check = "http", check_path = "/health"}]\n')
    redis, web = parse_config(["--config", str(config)]).backends
    assert (redis.check.kind, redis.check.send, redis.check.expect) == ("tcp", b"PING\r\n", b"+PONG")
    assert (web.check.kind, web.check.path, web.check.send, web.check.expect) == ("http", "/health", b"", b"")


def test_config_has_exactly_one_field_per_setting_with_its_default():
    import dataclasses

    from fastlb.settings import Config

    fields = dataclasses.fields(Config)
    assert [f.name for f in fields[:2]] == ["port", "backends"]
    assert [f.name for f in fields[2:]] == [s.name for s in SETTINGS]
    for field, setting in zip(fields[2:], SETTINGS):
        assert field.default == setting.default and type(field.default) is type(setting.default), \
            setting.name
