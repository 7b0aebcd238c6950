"""Tests of the code chapter 11 exports (lib/groundup/scaling.py, amp.py, ddp.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from groundup.amp import LossScaler
from groundup.ddp import main as ddp_main
from groundup.ddp import rank_batch
from groundup.gpt import GPT, GPTConfig, get_lm_batch
from groundup.gpt_small import count_gpt_params
from groundup.scaling import aicc, bootstrap_alpha, fit_power_law, fit_scaling_law, power_law

pytestmark = pytest.mark.usefixtures("one_thread")

N = np.array([2e3, 8e3, 3e4, 1e5, 4e5, 1.5e6])


# ------------------------------------------------------------------------------- power-law fits
@pytest.mark.parametrize("alpha, N_c", [(0.076, 8.8e13), (0.35, 5e3), (0.9, 1e7)])
def test_plain_fit_recovers_known_parameters(alpha, N_c):
    fit = fit_power_law(N, power_law(N, alpha, math.log(N_c)))
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-9)
    assert fit["log_N_c"] == pytest.approx(math.log(N_c), rel=1e-9)
    assert fit["E"] == 0.0 and fit["rss"] < 1e-20 and fit["k"] == 2


@pytest.mark.parametrize("alpha, N_c, E", [(0.3, 2e4, 1.5), (0.5, 1e5, 3.0), (0.15, 1e3, 0.7)])
def test_irreducible_fit_recovers_known_parameters(alpha, N_c, E):
    fit = fit_power_law(N, power_law(N, alpha, math.log(N_c), E), irreducible=True)
    assert fit["E"] == pytest.approx(E, abs=1e-6)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-5)
    assert fit["log_N_c"] == pytest.approx(math.log(N_c), rel=1e-5)


def test_fit_is_least_squares_in_log_space():
    """With noise, the plain fit is numpy's degree-1 polyfit of log L on log N."""
    rng = np.random.default_rng(1)
    L = power_law(N, 0.2, math.log(1e8)) * np.exp(0.05 * rng.standard_normal(len(N)))
    slope, intercept = np.polyfit(np.log(N), np.log(L), 1)
    fit = fit_power_law(N, L)
    assert fit["alpha"] == pytest.approx(-slope, rel=1e-10)
    assert fit["log_N_c"] == pytest.approx(intercept / -slope, rel=1e-10)


def test_aicc_asks_for_the_floor_only_when_there_is_one():
    rng = np.random.default_rng(0)
    with_floor = power_law(N, 0.3, math.log(2e4), 1.5) * np.exp(0.001 * rng.standard_normal(6))
    without = power_law(N, 0.076, math.log(8.8e13)) * np.exp(0.001 * rng.standard_normal(6))
    assert fit_scaling_law(N, with_floor)["uses_floor"]
    assert not fit_scaling_law(N, without)["uses_floor"]
    assert aicc(1.0, 6, 3) - aicc(1.0, 6, 2) == pytest.approx(2 + 24 / 2 - 12 / 3)


def test_bootstrap_interval_covers_the_truth_and_shrinks_with_more_windows():
    rng = np.random.default_rng(0)
    clean = power_law(N, 0.25, math.log(1e6))[:, None, None]
    few = clean + 0.5 * rng.standard_normal((6, 1, 50))
    many = clean + 0.5 * rng.standard_normal((6, 1, 2000))
    b_few = bootstrap_alpha(N, few, irreducible=False, n_boot=300)
    b_many = bootstrap_alpha(N, many, irreducible=False, n_boot=300)
    assert b_many["lo"] < 0.25 < b_many["hi"]
    assert b_many["hi"] - b_many["lo"] < 0.5 * (b_few["hi"] - b_few["lo"])
    with pytest.raises(ValueError):
        bootstrap_alpha(N, few[:, 0], irreducible=False)


def test_bootstrap_over_seeds_widens_the_interval():
    rng = np.random.default_rng(2)
    clean = power_law(N, 0.25, math.log(1e6))[:, None, None]
    windows = 0.2 * rng.standard_normal((6, 1, 400))
    seeds = 0.05 * rng.standard_normal((6, 3, 1))
    b1 = bootstrap_alpha(N, clean + windows, irreducible=False, n_boot=300)
    b3 = bootstrap_alpha(N, clean + windows + seeds, irreducible=False, n_boot=300)
    assert b3["hi"] - b3["lo"] > b1["hi"] - b1["lo"]


# --------------------------------------------------------------------- non-embedding parameters
@pytest.mark.parametrize("n_layer, n_embd, n_head",
                         [(1, 16, 1), (2, 48, 3), (3, 64, 4), (6, 128, 8)])
