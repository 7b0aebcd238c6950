"""Generate the results tables from ``results/*.json``: ``results/README.md`` and ``book/results.md``.

    python tools/results_table.py              # write both
    python tools/results_table.py --check      # exit 1 if either is out of date
    python tools/results_table.py --notebooks  # also redraw each chapter's committed results table

``--notebooks`` replaces the committed output of a chapter's ``display(Markdown(rows_markdown(record)))``
by ``rows_markdown`` of the same run's ``results/<chapter>.json``: the numbers are the run's, only the
table's formatting is today's (for a change of ``rows_markdown`` itself; it never runs a notebook).

Every number comes from a JSON file that a chapter's code wrote; nothing here is typed by hand except the
reasons of ``book/missed_targets.json``, words without numbers, one for each target a run missed (``--check``
fails when a missed target has none, or a reason names no missed target).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))
from groundup.results import _fmt, headline, judged, load_records, met_text, rows_markdown, table_row  # noqa: E402

MISSED = ROOT / "book" / "missed_targets.json"

INTRO = """Every number below was written by a chapter's own code into `results/<chapter>.json` and collected by
`tools/results_table.py` (`make results`). A run is judged against the targets of its profile: those the
book's specification (BOOK.md) sets, which the Targets page (`book/targets.md`) lists, and each chapter's own,
stated in its results table: a `cpu` run (at most
30 minutes on 2 CPU cores) against the cpu targets, a `full` run (at most 10 minutes of training on one
H100/H200) against the full targets. A `smoke` run (seconds of training, what CI runs) only shows that
the code runs end to end: its targets read "smoke run", except the checks that hold in any profile
(equivalences with a reference implementation, exact round trips), which are judged in every run. Paper
figures are quoted with their source; ours were measured.
"""


def load(root: Path = ROOT) -> list[dict]:
    return load_records(root / "results")


def load_kept(root: Path = ROOT) -> list[dict]:
    """The records kept in ``results/<profile>/`` after a run of another profile replaced them (a chapter's
    cpu run, once a GPU's full run became its record), in chapter order."""
    kept = [r for folder in sorted(p for p in (root / "results").iterdir() if p.is_dir())
            for r in load_records(folder)]
    return sorted(kept, key=lambda r: r["chapter"])


def load_reasons(path: Path = MISSED) -> dict[str, dict[str, str]]:
    """{chapter: {start of a row's metric: why its target was missed}} from ``book/missed_targets.json``."""
    if not path.exists():
        return {}
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}


def missed(records: list[dict]) -> list[tuple[dict, dict]]:
    """Every (record, row) whose target was judged and missed."""
    return [(rec, r) for rec in records for r in rec["rows"] if judged(rec, r) and r["met"] is False]


def reason(reasons: dict, rec: dict, row: dict) -> str | None:
    return next((why for start, why in reasons.get(rec["chapter"], {}).items() if row["metric"].startswith(start)),
                None)


def unexplained(records: list[dict], reasons: dict) -> list[str]:
    """What --check refuses: a missed target without a reason, and a reason that matches no missed target."""
    misses = missed(records)
    problems = [f"{rec['chapter']}: no reason for the missed target {r['metric']!r} in {MISSED.name}"
                for rec, r in misses if reason(reasons, rec, r) is None]
    for chapter, entries in reasons.items():
        for start in entries:
            if not any(rec["chapter"] == chapter and r["metric"].startswith(start) for rec, r in misses):
                problems.append(f"{chapter}: the reason for {start!r} in {MISSED.name} matches no missed target")
    return problems


def misses_list(records: list[dict], reasons: dict, link=None) -> str:
    """One item per missed target: the chapter, the row, our number against the target, and why."""
    items = []
    for rec, r in missed(records):
        number = rec["chapter"][:2]
        name = link(rec) if link else f"{number} `{rec['chapter']}`"
        why = reason(reasons, rec, r) or "(no reason recorded)"
        items.append(f"- **{name}** ({rec['profile']} profile), {r['metric']}: {_fmt(r['ours'], r['unit'])} "
                     f"against {r['target']}. {why}")
    return "\n".join(items) if items else "Every judged target was met."


def _device(rec: dict) -> str:
    return rec["device"]


