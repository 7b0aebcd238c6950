"""Generate the results tables from ``results/*.json``: ``results/README.md`` and ``book/results.md``.

    python tools/results_table.py          # write both
    python tools/results_table.py --check  # exit 1 if either is out of date

Every number comes from a JSON file that a chapter's code wrote; nothing here is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))
from groundup.results import _fmt, rows_markdown  # noqa: E402

INTRO = """Every number below was written by a chapter's own code into `results/<chapter>.json` and
collected by `tools/results_table.py` (`make results`). Targets are those of the full profile (one
H100, at most 10 minutes of training); a smoke-profile run (2 CPU cores, seconds of training) only
shows that the code runs end to end, so it is not judged against them. A full-profile run made on a
CPU is judged on its metrics but not on targets that name a GPU. Paper figures are quoted with
their source; ours were measured.
"""


def load(root: Path = ROOT) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "results").glob("*.json"))]


def _met(rec: dict, row: dict) -> str:
    return {True: "yes", False: "no", None: "—"}[row["met"]] if rec["profile"] == "full" else "—"


def summary(records: list[dict]) -> str:
    """Every row of every chapter with its run: the table issue readers and maintainers scan."""
    lines = ["| chapter | metric | ours | paper | target | met | profile | device | wall time | date | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        for r in rec["rows"]:
            lines.append(
                f"| {rec['chapter']} | {r['metric']} | {_fmt(r['ours'], r['unit'])} | {r['paper']} | {r['target']} | "
                f"{_met(rec, r)} | {rec['profile']} | {rec['device']} | {rec['wall_time_s']:.0f} s | {rec['date'][:10]} | "
                f"`{rec['git']['commit'][:8]}` |")
    return "\n".join(lines)


def compact(records: list[dict]) -> str:
    """The website's overview: narrow enough to read; each chapter's section below has the details."""
    lines = ["| chapter | metric | ours | target | met | run |", "|---|---|---|---|---|---|"]
    for rec in records:
        link = f"[{rec['chapter'][:2]}](../notebooks/{rec['chapter']}.ipynb)"
        for r in rec["rows"]:
            lines.append(f"| {link} | {r['metric']} | {_fmt(r['ours'], r['unit'])} | {r['target']} | {_met(rec, r)} | "
                         f"{rec['profile']}, {rec['device_type'].upper()} |")
    return "\n".join(lines)


def readme(records: list[dict]) -> str:
    return f"# Results\n\n{INTRO}\n{summary(records)}\n"


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


def book_page(records: list[dict]) -> str:
    parts = [f"# Results\n\n{INTRO}\n## All chapters\n\n{compact(records)}\n"]
    for rec in records:
        parts.append(f"\n## {rec['chapter']}: {rec['title']}\n\n{rows_markdown(rec)}\n")
        parts.append(f"\nData: {describe_data(rec['data'])}.\n")
        if rec.get("notes"):
            parts.append(f"\n{rec['notes']}\n")
    return "".join(parts)


def outputs(root: Path = ROOT) -> dict[Path, str]:
    records = load(root)
    return {root / "results" / "README.md": readme(records), root / "book" / "results.md": book_page(records)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current != text:
            if args.check:
                stale.append(str(path.relative_to(ROOT)))
            else:
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `make results` and commit", file=sys.stderr)
        return 1
    if args.check:
        print("results tables are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
