"""The website as a reader sees it: the built site loaded in headless Chromium.

Checks what a page's HTML alone does not show: tables render as tables (no raw `| a | b |` text), every
cell of a generated table holds what it should (a `|` inside a cell once split rows into wrong columns),
MathJax typesets without errors, no display equation is clipped (it fits its column, or its box scrolls
and starts inside it), every image loads, code of up to CODE_WIDTH characters fits the column on a
desktop, and the search page finds a chapter by a word from it.

The site is `_build/html` (which `make test` builds before pytest) when it is newer than every source,
else it is built into a scratch folder; BOOK_SITE_DIR names another built site. Needs Chromium and its
driver (Debian: `apt-get install chromium chromium-driver`; `.ci/run` installs them) and selenium.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_WIDTH = 120  # characters of code that fit the column at 1400 px (see tests/test_book.py's line limit)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no headless Chromium: install Debian's `chromium` and `chromium-driver` packages "
                "(apt-get install -y chromium chromium-driver; .ci/run does) to run the website's browser test",
                allow_module_level=True)

# A few representative pages: the landing page, chapters with wide tables, numbered equations and
# figures, the generated results page and the setup page (a table of commands).
PAGES = ["book/intro.html", "book/setup.html", "book/results.html", "notebooks/03_cnn_cifar10.html",
         "notebooks/07_gpt_mini.html", "notebooks/14_vae.html", "notebooks/17_improved_ddpm.html"]
WIDTHS = [1400, 400]


def _sources() -> list[Path]:
    files = [ROOT / "_config.yml", ROOT / "_toc.yml", *ROOT.glob("book/**/*"), *ROOT.glob("notebooks/*.ipynb")]
    return [f for f in files if f.is_file()]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if os.environ.get("BOOK_SITE_DIR"):
        return Path(os.environ["BOOK_SITE_DIR"])
    built = ROOT / "_build" / "html" / "index.html"
    if built.exists() and all(f.stat().st_mtime <= built.stat().st_mtime for f in _sources()):
        return built.parent
    out = tmp_path_factory.mktemp("site")
    jb = Path(os.environ.get("JUPYTER_BOOK", ROOT / ".venv" / "bin" / "jupyter-book"))
    subprocess.run([str(jb) if jb.exists() else "jupyter-book", "build", str(ROOT), "--path-output", str(out),
                    "--warningiserror", "--keep-going", "--quiet"], check=True, capture_output=True)
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def server(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(60)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(driver, url: str, width: int):
    driver.set_window_size(width, 1000)
    driver.get(url)
    # wait until MathJax has typeset the page (when the page has math) and the fonts are in
    driver.execute_async_script("""
        const done = arguments[0];
        const wait = (n) => {
          if (window.MathJax && MathJax.startup && MathJax.startup.promise)
            return MathJax.startup.promise.then(() => document.fonts.ready).then(() => done(true));
          if (n <= 0 || !document.querySelector('script[src*="mathjax"]')) return done(false);
          setTimeout(() => wait(n - 1), 100);
        };
        wait(100);""")


# --- what a page shows, measured in the browser -----------------------------------------------------

RAW_TABLE_JS = r"""
const article = document.querySelector('article') || document.body;
const copy = article.cloneNode(true);
copy.querySelectorAll('pre, code, mjx-container, script, style').forEach(e => e.remove());
document.body.appendChild(copy);  // innerText needs a rendered node
copy.style.position = 'absolute'; copy.style.left = '-99999px';
const lines = copy.innerText.split('\n').map(l => l.trim());
copy.remove();
// a pipe table that was not parsed: one paragraph "| a | b | |---|---| | 1 | 2 |" (Sphinx turns --- into an em dash)
return lines.filter(l => (/^\|.*\|$/.test(l) && (l.match(/\|/g) || []).length >= 3) || /\|\s*:?(-{3,}|—+|–+):?\s*\|/.test(l));
"""

BROKEN_CELLS_JS = r"""
// a `|` inside an unescaped code span splits it: the cell then shows a lone backtick
return [...document.querySelectorAll('article table td, article table th')]
  .filter(td => td.innerText.includes('`')).map(td => td.innerText.slice(0, 120));
"""

# textContent: a table folded in a dropdown is not rendered, but its cells are there
CELLS_JS = r"""return [...document.querySelectorAll('article table td')].map(td => td.textContent.trim());"""


def _same(text: str) -> str:
    """Text with Sphinx's smart quotes (an opening \u2018, a closing \u2019) made straight again and
    whitespace collapsed: apply it to both sides of a comparison."""
    return " ".join(text.replace("\u2018", "'").replace("\u2019", "'").split())

MATH_ERRORS_JS = r"""
return [...document.querySelectorAll('mjx-merror, .MathJax_Error, [data-mjx-error]')]
  .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120));