def summary(records: list[dict]) -> str:
    """Every row of every chapter with its run: the table issue readers and maintainers scan."""
    lines = [table_row("chapter", "metric", "ours", "paper", "target", "met", "profile", "device", "wall time",
                       "date", "commit"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        for r in rec["rows"]:
            lines.append(table_row(rec["chapter"], r["metric"], _fmt(r["ours"], r["unit"]), r["paper"], r["target"],
                                   met_text(rec, r), rec["profile"], rec["device"], f"{rec['wall_time_s']:.0f} s",
                                   rec["date"][:10], f"`{rec['git']['commit'][:8]}`"))
    return "\n".join(lines)


def overview(records: list[dict]) -> str:
    """The website's one-screen summary: one row per chapter, its headline number and the run that made it."""
    lines = ["| chapter | headline metric | ours | target | met | profile | device |", "|---|---|---|---|---|---|---|"]
    for rec in records:
        r = headline(rec)
        number = rec["chapter"][:2]
        lines.append(table_row(f"[{number}](#ch-{number})", r["metric"], _fmt(r["ours"], r["unit"]), r["target"],
                               met_text(rec, r), rec["profile"], _device(rec)))
    return "\n".join(lines)


def readme(records: list[dict], kept: list[dict] = (), reasons: dict | None = None) -> str:
    text = (f"# Results\n\n{INTRO}\n## Targets missed, and why\n\n{misses_list(records, reasons or {})}\n\n"
            f"## Every row\n\n{summary(records)}\n")
    if kept:
        text += (f"\n## Earlier runs of another profile\n\n{KEPT_INTRO}\n{summary(kept)}\n")
    return text


def _data_item(name: str, d) -> str:
    """One data entry, e.g. "MNIST train: 17,435 examples from the mirror (...)"; unknown keys in parentheses."""
    if not isinstance(d, dict):
        return f"{name}: {d}"
    used = {"dataset", "split", "source", "unit"}
    text = " ".join(str(d[k]) for k in ("dataset", "split") if k in d) or name
    count = next((k for k in ("examples", "characters", "tokens") if isinstance(d.get(k), int)), None)
    if count:
        used.add(count)
        text += f": {d[count]:,} {d.get('unit', count)}"
    if "source" in d:
        text += f" from the {d['source']}"
    extras = [f"{k} {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in d.items() if k not in used]
    return text + (f" ({'; '.join(extras)})" if extras else "")


def describe_data(data: dict) -> str:
    """A chapter's `data` record in words: one item per entry (or the whole record when no entry is a data set)."""
    if any(isinstance(v, dict) for v in data.values()):
        return "; ".join(_data_item(name, d) for name, d in data.items())
    return _data_item("data", data)


KEPT_INTRO = """A chapter's record is its best run (the book's rule: `full` where a GPU run exists, else `cpu`). When a
GPU's `full` run replaced a `cpu` record, the `cpu` record is kept in `results/cpu/`: later chapters of
the cpu profile compare themselves with it, and its rows follow here.
"""


def book_page(records: list[dict], kept: list[dict] = (), reasons: dict | None = None) -> str:
    """The website's results page: the one-screen summary, how runs are judged, then every row of every
    chapter, each chapter's table folded under its heading."""
    parts = ["# Results\n\nOne row per chapter: its headline number, its target, and the run that made it "
             "(profile and device). Every row of every chapter follows [below](#all-rows).\n\n"
             f":::{{table}}\n:class: groundup-summary\n{overview(records)}\n:::\n\n"
             f"## Targets missed, and why\n\nEvery target a committed run missed, with the reason its chapter "
             f"gives at length.\n\n{misses_list(records, reasons or {}, _chapter_link)}\n\n"
             f"## How the runs are judged\n\n{INTRO}\n(all-rows)=\n## Every row, chapter by chapter\n"]
    for rec in records:
        number = rec["chapter"][:2]
        link = f"[chapter {number}](../notebooks/{rec['chapter']}.ipynb)"
        body = f"{rows_markdown(rec)}\n\nData: {describe_data(rec['data'])}.\n"
        if rec.get("notes"):
            body += f"\n{rec['notes']}\n"
        parts.append(f"\n(ch-{number})=\n### {number} · {rec['title']}\n\n"
                     f"{len(rec['rows'])} rows from {link}, {rec['profile']} profile on {rec['device']}.\n\n"
                     f"::::{{dropdown}} The {len(rec['rows'])} rows and the data\n{body}::::\n")
        for old in (k for k in kept if k["chapter"] == rec["chapter"]):
            h = headline(old)
            parts.append(f"\nThe chapter's earlier {old['profile']}-profile run ({old['device']}, "
                         f"{old['date'][:10]}, commit `{old['git']['commit'][:8]}`), kept in "
                         f"`results/{old['profile']}/`: {h['metric']} {_fmt(h['ours'], h['unit'])} "
                         f"(target {h['target']}: {met_text(old, h)}).\n\n"
                         f"::::{{dropdown}} Its {len(old['rows'])} rows\n{rows_markdown(old)}\n::::\n")
    return "".join(parts)


def _chapter_link(rec: dict) -> str:
    return f"[chapter {rec['chapter'][:2]}](../notebooks/{rec['chapter']}.ipynb)"


def outputs(root: Path = ROOT) -> dict[Path, str]:
    records, kept = load(root), load_kept(root)
    reasons = load_reasons(root / "book" / MISSED.name)
    return {root / "results" / "README.md": readme(records, kept, reasons),
            root / "book" / "results.md": book_page(records, kept, reasons)}


TABLE_HEAD = "| metric | ours | paper |"


def redraw_notebook_tables(root: Path = ROOT) -> list[Path]:
    """Redraw the results table in each chapter's committed outputs from its results JSON; return the
    notebooks changed."""
    changed = []
    for rec in load(root):
        path = root / "notebooks" / f"{rec['chapter']}.ipynb"
        if not path.exists():
            continue
        nb = json.loads(path.read_text(encoding="utf-8"))
        if nb["metadata"].get("groundup", {}).get("profile") != rec["profile"]:
            continue  # the JSON is not of the run whose outputs are committed
        text = rows_markdown(rec)
        touched = False
        for c in nb["cells"]:
            for out in c.get("outputs", []):
                md = out.get("data", {}).get("text/markdown")
                if md is not None and "".join(md).startswith(TABLE_HEAD) and "".join(md) != text:
                    out["data"]["text/markdown"] = text.splitlines(keepends=True)
                    touched = True
        if touched:
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(path)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--notebooks", action="store_true", help="redraw the chapters' committed results tables")
    args = parser.parse_args(argv)
    if args.notebooks:
        for path in redraw_notebook_tables():
            print(f"redrew the results table in {path.relative_to(ROOT)}")
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current != text:
            if args.check:
                stale.append(str(path.relative_to(ROOT)))
            else:
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    problems = unexplained(load(), load_reasons())
    if problems:
        print("\n".join(problems) + f"\n(say why in {MISSED.relative_to(ROOT)}, in words)", file=sys.stderr)
        return 1
    if stale:
        print(f"out of date: {', '.join(stale)}; run `make results` and commit", file=sys.stderr)
        return 1
    if args.check:
        print("results tables are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
