"""Execute notebooks in place, keep their outputs and record what produced them.

    BOOK_PROFILE=cpu python tools/run_notebooks.py [--fresh] notebooks/02_mlp_mnist.ipynb

``--fresh`` (what ``make outputs`` passes) deletes the chapter's own checkpoints first: the page then shows
a run that trained everything it reports, with its real times.

Committed outputs come from ``cpu`` or ``full`` runs (BOOK.md), never ``smoke``; the notebook's metadata
(``groundup``) records the profile, the device, the torch version, the commit, the date and the execution
time, and the website shows them. This is the run whose results are committed: it writes ``results/``
(``BOOK_RESULTS_DIR``), where a reader's run writes a scratch folder. After the run the outputs are checked
for this machine's folders (the checkout, the data mirror, the home folder): a committed page must not
show them.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
from groundup.results import git_commit  # noqa: E402
from groundup.runtime import book_root, device_name, get_device, get_profile  # noqa: E402


def machine_paths() -> list[str]:
    """Absolute folders of this machine that must not appear in committed outputs (a library's warning shows
    its file under the Python installation)."""
    paths = {str(book_root().resolve()), str(Path.home()), sys.prefix, sys.base_prefix}
    for name in ("BOOK_DATA", "BOOK_CACHE", "BOOK_CHECKPOINT_DIR"):
        if os.environ.get(name):
            paths.add(str(Path(os.environ[name]).expanduser().resolve()))
    return sorted(p for p in paths if len(p) > 1)


def output_text(output) -> str:
    """What a reader sees of one cell output: its stream text, plain and Markdown data, and traceback."""
    data = output.get("data", {})
    return "".join("".join(part) for part in (output.get("text", ""), data.get("text/plain", ""),
                                                data.get("text/markdown", ""), output.get("traceback", "")))


# What a reader of a committed page must not see, on any machine: a library's warning or notice, a traceback, a
# network failure spelled out by a library, an absolute folder of the machine that ran it (leaked_paths below
# also checks this machine's own folders by name).
NOISE = re.compile(r"\b[A-Z][A-Za-z]*Warning\b|friendly reminder|Traceback \(most recent call last\)|"
                   r"Max retries exceeded|HTTPSConnectionPool|Failed to download|/site-packages/|"
                   r"(?<![\w.~])/(?:work|tmp|home|root|opt|usr|var|Users|private|content)/")


def noisy_outputs(nb) -> list[str]:
    """'cell N: ...' for every output of ``nb`` that is an error or shows NOISE (also used by
    tests/test_book.py on the committed notebooks)."""
    found = []
    for number, cell in enumerate(nb["cells"], start=1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {number}: an error ({output.get('ename')})")
                continue
            text = output_text(output)
            match = NOISE.search(text)
            if match:
                found.append(f"cell {number}: ...{text[max(0, match.start() - 60):match.end() + 40]}...")
    return found


def leaked_paths(nb) -> list[str]:
    """'cell N: /path...' for every output that shows one of machine_paths()."""
    found = []
    for number, cell in enumerate(nb.cells, start=1):
        for output in cell.get("outputs", []):
            text = output_text(output)
            for path in machine_paths():
                if path in text:
                    found.append(f"cell {number}: {path}")
    return found


OUTPUTS_LINE = "**Outputs on this page.**"
DRAFT_LINE = "The outputs on this page are not yet from"   # a draft's header sentence, gone once a committed run stamps it
GIVEN_COMMIT = os.environ.get("BOOK_GIT_COMMIT")    # set by the caller where the checkout has no .git


def stamp_header(nb, profile: str, device: str, seconds: float, date: str, load: float | None = None) -> None:
    """Write what produced the page into the header cell: the line that starts with OUTPUTS_LINE (added if
    missing; a committed run also drops a draft's "not yet from a cpu or full run" sentence) and, in the runtime table, the measured time of the row of this profile (rows that mention a
    T4 are estimates for another machine and stay as they are)."""
    header = nb.cells[0]
    lines = header.source.split("\n")
    minutes = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    busy = f", on a machine shared with other jobs (load average {load:.1f})" if load else ""
    stamp = (f"{OUTPUTS_LINE} A `{profile}`-profile run on {device}: {minutes} for the whole notebook "
             f"({date}{busy}).")
    kept, in_old = [], False
    for line in lines:                       # the old outputs paragraph, all its lines, becomes the stamp
        if line.startswith(OUTPUTS_LINE):
            kept.append(stamp)
            in_old = True
        elif in_old and line.strip() and not line.startswith(("|", "#")):
            continue
        else:
            in_old = False
            kept.append(line)
    lines = kept
    if profile in ("cpu", "full"):
        kept = []
        for line in lines:                       # the draft's sentence goes, and the blank line it leaves
            if not (line.startswith(DRAFT_LINE) or (line == "" and kept and kept[-1] == "")):
                kept.append(line)
        lines = kept
    if stamp not in lines:
        lines += ["", stamp]
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == profile and "T4" not in line and len(cells) >= 3:
            lines[i] = "| " + " | ".join(cells[:-1] + [f"{minutes} (measured {date}{'; shared machine' if load else ''})"]) + " |"
            break
    header.source = "\n".join(lines)


def chapter_checkpoints(path: Path) -> list[Path]:
    """The checkpoints chapter ``NN_slug.ipynb`` wrote (their names start with its number ``NN_``)."""
    from groundup.checkpoint import checkpoint_dir

    number = path.name.split("_", 1)[0]
    folder = checkpoint_dir()
    return sorted(folder.glob(f"{number}_*")) if folder.is_dir() else []


def _load() -> float:
    """The 5-minute load average (it includes this run itself, about one per busy core)."""
    try:
        return os.getloadavg()[1]
    except OSError:
        return 0.0


def run(path: Path, fresh: bool = False) -> float:
    """Execute one notebook in place. ``fresh``: delete the chapter's own checkpoints first, so that the page
    shows a run that trained (and timed) everything, not one that loaded a finished checkpoint."""
    if fresh:
        for old in chapter_checkpoints(path):
            old.unlink()
    os.environ["BOOK_PROGRESS"] = "static"  # saved notebooks show each bar's final state as text
    if not GIVEN_COMMIT:                                     # the code this run starts from, for every record it
        for name in ("BOOK_GIT_COMMIT", "BOOK_GIT_DIRTY"):  # writes, even if the checkout changes meanwhile
            os.environ.pop(name, None)                       # (a copy without .git names it: BOOK_GIT_COMMIT)
    at_start = git_commit()
    os.environ["BOOK_GIT_COMMIT"] = at_start["commit"]
    os.environ["BOOK_GIT_DIRTY"] = {True: "1", False: "0"}.get(at_start["dirty"], "")
    os.environ.setdefault("BOOK_RESULTS_DIR", str(book_root() / "results"))   # the committed records
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=4 * 3600, kernel_name="python3", record_timing=False,
                            store_widget_state=True, resources={"metadata": {"path": str(path.parent)}})
    start, load_before = time.perf_counter(), _load()
    client.execute()
    seconds = time.perf_counter() - start
    load = max(load_before, _load())     # the machine's other work: a busy machine inflates the times
    nb.metadata["groundup"] = {
        "profile": get_profile(),
        "device": device_name(get_device()),
        "torch": torch.__version__,
        "git": at_start,
        "executed": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "execution_time_s": round(seconds, 1),
        "load_average": round(load, 2),
    }
    cores = os.cpu_count() or 1
    if get_profile() in ("cpu", "full"):     # a committed run: the chapter is no longer a draft
        nb.metadata.pop("groundup_draft", None)
    stamp_header(nb, get_profile(), device_name(get_device()), seconds, nb.metadata["groundup"]["executed"][:10],
                 load=load if load > cores + 0.5 else None)
    nbformat.write(nb, path)
    leaks = leaked_paths(nb)
    if leaks:
        raise SystemExit(f"{path}: the outputs show folders of this machine ({'; '.join(leaks[:5])}); make "
                         "the code print paths relative to the book (or none) and run it again")
    noise = noisy_outputs(nb)
    if noise:
        raise SystemExit(f"{path}: the outputs show library warnings or errors ({'; '.join(noise[:5])}); "
                         "silence the notice where the code calls the library (or fix its cause) and run it again")
    return seconds


def main(args: list[str]) -> int:
    fresh = "--fresh" in args
    paths = [a for a in args if a != "--fresh"]
    if not paths:
        print(__doc__)
        return 2
    for p in paths:
        seconds = run(Path(p), fresh=fresh)
        print(f"{p}: {get_profile()} profile, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
