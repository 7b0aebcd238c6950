"""groundup.checkpoint: save/load round trip, and resuming ends where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from groundup import checkpoint
from groundup.checkpoint import CheckpointError, checkpoint_dir, load_checkpoint, save_checkpoint
from groundup.runtime import batch_indices, seed_everything

pytestmark = pytest.mark.usefixtures("clean_env")

N, BATCH, DATA_SEED = 64, 8, 3


def make_model(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 3))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def train(model, optimizer, steps: range) -> list[float]:
    x, y = data()
    model.train()
    losses = []
    for step in steps:
        idx = batch_indices(N, BATCH, step, DATA_SEED)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def optimizer_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for pid in sa["state"]:
        assert sa["state"][pid].keys() == sb["state"][pid].keys()
        for key, value in sa["state"][pid].items():
            other = sb["state"][pid][key]
            if torch.is_tensor(value):
                assert torch.equal(value, other), (pid, key)
            else:
                assert value == other, (pid, key)
    # param_groups go through JSON, which turns tuples (betas) into lists; compare the values
    assert json.loads(json.dumps(sa["param_groups"])) == json.loads(json.dumps(sb["param_groups"]))


# ----------------------------------------------------------------------------- round trip

def test_round_trip(tmp_path):
    seed_everything(0)
    model = make_model()
    opt = make_optimizer(model)
    train(model, opt, range(3))
    extra = {"history": [[0, 1.5], [1, 1.25]], "best": 0.5, "name": "mlp", "nested": {"a": None}}
    path = save_checkpoint(tmp_path / "ckpt" / "run.safetensors", model, opt, step=3, extra=extra)
    assert path == tmp_path / "ckpt" / "run.safetensors" and path.exists()

    seed_everything(1)
    fresh = make_model()
    fresh_opt = make_optimizer(fresh)
    step, loaded_extra = load_checkpoint(path, fresh, fresh_opt)
    assert step == 3
    assert loaded_extra == extra
    assert_same_parameters(model, fresh)
    optimizer_states_equal(opt, fresh_opt)
    assert fresh_opt.state_dict()["state"], "the optimizer state was not restored"


def test_round_trip_without_optimizer_and_extra(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "m.safetensors", model, step=0)
    fresh = make_model()
    assert load_checkpoint(path, fresh) == (0, {})
    assert_same_parameters(model, fresh)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, make_model(), make_optimizer(make_model()))


def test_load_restores_the_random_state(tmp_path):
    model = make_model()
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path / "r.safetensors", model, step=1)
    expected = torch.rand(4)
    fresh = make_model()
    torch.manual_seed(99)
    load_checkpoint(path, fresh)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(99)
    after_99 = torch.rand(4)
    torch.manual_seed(99)
    load_checkpoint(path, fresh, restore_rng=False)
    assert torch.equal(torch.rand(4), after_99)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight  # one Parameter, two modules

    def forward(self, idx):
        return self.head(self.embed(idx))


def test_tied_weights(tmp_path):
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.tensor([1, 2, 3])).sum()
    loss.backward()
    opt.step()
    path = save_checkpoint(tmp_path / "tied.safetensors", model, opt, step=1)
    fresh = Tied()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_checkpoint(path, fresh, fresh_opt)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight  # still tied after loading
    optimizer_states_equal(opt, fresh_opt)


# ----------------------------------------------------------------------------- resuming

@pytest.mark.parametrize("k", [3, 8, 11])  # mid-epoch, exactly one epoch (8 batches of 8), across epochs
def test_interrupted_run_ends_where_an_uninterrupted_one_does(tmp_path, k):
    seed_everything(0)
    straight = make_model()
    straight_opt = make_optimizer(straight)
    straight_losses = train(straight, straight_opt, range(2 * k))

    seed_everything(0)
    first = make_model()
    first_opt = make_optimizer(first)
    first_losses = train(first, first_opt, range(k))
    path = save_checkpoint(tmp_path / "run.safetensors", first, first_opt, step=k,
                           extra={"losses": first_losses})
    del first, first_opt

    seed_everything(12345)  # a new process: other random state, other initial weights
    resumed = make_model()
    resumed_opt = make_optimizer(resumed)
    step, extra = load_checkpoint(path, resumed, resumed_opt)
    assert step == k
    resumed_losses = extra["losses"] + train(resumed, resumed_opt, range(step, 2 * k))

    assert resumed_losses == straight_losses
    assert_same_parameters(straight, resumed)
    optimizer_states_equal(straight_opt, resumed_opt)


def test_resume_test_would_notice_a_lost_random_state_or_optimizer(tmp_path):
    """The test above can fail: resuming without the RNG state (dropout masks) or without the
    optimizer's moments ends elsewhere."""
    k = 4
    seed_everything(0)
    straight = make_model()
    straight_opt = make_optimizer(straight)
    train(straight, straight_opt, range(2 * k))

    seed_everything(0)
    first = make_model()
    first_opt = make_optimizer(first)
    train(first, first_opt, range(k))
    path = save_checkpoint(tmp_path / "run.safetensors", first, first_opt, step=k)

    seed_everything(12345)
    no_rng = make_model()
    no_rng_opt = make_optimizer(no_rng)
    load_checkpoint(path, no_rng, no_rng_opt, restore_rng=False)
    train(no_rng, no_rng_opt, range(k, 2 * k))
    assert not torch.equal(no_rng[0].weight, straight[0].weight)

    seed_everything(12345)
    no_opt = make_model()
    load_checkpoint(path, no_opt)
    train(no_opt, make_optimizer(no_opt), range(k, 2 * k))
    assert not torch.equal(no_opt[0].weight, straight[0].weight)


