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


def _draft(path):
    """A draft chapter (metadata ``groundup_draft``: why) is written and passes in smoke (nbmake) but has no
    committed run yet: it carries no outputs and no results file and is not published in the toc.
    ``tools/run_notebooks.py`` removes the mark when it makes a cpu or full run."""
    return json.loads(path.read_text())["metadata"].get("groundup_draft")


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_name_and_toc(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name)
    if _draft(path):
        assert f"notebooks/{path.stem}" not in _toc_files(), f"{path.name} is a draft: it is not published yet"
    else:
        assert f"notebooks/{path.stem}" in _toc_files(), f"{path.name} is not in _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_header_has_colab_badge_to_this_notebook(path):
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    owner_repo = repo.removeprefix("https://github.com/")
    header = _text(_cells(path)[0])
    assert header.startswith(f"# {path.name[:2]} ")
    assert f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}" in header
    assert re.search(r"\{cite(:[a-z]+)?\}`", header), "the header cites the chapter's paper(s)"
    assert "| smoke |" in header and "| full |" in header, "the header has a runtime table"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_installs_only_in_colab(path):
    setup = _text(_cells(path)[1])
    assert '"google.colab" in sys.modules' in setup and "pip" in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_say_what_produced_them(path):
    nb = json.loads(path.read_text())
    if _draft(path):                         # a draft commits no outputs (they would be a smoke run's)
        assert "groundup" not in nb["metadata"] and not any(c.get("outputs") for c in nb["cells"])
        return
    meta = nb["metadata"].get("groundup")
    assert meta, f"{path.name} was not executed by tools/run_notebooks.py (no groundup metadata)"
    assert meta["profile"] in ("cpu", "full") and meta["device"], \
        f"{path.name}: committed outputs come from a cpu or full run (`make outputs`), never smoke"
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and _text(c).strip()]
    assert all(c.get("execution_count") for c in code), "every code cell was executed and its outputs committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_are_clean(path):
    """No library warning, traceback or network failure, and no absolute folder of a machine, in what a reader
    of the page sees (tools/run_notebooks.py refuses such a run; this catches outputs committed otherwise)."""
    from run_notebooks import noisy_outputs

    noise = noisy_outputs(json.loads(path.read_text()))
    assert not noise, f"{path.name}: {noise[:3]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_results_file_matches_the_committed_run(path):
    results = ROOT / "results" / f"{path.stem}.json"
    if _draft(path):
        assert not results.exists(), f"{path.name} is a draft: results/ holds only committed runs"
        return
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


def test_every_missed_target_is_explained():
    import results_table
    records = results_table.load()
    reasons = results_table.load_reasons()
    assert not results_table.unexplained(records, reasons)
    # the check can fail: a missed row without its reason, and a reason whose row was met
    chapter, entries = next(iter(reasons.items()))
    fewer = {**reasons, chapter: dict(list(entries.items())[1:])}
    assert any("no reason" in p for p in results_table.unexplained(records, fewer))
    stale = {**reasons, "01_tensors_regression": {"least-squares classifier": "why"}}
    assert any("matches no missed target" in p for p in results_table.unexplained(records, stale))


def test_provenance_compares_code_not_layout():
    import provenance
    cell = "x = 1  # one\nprint(x)\n"
    assert provenance.changed_cells([cell], ["x = 1\n\n# a new comment\nprint(\n    x)\n"]) == []
    assert provenance.changed_cells([cell], ["x = 2\nprint(x)\n"]) == [0]                # a changed number
    assert provenance.changed_cells([cell], [cell, "assert x > 0\n"]) == [1]             # an added cell
    assert provenance.changed_cells(["%matplotlib inline\nx = 1"], ["%matplotlib inline\nx = 1 # c"]) == []
    assert provenance.changed_cells(["%time x = 1"], ["%time x = 2"]) == [0]
    # followed through the library's own imports: latent imports unet (`from .unet import ...`)
    assert {"latent", "unet"} <= provenance.imported_modules(["from groundup.latent import KLAutoencoder"])


