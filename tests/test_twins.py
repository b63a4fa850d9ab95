"""The twin pattern itself: which hot path loads, and that both twins offer the same names."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from fastlb.bridge import NO_EXTENSIONS


def run_python(*args: str, no_extensions: str | None) -> str:
    """Run ``python *args`` from the source tree, with FASTLB_NO_EXTENSIONS set or removed."""
    env = dict(os.environ)
    env.pop("FASTLB_NO_EXTENSIONS", None)
    if no_extensions is not None:
        env["FASTLB_NO_EXTENSIONS"] = no_extensions
    done = subprocess.run([sys.executable, *args], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("no_extensions, expected", [
    (None, "cython"),
    ("0", "cython"),
    ("1", "python"),
])
def test_compiled_twin_is_what_loads_unless_disabled(no_extensions, expected):
    """A build that silently fell back to Python fails here."""
    code = ("import fastlb.bridge as b; "
            "print(b.IMPLEMENTATION, b.relay.__module__, b.Engine.__module__)")
    implementation, module, engine = run_python("-c", code, no_extensions=no_extensions).split()
    assert implementation == expected
    assert module == ("fastlb._bridge" if expected == "cython" else "fastlb._bridge_py")
    assert engine == ("fastlb._engine" if expected == "cython" else "fastlb._engine_py")


def test_this_process_uses_the_twin_its_environment_asks_for():
    import fastlb.bridge

    assert fastlb.bridge.IMPLEMENTATION == ("python" if NO_EXTENSIONS else "cython")


def test_compiled_twin_is_an_extension_module():
    compiled = importlib.import_module("fastlb._bridge")
    assert compiled.IMPLEMENTATION == "cython"
    assert Path(compiled.__file__).suffix in (".so", ".pyd")


def test_both_twins_export_the_same_names():
    python = importlib.import_module("fastlb._bridge_py")
    compiled = importlib.import_module("fastlb._bridge")
    assert compiled.__all__ == python.__all__
    for name in python.__all__:
        assert hasattr(compiled, name), name
    assert compiled.RelayResult._fields == python.RelayResult._fields
    assert compiled.MAX_HEALTH_ANSWER == python.MAX_HEALTH_ANSWER
    assert compiled.MAX_PROXY_HEADER == python.MAX_PROXY_HEADER == 16384
    for name in ("MAX_PROXY_HEADER", "parse_proxy_header", "build_proxy_header"):
        assert name in python.__all__, name
    assert compiled.BUFFER_SIZE >= python.BUFFER_SIZE
    # Results compare equal across twins.
    assert compiled.RelayResult(1, 2, "eof", "eof", "done", 200) == \
        python.RelayResult(1, 2, "eof", "eof", "done", 200)


def _parameters(function) -> list:
    """A callable's parameters as comparable data: name, kind and default (not annotations)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_both_twins_functions_take_the_same_parameters():
    for python_name, compiled_name in (("fastlb._bridge_py", "fastlb._bridge"),
                                       ("fastlb._engine_py", "fastlb._engine")):
        python = importlib.import_module(python_name)
        compiled = importlib.import_module(compiled_name)
        assert compiled.__all__ == python.__all__, python_name
        for name in python.__all__:
            ours, theirs = getattr(python, name), getattr(compiled, name)
            if callable(ours) and not isinstance(ours, type):
                assert _parameters(theirs) == _parameters(ours), name


def test_both_engine_twins_have_the_same_methods_attributes_and_types():
    python = importlib.import_module("fastlb._engine_py")
    compiled = importlib.import_module("fastlb._engine")
    for method in ("add", "wake", "stop", "set_timeouts", "run"):
        assert _parameters(getattr(compiled.Engine, method)) == \
            _parameters(getattr(python.Engine, method)), method
    # The constructor of an extension type has no introspectable signature:
    # both take the same keywords, and refuse the same unknown one.
    keywords = dict(router=object(), server_timeout=1.0, idle_timeout=2.0, client_timeout=3.0,
                    connect_timeout=4.0, splice=None, accept_proxy=False, retry_on_empty="idempotent")
    engines = [twin.Engine(**keywords) for twin in (python, compiled)]
    for twin in (python, compiled):
        with pytest.raises(TypeError):
            twin.Engine(**keywords, bogus=1)
    for name in ("router", "server_timeout", "idle_timeout", "client_timeout", "connect_timeout",
                 "accept_proxy", "retry_on_empty", "active", "pending", "added", "closed"):
        values = [getattr(engine, name) for engine in engines]
        assert type(values[0]) is type(values[1]) and values[0] == values[1], (name, values)
    for engine in engines:
        # With nothing to relay, run() returns at once and closes what the engine owns.
        engine.stop()
        engine.run()
    for name in python.__all__:
        value = getattr(python, name)
        if not callable(value):
            assert type(getattr(compiled, name)) is type(value), name


@pytest.mark.parametrize("no_extensions, expected", [(None, "cython"), ("1", "python")])
def test_version_reports_the_active_bridge(no_extensions, expected):
    out = run_python("-m", "fastlb", "--version", no_extensions=no_extensions)
    assert "bridge: %s" % expected in out
