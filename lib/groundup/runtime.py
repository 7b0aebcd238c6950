"""Runtime plumbing shared by every chapter: profile switch, device, seeding, mixed precision,
progress bars, loss-curve plots and the batch order that makes training resumable.

Hand-written (not exported from a notebook): none of this is taught, it is the bench the
chapters stand on. Chapter 01 walks through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import platform
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.std import tqdm as tqdm_std

PROFILES = ("smoke", "cpu", "full")


def book_root() -> Path:
    """The repository root (the folder holding ``_toc.yml``) seen from the working directory, else the cwd."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").exists():
            return folder
    return here


def get_profile() -> str:
    """The run profile: ``BOOK_PROFILE`` if set, else ``full`` on a CUDA GPU with bf16 tensor cores and ``cpu``
    everywhere else (a CPU, Apple's MPS, an older GPU such as Colab's T4).

    smoke: top to bottom on 2 CPU cores in at most 90 s (what CI and ``make test`` run).
    cpu:   a real result in at most 30 minutes on 2 CPU cores (minutes on a laptop or a T4).
    full:  the reference run, at most 10 minutes of training on one H100/H200.
    """
    value = os.environ.get("BOOK_PROFILE", "").strip().lower()
    if not value:
        return "full" if torch.cuda.is_available() and bf16_supported("cuda") else "cpu"
    if value not in PROFILES:
        raise ValueError(f"BOOK_PROFILE={value!r} is not a profile; set it to one of {', '.join(PROFILES)}")
    return value


def pick(smoke, full, profile: str | None = None, *, cpu=None):
    """Choose a config preset by profile: ``pick(smoke, full, cpu=cpu)``.

    A chapter without a ``cpu`` preset cannot run in the cpu profile: that is an error that says so, never a
    silent fall-back to a preset sized for another machine."""
    profile = profile or get_profile()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    if profile == "cpu":
        if cpu is None:
            raise ValueError("this chapter has no `cpu` preset yet: run it with BOOK_PROFILE=smoke or full")
        return cpu
    return smoke if profile == "smoke" else full


# On CUDA the first cuBLAS call of a process may come from autograd's backward thread, which then prints
# "Attempting to run cuBLAS, but there was no current CUDA context!" and sets the context itself: a notice,
# not a fault, that would otherwise sit in the committed outputs of every chapter whose first matmul is a backward.
warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")


def get_device() -> torch.device:
    """CUDA if present, then Apple's MPS, then the CPU. ``BOOK_DEVICE`` overrides (e.g. ``cpu``)."""
    forced = os.environ.get("BOOK_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device: torch.device | str | None = None) -> str:
    """A human-readable name of the device that ran the code, for results and figure captions."""
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    cores = os.cpu_count() or 1
    return f"CPU: {_cpu_model()} ({cores} core{'s' if cores != 1 else ''})"


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA, MPS); a no-op on the CPU. Only for timing: a training step
    never calls it, so that the host runs ahead of the GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA GPU with bfloat16 tensor cores (compute capability 8.0 or newer:
    A100, H100, L4, RTX 30xx and later; not a T4 or V100)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def autocast(device: torch.device | str):
    """bf16 autocast on a CUDA GPU that has bf16 tensor cores; a no-op elsewhere: float32 on the CPU (CPU
    bf16 is slow, MPS support varies) and on older GPUs such as Colab's T4, where bf16 is emulated and slow
    (float16 would need a gradient scaler, which chapter 11 introduces)."""
    device = torch.device(device)
    if bf16_supported(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress(iterable=None, **kwargs):
    """A tqdm progress bar: a live widget in Jupyter, text in a terminal.

    With ``BOOK_PROGRESS=static`` (set by ``tools/run_notebooks.py`` when it executes a notebook
    for the website) the bar prints once, in its final state, as plain text: a saved notebook
    then shows "100%|...| 4080/4080 [00:03<00:00, ...]" rather than a widget with no state.
    """
    kwargs.setdefault("mininterval", 0.5)
    if os.environ.get("BOOK_PROGRESS") == "static":
        return _FinalStateBar(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


class _FinalStateBar(tqdm_std):
    """A text bar that shows nothing while it runs and prints its final state once."""

    def __init__(self, *args, **kwargs):
        kwargs["file"] = io.StringIO()
        super().__init__(*args, **kwargs)

    def close(self):
        if not self.disable and not getattr(self, "_final_printed", False):
            self._final_printed = True
            print(self, flush=True)
        super().close()


def batch_indices(n: int, batch_size: int, step: int, seed: int, device=None) -> torch.Tensor:
    """Indices of the examples in training step ``step`` (0-based).

    Each epoch is a fresh permutation drawn from ``(seed, epoch)``; a step's batch is a slice of it,
    dropping the incomplete last batch. The batch depends only on its arguments, so a run resumed
    from a checkpoint at step k sees exactly the batches an uninterrupted run would. ``device``:
    where the permutation is drawn (a generator there; the data's device, so that no index tensor
    is copied from the host per step); a GPU draws other permutations than the CPU.
    """
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the data set ({n} examples)")
    steps_per_epoch = n // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    device = torch.device("cpu" if device is None else device)
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g, device=device)
    return perm[i * batch_size:(i + 1) * batch_size]


def plot_curves(curves: dict, *, title: str = "", xlabel: str = "step", ylabel: str = "loss",
                logy: bool = False, ax=None):
    """Plot named curves, each a sequence of (x, y) pairs or of y values; returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, points in curves.items():
        points = list(points)
        if points and isinstance(points[0], (tuple, list)):
            xs, ys = zip(*points)
        else:
            xs, ys = range(len(points)), points
        ax.plot(xs, ys, label=name, marker="o" if len(points) < 20 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def run_tag(config, **more) -> str:
    """A short, stable hash of a whole config (a dataclass or a dict) and anything else that shapes a run
    (``more``: data size, profile, ...), for checkpoint names: a changed setting never resumes a stale run."""
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    text = json.dumps(fields | more, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_label(device: torch.device | str | None = None, profile: str | None = None) -> str:
    """'smoke profile, CPU: ...' for figure titles, so every figure says what produced it."""
    return f"{profile or get_profile()} profile, {device_name(device)}"
