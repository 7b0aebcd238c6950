"""groundup.lora (chapter 13): LoRA from scratch. Tiny models, CPU, float64, a few seconds."""

import copy

import pytest
import torch
import torch.nn as nn

from groundup.gpt import GPT, GPTConfig
from groundup.lora import (LoRALinear, add_lora, lora_layers, lora_param_count, merge_lora, trainable_params,
                           training_state_bytes, unmerge_lora)

TINY = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY).double().eval()


def tokens(seed: int = 1, B: int = 3, T: int = 12) -> torch.Tensor:
    return torch.randint(TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_B(model: nn.Module, std: float = 0.3) -> None:
    """As if trained: B = 0 would hide every mistake below."""
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.normal_(0.0, std)


def test_zero_init_B_gives_identical_outputs():
    base = tiny_gpt()
    model = add_lora(copy.deepcopy(base), r=2, alpha=4.0)
    x = tokens()
    assert all(torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) for layer in lora_layers(model))
    assert all(layer.lora_A.abs().min() > 0 for layer in lora_layers(model))       # A random, not zero
    assert torch.equal(model(x)[0], base(x)[0])                                  # eq. (4), exactly
    randomize_B(model)
    assert not torch.allclose(model(x)[0], base(x)[0])                           # the update does act


def test_gradients_at_init_reach_B_not_A():
    model = add_lora(tiny_gpt(), r=2, alpha=4.0)
    x = tokens()
    model(x, x)[1].backward()
    layer = lora_layers(model)[0]
    assert layer.lora_B.grad.abs().max() > 0                     # dL/dB = (alpha/r) g (Ax)^T != 0
    assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))   # dL/dA = (alpha/r) B^T g x^T = 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)   # W_0 frozen


def test_merge_unmerge_round_trip_float64():
    model = add_lora(tiny_gpt(), r=3, alpha=5.0, targets=("q", "v", "o"))
    randomize_B(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    unmerged = model(x)[0]
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model))
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, before["transformer.h.0.attn.c_attn.weight"])
    assert (model(x)[0] - unmerged).abs().max() < 1e-12                          # eq. (5)
    merge_lora(model)                                                             # merging twice is a no-op
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        assert (value - before[key]).abs().max() < 1e-14, key
    assert (model(x)[0] - unmerged).abs().max() < 1e-12


def test_forward_equals_the_merged_update():
    """The bypass in forward computes x (Delta W)^T with Delta W = (alpha/r) B_full A (eqs. 3 and 6)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 24).double()
    layer = LoRALinear(base, r=2, alpha=3.0, blocks=(0, 2), n_blocks=3)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = base(x) + x @ layer.delta_weight().T
    assert (layer(x) - expected).abs().max() < 1e-13
    assert layer.weight is base.weight and layer.bias is base.bias               # shared, not copied


def test_qv_block_structure_leaves_k_rows_exactly_zero():
    model = add_lora(tiny_gpt(), r=2, alpha=4.0)                                   # default: q and v
    randomize_B(model)
    d = TINY.n_embd
    for layer in lora_layers(model):
        assert layer.blocks == (0, 2) and layer.n_blocks == 3
        delta = layer.delta_weight()
        assert delta.shape == (3 * d, d)
        assert torch.equal(delta[d:2 * d], torch.zeros(d, d))                    # k rows: exactly zero
        assert delta[:d].abs().sum(1).min() > 0 and delta[2 * d:].abs().sum(1).min() > 0   # q, v rows: all move
        assert torch.linalg.matrix_rank(delta[:d]) == 2 and torch.linalg.matrix_rank(delta[2 * d:]) == 2
        B = layer.fused_B()
        assert B.shape == (3 * d, 4) and torch.equal(B[d:2 * d], torch.zeros(d, 4))
        assert torch.equal(B[:d, 2:], torch.zeros(d, 2)) and torch.equal(B[2 * d:, :2], torch.zeros(d, 2))
    model = add_lora(tiny_gpt(), r=2, alpha=4.0, targets=("k",))
    randomize_B(model)
    delta = lora_layers(model)[0].delta_weight()
    assert torch.equal(delta[:d], torch.zeros(d, d)) and delta[d:2 * d].abs().min() > 0


@pytest.mark.parametrize("targets,n_matrices", [(("q", "v"), 2), (("q",), 1), (("q", "k", "v", "o"), 4)])
@pytest.mark.parametrize("r", [1, 4])
def test_trainable_parameter_count_formula(targets, n_matrices, r):
    model = add_lora(tiny_gpt(), r=r, alpha=2.0 * r, targets=targets)
    assert trainable_params(model) == lora_param_count(TINY.n_layer, TINY.n_embd, r, n_matrices)
    assert lora_param_count(12, 768, 4, 2) == 147_456                            # GPT-2 124M, q and v, r = 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_state_dict_keeps_the_base_keys():
    base = tiny_gpt()
    model = add_lora(copy.deepcopy(base), r=2, alpha=4.0)
    keys = set(model.state_dict())
    assert set(base.state_dict()) <= keys
    assert keys - set(base.state_dict()) == {f"transformer.h.{i}.attn.c_attn.lora_{m}"
                                             for i in range(TINY.n_layer) for m in "AB"}


def test_training_state_bytes():
    model = add_lora(tiny_gpt().float(), r=2, alpha=4.0)
    n_lora = trainable_params(model)
    n = sum(p.numel() for p in model.parameters()) - n_lora                     # N: the base model's
    assert training_state_bytes(model)["total"] == 4 * n + 16 * n_lora        # eq. (9)
    full = tiny_gpt().float()
    assert training_state_bytes(full)["total"] == 16 * sum(p.numel() for p in full.parameters())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        add_lora(tiny_gpt(), r=2, alpha=4.0, targets=("q", "qkv"))
    with pytest.raises(ValueError):
        add_lora(tiny_gpt(), r=2, alpha=4.0, targets=("x",))
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 12), r=0, alpha=1.0)
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 10), r=1, alpha=1.0, blocks=(0,), n_blocks=3)


def test_equals_peft_rank_2r_with_doubled_alpha():
    """Eq. (8): q, v in the fused matrix = PEFT's rank-2r LoRA on c_attn with B_full and alpha' = 2 alpha."""
    peft = pytest.importorskip("peft")
    from groundup.hf import GroundUpGPTConfig, GroundUpGPTForCausalLM

    ours = add_lora(tiny_gpt(), r=2, alpha=3.0)
    randomize_B(ours)
    hf = GroundUpGPTForCausalLM(GroundUpGPTConfig.from_gpt_config(TINY)).double()
    hf.gpt.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k})
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=["c_attn"], lora_dropout=0.0))
    with torch.no_grad():
        for mine, theirs in zip(ours.transformer.h, pm.base_model.model.gpt.transformer.h):
            theirs.attn.c_attn.lora_A["default"].weight.copy_(mine.attn.c_attn.lora_A)
            theirs.attn.c_attn.lora_B["default"].weight.copy_(mine.attn.c_attn.fused_B())
    x = tokens()
    assert (pm.eval()(input_ids=x).logits - ours(x)[0]).abs().max() < 1e-12
