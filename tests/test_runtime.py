"""groundup.runtime: profile switch, device, seeding and the resumable batch order."""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import pytest
import torch

from groundup import runtime
from groundup.runtime import batch_indices, get_device, get_profile, pick, seed_everything

pytestmark = pytest.mark.usefixtures("clean_env")


# ----------------------------------------------------------------------------- profile

def test_profile_defaults_to_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile() == "cpu"


def test_profile_defaults_to_full_with_a_bf16_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert get_profile() == "full"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_profile_on_this_cpu_machine_is_cpu():
    assert get_profile() == "cpu"


@pytest.mark.parametrize("value, expected", [("smoke", "smoke"), ("full", "full"), (" FULL ", "full"),
                                             ("Smoke", "smoke"), ("cpu", "cpu")])
def test_profile_from_environment(monkeypatch, value, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # default: cpu
    monkeypatch.setenv("BOOK_PROFILE", value)
    assert get_profile() == expected


def test_empty_profile_means_unset(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("BOOK_PROFILE", "")
    assert get_profile() == "cpu"


def test_invalid_profile_raises_a_helpful_error(monkeypatch):
    monkeypatch.setenv("BOOK_PROFILE", "fast")
    with pytest.raises(ValueError) as err:
        get_profile()
    message = str(err.value)
    assert "BOOK_PROFILE" in message and "'fast'" in message
    assert "smoke" in message and "cpu" in message and "full" in message


def test_pick(monkeypatch):
    assert pick(1, 2, "smoke") == 1
    assert pick(1, 2, "full") == 2
    monkeypatch.setenv("BOOK_PROFILE", "full")
    assert pick("s", "f") == "f"
    monkeypatch.setenv("BOOK_PROFILE", "smoke")
    assert pick("s", "f") == "s"
    with pytest.raises(ValueError, match="unknown profile"):
        pick(1, 2, "medium")


def test_pick_cpu_preset():
    assert pick(1, 3, "cpu", cpu=2) == 2
    assert pick(1, 3, "full", cpu=2) == 3 and pick(1, 3, "smoke", cpu=2) == 1
    with pytest.raises(ValueError, match="no `cpu` preset"):
        pick(1, 3, "cpu")


def test_default_profile_is_cpu_without_a_bf16_gpu(monkeypatch):
    monkeypatch.delenv("BOOK_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_profile() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))   # a T4
    assert get_profile() == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))   # an H100
    assert get_profile() == "full"


def test_pick_returns_the_objects_themselves():
    smoke, full = {"steps": 10}, {"steps": 1000}
    assert pick(smoke, full, "smoke") is smoke
    assert pick(smoke, full, "full") is full


# ----------------------------------------------------------------------------- device

def test_device_from_environment(monkeypatch):
    monkeypatch.setenv("BOOK_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.setenv("BOOK_DEVICE", "meta")  # any device torch knows, even one that is not the default
    assert get_device() == torch.device("meta")


def test_device_without_accelerators_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")


def test_device_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == torch.device("cuda")


def test_device_name_on_cpu():
    name = runtime.device_name("cpu")
    assert name.startswith("CPU: ")
    cores = os.cpu_count()
    assert f"({cores} core" in name
    assert runtime.device_name(torch.device("cpu")) == name


def test_run_label(monkeypatch):
    monkeypatch.setenv("BOOK_PROFILE", "smoke")
    label = runtime.run_label("cpu")
    assert label.startswith("smoke profile, CPU: ")
    assert runtime.run_label("cpu", profile="full").startswith("full profile, ")


def test_autocast_is_a_no_op_on_cpu():
    with runtime.autocast("cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("capability, bf16", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_autocast_uses_bf16_only_on_gpus_with_bf16_tensor_cores(monkeypatch, capability, bf16):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert runtime.bf16_supported("cuda") is bf16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # constructing a CUDA autocast on a machine without CUDA warns
        ctx = runtime.autocast("cuda")
    assert isinstance(ctx, torch.autocast) is bf16
    if bf16:
        assert ctx.fast_dtype == torch.bfloat16
    assert runtime.bf16_supported("cpu") is False


# ----------------------------------------------------------------------------- seeding

def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_seed_everything_is_reproducible():
    seed_everything(123)
    a = _draws()
    seed_everything(123)
    b = _draws()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    seed_everything(124)
    c = _draws()
    assert a[0] != c[0] and a[1] != c[1] and not torch.equal(a[2], c[2])


def test_seed_everything_makes_dropout_reproducible():
    drop = torch.nn.Dropout(0.5)
    seed_everything(0)
    a = drop(torch.ones(64))
    seed_everything(0)
    b = drop(torch.ones(64))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- batch order

N, BS, SEED = 103, 10, 7  # 10 full batches per epoch; 3 examples left over each epoch


def _epoch(epoch: int, n=N, bs=BS, seed=SEED) -> list[torch.Tensor]:
    steps = n // bs
    return [batch_indices(n, bs, epoch * steps + i, seed) for i in range(steps)]


def test_every_batch_has_batch_size_valid_indices():
    for step in range(35):  # three and a half epochs
        batch = batch_indices(N, BS, step, SEED)
        assert batch.shape == (BS,)
        assert batch.dtype == torch.int64
        assert int(batch.min()) >= 0 and int(batch.max()) < N


def test_an_epochs_batches_are_disjoint_and_cover_n_div_bs_times_bs_indices():
    for epoch in range(3):
        batches = _epoch(epoch)
        everything = torch.cat(batches)
        assert everything.numel() == (N // BS) * BS
        assert len(set(everything.tolist())) == (N // BS) * BS  # disjoint: no index twice
        for i, a in enumerate(batches):
            for b in batches[i + 1:]:
                assert not set(a.tolist()) & set(b.tolist())


def test_exact_division_covers_every_example():
    batches = _epoch(0, n=40, bs=8)
    assert sorted(torch.cat(batches).tolist()) == list(range(40))


def test_epochs_are_different_permutations():
    orders = [torch.cat(_epoch(e)) for e in range(4)]
    for i in range(len(orders)):
        for j in range(i + 1, len(orders)):
            assert not torch.equal(orders[i], orders[j])


def test_batches_are_shuffled():
    assert not torch.equal(torch.cat(_epoch(0, n=100, bs=10)), torch.arange(100))


def test_same_arguments_same_batch_regardless_of_global_rng():
    torch.manual_seed(0)
    a = batch_indices(N, BS, 13, SEED)
    torch.manual_seed(999)
    torch.rand(100)
    b = batch_indices(N, BS, 13, SEED)
    assert torch.equal(a, b)


def test_batch_indices_does_not_consume_the_global_rng():
    state = torch.get_rng_state()
    batch_indices(N, BS, 3, SEED)
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_changes_the_order():
    assert not torch.equal(torch.cat(_epoch(0, seed=1)), torch.cat(_epoch(0, seed=2)))


def test_batch_size_equal_to_n_is_allowed():
    assert sorted(batch_indices(16, 16, 0, 0).tolist()) == list(range(16))
    assert not torch.equal(batch_indices(16, 16, 0, 0), batch_indices(16, 16, 1, 0))


def test_batch_size_larger_than_data_set_raises():
    with pytest.raises(ValueError, match="larger than the data set"):
        batch_indices(5, 6, 0, 0)


# ----------------------------------------------------------------------------- book root and plotting

def test_book_root_finds_toc_from_a_subfolder(book_root):
    assert runtime.book_root() == book_root.resolve()


def test_book_root_falls_back_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runtime.book_root() == tmp_path.resolve()


def test_plot_curves_accepts_pairs_and_values():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = runtime.plot_curves({"train": [(0, 1.0), (10, 0.5)], "val": [0.9, 0.7, 0.6]}, title="t", logy=True)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["train", "val"]
    assert list(lines[0].get_xdata()) == [0, 10]
    assert list(lines[1].get_xdata()) == [0, 1, 2]
    assert ax.get_yscale() == "log"
    plt.close(ax.figure)


def test_run_tag_hashes_the_whole_config():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        steps: int = 10
        lr: float = 1e-3

    tag = runtime.run_tag(Cfg())
    assert tag == runtime.run_tag(Cfg()) and len(tag) == 10
    assert tag != runtime.run_tag(Cfg(lr=2e-3))                  # any field changes the tag
    assert tag != runtime.run_tag(Cfg(), n_train=100)            # and so does anything else passed
    assert runtime.run_tag({"steps": 10, "lr": 1e-3}) == tag     # a dict of the same fields: the same run


def test_batch_indices_on_a_device_equal_the_cpu_ones_on_the_cpu():
    """batch_indices(device=...) draws the permutation there (no host copy); on the CPU it is the same batch."""
    assert torch.equal(batch_indices(50, 8, 9, 3, device="cpu"), batch_indices(50, 8, 9, 3))
    assert batch_indices(50, 8, 9, 3, device=torch.device("cpu")).device.type == "cpu"
