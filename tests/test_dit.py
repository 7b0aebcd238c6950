"""Chapter 23's exported code: the Diffusion Transformer (groundup.dit)."""

from dataclasses import replace

import pytest
import torch

from groundup.dit import (DiT, DiTBlock, DiTConfig, counted_gflops, dit_gflops, patchify,
                          sincos_pos_embed_2d, to_diffusers_dit, unpatchify)
from groundup.guidance import ClassifierFreeGuidance, LabelDropout
from groundup.iddpm import ImprovedDiffusion, respace, spaced_timesteps
from groundup.ddpm import linear_beta_schedule

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

TOY = DiTConfig(image_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4)


def awake(cfg=TOY, seed=0, dtype=torch.float32):
    """a DiT whose zero-initialized parts are random too (two zero outputs prove nothing)"""
    torch.manual_seed(seed)
    net = DiT(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_patchify_round_trip_and_token_layout():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    assert torch.equal(unpatchify(tokens, 4, 3, 2, 3), x)
    assert torch.equal(tokens[:, 4], x[:, :, 4:8, 4:8].permute(0, 2, 3, 1).flatten(1))   # row 1, column 1
    with pytest.raises(ValueError):
        patchify(x, 5)


def test_positions_equal_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    theirs = get_2d_sincos_pos_embed(48, 5, base_size=5, output_type="pt").double()
    assert torch.allclose(sincos_pos_embed_2d(48, 5, 5), theirs, atol=1e-12)
    # rows and columns swapped is a different table
    assert not torch.allclose(sincos_pos_embed_2d(48, 5, 5)[:, [*range(24, 48), *range(24)]], theirs)


def test_zero_initialized_block_is_identity_and_gate_scales_branch():
    torch.manual_seed(0)
    block = DiTBlock(16, 2).double()
    torch.nn.init.zeros_(block.adaLN_modulation[1].weight)
    torch.nn.init.zeros_(block.adaLN_modulation[1].bias)
    h, c = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    assert torch.equal(block(h, c), h)
    with torch.no_grad():
        block.adaLN_modulation[1].bias.normal_()
        block.adaLN_modulation[1].bias[5 * 16:] = 0                     # MLP gate off
        once = block(h, c) - h
        block.adaLN_modulation[1].bias[2 * 16:3 * 16] *= 3              # attention gate x 3
        assert torch.allclose(block(h, c) - h, 3 * once, atol=1e-12)
    assert once.abs().max() > 1e-3


def test_fresh_dit_outputs_zero_and_null_class_is_none():
    net = DiT(TOY)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 50, 999])
    out = net(x, t, class_labels=torch.tensor([0, 1, 2]))
    assert out.shape == (3, 6, 8, 8) and torch.equal(out, torch.zeros_like(out))
    net = awake()
    assert net.null_class_index == 10
    assert torch.equal(net(x, t), net(x, t, class_labels=torch.full((3,), 10)))
    assert not torch.allclose(net(x, t, class_labels=torch.tensor([0, 1, 2])), net(x, t))
    with pytest.raises(ValueError):
        net(torch.randn(3, 3, 16, 16), t)


def test_class_table_scale_is_the_authors_by_default_and_settable():
    cfg = replace(TOY, hidden_size=64, num_classes=1000)       # 1001 x 64 entries: a tight estimate
    torch.manual_seed(0)
    authors = DiT(cfg).y_embedder.weight.std().item()
    unit = DiT(replace(cfg, class_embed_std=1.0)).y_embedder.weight.std().item()
    assert abs(authors - 0.02) < 0.001 and abs(unit - 1.0) < 0.05
    # only the table changes: the time MLP keeps the authors' N(0, 0.02)
    assert abs(DiT(replace(cfg, class_embed_std=1.0)).t_embedder.linear_2.weight.std() - 0.02) < 0.002


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_equal_to_diffusers_dit_with_ported_weights(dtype, tol):
    ours = awake(replace(TOY, freq_shift=1, depth=3, patch_size=4), dtype=dtype)
    theirs = to_diffusers_dit(ours).eval()
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    t, y = torch.tensor([0, 7, 400, 999]), torch.tensor([0, 5, 9, 10])
    a, b = ours(x, t, class_labels=y), theirs(x, t, class_labels=y).sample
    assert (a - b).abs().max() <= tol * a.abs().max()
    # the authors' timestep features (freq_shift=0) are another function, and the converter says so
    with pytest.raises(ValueError):
        to_diffusers_dit(DiT(TOY))
    other = DiT(replace(ours.config, freq_shift=0)).to(dtype).eval()
    other.load_state_dict(ours.state_dict())
    assert (other(x, t, class_labels=y) - b).abs().max() > 1e-6


def test_gflops_formula_matches_counter_and_paper():
    net = DiT(replace(TOY, depth=3))
    x = torch.randn(2, 3, 8, 8)
    counted = counted_gflops(net, x, torch.tensor([3, 4]), class_labels=torch.tensor([1, 2]))
    assert abs(dit_gflops(net.config) - counted) / counted < 0.01
    xl2 = DiTConfig(image_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                    num_classes=1000)
    assert abs(dit_gflops(xl2) - 118.6) < 0.1                           # the paper's DiT-XL/2
    assert abs(dit_gflops(replace(xl2, patch_size=4)) - 29.1) < 0.1     # Table 1, XL at p = 4


def test_runs_in_the_diffusion_stack_with_dropout_and_guidance():
    net = awake(replace(TOY, image_size=8))
    diffusion = ImprovedDiffusion(linear_beta_schedule(100), variance_type="learned_range")
    x0 = torch.randint(0, 256, (4, 3, 8, 8)).float() / 127.5 - 1
    y = torch.tensor([0, 1, 2, 3])
    loss = diffusion.training_loss(LabelDropout(net.train(), 0.5), x0, model_kwargs={"class_labels": y})
    loss.backward()
    assert torch.isfinite(loss) and net.x_embedder.weight.grad is not None
    short = respace(diffusion, spaced_timesteps(100, 3))
    guided = ClassifierFreeGuidance(net.eval(), 2.0, {"class_labels": net.null_class_index}, guided_channels=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = short.sample(guided, (4, 3, 8, 8), generator=g, progress_bar=False, model_kwargs={"class_labels": y})
    assert out.shape == (4, 3, 8, 8) and torch.isfinite(out).all()