"""

CLIPPED_MATH_JS = r"""
// A display equation is fine when its box fits its column, or when the box that scrolls it starts no
// further left than the equation (content left of a scroll box's edge can never be scrolled to).
function scroller(el) {
  for (let e = el; e && e !== document.body; e = e.parentElement) {
    const o = getComputedStyle(e).overflowX;
    if ((o === 'auto' || o === 'scroll') && e.scrollWidth > e.clientWidth + 1) return e;
  }
  return null;
}
const bad = [];
document.querySelectorAll('div.math').forEach((box, i) => {
  const math = box.querySelector('mjx-container mjx-math');
  if (!math) return;
  const m = math.getBoundingClientRect(), b = box.getBoundingClientRect();
  const s = scroller(math);
  const ok = s ? m.left >= s.getBoundingClientRect().left - 1 : (m.left >= b.left - 1 && m.right <= b.right + 1);
  if (!ok) bad.push({equation: i + 1, id: box.id || (box.querySelector('[id]') || {}).id || '',
                     tex: (box.querySelector('mjx-assistive-mml') || box).textContent.trim().slice(0, 60),
                     left: Math.round(m.left), right: Math.round(m.right),
                     column: [Math.round(b.left), Math.round(b.right)]});
});
return bad;
"""

IMAGES_JS = r"""
return [...document.images].filter(img => img.src.startsWith(location.origin))
  .filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src);
"""

WIDE_CODE_JS = r"""
const limit = arguments[0];
return [...document.querySelectorAll('article div.highlight pre')]
  .filter(pre => Math.max(...pre.textContent.split('\n').map(l => l.length)) <= limit)
  .filter(pre => pre.scrollWidth > pre.clientWidth + 1)
  .map(pre => pre.textContent.split('\n')[0].slice(0, 80));
"""


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("page", PAGES)
def test_page_renders(browser, server, page, width):
    _open(browser, f"{server}/{page}", width)
    problems = {
        "raw Markdown table text": browser.execute_script(RAW_TABLE_JS),
        "table cells split by an unescaped |": browser.execute_script(BROKEN_CELLS_JS),
        "MathJax errors": browser.execute_script(MATH_ERRORS_JS),
        "clipped display equations": browser.execute_script(CLIPPED_MATH_JS),
        "images that do not load": browser.execute_script(IMAGES_JS),
    }
    if width >= 1400:
        problems[f"code blocks of <= {CODE_WIDTH} characters that scroll sideways"] = \
            browser.execute_script(WIDE_CODE_JS, CODE_WIDTH)
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"{page} at {width} px:\n" + json.dumps(problems, indent=1, ensure_ascii=False)[:4000]


def _rows(root: Path, chapter: str | None = None) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((root / "results").glob("*.json"))]
    return [r for rec in records if chapter in (None, rec["chapter"]) for r in rec["rows"]]


def test_results_page_cells_hold_whole_values(browser, server):
    """Every metric of every results/*.json row is one whole cell of the results page, in the metric column."""
    _open(browser, f"{server}/book/results.html", 1400)
    cells = {_same(c) for c in browser.execute_script(CELLS_JS)}
    missing = [r["metric"] for r in _rows(ROOT) if _same(r["metric"]) not in cells]
    assert not missing, f"results page: rows whose metric is not one cell (split by a `|`?): {missing}"


# the chapters whose results rows hold a `|` (the ones a missing escape breaks)
PIPED = sorted(p.stem for p in (ROOT / "results").glob("*.json") if "|" in json.dumps(json.loads(p.read_text())["rows"]))


@pytest.mark.parametrize("chapter", PIPED)
def test_chapter_results_table_cells_hold_whole_values(browser, server, chapter):
    """The chapter's own results table (a display(Markdown(...)) output) shows each metric in one cell."""
    _open(browser, f"{server}/notebooks/{chapter}.html", 1400)
    cells = {_same(c) for c in browser.execute_script(CELLS_JS)}
    missing = [r["metric"] for r in _rows(ROOT, chapter) if _same(r["metric"]) not in cells]
    assert not missing, f"{chapter}: results rows whose metric is not one table cell: {missing}"


def test_search_finds_a_chapter(browser, server):
    """Sphinx's client-side search finds chapter 14 by a word that appears in it."""
    browser.set_window_size(1400, 1000)
    browser.get(f"{server}/search.html?q=reparameterization")
    links = browser.execute_async_script("""
        const done = arguments[0]; let n = 0;
        const poll = () => {
          const found = [...document.querySelectorAll('#search-results li a')].map(a => a.href);
          const status = document.querySelector('#search-results p.search-summary, #search-results .search-summary');
          if ((found.length && status) || n++ > 200) return done(found);
          setTimeout(poll, 100);
        };
        poll();""")
    assert any("14_vae" in href for href in links), f"search for 'reparameterization' found {links}"


# --- every page, without a browser ---------------------------------------------------------------------

class _Text(HTMLParser):
    """The text of a page outside <pre>, <code>, <script> and <style>, and its local <img> sources."""

    SKIP = {"pre", "code", "script", "style"}

    def __init__(self):
        super().__init__()
        self.depth, self.text, self.images = 0, [], []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth += 1
        if tag == "img":
            src = dict(attrs).get("src", "")
            if src and not re.match(r"^(https?:|data:)", src):
                self.images.append(src)

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.text.append(data)


def test_every_page_has_no_raw_tables_and_no_missing_images(site):
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.parts)
    assert len(pages) > 10, f"only {len(pages)} pages in {site}"
    problems = []
    for page in pages:
        parser = _Text()
        parser.feed(page.read_text(encoding="utf-8"))
        text = html.unescape("".join(parser.text))
        raw = [line.strip() for line in text.splitlines() if re.search(r"\|\s*:?(-{3,}|—+|–+):?\s*\|", line)]
        if raw:
            problems.append(f"{page.relative_to(site)}: raw table text {raw[:2]}")
        missing = [src for src in parser.images if not (page.parent / src.split("#")[0].split("?")[0]).exists()]
        if missing:
            problems.append(f"{page.relative_to(site)}: missing images {missing[:3]}")
    assert not problems, "\n".join(problems)
