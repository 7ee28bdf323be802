"""LR range test: the sweep's formula, a known answer, bit-for-bit restoration, the suggestion rule."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minicnn.data import Batches
from minicnn.lr_find import LRFindResult, lr_find, suggest_lr
from minicnn.optim import SGD


class Scalar(nn.Module):
    """w alone; with loss a*w**2/2 plain SGD gives w <- (1 - lr*a) w: diverges for lr > 2/a."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0]))

    def forward(self, x):
        return self.w


def quadratic(a):
    return lambda w, y: a * (w ** 2).sum() / 2


ONE_BATCH = [(torch.zeros(1), torch.zeros(1))]


def tiny_net():
    """Conv-BN-ReLU-Dropout-Linear on (N, 1, 6, 6): BatchNorm statistics and the RNG both matter."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def tiny_data(n=40, batch_size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return Batches(x, y, batch_size, shuffle=True, generator=g)


def test_sweep_is_exponential_and_smoothing_bias_corrected():
    r = lr_find(Scalar(), ONE_BATCH, torch.optim.SGD(Scalar().parameters(), lr=1.0),
                loss_fn=quadratic(1.0), start_lr=1e-4, end_lr=1e-1, num_iter=7, beta=0.9)
    assert isinstance(r, LRFindResult) and len(r.lrs) == 7
    for i, lr in enumerate(r.lrs):
        assert lr == pytest.approx(1e-4 * 1000 ** (i / 6), rel=1e-12)
    assert r.smoothed_losses[0] == r.losses[0]  # debiased: no start near 0
    avg = 0.0
    for i, (loss, smoothed) in enumerate(zip(r.losses, r.smoothed_losses)):
        avg = 0.9 * avg + 0.1 * loss
        assert smoothed == pytest.approx(avg / (1 - 0.9 ** (i + 1)), rel=1e-12)


@given(st.floats(0.0, 3.0))  # a = 10**e in [1, 1000], so 2/a lies well inside 1e-7 .. 10
def test_quadratic_suggestion_below_divergence_within_factor_10(e):
    a = 10.0 ** e
    model = Scalar()
    r = lr_find(model, ONE_BATCH, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=quadratic(a))
    assert r.loss_fell
    # measured: 2/a divided by the suggestion lies between 2.8 and 3.9 for a in [1, 1000]
    assert 2 / a / 10 < r.suggested_lr < 2 / a, r.reason


def _snapshot(model, opt):
    return dict(state={k: v.clone() for k, v in model.state_dict().items()},
                grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
                requires_grad=[p.requires_grad for p in model.parameters()],
                modes=[m.training for m in model.modules()],
                opt=copy.deepcopy(opt.state_dict()), rng=torch.get_rng_state())  # state_dict is live


def _assert_same(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:  # includes running_mean/var and num_batches_tracked
        assert torch.equal(a["state"][k], b["state"][k]), k
    for ga, gb in zip(a["grads"], b["grads"]):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert a["requires_grad"] == b["requires_grad"] and a["modes"] == b["modes"]
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for k in a["opt"]["state"]:
        for name, value in a["opt"]["state"][k].items():
            other = b["opt"]["state"][k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    assert torch.equal(a["rng"], b["rng"])


SGD_FACTORIES = {  # both optimizers, always: a missing one fails at import instead of vanishing
    "torch": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "minicnn": lambda params: SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
}


@pytest.mark.parametrize("make_opt", SGD_FACTORIES.values(), ids=SGD_FACTORIES.keys())
def test_everything_restored_bit_for_bit_and_same_curve_twice(make_opt):
    model, data = tiny_net(), tiny_data()
    model[0].weight.requires_grad_(False)  # a frozen layer stays frozen
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    for x, y in data.epoch(0):  # momentum buffers and BN statistics that are not the defaults
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    model[3].train()  # mixed modes: only the dropout in train mode
    before = _snapshot(model, opt)
    seen = {}

    def loss_fn(logits, y):  # also records the last weights the sweep saw
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return F.cross_entropy(logits, y)

    first = lr_find(model, data, opt, loss_fn=loss_fn, num_iter=30, end_lr=1.0)
    assert not torch.equal(seen["state"]["1.running_mean"], before["state"]["1.running_mean"])
    assert not torch.equal(seen["state"]["5.weight"], before["state"]["5.weight"])  # the sweep did train
    _assert_same(before, _snapshot(model, opt))
    assert data.epochs_seen == 0  # Batches read through .epoch(e): its own counter untouched
    second = lr_find(model, data, opt, loss_fn=loss_fn, num_iter=30, end_lr=1.0)
    assert first.losses == second.losses and first.lrs == second.lrs
    _assert_same(before, _snapshot(model, opt))


def test_restored_when_the_loss_raises():
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before, calls = _snapshot(model, opt), []

    def loss_fn(logits, y):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory (pretend)")
        return F.cross_entropy(logits, y)

    with pytest.raises(RuntimeError, match="pretend"):
        lr_find(model, tiny_data(), opt, loss_fn=loss_fn, num_iter=20)
    _assert_same(before, _snapshot(model, opt))


def test_fewer_batches_than_steps_cycles_through_epochs_in_order():
    data, labels = tiny_data(n=16, batch_size=8), []  # 2 batches a pass
    model = tiny_net()

    def loss_fn(logits, y):
        labels.append(y.clone())
        return F.cross_entropy(logits, y)

    r = lr_find(model, data, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn, num_iter=5)
    assert len(r.lrs) == 5
    expected = [y for e in range(3) for _, y in data.epoch(e)][:5]
    assert all(torch.equal(a, b) for a, b in zip(labels, expected))
    with pytest.raises(ValueError, match="train_batches gave no batches"):
        lr_find(model, [], torch.optim.SGD(model.parameters(), lr=0.1))


def test_groups_keep_their_ratios_and_get_theirs_back():
    model, seen = tiny_net(), []
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.001},
                           {"params": model[1].parameters(), "lr": 0.003},
                           {"params": model[5].parameters(), "lr": 0.03}], lr=0.1)

    def loss_fn(logits, y):
        seen.append([g["lr"] for g in opt.param_groups])
        return F.cross_entropy(logits, y)

    r = lr_find(model, tiny_data(), opt, loss_fn=loss_fn, num_iter=10, end_lr=1.0)
    for lr, (lr0, lr1, lr2) in zip(r.lrs, seen):
        assert lr2 == lr and lr0 == pytest.approx(lr / 30) and lr1 == pytest.approx(lr / 10)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.003, 0.03]
    opt.param_groups[-1]["lr"] = 0.0
    with pytest.raises(ValueError, match="last param group's lr > 0, got 0.0"):
        lr_find(model, tiny_data(), opt)


def test_nan_loss_stops_the_sweep_and_is_cut_from_the_suggestion():
    model, calls = Scalar(), []
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def loss_fn(w, y):  # falls steadily, then NaN on the 40th call
        calls.append(1)
        return (w * 0 + (math.nan if len(calls) == 40 else 10.0 - 0.2 * len(calls))).sum()

    r = lr_find(model, ONE_BATCH, opt, loss_fn=loss_fn, num_iter=100)
    assert len(calls) == 40 and len(r.lrs) == 40 and r.stop == 39
    assert math.isnan(r.smoothed_losses[-1]) and "nan" in r.stop_reason and "nan" in r.reason
    assert r.loss_fell and r.suggested_index < 39


def test_divergence_stops_after_smoothed_loss_passes_4x_best():
    model = Scalar()
    r = lr_find(model, ONE_BATCH, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=quadratic(100.0))
    assert len(r.lrs) < 100 and "blew up" in r.reason
    assert r.smoothed_losses[-1] > 4 * min(r.smoothed_losses[:-1])
    assert all(s <= 4 * min(r.smoothed_losses[:i + 1]) for i, s in enumerate(r.smoothed_losses[:-1]))


def test_suggest_index_zero_and_two_points():
    s = suggest_lr([1e-3, 1e-2], [2.0, 1.0])
    assert s.lr == 1e-3 and s.index == 0 and s.loss_fell  # index 0 is a real answer, never dropped
    s = suggest_lr([1e-3, 1e-2, 1e-1, 1.0], [3.0, 2.0, 2.5, 2.6], skip_start=0)
    assert (s.index, s.lr, s.loss_fell) == (0, 1e-3, True)
    rising = suggest_lr([1e-3, 1e-2], [1.0, 2.0])
    assert rising.lr == 1e-3 and not rising.loss_fell and "never clearly fell" in rising.reason
    assert suggest_lr([1e-3], [1.0]).lr is None
    none = suggest_lr([1e-3, 1e-2, 1e-1], [1.0, math.inf, 0.5])
    assert none.lr is None and none.stop == 1 and "only 1 usable" in none.reason


def test_suggest_skips_the_noisy_head_but_keeps_two_points():
    lrs = [10 ** (-5 + i / 4) for i in range(20)]
    losses = [0.1] + [2.0 - 0.05 * i for i in range(1, 20)]  # a fluke low first point
    s = suggest_lr(lrs, losses)  # skip_start = 20 // 10 = 2
    assert s.skip_start == 2 and s.loss_fell and 2 <= s.index < 19
    s = suggest_lr(lrs[:3], [3.0, 2.0, 1.0], skip_start=10)
    assert s.skip_start == 1 and s.index == 1


def test_suggest_measures_runs_in_log_lr_not_in_points():
    # run A: 6 points packed into 0.05 decades; run B: 3 points spread over 2 decades.
    # Steep = the mean fall from 3.0 to 0.5 over 4 decades, 0.625 a decade: both runs are steeper.
    lrs = [1e-4 * 10 ** (0.01 * i) for i in range(6)] + [1e-2, 1e-1, 1.0, 2.0]
    losses = [3.0, 2.8, 2.6, 2.4, 2.2, 2.0, 2.1, 1.3, 0.5, 0.6]
    s = suggest_lr(lrs, losses, skip_start=0)
    assert s.lr == 1e-1 and s.index == 7, s.reason  # middle of run B (1e-2 .. 1)


def test_suggest_flat_noisy_curve_is_flagged():
    g = torch.Generator().manual_seed(0)
    losses = (2.3 + 0.01 * torch.randn(50, generator=g)).tolist()  # under 2% wiggle
    s = suggest_lr([10 ** (-6 + i / 8) for i in range(50)], losses)
    assert not s.loss_fell and "not a recommendation" in s.reason and s.lr is not None


def test_a_one_shot_generator_that_runs_dry_says_so_and_suggests_from_what_ran():
    model, data = tiny_net(), tiny_data(n=40, batch_size=8)  # 5 batches
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = lr_find(model, (xy for xy in data.epoch(0)), opt, num_iter=30)
    assert len(r.lrs) == 5 and "ran 30 steps" not in r.reason
    assert r.stop_reason.startswith("the batches ran out after 5 of 30 steps") and "one-shot" in r.stop_reason
    assert r.stop_reason in r.reason
    expected = suggest_lr(r.lrs, r.smoothed_losses)
    assert (r.suggested_lr, r.suggested_index) == (expected.lr, expected.index)
    whole = lr_find(model, data, opt, num_iter=30)  # re-readable batches: the full sweep
    assert whole.stop_reason == "ran 30 steps" and len(whole.lrs) == 30


def test_label_and_batchnorm_errors_of_the_sweep_say_what_to_do():
    model = tiny_net()
    x, y = torch.rand(8, 1, 6, 6), torch.tensor([0, 1, 2, 1, 0, 2, 1, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"lr_find, step 0: labels run 0 \.\. 9"):
        lr_find(model, [(x, torch.where(y == 2, 9, y))], opt)
    with pytest.raises(TypeError, match=r"labels are torch.float32.*y\.long\(\)"):
        lr_find(model, [(x, y.float())], opt)
    _assert_same(before, _snapshot(model, opt))  # restored after the error too
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"lr_find, step 1: .*batch of 1\b.*drop_last=True"):
        lr_find(net, [(x, y), (x[:1], y[:1])], torch.optim.SGD(net.parameters(), lr=0.1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(start_lr=0), r"start_lr < end_lr.*\(0, 10.0\)"),
    (dict(start_lr=1, end_lr=0.1), r"start_lr < end_lr.*\(1, 0.1\)"),
    (dict(end_lr=math.nan), r"end_lr < inf.*nan"), (dict(end_lr=math.inf), r"end_lr < inf.*inf"),
    (dict(num_iter=1), "num_iter >= 2, got 1"), (dict(beta=1.0), "beta < 1, got 1.0"),
    (dict(beta=math.nan), "beta < 1, got nan"), (dict(diverge=1.0), "diverge > 1, got 1.0"),
    (dict(diverge=math.nan), "diverge > 1, got nan"),
])
def test_bad_arguments(kwargs, match):
    model = Scalar()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        lr_find(model, ONE_BATCH, opt, **{"loss_fn": quadratic(1.0), **kwargs})
    _assert_same(before, _snapshot(model, opt))


def test_suggest_needs_one_loss_per_lr():
    with pytest.raises(ValueError, match="one loss per LR"):
        suggest_lr([1e-3, 1e-2], [1.0])
