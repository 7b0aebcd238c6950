"""Checking an upstream contribution: copy an installed package, apply a patch, run a test on both
copies.

Hand-written (not exported from a notebook). Chapter 21's contribution to diffusers lives in
`contrib/diffusers/` (`fix.patch`, `test_finding.py`); `round_trip` shows that its test fails on the
package as installed and passes on a patched copy, without touching the installed package and
without network.

The patch is applied in pure Python (`apply_patch`), so a machine without the `patch` program works
too. It accepts unified diffs whose paths are relative to the package directory
(`--- a/models/embeddings.py`), and it refuses a hunk whose context or removed lines are not found
in the file, rather than guess.

Run from the repository root: `python -m groundup.contrib contrib/diffusers/fix.patch
contrib/diffusers/test_finding.py` prints both outcomes.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path


# The smallest UNet2DConditionModel that still has every part chapter 21 walks through
# (notebooks/21_unet2d_condition.ipynb, section 1): two levels, one cross-attention and one plain
# block each way, the cross-attention mid block, one resnet per down block. Note
# `attention_head_dim` is the number of heads.
SMALLEST_FULL_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(8, 16), norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12, attention_head_dim=2,
)


class PatchError(ValueError):
    """A patch that cannot be parsed, or whose hunk does not match the file it is applied to."""


@dataclasses.dataclass
class Hunk:
    old_start: int  # 1-based line number in the original file
    lines: list[str]  # each with its ' ', '-' or '+' marker, without the newline


@dataclasses.dataclass
class FilePatch:
    path: str  # relative to the package directory
    hunks: list[Hunk]


HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip_prefix(path: str) -> str:
    path = path.split("\t")[0].strip()
    return path[2:] if path.startswith(("a/", "b/")) else path


def parse_patch(text: str) -> list[FilePatch]:
    """The files and hunks of a unified diff (as `diff -u` or `difflib.unified_diff` write it)."""
    files: list[FilePatch] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            files.append(FilePatch(_strip_prefix(lines[i + 1][4:]), []))
            i += 2
            continue
        match = HUNK_HEADER.match(lines[i])
        if match:
            if not files:
                raise PatchError(f"line {i + 1}: a hunk before any '---'/'+++' file header")
            old_len = int(match.group(2) or 1)
            new_len = int(match.group(4) or 1)
            hunk = Hunk(int(match.group(1)), [])
            i += 1
            seen_old = seen_new = 0
            while i < len(lines) and (seen_old < old_len or seen_new < new_len):
                line = lines[i]
                if line.startswith("\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                marker = line[:1] or " "
                if marker not in " -+":
                    raise PatchError(f"line {i + 1}: unexpected line inside a hunk: {line!r}")
                hunk.lines.append(marker + line[1:])
                seen_old += marker in " -"
                seen_new += marker in " +"
                i += 1
            if (seen_old, seen_new) != (old_len, new_len):
                raise PatchError(f"hunk at line {hunk.old_start} of {files[-1].path} is truncated")
            files[-1].hunks.append(hunk)
            continue
        i += 1
    if not files or not any(f.hunks for f in files):
        raise PatchError("no hunks found")
    return files


def apply_file_patch(text: str, patch: FilePatch, max_offset: int = 50) -> str:
    """`text` with the hunks applied. A hunk's old lines must match exactly, at its stated line or
    within `max_offset` lines of it (closest first); otherwise PatchError."""
    lines = text.splitlines(keepends=True)
    shift = 0  # how far earlier hunks moved the line numbers
    for hunk in patch.hunks:
        old = [line[1:] for line in hunk.lines if line[0] in " -"]
        new = [line[1:] for line in hunk.lines if line[0] in " +"]
        want = hunk.old_start - 1 + shift
        bare = [line.rstrip("\r\n") for line in lines]
        found = None
        for offset in sorted(range(-max_offset, max_offset + 1), key=abs):
            at = want + offset
            if 0 <= at and bare[at:at + len(old)] == old:
                found = at
                break
        if found is None:
            raise PatchError(
                f"{patch.path}: hunk for line {hunk.old_start} does not match the file")
        ending = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
        lines[found:found + len(old)] = [line + ending for line in new]
        shift += len(new) - len(old) + (found - want)
    return "".join(lines)


def apply_patch(patch_text: str, root: Path) -> list[Path]:
    """Apply a unified diff to the files under `root` (paths in the diff are relative to it). Every
    hunk is checked before any file is written. Returns the files changed."""
    root = Path(root)
    results = {}
    for file_patch in parse_patch(patch_text):
        target = root / file_patch.path
        if not target.is_file():
            raise PatchError(f"{file_patch.path}: no such file under {root}")
        results[target] = apply_file_patch(target.read_text(encoding="utf-8"), file_patch)
    for target, text in results.items():
        if target.is_symlink():  # a linked copy: replace the link, never write through it
            target.unlink()
        target.write_text(text, encoding="utf-8")
        for stale in (target.parent / "__pycache__").glob(f"{target.stem}.*.pyc"):
            stale.unlink()
    return list(results)


def package_dir(name: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"no installed package named {name!r}")
    return Path(list(spec.submodule_search_locations)[0])


def copy_package(src: Path, dest_parent: Path, link: bool = True,
                 editable: list[str] | None = None) -> Path:
    """Copy the package directory `src` into `dest_parent` (so that `dest_parent` goes on sys.path).

    link=True makes real directories and symbolic links to the files (fast, and safe with
    `apply_patch`, which replaces a link before writing); link=False copies every byte. With
    `editable` (paths relative to `src`, e.g. the files a patch changes) and link=True, only the
    directories on the way to those files are made real; every other directory is one link to the
    installed one (a large package is copied in a fraction of the time, and Python reuses its
    compiled files). A `__pycache__` beside an editable file is real, so `apply_patch` removes its
    stale entries in the copy, never in the installed package."""
    src, dest = Path(src), Path(dest_parent) / Path(src).name
    if not link or editable is None:
        shutil.copytree(src, dest, copy_function=os.symlink if link else shutil.copy2)
        return dest
    on_the_way = {Path(".")} | {parent for path in editable for parent in Path(path).parents}
    for rel in sorted(on_the_way, key=lambda p: len(p.parts)):
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for entry in (src / rel).iterdir():
            target = dest / rel / entry.name
            if entry.is_dir() and entry.name == "__pycache__":
                shutil.copytree(entry, target, copy_function=os.symlink)
            elif not (entry.is_dir() and rel / entry.name in on_the_way):
                os.symlink(entry, target, target_is_directory=entry.is_dir())
    return dest


@dataclasses.dataclass
class Outcome:
    passed: bool
    output: str  # the test runner's report (failures included)
    imported_from: str  # the package directory the tests imported


def _purge(name: str) -> dict:
    gone = {k: v for k, v in sys.modules.items() if k == name or k.startswith(name + ".")}
    for k in gone:
        del sys.modules[k]
    return gone


def run_in_process(test_file: Path, path_entry: Path, package: str) -> Outcome:
    """Import `package` from `path_entry` (put first on sys.path), load `test_file` and call each of
    its `test_*` functions (they must take no arguments). Restores sys.path and sys.modules
    afterwards."""
    saved = _purge(package)
    sys.path.insert(0, str(path_entry))
    importlib.invalidate_caches()
    name = f"_groundup_contrib_{Path(test_file).stem}"
    report, passed = [], True
    try:
        spec = importlib.util.spec_from_file_location(name, test_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        imported_from = str(Path(sys.modules[package].__file__).parent)
        tests = sorted(k for k, v in vars(module).items() if k.startswith("test_") and callable(v))
        for test in tests:
            try:
                getattr(module, test)()
                report.append(f"PASSED {test}")
            except Exception:  # an assertion or any error fails the test, as under pytest
                passed = False
                report.append(f"FAILED {test}\n{traceback.format_exc(limit=2)}")
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(path_entry))
        _purge(package)
        sys.modules.update(saved)
        importlib.invalidate_caches()
    return Outcome(passed, "\n".join(report), imported_from)


def run_pytest(test_file: Path, path_entry: Path, package: str, timeout: float = 600) -> Outcome:
    """Run pytest on `test_file` in a fresh interpreter with `path_entry` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path_entry), env.get("PYTHONPATH", "")])
    env["PYTHONPATH"] = env["PYTHONPATH"].rstrip(os.pathsep)
    probe = f"import {package}, os; print('IMPORTED_FROM', os.path.dirname({package}.__file__))"
    where = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                           timeout=timeout)
    imported_from = where.stdout.split("IMPORTED_FROM", 1)[-1].strip()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=Path(test_file).parent)
    return Outcome(result.returncode == 0, result.stdout + result.stderr, imported_from)


