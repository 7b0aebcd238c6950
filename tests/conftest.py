"""Shared fixtures for the unit tests.

The tests of the hand-written plumbing (runtime, checkpoint, results, data) use ``clean_env``
(``pytestmark = pytest.mark.usefixtures("clean_env")``): the book's environment variables are
cleared, each test sets the ones it needs, and the network is cut off, so that those tests never
read the developer's cache, never write to the committed results/ or checkpoints/, and never
download anything.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Captured at import time, before `clean_env` clears the variables.
_BOOK_DATA_AT_START = os.environ.get("BOOK_DATA")

BOOK_VARIABLES = ("BOOK_DATA", "BOOK_CACHE", "BOOK_PROFILE", "BOOK_DEVICE", "BOOK_RESULTS_DIR",
                  "BOOK_CHECKPOINT_DIR")


@pytest.fixture
def clean_env(monkeypatch):
    """No BOOK_* variable leaks in from the caller, and the test cannot reach the network."""
    for name in BOOK_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in the unit tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


@pytest.fixture
def one_thread():
    """One PyTorch thread for the test: tiny models pay more for thread synchronisation than they gain,
    and on a busy machine two threads can be many times slower than one. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline data mirror: ``BOOK_DATA`` as the suite was started with, else ``../shared/data``.

    A relative ``BOOK_DATA`` is taken from the repository's root, as the library does. Tests that need
    the mirror are skipped where there is none.
    """
    if _BOOK_DATA_AT_START:
        path = Path(_BOOK_DATA_AT_START).expanduser()
        path = path if path.is_absolute() else REPO / path
    else:
        path = REPO.parent / "shared" / "data"
    path = path.resolve()
    if not (path / "SHA256SUMS").is_file():
        pytest.skip(f"no data mirror at {path} (set BOOK_DATA to the book's offline data folder)")
    return path


@pytest.fixture
def book_root(tmp_path, monkeypatch) -> Path:
    """A scratch book root (a folder with ``_toc.yml``); the working directory is a subfolder of it."""
    root = tmp_path / "book"
    (root / "notebooks").mkdir(parents=True)
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    monkeypatch.chdir(root / "notebooks")
    return root


class Crash(Exception):
    """Raised by a crashing progress bar: a training run killed mid-way, as by a lost machine."""


def crashing_progress(at):
    """A stand-in for ``groundup.runtime.progress`` that kills the loop when it reaches item ``at``
    (a step or an epoch). Patch it into a chapter module to test that training resumes exactly."""
    class CrashingBar:
        def __init__(self, iterable=None, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            for item in self.iterable:
                if item == at:
                    raise Crash
                yield item

        def set_postfix(self, **kwargs):
            pass

    return CrashingBar


def crash_then_resume(monkeypatch, module, at: int, train, make_model, checkpoint):
    """Run ``train(model, checkpoint=...)`` on a fresh ``make_model()`` until ``module``'s progress bar
    kills it at step ``at``, then resume from ``checkpoint`` with another fresh model (made after a
    different seed: everything must come from the checkpoint). Returns (resumed model, its result)."""
    import torch

    monkeypatch.setattr(module, "progress", crashing_progress(at))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train(make_model(), checkpoint=checkpoint)
    monkeypatch.undo()
    torch.manual_seed(99)
    resumed = make_model()
    return resumed, train(resumed, checkpoint=checkpoint)
