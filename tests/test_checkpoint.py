"""A run stopped after k steps and resumed from its checkpoint ends bit for bit where the
never-stopped run ends; saving is atomic; a wrong architecture is named key by key."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from minicnn.checkpoint import load_checkpoint, save_checkpoint
from minicnn.data import Batches
from minicnn.models import simple_resnet
from minicnn.train import fit

EPOCHS, BATCH = 3, 10  # 48 images: 5 batches an epoch (the last one of 8), 15 steps


class Stop(Exception):
    """Stands for the interruption (a crash, a pre-empted machine) right after a save."""


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (48,), generator=g)
    x = torch.rand(48, 1, 12, 12, generator=g) * 0.3
    for c in range(3):
        x[y == c, :, 4 * c:4 * c + 3] += 0.6
    return x, y


def tiny_model(seed):
    torch.manual_seed(seed)
    model = simple_resnet(3, widths=(4, 8))
    model.layer_groups[2].insert(2, nn.Dropout(0.3))  # head: pool, flatten, dropout, linear
    return model


def flip_augment(generator):
    """Random horizontal flips drawn from their own generator (minicnn.augment if present)."""
    try:
        from minicnn.augment import side_on
        return side_on(generator=generator)
    except ImportError:
        def flip(x):
            flipped = torch.rand(len(x), generator=generator) < 0.5  # (N,)
            return torch.where(flipped[:, None, None, None], x.flip(3), x)
        return flip


def optimizers(model, kind):
    if kind == "torch":
        return torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-3)
    from minicnn.optim import SGD
    return SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-3, nesterov=True)


def lr_at(step):
    return 0.05 * (1 - step / (EPOCHS * 5))


def run(tmp_path, kind, stop_after=None, resume=False, seed=0, frozen=False):
    """Train from scratch (or from tmp_path/ckpt.pt) -> (model, optimizer, history)."""
    model = tiny_model(seed)
    if frozen:  # the early group frozen, its BatchNorm in eval mode (a hook: code, re-applied)
        from minicnn.freeze import freeze_to
        freeze_to(model, 1, train_bn=False)
    opt = optimizers(model, kind)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    train = Batches(*data(), BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    start, hook, ends = 0, None, ()
    if resume:  # everything else was built from other seeds: the checkpoint must restore it all
        start = load_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, generators={"augment": aug_gen}).step
    if stop_after is not None:
        def hook(model, step):  # after the optimizer step of step `stop_after - 1`: k steps done
            save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, step=step + 1,
                            generators={"augment": aug_gen})
            raise Stop
        ends = (stop_after - 1,)
    try:
        history = fit(model, train, None, opt, lr_at, EPOCHS, augment=flip_augment(aug_gen),
                      on_cycle_end=hook, cycle_ends=ends, start_step=start, verbose=False)
    except Stop:
        history = None
    return model, opt, history


@pytest.mark.parametrize("kind", ["torch", "minicnn"])
@pytest.mark.parametrize("k", [7, 10])  # mid-epoch, and at an epoch's end
def test_a_resumed_run_ends_bit_identical_to_the_never_stopped_run(tmp_path, kind, k):
    if kind == "minicnn":
        pytest.importorskip("minicnn.optim")
    torch.manual_seed(123)
    whole, whole_opt, whole_history = run(tmp_path, kind)
    torch.manual_seed(123)  # the same global RNG at the start: dropout masks
    run(tmp_path, kind, stop_after=k)
    torch.manual_seed(999)  # the resumed process starts elsewhere; load_checkpoint must fix it
    resumed, resumed_opt, resumed_history = run(tmp_path, kind, resume=True, seed=7)
    assert resumed_history.batch_loss == whole_history.batch_loss[k:]
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for a, b in zip(whole_opt.state_dict()["state"].values(), resumed_opt.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_a_frozen_run_resumes_exactly_when_freeze_to_is_called_again(tmp_path):
    pytest.importorskip("minicnn.freeze")
    torch.manual_seed(123)
    whole, _, whole_history = run(tmp_path, "torch", frozen=True)
    torch.manual_seed(123)
    run(tmp_path, "torch", stop_after=7, frozen=True)
    resumed, _, resumed_history = run(tmp_path, "torch", resume=True, seed=7, frozen=True)
    assert resumed_history.batch_loss == whole_history.batch_loss[7:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))
    early = whole.layer_groups[0][1][1]  # a BatchNorm of the frozen group: its statistics never moved
    assert torch.equal(early.running_mean, torch.zeros_like(early.running_mean))


def test_without_the_rng_states_the_resume_would_differ(tmp_path):
    """The control: the same resume with the augmentation generator left out drifts away."""
    torch.manual_seed(123)
    whole, _, _ = run(tmp_path, "torch")
    torch.manual_seed(123)
    run(tmp_path, "torch", stop_after=7)
    model = tiny_model(7)
    opt = optimizers(model, "torch")
    step = load_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt).step  # no generators
    train = Batches(*data(), BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit(model, train, None, opt, lr_at, EPOCHS, augment=flip_augment(torch.Generator().manual_seed(8)),
        start_step=step, verbose=False)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole.state_dict().values()))


def test_freeze_state_global_rngs_and_extra_round_trip(tmp_path):
    model = tiny_model(0)
    for p in model.layer_groups[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=4, extra={"epoch": 0, "loss": [1.5]})
    expected = random.random(), np.random.rand(), torch.rand(1)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    fresh = tiny_model(5)
    later_groups = [p for group in fresh.layer_groups[1:] for p in group.parameters()]
    resumed = load_checkpoint(tmp_path / "c.pt", model=fresh, optimizer=torch.optim.SGD(later_groups, lr=0.1))
    assert resumed == (4, {"epoch": 0, "loss": [1.5]}) and resumed.step == 4
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in model.parameters()]
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_an_interrupted_save_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    model = tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=1)
    real_save = torch.save

    def save_half_then_die(obj, f):
        real_save(obj, f)
        f.seek(f.tell() // 2)
        f.truncate()  # half the bytes are written ...
        raise KeyboardInterrupt  # ... when the process is stopped
    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=2)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # like any file open() makes


def test_a_different_architecture_names_the_keys(tmp_path):
    model = tiny_model(0)
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=0)

    def error_for(other):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match="different architecture") as error:
            load_checkpoint(tmp_path / "c.pt", model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
        assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())  # nothing loaded
        return str(error.value)

    wider = simple_resnet(5, widths=(4, 8, 16))
    wider.layer_groups[2].insert(2, nn.Dropout(0.3))
    message = error_for(wider)
    assert "missing keys: layer_groups.1.2.0.weight" in message and "unexpected keys: none" in message
    assert "layer_groups.2.3.weight: saved (3, 8), model (5, 16)" in message
    message = error_for(simple_resnet(3, widths=(4, 8)))  # no dropout: the linear layer moved
    assert "missing keys: layer_groups.2.2.weight, layer_groups.2.2.bias;" in message
    assert "unexpected keys: layer_groups.2.3.weight, layer_groups.2.3.bias;" in message


def test_bad_input(tmp_path):
    model = tiny_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="step must be the number of steps done"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=-1)
    with pytest.raises(TypeError, match="generators must be a dict"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0, generators=[torch.Generator()])
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0)
    with pytest.raises(ValueError, match=r"no state for generators \['augment'\]"):
        load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, generators={"augment": torch.Generator()})
    other = tiny_model(1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError):  # other param groups: refused before the model is touched
        load_checkpoint(tmp_path / "c.pt", model=other, optimizer=torch.optim.SGD(list(other.parameters())[1:], lr=0.1))
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a minicnn checkpoint"):
        load_checkpoint(tmp_path / "weights.pt", model=model, optimizer=opt)