def round_trip(patch_file: Path, test_file: Path, package: str = "diffusers",
               in_process: bool = False) -> dict[str, Outcome]:
    """{'original': Outcome, 'patched': Outcome}: the test run on an unpatched copy of the installed
    package and on a copy with `patch_file` applied. The installed package is never modified.

    in_process=True calls the test functions in this interpreter (fast: torch and the package's
    dependencies are imported once); False runs pytest in a fresh interpreter per copy (what a
    reviewer would do)."""
    src = package_dir(package)
    patch_text = Path(patch_file).read_text(encoding="utf-8")
    changed = [file_patch.path for file_patch in parse_patch(patch_text)]
    run = run_in_process if in_process else run_pytest
    outcomes = {}
    with tempfile.TemporaryDirectory(prefix="groundup-contrib-") as tmp:
        for variant in ("original", "patched"):
            parent = Path(tmp) / variant
            copy = copy_package(src, parent, editable=changed)
            if variant == "patched":
                apply_patch(patch_text, copy)
            outcomes[variant] = run(Path(test_file).resolve(), parent, package)
    return outcomes


if __name__ == "__main__":
    patch_arg, test_arg = sys.argv[1:3]
    for variant, outcome in round_trip(Path(patch_arg), Path(test_arg)).items():
        verdict = "PASSED" if outcome.passed else "FAILED"
        print(f"== {variant}: {verdict} (imported from {outcome.imported_from})")
        print(outcome.output.strip()[-3000:])
