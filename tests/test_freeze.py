"""freeze.py: who trains after freeze_to, frozen weights bit for bit, BatchNorm modes, LRs per group."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from minicnn.data import Batches
from minicnn.freeze import bn_freeze, differential_lrs, freeze, freeze_to, param_groups, unfreeze
from minicnn.models import simple_resnet
from minicnn.train import fit


def tiny_model():
    return simple_resnet(3, in_channels=1, widths=(4, 8))


def tiny_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def snapshot(module):
    """Copies of every parameter and buffer (BN running statistics included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_steps(model, opt, steps=4):
    x, y = tiny_data()
    model.train()
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def bn_layers(module):
    return [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))]


def optimizers():
    """torch's SGD, and minicnn's (L2 and decoupled decay) when minicnn/optim.py is there."""
    yield pytest.param(lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.1), id="torch")
    try:
        from minicnn.optim import SGD
    except ImportError:
        return
    yield pytest.param(lambda groups: SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.1), id="minicnn")
    yield pytest.param(lambda groups: SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.1,
                                          decoupled_weight_decay=True), id="minicnn-decoupled")


@pytest.mark.parametrize("make_opt", list(optimizers()))
def test_frozen_weights_bit_identical_with_weight_decay_and_momentum(make_opt):
    model = tiny_model()
    opt = make_opt(param_groups(model, [0.1, 0.1, 0.1]))
    opt.zero_grad(set_to_none=False)  # leave zero-filled gradients behind: freeze must clear them
    train_steps(model, opt, steps=1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)   # a stale gradient that a step would apply (with decay) if left
    freeze(model, train_bn=False)
    assert all(p.grad is None for g in model.layer_groups[:2] for p in g.parameters())
    body_before, head_before = snapshot(model.layer_groups[:2]), snapshot(model.layer_groups[2])
    train_steps(model, opt, steps=4)
    body_after = snapshot(model.layer_groups[:2])
    for key, value in body_before.items():
        assert torch.equal(value, body_after[key]), f"frozen {key} changed"
    assert any(not torch.equal(v, model.layer_groups[2].state_dict()[k]) for k, v in head_before.items())


def test_freeze_to_sets_requires_grad_per_group_and_train_bn():
    model = tiny_model()
    for n in range(3):
        freeze_to(model, n, train_bn=False)
        for i, group in enumerate(model.layer_groups):
            assert all(p.requires_grad == (i >= n) for p in group.parameters())
    freeze_to(model, 2, train_bn=True)  # frozen groups: only their BN weights train
    for group in model.layer_groups[:2]:
        for module in group.modules():
            for p in module.parameters(recurse=False):
                assert p.requires_grad == isinstance(module, nn.BatchNorm2d)
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_train_bn_false_keeps_frozen_batchnorm_in_eval_mode_after_model_train():
    model = tiny_model()
    x, _ = tiny_data()
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)  # stats away from 0/1
    freeze(model, train_bn=False)
    body = nn.Sequential(*model.layer_groups[:2])
    stats = snapshot(body)
    model.eval()
    expected = body(x)
    model.train()
    assert torch.equal(body(x), expected)  # normalised with the running statistics, as in eval mode
    assert all(not bn.training for bn in bn_layers(body))
    assert all(torch.equal(v, body.state_dict()[k]) for k, v in stats.items())
    assert model.layer_groups[2].training  # the head still trains in train mode

    unfreeze(model)  # back to the model's (train) mode; statistics follow the batches again
    assert all(bn.training for bn in bn_layers(model))
    body(x)
    assert not torch.equal(stats["0.1.1.running_mean"], body.state_dict()["0.1.1.running_mean"])


def test_train_bn_true_lets_frozen_batchnorm_statistics_move():
    model = tiny_model()
    freeze(model, train_bn=True)
    stats = snapshot(model.layer_groups[0])
    model.train()
    model(tiny_data()[0])
    assert not torch.equal(stats["1.1.running_mean"], model.layer_groups[0].state_dict()["1.1.running_mean"])


