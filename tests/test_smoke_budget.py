"""The smoke-budget report of the root conftest.py: which notebooks it times and which it flags."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

_spec = importlib.util.spec_from_file_location("root_conftest", Path(__file__).resolve().parent.parent / "conftest.py")
budget = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(budget)


def report(nodeid, when, duration):
    return SimpleNamespace(nodeid=nodeid, when=when, duration=duration)


def test_only_the_call_phase_of_notebooks_is_timed():
    reports = [report("notebooks/07_gpt_mini.ipynb::", "call", 42.0),
               report("notebooks/07_gpt_mini.ipynb::", "setup", 5.0),
               report("tests/test_gpt.py::test_shapes", "call", 300.0)]
    assert budget.notebook_times(reports) == {"notebooks/07_gpt_mini.ipynb": 42.0}


def test_a_notebook_over_the_budget_is_flagged_and_one_at_it_is_not():
    times = {"a.ipynb": 90.0, "b.ipynb": 90.5, "c.ipynb": 12.0}
    assert budget.over_budget(times, 90.0) == {"b.ipynb": 90.5}


def test_the_budget_comes_from_book_md_unless_set(monkeypatch):
    monkeypatch.delenv("BOOK_SMOKE_BUDGET_S", raising=False)
    assert budget.smoke_budget_s() == 90.0
    monkeypatch.setenv("BOOK_SMOKE_BUDGET_S", "120")
    assert budget.smoke_budget_s() == 120.0
    monkeypatch.setenv("BOOK_SMOKE_BUDGET_S", "ninety")
    with pytest.raises(SystemExit, match="BOOK_SMOKE_BUDGET_S must be a number"):
        budget.smoke_budget_s()


def _run_notebook_suite(tmp_path, env_extra):
    """pytest --nbmake on one notebook that sleeps 1.5 s, with the repository's conftest.py at its root."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(Path(budget.__file__), tmp_path / "conftest.py")
    cell = {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
            "source": ["import time\n", "time.sleep(1.5)"]}
    nb = {"cells": [cell], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "slow.ipynb").write_text(json.dumps(nb))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOK_SMOKE")} | env_extra
    return subprocess.run([sys.executable, "-m", "pytest", "--nbmake", "-p", "no:cacheprovider", "slow.ipynb"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_strict_mode_fails_a_run_whose_notebook_is_over_budget(tmp_path):
    reported = _run_notebook_suite(tmp_path, {"BOOK_SMOKE_BUDGET_S": "1"})
    assert reported.returncode == 0, reported.stdout
    assert "slow.ipynb  OVER BUDGET" in reported.stdout
    strict = _run_notebook_suite(tmp_path, {"BOOK_SMOKE_BUDGET_S": "1", "BOOK_SMOKE_STRICT": "1"})
    assert strict.returncode == 1, strict.stdout
    relaxed = _run_notebook_suite(tmp_path, {"BOOK_SMOKE_BUDGET_S": "60", "BOOK_SMOKE_STRICT": "1"})
    assert relaxed.returncode == 0 and "all 1 notebooks within 60 s" in relaxed.stdout, relaxed.stdout
