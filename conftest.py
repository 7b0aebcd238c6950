"""The smoke budget of BOOK.md, checked where it is measured: under nbmake.

Each notebook's smoke run must finish in at most 90 s on 2 CPU cores. After a run of the notebooks
(`make test`, `make notebooks`), pytest prints every notebook's time against that budget and names
the ones over it. A slow machine or a loaded one makes every notebook slower, so by default an
overrun is reported, not failed; set ``BOOK_SMOKE_STRICT=1`` (on a machine with 2 free cores) to
fail the run instead. ``BOOK_SMOKE_BUDGET_S`` changes the budget.
"""

from __future__ import annotations

import os

SMOKE_BUDGET_S = 90.0


def smoke_budget_s() -> float:
    value = os.environ.get("BOOK_SMOKE_BUDGET_S", "")
    try:
        return float(value) if value else SMOKE_BUDGET_S
    except ValueError:
        raise SystemExit(f"BOOK_SMOKE_BUDGET_S must be a number of seconds, got {value!r}") from None


def notebook_times(reports) -> dict[str, float]:
    """Seconds of each notebook's run (nbmake's call phase, kernel start included), by node id."""
    times = {}
    for report in reports:
        if getattr(report, "when", None) == "call" and report.nodeid.split("::")[0].endswith(".ipynb"):
            times[report.nodeid.split("::")[0]] = report.duration
    return times


def over_budget(times: dict[str, float], budget: float) -> dict[str, float]:
    return {name: s for name, s in times.items() if s > budget}


def _call_reports(terminalreporter):
    for key in ("passed", "failed"):
        yield from terminalreporter.stats.get(key, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    times = notebook_times(_call_reports(terminalreporter))
    if not times:
        return
    budget = smoke_budget_s()
    slow = over_budget(times, budget)
    terminalreporter.section(f"smoke budget: each notebook <= {budget:.0f} s (BOOK.md)")
    for name, seconds in sorted(times.items()):
        mark = "  OVER BUDGET" if name in slow else ""
        terminalreporter.write_line(f"{seconds:7.1f} s  {name}{mark}")
    if slow:
        terminalreporter.write_line(f"{len(slow)} notebook(s) over {budget:.0f} s: shrink their smoke presets "
                                    "(or check that the machine was not busy with something else)")
    else:
        terminalreporter.write_line(f"all {len(times)} notebooks within {budget:.0f} s")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("BOOK_SMOKE_STRICT") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if over_budget(notebook_times(_call_reports(reporter)), smoke_budget_s()):
        session.exitstatus = 1