def test_pages_show_the_code_that_ran():
    """Each chapter's code cells equal those of the commit its committed run started from (or an excuse in
    book/provenance_exceptions.json says why not); skipped without the repository's history."""
    import provenance
    if provenance.git("rev-parse", "--verify", "HEAD").returncode != 0:
        pytest.skip("no git (or no history) here")
    rows = provenance.report(ROOT)
    compared = [r for r in rows if r["cells"] is not None]
    if not compared:
        pytest.skip("the runs' commits are not in this clone's history (shallow)")
    excused = provenance.load_exceptions()
    changed = {r["chapter"]: r["cells"] for r in compared if r["cells"] and r["chapter"] not in excused}
    assert not changed, f"code changed after the committed run (make provenance): {changed}"
    stale = [name for name in excused if any(r["chapter"] == name and r["cells"] == [] for r in compared)]
    assert not stale, f"excused in book/provenance_exceptions.json but unchanged: {stale}"
    assert not [r["chapter"] for r in rows if r["dirty"]], "a committed run started from a dirty checkout"


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


# The website's code column fits CODE_WIDTH characters at 1400 px (tests/test_site.py checks it in a browser).
# New code stays within 100 characters (CONTRIBUTING.md); lines over CODE_WIDTH are counted per notebook
# and may only become fewer: the counts of 2026-12-02, when the limit came in.
CODE_WIDTH = 120
LONG_CODE_LINES = {"01_tensors_regression": 3, "02_mlp_mnist": 4, "03_cnn_cifar10": 6, "04_rnn_lstm_gru": 4,
                   "05_attention": 12, "06_transformer": 17, "07_gpt_mini": 4, "08_bpe_tokenizer": 5,
                   "09_gpt_small": 7, "14_vae": 16, "15_ddpm_mnist": 16, "16_unet_ddpm_cifar10": 8,
                   "17_improved_ddpm": 8}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_fit_the_page(path):
    long = [line for cell in _cells(path) if cell["cell_type"] == "code"
            for line in _text(cell).splitlines() if len(line) > CODE_WIDTH]
    allowed = LONG_CODE_LINES.get(path.stem, 0)
    assert len(long) <= allowed, (f"{path.name}: {len(long)} code lines longer than {CODE_WIDTH} characters "
                                  f"(at most {allowed}; they scroll sideways on the website): {long[:3]}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_headings_have_no_latex(path):
    """A heading's text goes into the page's contents on the right, where LaTeX is not rendered."""
    for cell in _cells(path):
        if cell["cell_type"] == "markdown":
            for heading in re.findall(r"^#{1,6} .*$", _text(cell), re.M):
                assert not re.search(r"\$|\\|_\{|\^\{", heading), f"{path.name}: LaTeX in a heading: {heading}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_citations_are_not_doubled(path):
    """Typing the authors and year next to an author-year citation shows them twice ("Heusel et al. 2017
    [Heusel et al., 2017]"): write {cite:t}`key` (Heusel et al. [2017]) or {cite:p}`key` alone."""
    for cell in _cells(path):
        if cell["cell_type"] == "markdown":
            doubled = re.findall(r"[A-Z][\w-]+(?:\s+et\s+al\.|\s+and\s+[A-Z][\w-]+)(?:'s)?,?\s+(?:\d{4}\s+)?\{cite(?::p)?\}`",
                                 _text(cell))
            assert not doubled, f"{path.name}: {doubled}"


def test_arxiv_identifiers_are_links():
    """An arXiv identifier is a link to its abstract wherever it appears: in the chapters' text as
    [arXiv:ID](https://arxiv.org/abs/ID), in the bibliography as an `eprint` (the style links it)."""
    bare = re.compile(r"(?<![\[/])arXiv:\d{4}\.\d{4,5}")
    for path in NOTEBOOKS:
        for cell in _cells(path):
            if cell["cell_type"] == "markdown":
                assert not bare.findall(_text(cell)), f"{path.name}: {bare.findall(_text(cell))}"
    bib = (ROOT / "book" / "references.bib").read_text()
    assert not re.findall(r"(?i)(note|journal|howpublished)\s*=\s*\{[^}]*arxiv", bib), \
        "write an arXiv paper's identifier as eprint = {ID}, archivePrefix = {arXiv}"
