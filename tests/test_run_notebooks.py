"""tools/run_notebooks.py: the header stamp that says which run produced a page, and the check that
committed outputs show none of this machine's folders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "tools" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(spec)
sys.modules["run_notebooks"] = run_notebooks
spec.loader.exec_module(run_notebooks)

HEADER = """# 99 · A chapter

| profile | where | training | measured wall time (whole notebook) |
|---|---|---|---|
| smoke | 2 CPU cores | 3 steps | 12 s |
| cpu | 2 CPU cores | 3000 steps | not yet run |
| cpu | Colab T4 | as above | a few minutes (estimate) |
| full | one H100 | 30000 steps | not yet run |"""


def notebook(header=HEADER, outputs=()):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(header), nbformat.v4.new_code_cell("x = 1")]
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text=t) for t in outputs]
    return nb


def test_stamp_header_fills_the_profiles_row_and_the_outputs_line():
    nb = notebook()
    run_notebooks.stamp_header(nb, "cpu", "CPU: AMD EPYC (2 cores)", 754.0, "2026-12-02")
    text = nb.cells[0].source
    assert "| cpu | 2 CPU cores | 3000 steps | 12.6 min (measured 2026-12-02) |" in text
    assert "| cpu | Colab T4 | as above | a few minutes (estimate) |" in text      # the estimate row stays
    assert "| full | one H100 | 30000 steps | not yet run |" in text
    assert text.endswith("**Outputs on this page.** A `cpu`-profile run on CPU: AMD EPYC (2 cores): "
                         "12.6 min for the whole notebook (2026-12-02).")
    run_notebooks.stamp_header(nb, "cpu", "CPU: AMD EPYC (2 cores)", 30.0, "2026-12-03")   # a later run
    text = nb.cells[0].source
    assert text.count("**Outputs on this page.**") == 1 and "30 s for the whole notebook (2026-12-03)" in text
    assert "| cpu | 2 CPU cores | 3000 steps | 30 s (measured 2026-12-03) |" in text


def test_stamp_replaces_a_wrapped_outputs_paragraph_whole():
    nb = notebook(HEADER + "\n\n**Outputs on this page.** None yet: a draft; its first cpu run\nwill fill this page.")
    run_notebooks.stamp_header(nb, "cpu", "CPU: X (2 cores)", 120.0, "2026-12-03")
    text = nb.cells[0].source
    assert "will fill this page" not in text
    assert text.endswith("2.0 min for the whole notebook (2026-12-03).")


def test_leaked_paths_finds_this_machines_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("BOOK_DATA", str(tmp_path / "data"))
    clean = notebook(outputs=["wrote results/01_x.json\n"])
    assert run_notebooks.leaked_paths(clean) == []
    leaky = notebook(outputs=[f"loaded {tmp_path / 'data'}/mnist/test.npz\n"])
    found = run_notebooks.leaked_paths(leaky)
    assert found and found[0].startswith("cell 2: ")


def test_a_committed_run_drops_the_drafts_sentence():
    header = ("# 99 · x\n\n| profile | where | what | time |\n|---|---|---|---|\n| cpu | 2 CPU cores | s | not yet |\n\n"
              "The outputs on this page are not yet from a `cpu` or `full` run (they are replaced when ...).\n\n"
              "**Outputs on this page.** none")
    for profile, kept in (("smoke", True), ("cpu", False)):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_markdown_cell(header)]
        run_notebooks.stamp_header(nb, profile, "CPU", 60.0, "2026-12-03")
        text = nb.cells[0].source
        assert ("not yet from a `cpu`" in text) == kept
        assert "\n\n\n" not in text


@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_stamp_header_without_a_table_adds_only_the_line(profile):
    nb = notebook(header="# 99 · A chapter")
    run_notebooks.stamp_header(nb, profile, "a GPU", 61.0, "2026-12-02")
    assert nb.cells[0].source == (f"# 99 · A chapter\n\n**Outputs on this page.** A `{profile}`-profile run on "
                                  "a GPU: 1.0 min for the whole notebook (2026-12-02).")


def test_fresh_runs_delete_only_the_chapters_own_checkpoints(monkeypatch, tmp_path):
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path))
    for name in ("02_mlp_cpu.safetensors", "02_mlp_smoke.safetensors", "03_cifar_classifier.safetensors"):
        (tmp_path / name).write_text("x")
    found = run_notebooks.chapter_checkpoints(Path("notebooks/02_mlp_mnist.ipynb"))
    assert [p.name for p in found] == ["02_mlp_cpu.safetensors", "02_mlp_smoke.safetensors"]


def test_a_busy_machine_is_said():
    nb = notebook()
    run_notebooks.stamp_header(nb, "cpu", "CPU: X (2 cores)", 120.0, "2026-12-02", load=6.4)
    text = nb.cells[0].source
    assert "(2026-12-02, on a machine shared with other jobs (load average 6.4))." in text
    assert "| cpu | 2 CPU cores | 3000 steps | 2.0 min (measured 2026-12-02; shared machine) |" in text
