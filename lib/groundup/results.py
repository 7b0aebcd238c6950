"""The results recorder: every chapter ends by writing ``results/NN_slug.json``.

Hand-written plumbing. A record holds the chapter's metrics, its comparison rows (ours next to the
paper's figure and the book's target), the config, the profile, the device, the torch version, the
wall time, the git commit, the date and which data were used. The website's results page and
``results/README.md`` are generated from these files (``tools/results_table.py``); nothing in them
is typed by hand.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from .runtime import book_root, device_name, get_device, get_profile


def results_dir() -> Path:
    """Where a run writes its record: ``BOOK_RESULTS_DIR`` if set, else a scratch folder ``_build/results``.

    The committed ``results/`` is written only by the runs that produce the website's outputs
    (``make outputs``, ``tools/run_notebooks.py`` set ``BOOK_RESULTS_DIR``): a reader's run in JupyterLab
    never overwrites a committed record."""
    value = os.environ.get("BOOK_RESULTS_DIR")
    return Path(value) if value else book_root() / "_build" / "results"


def committed_results_dir() -> Path:
    """The committed records, ``results/`` at the book's root."""
    return book_root() / "results"


def kept_results_dir(profile: str) -> Path:
    """``results/<profile>/``: a committed record of ``profile`` kept after a run of another profile (a GPU's
    ``full`` run) replaced it as the chapter's record, so that later chapters of that profile can still
    compare themselves with it."""
    return committed_results_dir() / profile


def read_results(slug: str, profile: str | None = None) -> dict | None:
    """The record of chapter ``slug`` that a later chapter compares itself with (its measured numbers, its
    checkpoint's name): the first of this session's run, the committed record and the one kept in
    ``results/<profile>/`` whose profile is ``profile`` (default: this run's), else the first of them that
    exists, whatever its profile; None if there is none."""
    profile = profile or get_profile()
    found = []
    for path in (results_dir() / f"{slug}.json", committed_results_dir() / f"{slug}.json",
                 kept_results_dir(profile) / f"{slug}.json"):
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("profile") == profile:
                return record
            found.append(record)
    return found[0] if found else None


def git_commit(root: Path | None = None) -> dict:
    """{"commit", "dirty"} of the book's checkout. Where the run has no ``.git`` (a GPU machine that received a
    copy of the working tree), ``BOOK_GIT_COMMIT`` names the commit the copy was made from (and
    ``BOOK_GIT_DIRTY`` = 1/0 whether the tree had changes); ``tools/run_notebooks.py`` sets both at the start of
    a run, so that a record names the code the run started from even if the checkout moves meanwhile."""
    if os.environ.get("BOOK_GIT_COMMIT"):          # also set by tools/run_notebooks.py: the commit at the run's start
        dirty = {"1": True, "0": False}.get(os.environ.get("BOOK_GIT_DIRTY", ""))
        return {"commit": os.environ["BOOK_GIT_COMMIT"], "dirty": dirty}
    root = root or book_root()
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        # no repository, or one with no commit yet (where `git rev-parse HEAD` prints "HEAD"): no commit
        commit = head.stdout.strip() if head.returncode == 0 else ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit or "unknown", "dirty": bool(dirty) if commit else None}


@dataclasses.dataclass
class Row:
    """One line of a chapter's results table: our measurement next to the paper's and the target."""
    metric: str
    ours: float | str
    paper: str = "—"   # the paper's figure, with its source and setting, e.g. "1.6% (Simard 2003, 60k images)"
    target: str = "—"  # the book's target for this run's profile (BOOK.md: cpu or full), e.g. ">= 98.0%"
    met: bool | None = None  # whether ours meets the target; None where there is none
    unit: str = ""
    any_profile: bool = False  # a check that holds in every profile (an equivalence, an exact round trip):
    #                            judged in smoke runs too, where other targets are not
    headline: bool = False  # the chapter's headline number: the row the results page's summary shows


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def record_results(slug: str, *, title: str, metrics: dict, rows: list[Row], config, data: dict,
                   wall_time_s: float, notes: str = "", device=None) -> dict:
    """Write ``results/<slug>.json`` and return the record."""
    device = torch.device(device) if device is not None else get_device()
    record = {
        "chapter": slug,
        "title": title,
        "profile": get_profile(),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_time_s": round(float(wall_time_s), 2),
        "git": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": data,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        "metrics": metrics,
        "rows": [dataclasses.asdict(r) for r in rows],
        "notes": notes,
    }
    path = results_dir() / f"{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    try:                                           # a path relative to the book, not this machine's folders
        shown = path.resolve().relative_to(book_root().resolve())
    except ValueError:
        shown = path.name
    print(f"wrote {shown}", file=sys.stderr)
    return record


