"""Collects each benchmark's headline figure and prints them, with compiled/python speed-ups, at the end."""

from __future__ import annotations

import pytest

_FIGURES = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_FIGURES] = {}


@pytest.fixture
def report(request):
    """``report(case, twin, unit, value, lower_is_better=False)`` records one median figure."""
    figures = request.config.stash[_FIGURES]

    def record(case, twin, unit, value, lower_is_better=False):
        figures.setdefault(case, {})[twin] = (unit, value, lower_is_better)

    return record


def pytest_terminal_summary(terminalreporter, config):
    figures = config.stash.get(_FIGURES, {})
    if not figures:
        return
    write = terminalreporter.write_line
    terminalreporter.section("hot path: medians and compiled/python speed-up")
    write("%-24s %-14s %14s  %-14s %s" % ("case", "twin", "median", "unit", "speed-up vs python"))
    for case, rows in figures.items():
        python = rows.get("python")
        for twin, (unit, value, lower_is_better) in rows.items():
            ratio = ""
            if python is not None and twin != "python":
                ratio = "%.2fx" % (python[1] / value if lower_is_better else value / python[1])
            write("%-24s %-14s %14.1f  %-14s %s" % (case, twin, value, unit, ratio))