# ----------------------------------------------------------------------------- errors

def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(path, make_model())


def test_truncated_file_raises_naming_the_path(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "t.safetensors", model, make_optimizer(model), step=2)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, make_model())
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint" * 10, b"\xff" * 8 + b"{}"])
def test_garbage_file_raises_naming_the_path(tmp_path, content):
    path = tmp_path / "g.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, make_model())
    assert str(path) in str(err.value)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"model.0.weight": torch.zeros(16, 5)}, str(path))
    with pytest.raises(CheckpointError, match="not written by groundup.checkpoint"):
        load_checkpoint(path, make_model())


def test_model_of_another_shape_raises(tmp_path):
    path = save_checkpoint(tmp_path / "s.safetensors", make_model(width=16), step=1)
    before = {k: v.clone() for k, v in make_model(width=32).state_dict().items()}
    other = make_model(width=32)
    other.load_state_dict(before)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, other)
    assert str(path) in str(err.value)
    assert "does not fit" in str(err.value)


def test_model_with_other_layers_raises(tmp_path):
    path = save_checkpoint(tmp_path / "l.safetensors", make_model(), step=1)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, nn.Sequential(nn.Linear(5, 3)))


# ----------------------------------------------------------------------------- where, and how it is written

def test_checkpoint_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path / "ck"))
    assert checkpoint_dir() == tmp_path / "ck"


def test_checkpoint_dir_defaults_to_the_book_root(book_root):
    assert checkpoint_dir() == book_root.resolve() / "checkpoints"


def test_save_leaves_no_temporary_file(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path / "a.safetensors", model, make_optimizer(model), step=1)
    save_checkpoint(tmp_path / "a.safetensors", model, make_optimizer(model), step=2)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert load_checkpoint(tmp_path / "a.safetensors", make_model())[0] == 2


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = make_model()
    path = save_checkpoint(tmp_path / "a.safetensors", model, step=1)
    before = path.read_bytes()

    def crashing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_model(), step=2)
    assert path.read_bytes() == before
    assert load_checkpoint(path, make_model())[0] == 1


def test_read_extra_without_loading_tensors(tmp_path):
    from groundup.checkpoint import read_extra
    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "c.safetensors", model, step=4, extra={"widths": [4, 8], "note": "x"})
    assert read_extra(path) == {"widths": [4, 8], "note": "x"}
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_extra(tmp_path / "bad.safetensors")
