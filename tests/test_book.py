"""The book's conventions, checked on the committed notebooks, results and website sources."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _text(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part["chapters"]]
    return files


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_name_and_toc(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name)
    assert f"notebooks/{path.stem}" in _toc_files(), f"{path.name} is not in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_header_has_colab_badge_to_this_notebook(path):
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    owner_repo = repo.removeprefix("https://github.com/")
    header = _text(_cells(path)[0])
    assert header.startswith(f"# {path.name[:2]} ")
    assert f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}" in header
    assert "{cite}" in header, "the header cites the chapter's paper(s)"
    assert "| smoke |" in header and "| full |" in header, "the header has a runtime table"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_installs_only_in_colab(path):
    setup = _text(_cells(path)[1])
    assert '"google.colab" in sys.modules' in setup and "pip" in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_say_what_produced_them(path):
    nb = json.loads(path.read_text())
    meta = nb["metadata"].get("groundup")
    assert meta, f"{path.name} was not executed by tools/run_notebooks.py (no groundup metadata)"
    assert meta["profile"] in ("smoke", "full") and meta["device"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and _text(c).strip()]
    assert all(c.get("execution_count") for c in code), "every code cell was executed and its outputs committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_results_file_matches_the_committed_run(path):
    results = ROOT / "results" / f"{path.stem}.json"
    assert results.exists(), f"missing {results.relative_to(ROOT)}"
    record = json.loads(results.read_text())
    meta = json.loads(path.read_text())["metadata"]["groundup"]
    assert record["chapter"] == path.stem
    assert record["profile"] == meta["profile"] and record["device"] == meta["device"]
    for key in ("metrics", "rows", "config", "data", "torch", "wall_time_s", "git", "date"):
        assert key in record


def test_results_tables_are_current():
    import results_table
    for path, text in results_table.outputs(ROOT).items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `make results`"


def test_library_is_in_sync_with_notebooks():
    import export
    assert export.check(ROOT) == [], "lib/ is out of sync with the notebooks: run `make export`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_display_math_renders(path):
    """Sphinx wraps a $$ block containing `\\\\` in a `split` environment, where MathJax rejects
    `\\tag` ("\\tag not allowed in split environment"). Use `\\cr` in matrices, or `align*`."""
    for cell in _cells(path):
        if cell["cell_type"] != "markdown":
            continue
        for block in re.findall(r"\$\$(.*?)\$\$", _text(cell), re.S):
            assert not ("\\\\" in block and "\\tag" in block), f"{path.name}: {block.strip()[:80]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_has_no_control_characters(path):
    """LaTeX written through a non-raw Python string loses its backslashes: `\\approx` becomes BEL + "pprox"
    (MathJax: "Math input error") and `\\times` becomes TAB + "imes" (shown as "imes")."""
    for number, cell in enumerate(_cells(path), start=1):
        if cell["cell_type"] == "markdown":
            bad = sorted({hex(ord(ch)) for ch in _text(cell) if ord(ch) < 32 and ch != "\n"})
            assert not bad, f"{path.name}, cell {number}: control characters {bad} (a lost backslash?)"