def test_non_embedding_count_by_hand(n_layer, n_embd, n_head):
    d = n_embd
    per_block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    hand = n_layer * per_block + 2 * d                        # blocks + final LayerNorm
    model = GPT(GPTConfig(vocab_size=300, block_size=40, n_layer=n_layer, n_head=n_head, n_embd=d))
    assert model.num_params() == hand == count_gpt_params(n_layer, d, vocab_size=0, block_size=0)
    assert model.num_params(non_embedding=False) == hand + 300 * d + 40 * d
    assert 0 < hand - 12 * n_layer * d * d <= 15 * n_layer * d     # Kaplan's eq. (2) drops 13d + 2d/L


# ------------------------------------------------------------------------------- loss scaling
def _trace(scaler, factors, dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).to(dtype)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    scales, skipped = [], []
    for factor in factors:
        before = [p.detach().clone() for p in net.parameters()]
        scaler.scale(net(x).pow(2).mean() * factor).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        skipped.append(all(torch.equal(a, p) for a, p in zip(before, net.parameters())))
        scales.append(float(scaler.get_scale()))
    return scales, skipped, torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("growth_interval", [1, 2, 5])
def test_loss_scaler_matches_grad_scaler(growth_interval):
    rng = np.random.default_rng(growth_interval)
    factors = [1e37 if u < 0.25 else (float("inf") if u > 0.95 else 1.0) for u in rng.random(40)]
    kw = dict(init_scale=2.0 ** 10, growth_interval=growth_interval)
    ours = _trace(LossScaler(**kw), factors)
    ref = _trace(torch.amp.GradScaler("cpu", **kw), factors)
    assert ours[0] == ref[0] and ours[1] == ref[1]
    assert torch.equal(ours[2], ref[2])
    assert any(ours[1]) and not all(ours[1])


def test_loss_scaler_unscales_exactly():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = LossScaler(init_scale=1024.0)
    scaler.scale((p * torch.tensor([3.0, 5.0])).sum()).backward()
    assert torch.equal(p.grad, torch.tensor([3072.0, 5120.0]))
    assert scaler.step(opt)                            # unscales, then steps
    assert torch.equal(p.grad, torch.tensor([3.0, 5.0]))
    scaler.update()
    with pytest.raises(RuntimeError):
        scaler.update()                                # no step since the last update


def test_loss_scaler_skips_on_inf_and_backs_off():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    scaler.scale(p.sum() * float("inf")).backward()
    assert not scaler.step(opt) and torch.equal(p.detach(), torch.ones(3))
    scaler.update()
    assert scaler.get_scale() == 4.0 and scaler.growth_tracker == 0


# ---------------------------------------------------------------------------- data parallelism
def test_rank_batches_tile_the_global_batch():
    data = torch.arange(500)
    x, y = get_lm_batch(data, 8, 12, step=3, seed=1)
    parts = [rank_batch(data, 8, 12, 3, 1, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError):
        rank_batch(data, 8, 12, 3, 1, 0, 5)


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_ddp_two_processes_equal_one_process_on_twice_the_batch(tmp_path):
    torch.save(torch.randint(0, 64, (5000,), generator=torch.Generator().manual_seed(0)),
               tmp_path / "tokens.pt")
    model = {"vocab_size": 64, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    common = ["--data", str(tmp_path / "tokens.pt"), "--model", json.dumps(model), "--steps", "3",
              "--lr", "0.01", "--device", "cpu", "--dtype", "float64", "--batch-size", "8"]
    ddp_main([*common, "--out", str(tmp_path / "one.pt")])
    lib = str(Path(__file__).resolve().parent.parent / "lib")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([lib, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "groundup.ddp", *common,
                           "--out", str(tmp_path / "two.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["world_size"] == 1 and two["world_size"] == 2
    err = max((one["state"][k] - two["state"][k]).abs().max().item() for k in one["state"])
    assert err < 1e-10


def test_loss_scaler_state_dict_is_grad_scalers():
    ours, ref = LossScaler(init_scale=256.0, growth_interval=7), torch.amp.GradScaler("cpu")
    ours.growth_tracker = 3
    ref.load_state_dict(ours.state_dict())
    assert ref.get_scale() == 256.0 and ref.state_dict()["_growth_tracker"] == 3
    back = LossScaler()
    back.load_state_dict(ref.state_dict())
    assert back.state_dict() == ref.state_dict()


def test_train_with_our_scaler_equals_train_with_grad_scaler():
    from groundup.train import train

    data = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(0))
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    weights = []
    for scaler in (None, LossScaler()):
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        history = train(model, lambda s: get_lm_batch(data, 16, 4, s, 0), steps=4, optimizer=opt,
                        lr_at=lambda s: 1e-2, precision="fp16", scaler=scaler, eval_every=4)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert history["precision"] == "fp16"
    assert torch.equal(weights[0], weights[1])
    with pytest.raises(ValueError):
        train(GPT(cfg), lambda s: get_lm_batch(data, 16, 4, s, 0), steps=1,
              optimizer=torch.optim.SGD(GPT(cfg).parameters(), lr=0.1), lr_at=lambda s: 0.1,
              precision="fp32", scaler=LossScaler())
