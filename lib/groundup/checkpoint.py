"""Checkpoints in safetensors: model, optimizer, step, random-number state and a JSON extra.

Hand-written plumbing. A checkpoint holds everything a training loop needs to carry on exactly
where it stopped: with the batch order from ``runtime.batch_indices`` an interrupted run that
resumes ends with the same weights as one that never stopped (tests/test_checkpoint.py checks it).

    save_checkpoint(path, model, optimizer, step=step, extra={"history": history})
    step, extra = load_checkpoint(path, model, optimizer)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .runtime import book_root

FORMAT = "groundup-checkpoint-1"


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the model; the message says which file and why."""


def checkpoint_dir() -> Path:
    """Where chapters keep checkpoints: ``BOOK_CHECKPOINT_DIR`` if set, else ``checkpoints/`` at the book's root."""
    return Path(os.environ.get("BOOK_CHECKPOINT_DIR") or book_root() / "checkpoints")


def save_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, step: int, extra: dict | None = None) -> Path:
    """Write a checkpoint atomically (a crash while saving never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (tied weights) or are not contiguous
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "step": str(step), "extra": json.dumps(extra or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars = {}
        for pid, pstate in state["state"].items():
            for key, value in pstate.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{pid}.{key}"] = value.detach().cpu().clone().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        meta["optim.param_groups"] = json.dumps(state["param_groups"])
        meta["optim.scalars"] = json.dumps(scalars)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _metadata(path: Path) -> dict:
    """The checkpoint's metadata, checked to be one of ours; CheckpointError names the file otherwise."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint ({err}); delete it to train from scratch"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} was not written by groundup.checkpoint (format {meta.get('format')!r})")
    return meta


def read_extra(path) -> dict:
    """The JSON ``extra`` of a checkpoint, without loading its tensors (e.g. to size a model before loading)."""
    return json.loads(_metadata(Path(path))["extra"])


def load_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, restore_rng: bool = True) -> tuple[int, dict]:
    """Load a checkpoint into ``model`` (and ``optimizer``); returns ``(step, extra)``."""
    path = Path(path)
    meta = _metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint ({err}); delete it to train from scratch"
        ) from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not fit this model (was the config changed?): {err}; delete it to train from scratch"
        ) from None
    if optimizer is not None:
        if "optim.param_groups" not in meta:
            raise CheckpointError(f"{path} holds no optimizer state")
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value  # load_state_dict moves it to the parameters' device
        for key, value in json.loads(meta["optim.scalars"]).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["optim.param_groups"])})
    if restore_rng:
        torch.set_rng_state(tensors["rng.cpu"])
        cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return int(meta["step"]), json.loads(meta["extra"])
