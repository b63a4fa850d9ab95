"""The twin pattern itself: which hot path loads, and that both twins offer the same names."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NO_EXTENSIONS = os.environ.get("FASTLB_NO_EXTENSIONS", "") not in ("", "0")


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


def test_stub_declares_exactly_the_compiled_names():
    stub = (ROOT / "fastlb" / "_bridge.pyi").read_text()
    python = importlib.import_module("fastlb._bridge_py")
    namespace: dict = {}
    exec(compile(stub, "_bridge.pyi", "exec"), namespace)
    assert namespace["__all__"] == python.__all__
    for name in python.__all__:
        assert name in namespace or name in namespace.get("__annotations__", {}), name


@pytest.mark.parametrize("no_extensions, expected", [(None, "cython"), ("1", "python")])
def test_version_reports_the_active_bridge(no_extensions, expected):
    out = run_python("-m", "fastlb", "--version", no_extensions=no_extensions)
    assert "bridge: %s" % expected in out
