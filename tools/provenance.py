"""Does each chapter's page show the code that produced its outputs?

    python tools/provenance.py           # a table: each chapter, the commit its committed run started from,
                                         # whether its code cells are still that run's, and the library
                                         # modules it imports that changed since
    python tools/provenance.py --check   # exit 1 where a chapter's code cells differ from its run's

A committed notebook records, in its metadata, the commit its run started from (``tools/run_notebooks.py``
writes it; the chapter's ``results/*.json`` names the same commit). This tool reads the notebook at that
commit and compares its code cells with today's, as Python syntax trees: comments, blank lines and line
breaks do not count, anything that Python would run differently does (a changed number, string, argument or
assert). A page whose code changed after its run shows outputs that its code did not produce: run it again
(``make outputs NB=... PROFILE=cpu``) and commit the outputs with the code.

The library modules a chapter imports (``groundup.*``, followed through their own imports) are compared the
same way and reported, not judged: most are other chapters' code, and a change there (a new option, a
silenced warning) rarely touches this chapter's numbers. Whether it does is for the author of the change to
say; the report lists them so that they can.

A chapter whose run cannot be repeated here (a ``full`` run that needs a GPU) may be excused in
``book/provenance_exceptions.json``, with the reason in words; ``--check`` fails for an excuse that names a
chapter whose code did not change (so that none outlives its cause). Without the repository's history (a
copy without ``.git``, a shallow clone) nothing can be compared: the tool says so and ``--check`` passes.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCEPTIONS = ROOT / "book" / "provenance_exceptions.json"
IMPORT = re.compile(r"\bgroundup\.(\w+)|^\s*from \.(\w+) import", re.MULTILINE)


def git(*args: str) -> subprocess.CompletedProcess:
    """``git args`` in the book's checkout; without git on this machine, a failed process (nothing to compare)."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError as e:
        return subprocess.CompletedProcess(["git", *args], returncode=127, stdout="", stderr=str(e))


def show(commit: str, path: str) -> str | None:
    """The file at ``commit``, or None where the commit or the file is not there."""
    out = git("show", f"{commit}:{path}")
    return out.stdout if out.returncode == 0 else None


def normalized(source: str) -> str:
    """Python source as its syntax tree, so that comments and layout do not count. IPython's ``%`` and ``!``
    lines become a call naming the line; a cell that still does not parse is compared line by line, with
    comments and blank lines dropped."""
    lines = [f"__ipython__({line.strip()!r})" if line.lstrip()[:1] in ("%", "!") else line
             for line in source.splitlines()]
    try:
        return ast.dump(ast.parse("\n".join(lines)))
    except SyntaxError:
        kept = [re.sub(r"\s+#.*$", "", line).rstrip() for line in lines]
        return "\n".join(line for line in kept if line.strip() and not line.lstrip().startswith("#"))


def code_cells(notebook_text: str) -> list[str]:
    cells = json.loads(notebook_text)["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def changed_cells(old: list[str], new: list[str]) -> list[int]:
    """Indices (among today's code cells) that differ from the run's; a cell added counts where it is, a cell
    removed at the index of today's cell that follows it."""
    matcher = difflib.SequenceMatcher(a=[normalized(s) for s in old], b=[normalized(s) for s in new], autojunk=False)
    return sorted({j for tag, _, _, j1, j2 in matcher.get_opcodes() if tag != "equal"
                   for j in range(j1, max(j2, j1 + 1))})


def imported_modules(sources: list[str]) -> set[str]:
    """The ``groundup`` modules that ``sources`` import, followed through the modules' own imports (today's)."""
    todo = {m for s in sources for pair in IMPORT.findall(s) for m in pair if m}
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        path = ROOT / "lib" / "groundup" / f"{name}.py"
        if name in seen or not path.exists():
            continue
        seen.add(name)
        todo |= {m for pair in IMPORT.findall(path.read_text(encoding="utf-8")) for m in pair if m} - seen
    return seen


@functools.lru_cache(maxsize=None)
def module_changed(commit: str, name: str, root: Path = ROOT) -> bool:
    """Whether library module ``name`` differs, as a syntax tree, between ``commit`` and today (chapters share
    modules and often commits: each pair is compared once)."""
    return (normalized(show(commit, f"lib/groundup/{name}.py") or "")
            != normalized((root / "lib" / "groundup" / f"{name}.py").read_text(encoding="utf-8")))


def run_commit(notebook: Path) -> tuple[str | None, bool | None]:
    """The commit the committed run of ``notebook`` started from, and whether the checkout had changes then."""
    meta = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {}).get("groundup", {})
    g = meta.get("git") or {}
    return g.get("commit"), g.get("dirty")


def report(root: Path = ROOT) -> list[dict]:
    rows = []
    for nb in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        rel = nb.relative_to(root).as_posix()
        commit, dirty = run_commit(nb)
        row = {"chapter": nb.stem, "commit": commit, "dirty": dirty, "cells": None, "modules": None}
        old = show(commit, rel) if commit and commit != "unknown" else None
        if old is not None:
            new_cells = code_cells(nb.read_text(encoding="utf-8"))
            row["cells"] = changed_cells(code_cells(old), new_cells)
            row["modules"] = sorted(m for m in imported_modules(new_cells) if module_changed(commit, m, root))
        rows.append(row)
    return rows


def load_exceptions(path: Path = EXCEPTIONS) -> dict[str, str]:
    if not path.exists():
        return {}
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 where a page's code changed since its run")
    args = parser.parse_args(argv)
    if git("rev-parse", "--verify", "HEAD").returncode != 0:
        print("no git here, or no history (a copy without .git): nothing to compare")
        return 0
    rows = report()
    if all(r["cells"] is None for r in rows):
        print("none of the runs' commits is in this repository's history (a shallow clone?): nothing to compare")
        return 0
    excused = load_exceptions()
    print(f"{'chapter':30s} {'run at':9s} {'code cells changed since':26s} library modules changed since (not judged)")
    for r in rows:
        cells = ("not comparable" if r["cells"] is None else
                 "none" if not r["cells"] else ", ".join(f"[{i}]" for i in r["cells"][:6])
                 + (" ..." if len(r["cells"]) > 6 else ""))
        mods = "—" if r["modules"] is None else ", ".join(r["modules"]) or "none"
        flag = " (dirty checkout)" if r["dirty"] else ""
        print(f"{r['chapter']:30s} {(r['commit'] or '?')[:8]:9s} {cells + flag:26s} {mods}")
    problems = []
    for r in rows:
        if r["cells"] and r["chapter"] not in excused:
            problems.append(f"{r['chapter']}: code cells {r['cells']} changed since its run at {r['commit'][:8]}; "
                            f"run it again (make outputs NB=notebooks/{r['chapter']}.ipynb PROFILE=cpu) or, where "
                            f"that needs a GPU, say why in {EXCEPTIONS.relative_to(ROOT)}")
        if r["dirty"]:
            problems.append(f"{r['chapter']}: its run started from a checkout with uncommitted changes")
    for name, why in excused.items():
        row = next((r for r in rows if r["chapter"] == name), None)
        if row is None or row["cells"] == []:
            problems.append(f"{EXCEPTIONS.relative_to(ROOT)} excuses {name}, whose page shows the code that ran "
                            "(or which is no chapter): remove the entry")
        else:
            print(f"excused: {name}: {why}")
    if args.check and problems:
        print("\n" + "\n".join(problems), file=sys.stderr)
        return 1
    if problems:
        print("\n" + "\n".join(problems))
    return 0


if __name__ == "__main__":
    sys.exit(main())