def running_means(module):
    return [bn.running_mean.clone() for bn in bn_layers(module)]


def test_bn_freeze_keeps_body_statistics_while_its_weights_train():
    model = tiny_model()
    model.layer_groups[2].insert(2, nn.BatchNorm1d(8))  # a head BN layer: bn_freeze leaves it alone
    unfreeze(model)
    bn_freeze(model)
    body = nn.Sequential(*model.layer_groups[:2])
    stats, head_stats = running_means(body), model.layer_groups[2][2].running_mean.clone()
    weights = [bn.weight.detach().clone() for bn in bn_layers(body)]
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)  # calls model.train()
    assert all(torch.equal(a, b) for a, b in zip(stats, running_means(body)))
    assert all(not torch.equal(a, bn.weight) for a, bn in zip(weights, bn_layers(body)))
    assert not torch.equal(head_stats, model.layer_groups[2][2].running_mean)

    bn_freeze(model, False)  # statistics follow the batches again
    model.train()
    model(tiny_data()[0])
    assert all(not torch.equal(a, b) for a, b in zip(stats, running_means(body)))


def test_bn_freeze_and_train_bn_false_see_syncbatchnorm_layers():
    # convert_sync_batchnorm (several GPUs, docs/distributed.md) swaps BatchNorm2d for SyncBatchNorm;
    # in eval mode SyncBatchNorm uses its running statistics and talks to no other rank, so the CPU runs it
    for freeze_body in (lambda m: (unfreeze(m), bn_freeze(m)), lambda m: freeze(m, train_bn=False)):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_model())
        body = nn.Sequential(*model.layer_groups[:2])
        assert bn_layers(body) and all(isinstance(bn, nn.SyncBatchNorm) for bn in bn_layers(body))
        freeze_body(model)
        stats = running_means(body)
        model.train()
        model(tiny_data()[0])  # would raise on the CPU if a SyncBatchNorm layer ran in train mode
        assert all(not bn.training for bn in bn_layers(body))
        assert all(torch.equal(a, b) for a, b in zip(stats, running_means(body)))


def test_bn_freeze_off_keeps_what_freeze_to_froze():
    model = tiny_model()
    freeze_to(model, 1, train_bn=False)  # group 0 frozen with its BN; group 1 trains
    bn_freeze(model)
    bn_freeze(model, False)
    model.train()
    early, late = running_means(model.layer_groups[0]), running_means(model.layer_groups[1])
    model(tiny_data()[0])
    assert all(torch.equal(a, b) for a, b in zip(early, running_means(model.layer_groups[0])))
    assert all(not torch.equal(a, b) for a, b in zip(late, running_means(model.layer_groups[1])))
    bn_freeze(model)
    unfreeze(model)  # undoes bn_freeze too
    assert all(bn.training for bn in bn_layers(model))


def test_refreezing_does_not_stack_hooks():
    model = tiny_model()
    for _ in range(3):
        freeze(model, train_bn=False)
    freeze(model, train_bn=True)  # replaces the hooks: BN layers follow model.train() again
    model.train()
    model(tiny_data()[0])
    assert all(bn.training for bn in bn_layers(model))


def test_param_groups_one_per_layer_group_frozen_or_not():
    model = tiny_model()
    freeze(model)
    groups = param_groups(model, [1e-3, 1e-2, 1e-1], momentum=0.9, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2, 1e-1]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 for g in groups)
    for group, layer_group in zip(groups, model.layer_groups):
        assert [id(p) for p in group["params"]] == [id(p) for p in layer_group.parameters()]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert [g["lr"] for g in param_groups(model, 0.5)] == [0.5] * 3


