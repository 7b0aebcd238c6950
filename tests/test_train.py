"""Tests of the book's training loop, groundup.train (taught in chapter 04, configured by chapters 05-13)."""

import math

import pytest
import torch
import torch.nn as nn

from groundup.gpt import GPT, GPTConfig, get_lm_batch
from groundup.train import amp_context, evaluate, resolve_precision, train, warmup_cosine_lr

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

TINY = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=32)


def one_step(precision: str, grad_clip: float | None, seed: int = 0):
    """One SGD step of a tiny GPT; returns the parameter update, the loss and the gradient norm."""
    torch.manual_seed(seed)
    model = GPT(TINY)
    before = [p.detach().clone() for p in model.parameters()]
    data = torch.randint(0, 23, (400,), generator=torch.Generator().manual_seed(1))
    h = train(model, lambda step: get_lm_batch(data, 12, 16, step, 0), steps=1, precision=precision,
              optimizer=torch.optim.SGD(model.parameters(), lr=1.0), lr_at=lambda step: 1.0, grad_clip=grad_clip)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    return update, h["train"][0][1], h["grad_norm"][0][1], h


@pytest.mark.parametrize("grad_clip", [None, 0.1])
def test_fp16_gradscaler_step_equals_fp32_step(grad_clip):
    """fp16 autocast with a GradScaler: the update equals fp32's within 0.5% of its largest entry (float16 has
    an 11-bit significand, ~5e-4 relative per rounding; measured: 3.6e-4 on this model, torch 2.14, CPU). With grad_clip=0.1 the clip is active (the norm is ~1): had the gradients not been unscaled before
    clipping, they would be clipped from a norm 65,536 times too large and the update would be far off."""
    u32, l32, n32, _ = one_step("fp32", grad_clip)
    u16, l16, n16, h = one_step("fp16", grad_clip)
    assert h["precision"] == "fp16"
    assert abs(l16 - l32) < 1e-3 and abs(n16 / n32 - 1) < 1e-3
    assert n32 > 0.5                                                   # so that clipping at 0.1 is active
    assert (u16 - u32).abs().max() < 5e-3 * u32.abs().max()
    assert (u16 - u32).abs().max() > 0                                 # fp16 really ran


def test_fp16_clipping_before_unscaling_would_differ():
    """The check above can fail: with the unscale moved after the clip (GradScaler.step unscales what the loop
    did not), the scaled gradients are clipped and the update is far off."""
    u32, *_ = one_step("fp32", 0.1)
    original, calls = torch.amp.GradScaler.unscale_, []

    def late_unscale(self, optimizer):                               # the loop's call does nothing ...
        calls.append(1)
        if len(calls) > 1:                                           # ... GradScaler.step's call unscales
            original(self, optimizer)
    torch.amp.GradScaler.unscale_ = late_unscale
    try:
        u16, *_ = one_step("fp16", 0.1)
    finally:
        torch.amp.GradScaler.unscale_ = original
    assert len(calls) == 2
    assert (u16 - u32).abs().max() > 0.5 * u32.abs().max()


