"""groundup.hf (chapter 12): our GPT as a transformers model. Tiny models, CPU, a few seconds."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from groundup.gpt import GPT, GPTConfig, to_hf_gpt2
from groundup.hf import (GroundUpGPTConfig, GroundUpGPTForCausalLM, make_model_card, push_to_hub_if_opted_in,
                         register_groundup_gpt, token_blocks)

TINY = GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed: int = 0, **overrides) -> GroundUpGPTForCausalLM:
    torch.manual_seed(seed)
    return GroundUpGPTForCausalLM(GroundUpGPTConfig.from_gpt_config(dataclasses.replace(TINY, **overrides))).eval()


def test_config_has_gptconfig_fields_and_defaults():
    defaults = GroundUpGPTConfig()
    for f in dataclasses.fields(GPTConfig):
        assert getattr(defaults, f.name) == f.default, f.name
    assert GroundUpGPTConfig.from_gpt_config(TINY).gpt_config() == TINY
    assert GroundUpGPTConfig(n_layer=3).num_hidden_layers == 3


def test_wrapper_loss_is_ours_with_hf_shift():
    model = tiny_model()
    x = torch.randint(17, (3, 12))
    labels = x.clone()
    labels[0, 5] = -100                                            # ignored
    with torch.no_grad():
        out = model(x, labels=labels)
        logits, _ = model.gpt(x)
    keep = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    assert torch.equal(out.logits, logits)
    assert abs(out.loss.item() - expected.item()) < 1e-6


def test_left_padding_is_refused_right_padding_accepted():
    model = tiny_model()
    x = torch.randint(17, (2, 6))
    model(x, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]))
    with pytest.raises(ValueError):
        model(x, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]))


def test_save_and_load_through_auto_classes(tmp_path):
    register_groundup_gpt()
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, GroundUpGPTForCausalLM)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config.gpt_config() == model.config.gpt_config()
    assert loaded.gpt.lm_head.weight is loaded.gpt.transformer.wte.weight


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_equals_gpt_generate_past_the_context(use_cache):
    model = tiny_model(seed=1)
    prompt = torch.randint(1, 17, (2, 4))
    n_new = 20                                                     # 4 + 20 > block_size 16: cropped windows
    ones = torch.ones_like(prompt)
    greedy = model.generate(prompt, attention_mask=ones, max_new_tokens=n_new, do_sample=False,
                            use_cache=use_cache, pad_token_id=0)
    assert torch.equal(greedy, model.gpt.generate(prompt, n_new, temperature=0.0))
    torch.manual_seed(5)
    sampled = model.generate(prompt, attention_mask=ones, max_new_tokens=n_new, do_sample=True, temperature=0.8,
                             top_k=5, top_p=1.0, use_cache=use_cache, pad_token_id=0)
    torch.manual_seed(5)
    assert torch.equal(sampled, model.gpt.generate(prompt, n_new, temperature=0.8, top_k=5))


def test_wrapped_weights_give_gpt2_logits():
    model = tiny_model(seed=2)
    hf = to_hf_gpt2(model.gpt).eval()
    x = torch.randint(17, (2, 10))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max() < 1e-5


def test_token_blocks():
    data = torch.arange(50)
    ds = token_blocks(data, 8)
    assert len(ds) == 6 and ds.column_names == ["input_ids", "labels"]
    assert torch.equal(ds[1]["input_ids"], torch.arange(8, 16)) and torch.equal(ds[1]["labels"], ds[1]["input_ids"])
    assert len(token_blocks(data, 8, n_blocks=2)) == 2
    with pytest.raises(ValueError):
        token_blocks(torch.arange(5), 8)


def test_model_card_round_trip(tmp_path):
    card = make_model_card("m", val_loss=1.23456, bigram_loss=2.5, n_params=1000, train_tokens=10_000,
                           profile="smoke", device="cpu")
    card.save(tmp_path / "README.md")
    from huggingface_hub import ModelCard
    back = ModelCard.load(tmp_path / "README.md")
    assert back.data.license == "mit" and back.data.datasets == ["tiny_shakespeare"]
    assert back.data.eval_results[0].metric_value == 1.2346


def test_push_needs_opt_in_and_token(monkeypatch):
    model = tiny_model()
    card = make_model_card("m", val_loss=1.0, bigram_loss=2.0, n_params=1, train_tokens=1, profile="smoke",
                           device="cpu")
    calls = []
    monkeypatch.setattr(GroundUpGPTForCausalLM, "push_to_hub", lambda *a, **k: calls.append(a))
    monkeypatch.delenv("GROUNDUP_PUSH_TO_HUB", raising=False)
    assert "not opted in" in push_to_hub_if_opted_in(model, card, "user/m")
    monkeypatch.setenv("GROUNDUP_PUSH_TO_HUB", "1")
    monkeypatch.setattr("groundup.hf.get_token", lambda: None)
    assert "no token" in push_to_hub_if_opted_in(model, card, "user/m")
    monkeypatch.setattr("groundup.hf.get_token", lambda: "hf_x")
    monkeypatch.setattr("groundup.hf.hub_reachable", lambda: False)
    assert "not reachable" in push_to_hub_if_opted_in(model, card, "user/m")
    assert calls == []


def test_trainer_resume_is_exact(tmp_path):
    pytest.importorskip("accelerate")                               # Trainer needs it
    from transformers import Trainer, TrainingArguments, default_data_collator

    ds = token_blocks(torch.randint(17, (2000,)), 16)

    def run(out, model, resume=None):
        args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                                 save_strategy="steps", save_steps=3, logging_steps=3, use_cpu=True, seed=0,
                                 report_to="none", disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator).train(
            resume_from_checkpoint=resume)
        return model

    a = run(tmp_path / "a", tiny_model(seed=0))
    b = run(tmp_path / "b", tiny_model(seed=9), resume=str(tmp_path / "a" / "checkpoint-3"))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_card_remote_code_option():
    kwargs = dict(val_loss=1.0, bigram_loss=2.0, n_params=1, train_tokens=1, profile="smoke", device="cpu")
    local = make_model_card("m", **kwargs).text
    remote = make_model_card("m", trained_with="our loop", remote_code=True, **kwargs).text
    assert "register_groundup_gpt()" in local and "trust_remote_code" not in local
    assert "trust_remote_code=True" in remote and "register_groundup_gpt" not in remote
    assert "trained with our loop" in remote and "trained with transformers' Trainer" in local