def _fmt(value, unit: str = "") -> str:
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text}{unit}" if unit and text != "—" else text


JUDGED_PROFILES = ("cpu", "full")  # profiles whose runs are judged against their targets (BOOK.md)


def judged(record: dict, row: dict) -> bool:
    """Whether ``row`` of ``record`` is judged against its target: every row of a cpu or full run, and in a
    smoke run only the checks that hold in any profile (``Row.any_profile``)."""
    return record["profile"] in JUDGED_PROFILES or bool(row.get("any_profile"))


def met_text(record: dict, row: dict) -> str:
    """The "met" cell: yes / no / — (no target), or "smoke run" for a target a smoke run is not judged on."""
    if not judged(record, row):
        return "smoke run"
    return {True: "yes", False: "no", None: "—"}[row["met"]]


def cell(value) -> str:
    """Text for one Markdown table cell: a ``|`` would end the cell, a newline the row."""
    return " ".join(str(value).split()).replace("\\|", "|").replace("|", "\\|")


def table_row(*cells) -> str:
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def rows_markdown(record: dict) -> str:
    """A chapter's results table in Markdown, with the run it came from under it."""
    lines = ["| metric | ours | paper | target | met |", "|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(table_row(r["metric"], _fmt(r["ours"], r["unit"]), r["paper"], r["target"], met_text(record, r)))
    lines.append("")
    lines.append(f"*{record['profile']} profile on {record['device']}, torch {record['torch']}, "
                 f"wall time {record['wall_time_s']:.1f} s, {record['date'][:10]}, "
                 f"commit {record['git']['commit'][:10]}.*")
    return "\n".join(lines)


# Records written before rows carried `any_profile` name their equivalence checks in words like these.
_CHECK_WORDS = re.compile(r"\bvs\b|→|round trip|max abs|max rel|max \||= ?greedy")


def _is_check(row: dict) -> bool:
    return bool(row.get("any_profile")) or bool(_CHECK_WORDS.search(row["metric"]))


def headline(rec: dict) -> dict:
    """The row a chapter marked ``headline``; else its first row with a target that is not an equivalence
    check; else its first row that is not a check; else its first row."""
    rows = rec["rows"]
    marked = [r for r in rows if r.get("headline")]
    scored = [r for r in rows if r["target"] not in ("", "—") and not _is_check(r)]
    return (marked or scored or [r for r in rows if not _is_check(r)] or rows)[0]


def load_records(folder: Path | None = None) -> list[dict]:
    """Every record in ``folder`` (default: the committed ``results/``), in chapter order."""
    folder = committed_results_dir() if folder is None else Path(folder)
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def chapter_number(record: dict) -> int:
    """The chapter's number, from its slug ("07_gpt_mini" -> 7)."""
    return int(record["chapter"].split("_", 1)[0])


def missing_chapters(records: list[dict], expected) -> list[int]:
    """The chapter numbers in ``expected`` that have no record."""
    have = {chapter_number(r) for r in records}
    return [n for n in expected if n not in have]


def met_counts(record: dict) -> dict:
    """How a record's rows with a target fared: {"met", "missed", "not judged"} (a smoke run's targets,
    other than its any-profile checks, are not judged). Rows without a target are not counted."""
    counts = {"met": 0, "missed": 0, "not judged": 0}
    for r in record["rows"]:
        if r["met"] is None:
            continue
        key = "not judged" if not judged(record, r) else ("met" if r["met"] else "missed")
        counts[key] += 1
    return counts


def chapters_markdown(records: list[dict]) -> str:
    """One row per chapter: its headline row (ours, the paper's figure, the target, met), how many of its
    targets were met, and the run (profile, device, wall time, commit)."""
    lines = [table_row("ch", "headline metric", "ours", "paper", "target", "met", "targets met",
                       "profile", "device", "wall time", "commit"), "|---" * 11 + "|"]
    for rec in records:
        r, n = headline(rec), met_counts(rec)
        lines.append(table_row(f"{chapter_number(rec):02d}", r["metric"], _fmt(r["ours"], r["unit"]), r["paper"],
                               r["target"], met_text(rec, r), f"{n['met']} of {n['met'] + n['missed']}",
                               rec["profile"], rec["device"], f"{rec['wall_time_s']:.0f} s",
                               f"`{rec['git']['commit'][:8]}`"))
    return "\n".join(lines)
