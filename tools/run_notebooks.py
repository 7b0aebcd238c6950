"""Execute notebooks in place, keep their outputs and record what produced them.

    BOOK_PROFILE=full python tools/run_notebooks.py notebooks/02_mlp_mnist.ipynb

The outputs committed with a notebook are those of its latest full-profile run where one was made,
otherwise of a smoke run; the notebook's metadata (``groundup``) records the profile, the device,
the torch version, the date and the execution time, and the website shows them.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
from groundup.runtime import device_name, get_device, get_profile  # noqa: E402


def run(path: Path) -> float:
    os.environ["BOOK_PROGRESS"] = "static"  # saved notebooks show each bar's final state as text
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", record_timing=False,
                            store_widget_state=True, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata["groundup"] = {
        "profile": get_profile(),
        "device": device_name(get_device()),
        "torch": torch.__version__,
        "executed": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "execution_time_s": round(seconds, 1),
    }
    nbformat.write(nb, path)
    return seconds


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    for p in paths:
        seconds = run(Path(p))
        print(f"{p}: {get_profile()} profile, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
