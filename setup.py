"""Builds the compiled twins: fastlb._bridge from src/bridge.pyx and fastlb._engine from src/engine.pyx.

Without a working compiler the build falls back to the pure-Python relay with a
loud warning, unless FASTLB_REQUIRE_EXTENSIONS=1 (set in CI and wheel builds),
which makes the failure fatal.  FASTLB_NO_EXTENSIONS=1 skips the extension.
FASTLB_CYTHON_TRACING=1 builds the twins with line tracing, so coverage.py's
Cython.Coverage plugin can measure the .pyx files (docs/development.md); such a
build takes the GIL for every traced line of the relay loops: never ship one.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def flag(name):
    return os.environ.get(name, "") not in ("", "0")


class optional_build_ext(build_ext):
    """Report which bridge was built; fall back to pure Python unless told not to."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            self._fallback(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)
        else:
            sys.stderr.write("*** fastlb: built the compiled twin %s\n" % ext.name)

    def _fallback(self, exc):
        if flag("FASTLB_REQUIRE_EXTENSIONS"):
            raise
        sys.stderr.write(
            "*** WARNING fastlb: could not build the compiled bridge (%s);\n"
            "*** fastlb will use the pure-Python relay, which is several times slower.\n" % exc
        )


def extensions():
    if flag("FASTLB_NO_EXTENSIONS"):
        sys.stderr.write("*** fastlb: FASTLB_NO_EXTENSIONS set, building the pure-Python bridge only\n")
        return []
    sources = [os.path.join("src", name) for name in ("bridge.pyx", "engine.pyx")]
    missing = [path for path in sources if not os.path.exists(path)]
    if missing:
        # An sdist without its Cython sources would otherwise build pure Python silently.
        if flag("FASTLB_REQUIRE_EXTENSIONS"):
            raise SystemExit("fastlb: FASTLB_REQUIRE_EXTENSIONS=1 but %s missing" % ", ".join(missing))
        sys.stderr.write("*** WARNING fastlb: %s missing; pure-Python bridge only\n" % ", ".join(missing))
        return []
    try:
        from Cython.Build import cythonize
    except ImportError as exc:
        if flag("FASTLB_REQUIRE_EXTENSIONS"):
            raise
        sys.stderr.write("*** WARNING fastlb: Cython missing (%s); pure-Python bridge only\n" % exc)
        return []
    directives = {"language_level": "3", "embedsignature": True}
    macros = []
    tracing = flag("FASTLB_CYTHON_TRACING")
    if tracing:
        sys.stderr.write("*** fastlb: FASTLB_CYTHON_TRACING set, compiling with line tracing\n")
        # CYTHON_TRACE_NOGIL (which implies CYTHON_TRACE) traces the nogil
        # relay loops too, taking the GIL for every traced line.
        directives["linetrace"] = True
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    return cythonize(
        [Extension("fastlb._bridge", ["src/bridge.pyx"], extra_compile_args=["-O2"],
                   define_macros=macros),
         Extension("fastlb._engine", ["src/engine.pyx"], extra_compile_args=["-O2"],
                   define_macros=macros)],
        compiler_directives=directives,
        # Where cimports are found: src/ itself (includes.epoll, proxy_header
        # ...), also from the files src/engine.pyx includes from src/engine/.
        include_path=["src"],
        # cythonize regenerates a .c file only when its .pyx is newer, and a
        # .c file from an earlier build has no tracing code.  (Without the
        # macro, a traced .c file compiles to the same code as any other.)
        force=tracing,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": optional_build_ext})