def test_unfreezing_mid_run_puts_the_early_groups_in_the_schedule():
    model = tiny_model()
    x, y = tiny_data(32)
    train = Batches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(0))
    freeze(model, train_bn=False)
    opt = torch.optim.SGD(param_groups(model, [1.0, 1.0, 1.0], momentum=0.9), lr=1.0)

    def lr_at(step):  # a different LR per group, changing every step
        return [1e-3 * (step + 1), 1e-2 * (step + 1), 0.05]

    early = [p for g in model.layer_groups[:2] for p in g.parameters()]
    before = [p.detach().clone() for p in early]
    fit(model, train, None, opt, lr_at, 1, verbose=False)
    assert all(torch.equal(a, p) for a, p in zip(before, early))
    assert not any(p in opt.state for p in early)  # no momentum buffer for a frozen weight

    unfreeze(model)
    history = fit(model, train, None, opt, lr_at, 2, start_step=len(train), verbose=False)
    steps = range(len(train), 2 * len(train))
    assert history.batch_lr == [lr_at(s) for s in steps]
    assert [g["lr"] for g in opt.param_groups] == lr_at(steps[-1])
    assert all(p in opt.state for p in early)
    assert all(not torch.equal(a, p) for a, p in zip(before, early) if p.dim() > 1)


def test_differential_lrs_examples():
    assert differential_lrs(1e-2, 3, ratio=10) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert differential_lrs(0.9, 3, ratio=3) == pytest.approx([0.1, 0.3, 0.9])  # fastai's lr/9, lr/3, lr
    assert differential_lrs(0.1, 1, ratio=3) == [0.1]


@given(lr=st.floats(1e-6, 10), n=st.integers(1, 8), ratio=st.floats(1, 20))
def test_differential_lrs_properties(lr, n, ratio):
    lrs = differential_lrs(lr, n, ratio=ratio)
    assert len(lrs) == n and lrs[-1] == lr
    for lower, higher in zip(lrs, lrs[1:]):
        assert math.isclose(higher / lower, ratio, rel_tol=1e-9)


@pytest.mark.parametrize("n", [-1, 3])
def test_freeze_to_rejects_n_out_of_range(n):
    with pytest.raises(ValueError, match=rf"n={n} must be in 0\.\.2"):
        freeze_to(tiny_model(), n)


def test_parameters_outside_the_layer_groups_are_rejected():
    model = tiny_model()
    model.extra = nn.Linear(2, 2)  # trained by nobody: its optimizer group would not exist
    with pytest.raises(ValueError, match="extra.weight, extra.bias in no layer group"):
        param_groups(model, 0.1)


@pytest.mark.parametrize("hyper", [dict(lr=0.5), dict(params=[])])
def test_lr_and_params_given_twice_are_refused_not_overridden(hyper):
    with pytest.raises(TypeError, match=next(iter(hyper))):
        param_groups(tiny_model(), 0.1, **hyper)


def test_a_zero_dim_tensor_lr_is_a_number():
    assert [g["lr"] for g in param_groups(tiny_model(), torch.tensor(0.5))] == [0.5] * 3


@pytest.mark.parametrize("lrs", [[0.1, 0.1], [0.1] * 4, [0.1, 0.0, 0.1], [0.1, float("nan"), 0.1],
                                 [0.1, float("inf"), 0.1], -1.0])
def test_param_groups_rejects_bad_lrs(lrs):
    with pytest.raises(ValueError, match=r"lrs=.* must be 3 finite numbers > 0"):
        param_groups(tiny_model(), lrs)


@pytest.mark.parametrize("args, kwargs, match", [
    ((0.0, 3), {"ratio": 3}, "lr=0.0"), ((float("inf"), 3), {"ratio": 3}, "lr=inf"),
    ((0.1, 0), {"ratio": 3}, "n_groups=0"),  # would give an empty list
    ((0.1, 3), {"ratio": 0.5}, "ratio=0.5"),  # earlier groups faster
    ((0.1, 3), {"ratio": float("nan")}, "ratio=nan")])
def test_differential_lrs_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        differential_lrs(*args, **kwargs)