def test_bf16_step_runs_and_precision_resolves():
    u32, *_ = one_step("fp32", 1.0)
    ubf, *_ = one_step("bf16", 1.0)
    assert (ubf - u32).abs().max() < 0.1 * u32.abs().max()            # bf16: an 8-bit significand
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")
    with amp_context("bf16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_grad_accumulation_equals_one_big_batch():
    """grad_accum micro-batches of b rows give the gradient of one batch of (grad_accum * b) rows."""
    data = torch.randint(0, 23, (400,), generator=torch.Generator().manual_seed(1))
    updates = []
    for accum, rows in ((1, 8), (2, 4)):
        torch.manual_seed(0)
        model = GPT(TINY).double()
        before = [p.detach().clone() for p in model.parameters()]

        def batch(i, rows=rows, accum=accum):                          # the same 8 rows either way
            x, y = get_lm_batch(data, 12, 8, i // accum, 0)
            part = i % accum
            return x[part * rows:(part + 1) * rows], y[part * rows:(part + 1) * rows]
        train(model, batch, steps=1, grad_accum=accum, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
              lr_at=lambda step: 1.0)
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    assert torch.allclose(updates[0], updates[1], atol=1e-12)


def test_warmup_cosine_lr_and_history_shape():
    assert warmup_cosine_lr(0, steps=110, lr=1.0, min_lr=0.1, warmup=10) == pytest.approx(0.1)
    assert warmup_cosine_lr(60, steps=110, lr=1.0, min_lr=0.1, warmup=10) == pytest.approx(0.55)
    assert warmup_cosine_lr(500, steps=110, lr=1.0, min_lr=0.1, warmup=10) == pytest.approx(0.1)
    _, _, _, h = one_step("fp32", None)
    assert set(h) >= {"train", "grad_norm", "lr", "val", "train_seconds", "first_step_seconds", "tokens_per_s"}
    assert h["lr"] == [(0, 1.0)] and h["val"] == [] and len(h["train_seconds"]) == 1


def test_evaluate_weights_batches_by_their_targets():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, y):
            return None, y.float().mean() + self.w                      # the mean of the targets as "loss"

    batches = [(None, torch.full((2, 3), 1.0)), (None, torch.full((1, 3), 4.0))]
    assert evaluate(Const(), batches) == pytest.approx((6 * 1.0 + 3 * 4.0) / 9)
    with pytest.raises(ValueError):
        evaluate(Const(), [])


def test_carry_state_refuses_a_checkpoint_inside_an_epoch(tmp_path):
    model = GPT(TINY)
    with pytest.raises(ValueError, match="reset_state_every"):
        train(model, lambda s: None, steps=4, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
              lr_at=lambda s: 0.1, carry_state=True, reset_state_every=3, eval_every=2,
              checkpoint=tmp_path / "x.safetensors")
    assert math.isfinite(0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_synchronization_between_evaluations(monkeypatch):
    """On a GPU, the steps between two evaluations never wait for the device: CUDA's sync debug mode turns any
    synchronization (an .item(), a host-to-device index copy, ...) into an error from step 1 (after the first
    step's lazy initialization) until the loop's own flush, which calls groundup.runtime.sync first."""
    import groundup.train as loop
    real_sync = loop.sync

    def sync_allowed(device):
        torch.cuda.set_sync_debug_mode(0)
        real_sync(device)
    monkeypatch.setattr(loop, "sync", sync_allowed)
    torch.manual_seed(0)
    model = GPT(TINY).cuda()
    data = torch.randint(0, 23, (400,), device="cuda")

    def lr_at(step):
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")
        return 1e-3
    from groundup.gpt import make_optimizer
    try:
        h = train(model, lambda step: get_lm_batch(data, 12, 8, step, 0), steps=6, eval_every=6, grad_clip=1.0,
                  precision="bf16", optimizer=make_optimizer(model, lr=1e-3, weight_decay=0.1), lr_at=lr_at)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(h["train"]) == 6


def test_fp16_resumes_with_its_loss_scale(tmp_path, monkeypatch):
    """An fp16 run killed and resumed ends where an uninterrupted one does: the GradScaler's state is in the
    checkpoint's extra. The loss is multiplied by 1e4 so that the scaled float16 gradients overflow and the
    scale backs off during the run: a resumed run with a fresh scaler would skip other steps and differ."""
    import groundup.train as loop
    from conftest import Crash, crashing_progress
    data = torch.randint(0, 23, (400,), generator=torch.Generator().manual_seed(1))

    def run(checkpoint=None):
        torch.manual_seed(0)
        model = GPT(TINY)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        h = train(model, lambda step: get_lm_batch(data, 12, 8, step, 0), steps=10, eval_every=4, precision="fp16",
                  optimizer=opt, lr_at=lambda step: 1e-3, grad_clip=1.0, checkpoint=checkpoint,
                  loss=lambda m, b, state: (m(*b)[1] * 1e4, None))
        return model, h

    straight, h1 = run()
    ckpt = tmp_path / "fp16.safetensors"
    monkeypatch.setattr(loop, "progress", crashing_progress(6))
    with pytest.raises(Crash):
        run(ckpt)
    monkeypatch.undo()
    resumed, h2 = run(ckpt)
    assert any(not math.isfinite(n) for _, n in h1["grad_norm"])      # the scale did back off (skipped steps)
    assert str(h1["train"]) == str(h2["train"]) and str(h1["grad_norm"]) == str(h2["grad_norm"])   # nan == nan
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
