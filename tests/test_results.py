"""groundup.results: the JSON record every chapter writes, and its Markdown table."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from groundup import results
from groundup.results import Row, git_commit, record_results, rows_markdown

pytestmark = pytest.mark.usefixtures("clean_env")

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@dataclasses.dataclass
class Config:
    hidden: int = 128
    lr: float = 3e-4
    layers: tuple = (2, 2)
    name: str = "mlp"


ROWS = [
    Row("test accuracy", 0.9812, paper="98.4% (LeCun 1998)", target=">= 98.0%", met=True),
    Row("test loss", 0.0612, met=None),
    Row("train time", 12.5, unit=" s", target="<= 600 s", met=False),
]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=Test", "-c", "user.email=test@example.com",
                           "-c", "commit.gpgsign=false", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(book_root) -> Path:
    """The scratch book root as a git repository with one commit."""
    git(book_root, "init", "-q")
    git(book_root, "add", "_toc.yml")
    git(book_root, "commit", "-q", "-m", "first")
    return book_root


def record(monkeypatch, tmp_path, profile: str = "smoke", **kwargs) -> dict:
    monkeypatch.setenv("BOOK_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("BOOK_PROFILE", profile)
    args = dict(title="MLP on MNIST", metrics={"test_acc": 0.9812, "steps": 200}, rows=ROWS,
                config=Config(), data={"train": {"dataset": "MNIST", "examples": 17435}},
                wall_time_s=12.3456, notes="a note", device="cpu")
    args.update(kwargs)
    return record_results("02_mlp_mnist", **args)


@needs_git
def test_record_results_writes_the_json(monkeypatch, tmp_path, repo):
    returned = record(monkeypatch, tmp_path)
    path = tmp_path / "results" / "02_mlp_mnist.json"
    assert path.exists()
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved.keys() == returned.keys()
    assert saved == json.loads(json.dumps(returned))  # the returned record is what was written

    assert saved["chapter"] == "02_mlp_mnist"
    assert saved["title"] == "MLP on MNIST"
    assert saved["profile"] == "smoke"
    assert saved["device"].startswith("CPU: ")
    assert saved["device_type"] == "cpu"
    assert saved["torch"] == torch.__version__
    assert saved["python"] == platform.python_version()
    assert saved["wall_time_s"] == 12.35
    assert saved["git"] == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}
    assert re.fullmatch(r"[0-9a-f]{40}", saved["git"]["commit"])
    date = dt.datetime.fromisoformat(saved["date"])
    assert date.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - date).total_seconds()) < 120
    assert saved["data"] == {"train": {"dataset": "MNIST", "examples": 17435}}
    assert saved["config"] == {"hidden": 128, "lr": 3e-4, "layers": [2, 2], "name": "mlp"}
    assert saved["metrics"] == {"test_acc": 0.9812, "steps": 200}
    assert saved["rows"] == [dataclasses.asdict(r) for r in ROWS]
    assert saved["rows"][0] == {"metric": "test accuracy", "ours": 0.9812, "paper": "98.4% (LeCun 1998)",
                                "target": ">= 98.0%", "met": True, "unit": "", "any_profile": False,
                                "headline": False}
    assert saved["notes"] == "a note"


@needs_git
def test_dirty_tree_is_recorded(monkeypatch, tmp_path, repo):
    (repo / "_toc.yml").write_text("format: jb-book\nroot: changed\n")
    assert record(monkeypatch, tmp_path)["git"]["dirty"] is True


@needs_git
def test_repository_without_commits_has_no_commit(book_root):
    git(book_root, "init", "-q")
    assert git_commit() == {"commit": "unknown", "dirty": None}


def test_outside_a_repository(book_root):
    assert git_commit(book_root) == {"commit": "unknown", "dirty": None}


def test_config_as_a_dict_and_values_json_cannot_hold(monkeypatch, tmp_path, book_root):
    rec = record(monkeypatch, tmp_path, config={"lr": 0.1, "path": Path("x/y")},
                 metrics={"loss": torch.tensor(0.5), "hist": torch.tensor([1.0, 2.0])})
    saved = json.loads((tmp_path / "results" / "02_mlp_mnist.json").read_text())
    assert saved["config"] == {"lr": 0.1, "path": "x/y"}
    assert saved["metrics"] == {"loss": 0.5, "hist": [1.0, 2.0]}
    assert rec["profile"] == "smoke"


def test_results_dir(monkeypatch, tmp_path, book_root):
    assert results.results_dir() == book_root.resolve() / "_build" / "results"   # a reader's run: scratch
    assert results.committed_results_dir() == book_root.resolve() / "results"
    monkeypatch.setenv("BOOK_RESULTS_DIR", str(tmp_path / "elsewhere"))
    assert results.results_dir() == tmp_path / "elsewhere"


def test_rows_markdown_for_a_smoke_run(monkeypatch, tmp_path, book_root):
    text = rows_markdown(record(monkeypatch, tmp_path, profile="smoke"))
    lines = text.splitlines()
    assert lines[0] == "| metric | ours | paper | target | met |"
    table = [line for line in lines[2:] if line.startswith("|")]
    assert len(table) == len(ROWS)
    for row, line in zip(ROWS, table):
        assert line.startswith(f"| {row.metric} |")
        assert line.endswith("| smoke run |")
    assert "| test accuracy | 0.9812 | 98.4% (LeCun 1998) | >= 98.0% | smoke run |" in lines
    assert "| train time | 12.5 s | — | <= 600 s | smoke run |" in lines
    run_line = lines[-1]
    assert run_line.startswith("*smoke profile on CPU: ")
    assert f"torch {torch.__version__}" in run_line
    assert "wall time 12.3 s" in run_line
    assert dt.date.today().isoformat()[:4] in run_line
    assert "commit unknown" in run_line


def test_rows_markdown_for_a_full_run(monkeypatch, tmp_path, book_root):
    text = rows_markdown(record(monkeypatch, tmp_path, profile="full"))
    assert "| test accuracy | 0.9812 | 98.4% (LeCun 1998) | >= 98.0% | yes |" in text
    assert "| test loss | 0.0612 | — | — | — |" in text
    assert "| train time | 12.5 s | — | <= 600 s | no |" in text
    assert "smoke run" not in text
    assert text.splitlines()[-1].startswith("*full profile on ")


def test_rows_markdown_judges_cpu_runs_and_any_profile_checks(monkeypatch, tmp_path, book_root):
    rows = [Row("test accuracy", 0.9812, target=">= 98.0%", met=True),
            Row("ours vs torch, max abs. error", 1e-15, target="< 1e-12", met=True, any_profile=True),
            Row("ours vs torch, float32", 1e-3, target="< 1e-5", met=False, any_profile=True)]
    cpu = rows_markdown(record(monkeypatch, tmp_path, profile="cpu", rows=rows))
    assert "| test accuracy | 0.9812 | — | >= 98.0% | yes |" in cpu and "smoke run" not in cpu
    smoke = rows_markdown(record(monkeypatch, tmp_path, profile="smoke", rows=rows))
    assert "| test accuracy | 0.9812 | — | >= 98.0% | smoke run |" in smoke
    assert "| ours vs torch, max abs. error | 1e-15 | — | < 1e-12 | yes |" in smoke
    assert "| ours vs torch, float32 | 0.001 | — | < 1e-5 | no |" in smoke


def test_rows_markdown_escapes_cell_text(monkeypatch, tmp_path, book_root):
    """A `|` in a cell would end it (the row's values then shift into the wrong columns); a newline, the row."""
    rows = [Row("max |p - 1|", 0.5, paper="a | b", target="≤ 1\nnats", met=True)]
    text = rows_markdown(record(monkeypatch, tmp_path, profile="full", rows=rows))
    assert "| max \\|p - 1\\| | 0.5 | a \\| b | ≤ 1 nats | yes |" in text.splitlines()
    assert results.cell("already \\| escaped") == "already \\| escaped"


def test_number_formatting():
    assert results._fmt(0.123456) == "0.1235"
    assert results._fmt(123456.7) == "123,457"
    assert results._fmt(3, "%") == "3%"
    assert results._fmt("—", " s") == "—"


def test_results_page_describes_any_data_record():
    """Chapters record their data in different shapes; the results page words each without failing."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from results_table import describe_data

    standard = {"train": {"dataset": "MNIST", "split": "train", "examples": 17435, "source": "mirror"}}
    assert describe_data(standard) == "MNIST train: 17,435 examples from the mirror"
    with_unit = {"val": {"dataset": "Tiny Shakespeare", "split": "last 10%", "examples": 111540, "unit": "characters"}}
    assert describe_data(with_unit) == "Tiny Shakespeare last 10%: 111,540 characters"
    mixed = {"train": {"dataset": "CIFAR-10", "examples": 5, "nll_images": 16}, "tokenizer": "BPE, vocabulary 512"}
    assert describe_data(mixed) == "CIFAR-10: 5 examples (nll_images 16); tokenizer: BPE, vocabulary 512"
    flat = {"dataset": "Tiny Shakespeare", "characters": 1115394, "lm_split": "90/10"}
    assert describe_data(flat) == "Tiny Shakespeare: 1,115,394 characters (lm_split: 90/10)"


def test_read_results_prefers_this_run_then_the_committed_record(monkeypatch, tmp_path, book_root):
    committed = book_root / "results"
    committed.mkdir()
    (committed / "07_x.json").write_text('{"profile": "cpu"}')
    monkeypatch.setenv("BOOK_RESULTS_DIR", str(tmp_path / "scratch"))
    assert results.read_results("07_x") == {"profile": "cpu"}
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "07_x.json").write_text('{"profile": "smoke"}')
    monkeypatch.setenv("BOOK_PROFILE", "smoke")                  # a reader's smoke runs of both chapters
    assert results.read_results("07_x") == {"profile": "smoke"}
    assert results.read_results("99_none") is None


def test_read_results_prefers_a_record_of_the_same_profile(monkeypatch, tmp_path, book_root):
    # A GPU's full run replaced chapter 07's cpu record; the cpu record is kept in results/cpu/.
    committed = book_root / "results"
    (committed / "cpu").mkdir(parents=True)
    (committed / "07_x.json").write_text('{"profile": "full"}')
    (committed / "cpu" / "07_x.json").write_text('{"profile": "cpu"}')
    monkeypatch.setenv("BOOK_RESULTS_DIR", str(committed))      # as `make outputs` runs
    monkeypatch.setenv("BOOK_PROFILE", "cpu")
    assert results.read_results("07_x") == {"profile": "cpu"}
    assert results.read_results("07_x", profile="full") == {"profile": "full"}
    monkeypatch.setenv("BOOK_PROFILE", "smoke")                  # none of this profile: any record
    assert results.read_results("07_x") == {"profile": "full"}


def test_record_results_prints_no_absolute_path(monkeypatch, tmp_path, book_root, capsys):
    monkeypatch.setenv("BOOK_RESULTS_DIR", str(book_root / "results"))
    results.record_results("01_t", title="t", metrics={}, rows=[], config={}, data={}, wall_time_s=1.0)
    err = capsys.readouterr().err
    assert "wrote results/01_t.json" in err and str(tmp_path) not in err

def test_results_page_summary_has_one_row_per_chapter():
    """The results page opens with one row per chapter: its marked headline row, else its first scored row."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from results_table import headline, overview

    def rec(chapter, rows, profile="cpu"):
        return {"chapter": chapter, "profile": profile, "device": "CPU: test (2 cores)", "device_type": "cpu",
                "rows": [dataclasses.asdict(r) for r in rows]}

    a = rec("01_a", [Row("ours vs torch, max abs. error", 1e-15, target="< 1e-12", met=True, any_profile=True),
                     Row("test error", 0.08, target="<= 10%", met=True)])
    b = rec("02_b", [Row("test error", 0.02, target="<= 2%", met=True),
                     Row("FID | 10k", 5.0, target="<= 20", met=True, headline=True)], profile="smoke")
    assert headline(a)["metric"] == "test error" and headline(b)["metric"] == "FID | 10k"
    lines = overview([a, b]).splitlines()
    assert len(lines) == 2 + 2
    assert lines[2] == "| [01](#ch-01) | test error | 0.08 | <= 10% | yes | cpu | CPU: test (2 cores) |"
    assert lines[3] == "| [02](#ch-02) | FID \\| 10k | 5 | <= 20 | smoke run | smoke | CPU: test (2 cores) |"


def test_git_commit_from_the_environment_where_there_is_no_repository(monkeypatch):
    monkeypatch.setenv("BOOK_GIT_COMMIT", "0123456789abcdef")
    assert results.git_commit() == {"commit": "0123456789abcdef", "dirty": None}

    monkeypatch.setenv("BOOK_GIT_DIRTY", "0")
    assert results.git_commit() == {"commit": "0123456789abcdef", "dirty": False}


def _record(chapter: str, rows: list[Row], profile: str = "cpu") -> dict:
    return {"chapter": chapter, "title": chapter, "profile": profile, "device": "CPU", "torch": "2",
            "wall_time_s": 61.0, "date": "2026-12-03T00:00:00", "git": {"commit": "0123456789abcdef"},
            "rows": [dataclasses.asdict(r) for r in rows]}


def test_met_counts_and_missing_chapters(tmp_path):
    rows = [Row("acc", 0.9, target=">= 0.8", met=True), Row("loss", 1.0, target="<= 0.5", met=False),
            Row("time", 3.0), Row("a vs b", 0.0, target="< 1e-6", met=True, any_profile=True)]
    assert results.met_counts(_record("02_x", rows)) == {"met": 2, "missed": 1, "not judged": 0}
    assert results.met_counts(_record("02_x", rows, "smoke")) == {"met": 1, "missed": 0, "not judged": 2}
    for name in ("02_x", "07_y"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_record(name, rows)))
    records = results.load_records(tmp_path)
    assert [results.chapter_number(r) for r in records] == [2, 7]
    assert results.missing_chapters(records, range(1, 9)) == [1, 3, 4, 5, 6, 8]


def test_chapters_markdown_one_row_per_chapter():
    a = _record("02_x", [Row("time", 3.0), Row("test error", 0.02, paper="1.6%", target="<= 2%", met=False)])
    b = _record("07_y", [Row("loss | val", 1.5, target="<= 1.6", met=True, headline=True)], "smoke")
    lines = results.chapters_markdown([a, b]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| ch | headline metric")
    assert lines[2].startswith("| 02 | test error | 0.02 | 1.6% | <= 2% | no | 0 of 1 | cpu |")
    assert "loss \\| val" in lines[3] and "| smoke run | 0 of 0 | smoke |" in lines[3]
