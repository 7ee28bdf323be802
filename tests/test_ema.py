"""EMA on tiny models: the average is the hand-computed one and torch's AveragedModel's, fit runs
unchanged with it (the trained weights bit for bit), decay 0 is the model itself, the state
round-trips (a checkpoint, lr_find's restore), the param groups are the wrapped optimizer's,
and a decay that would freeze or break the average is refused by name."""
import copy
import math

import pytest
from conftest import blobs
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from minicnn.checkpoint import load_checkpoint, save_checkpoint
from minicnn.data import Batches
from minicnn.ema import EMA, decay_at
from minicnn.lr_find import lr_find
from minicnn.optim import SGD
from minicnn.train import evaluate, fit


def tiny_net(dtype=torch.float32):
    """Conv, BatchNorm (running statistics and num_batches_tracked), linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(48, 2)).to(dtype)


def one_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def batches(n_steps, dtype=torch.float32, seed=0):
    x, y = blobs(8 * n_steps, seed)
    return list(zip(x.to(dtype).split(8), y.split(8)))


def same_state(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items()) and a.keys() == b.keys()


@pytest.mark.parametrize("decay, every, warmup", [(0.9, 1, False), (0.7, 2, False),
                                                  (0.99, 1, True), (0.5, 3, True)])
def test_the_average_is_the_hand_computed_one_after_every_step(decay, every, warmup):
    model = tiny_net(torch.float64)
    ema = EMA(SGD(model.parameters(), lr=0.1, momentum=0.9), model, decay=decay, every=every,
              warmup=warmup)
    expected = {k: v.clone() for k, v in model.state_dict().items()}  # w_ema starts as w_0
    t = 0
    for step, (x, y) in enumerate(batches(7, torch.float64), 1):
        one_step(model, ema, x, y)
        if step % every == 0:  # an average after every `every`-th step only
            d = min(decay, (1 + t) / (10 + t)) if warmup else decay
            for k, w in model.state_dict().items():
                expected[k] = d * expected[k] + (1 - d) * w if w.is_floating_point() else w.clone()
            t += 1
        got = ema.model.state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-12, msg=f"step {step}, {k}")
    assert (ema.steps, ema.averages) == (7, 7 // every)
    # a count: copied, not averaged, at the last average
    assert got["1.num_batches_tracked"] == 7 // every * every
    assert not torch.equal(got["1.running_mean"], model.state_dict()["1.running_mean"])


def test_the_warm_up_starts_at_a_tenth_and_climbs_to_decay_and_no_further():
    assert decay_at(0, 0.99, warmup=True) == pytest.approx(0.1)
    ds = [decay_at(t, 0.99, warmup=True) for t in range(2000)]
    assert all(a <= b <= 0.99 for a, b in zip(ds, ds[1:])) and ds[-1] == 0.99
    assert decay_at(0, 0.99) == decay_at(5000, 0.99) == 0.99  # no warm-up: constant


def test_the_average_is_torchs_averaged_model_with_an_ema_function():
    model = tiny_net()
    ema = EMA(SGD(model.parameters(), lr=0.1, momentum=0.9), model, decay=0.8)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    torchs.update_parameters(model)  # torch's first update copies: w_ema starts as w_0, as ours
    for x, y in batches(6):
        one_step(model, ema, x, y)
        torchs.update_parameters(model)
    ours, theirs = ema.model.state_dict(), torchs.module.state_dict()
    floats = [k for k, v in ours.items() if v.is_floating_point()]  # torch averages counts too
    assert len(floats) == 8  # weights and biases, BatchNorm's running mean and variance
    for k in floats:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)


def test_fit_runs_unchanged_and_the_average_differs_from_the_model_but_stays_near_it():
    x, y = blobs(64)
    train, valid = Batches(x, y, 8, shuffle=False), Batches(*blobs(32, seed=1), 32, shuffle=False)
    plain, averaged = tiny_net(), tiny_net()
    start = copy.deepcopy(plain.state_dict())
    fit(plain, train, valid, SGD(plain.parameters(), lr=0.0, momentum=0.9), lambda s: 0.1, 3,
        verbose=False)
    ema = EMA(SGD(averaged.parameters(), lr=0.0, momentum=0.9), averaged, decay=0.8)
    history = fit(averaged, train, valid, ema, lambda s: 0.1, 3, verbose=False)
    assert same_state(averaged.state_dict(), plain.state_dict())  # training untouched
    assert ema.steps == ema.averages == len(history.batch_loss) == 24
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    final, avg = averaged.state_dict(), ema.model.state_dict()
    for k in ("0.weight", "4.weight", "1.running_mean"):
        assert not torch.equal(avg[k], final[k])
        # nearer the final weights than the start was: 0.8**24 ~ 0.005 of w_0 is left in it
        assert (avg[k] - final[k]).norm() < 0.5 * (start[k] - final[k]).norm(), k
    loss, acc = evaluate(ema.model, valid)
    assert math.isfinite(loss) and acc >= 0.9


def test_decay_0_gives_the_models_weights_and_buffers_bit_for_bit():
    model = tiny_net()
    ema = EMA(SGD(model.parameters(), lr=0.1, momentum=0.9), model, decay=0.0)
    for x, y in batches(3):
        one_step(model, ema, x, y)
        assert same_state(ema.model.state_dict(), model.state_dict())


def test_the_param_groups_are_the_wrapped_optimizers_and_the_lr_set_through_them_is_used():
    model = tiny_net()
    sgd = SGD([{"params": model[0].parameters()}, {"params": model[4].parameters()}], lr=0.1)
    ema = EMA(sgd, model)
    assert ema.param_groups is sgd.param_groups
    assert all(a is b for a, b in zip(ema.param_groups, sgd.param_groups))
    for group in ema.param_groups:
        group["lr"] = 0.0  # as fit sets it: nothing moves
    before = copy.deepcopy(model[0].weight)
    x, y = batches(1)[0]
    one_step(model, ema, x, y)
    assert torch.equal(model[0].weight, before) and sgd.param_groups[0]["lr"] == 0.0
    assert ema.zero_grad() is None and model[0].weight.grad is None


def test_the_state_round_trips_and_training_goes_on_the_same(tmp_path):
    first = tiny_net()
    ema = EMA(SGD(first.parameters(), lr=0.1, momentum=0.9), first, decay=0.9, every=2)
    data = batches(8)
    for x, y in data[:3]:  # an odd count: the next average is one step away, not two
        one_step(first, ema, x, y)
    save_checkpoint(tmp_path / "run.pt", model=first, optimizer=ema, step=3)
    second = tiny_net()
    resumed = EMA(SGD(second.parameters(), lr=0.1, momentum=0.9), second, decay=0.9, every=2)
    assert load_checkpoint(tmp_path / "run.pt", model=second, optimizer=resumed).step == 3
    assert same_state(resumed.model.state_dict(), ema.model.state_dict())
    assert (resumed.steps, resumed.averages) == (ema.steps, ema.averages) == (3, 1)
    for x, y in data[3:]:
        one_step(first, ema, x, y)
        one_step(second, resumed, x, y)
    assert same_state(resumed.model.state_dict(), ema.model.state_dict())
    assert same_state(second.state_dict(), first.state_dict())  # the momentum came back too
    with pytest.raises(ValueError, match="ema.optimizer.load_state_dict"):
        resumed.load_state_dict(resumed.optimizer.state_dict())  # a bare optimizer's


def test_lr_find_leaves_the_average_and_its_counters_as_it_found_them():
    model = tiny_net()
    ema = EMA(SGD(model.parameters(), lr=0.1, momentum=0.9), model, decay=0.9)
    for x, y in batches(2):
        one_step(model, ema, x, y)
    before = copy.deepcopy(ema.model.state_dict())
    x, y = blobs(32)
    lr_find(model, Batches(x, y, 8, shuffle=False), ema, num_iter=6)
    assert same_state(ema.model.state_dict(), before) and (ema.steps, ema.averages) == (2, 2)


@pytest.mark.parametrize("decay, every", [(1.0, 1), (1.5, 1), (-0.1, 1), (math.nan, 1),
                                          (0.9, 0), (0.9, 1.5)])
def test_a_decay_that_would_freeze_or_break_the_average_is_refused_by_name(decay, every):
    model = tiny_net()
    with pytest.raises(ValueError, match=r"EMA: decay=.* must be in \[0, 1\).*every="):
        EMA(SGD(model.parameters(), lr=0.1), model, decay=decay, every=every)
