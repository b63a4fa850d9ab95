"""`coverage report` over a run on a tracing build, the compiled twins' .pyx files first.

Usage: python scripts/coverage_report.py [coverage report options, e.g. --show-missing]

Cython.Coverage learns which lines of an inlined .pxd file (src/proxy_header.pxd ...) exist only
by reading the C file of a .pyx that includes it; asked for a .pxd first, it has no reporter for
it and `coverage report` stops.  Plain `coverage report` asks in the order of a set, which
changes from run to run, so this passes the measured files in a fixed order: .pyx, then the rest.
See docs/development.md.
"""

import sys

import coverage
from coverage.cmdline import main as coverage_main


def main(argv: list) -> int:
    data = coverage.CoverageData()
    data.read()
    files = sorted(data.measured_files(), key=lambda name: (not name.endswith(".pyx"), name))
    if not files:
        print("coverage_report: no data; run `coverage run -m pytest ...` first", file=sys.stderr)
        return 1
    return coverage_main(["report", *argv, *files])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
