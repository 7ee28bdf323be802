"""minicnn.optim.SGD against torch.optim.SGD, its own two paths, its state_dict, and its errors.

Tolerance: 1e-6 absolute on parameters of size ~1 after up to 8 steps. The arithmetic is the
same as torch's in the same order, so in practice the difference is 0.
"""
import io
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minicnn.optim import SGD

TOL = 1e-6

# One group's hyper-parameters; nesterov needs momentum > 0 and no dampening.
hyper = st.fixed_dictionaries({
    "lr": st.floats(0.01, 1.0),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]) | st.floats(0.05, 0.99),
    "dampening": st.sampled_from([0.0, 0.0, 0.3]),
    "weight_decay": st.sampled_from([0.0, 1e-4, 0.1]),
    "nesterov": st.booleans(),
}).map(lambda h: {**h, "nesterov": h["nesterov"] and h["momentum"] > 0 and h["dampening"] == 0})

shape = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def problems(draw):
    """Groups of parameters (shapes, hyper-parameters), a step count, LRs per step, grad masks."""
    n_groups = draw(st.integers(1, 3))
    groups = [(draw(st.lists(shape, min_size=1, max_size=3)), draw(hyper)) for _ in range(n_groups)]
    n_steps = draw(st.integers(1, 8))
    lr_scale = draw(st.lists(st.floats(0.1, 2.0), min_size=n_steps, max_size=n_steps))
    # Fraction of parameters with a gradient at each step (hypothesis alone would favour ~0).
    has_grad = draw(st.lists(st.sampled_from([1.0, 1.0, 0.6]), min_size=n_steps, max_size=n_steps))
    return groups, lr_scale, has_grad, draw(st.integers(0, 2**31 - 1))


def build(groups, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for shapes, _ in groups]


def run(make_opt, groups, lr_scale, has_grad, seed, params=None):
    """Step an optimizer through the drawn problem; same gradients for every caller."""
    params = params or [[torch.nn.Parameter(p) for p in ps] for ps in build(groups, seed)]
    opt = make_opt([{"params": ps, **h} for ps, (_, h) in zip(params, groups)])
    g = torch.Generator().manual_seed(seed + 1)
    for scale, fraction in zip(lr_scale, has_grad):
        for group, (_, h) in zip(opt.param_groups, groups):
            group["lr"] = h["lr"] * scale                       # the LR changes between steps
            for p in group["params"]:
                grad = torch.randn(p.shape, generator=g)
                keep = torch.rand((), generator=g).item() < fraction  # some grads are None
                p.grad = grad if keep else None
        opt.step()
    return params, opt


def max_diff(a, b):
    return max((x - y).abs().max().item() for xs, ys in zip(a, b) for x, y in zip(xs, ys))


@given(problems(), st.booleans())
def test_matches_torch_sgd(problem, foreach):
    ours, _ = run(lambda groups: SGD(groups, 0.1, foreach=foreach), *problem)
    theirs, _ = run(lambda groups: torch.optim.SGD(groups, 0.1), *problem)
    assert max_diff(ours, theirs) <= TOL


@given(problems())
def test_foreach_path_equals_loop_bit_for_bit(problem):
    loop, loop_opt = run(lambda groups: SGD(groups, 0.1, foreach=False), *problem)
    fast, fast_opt = run(lambda groups: SGD(groups, 0.1, foreach=True), *problem)
    assert max_diff(loop, fast) == 0
    for p, q in zip(sum(loop, []), sum(fast, [])):
        assert (p in loop_opt.state) == (q in fast_opt.state)  # same params got state


@given(problems(), st.booleans())
def test_decoupled_weight_decay_is_shrink_then_plain_sgd(problem, foreach):
    """p <- p - lr*wd*p, then the step of torch's SGD without weight decay."""
    groups, lr_scale, has_grad, seed = problem
    groups = [(s, {**h, "decoupled_weight_decay": True}) for s, h in groups]
    ours, _ = run(lambda gs: SGD(gs, 0.1, foreach=foreach), groups, lr_scale, has_grad, seed)

    class ShrinkThenSGD(torch.optim.SGD):
        def step(self):
            with torch.no_grad():
                for group, (_, h) in zip(self.param_groups, groups):
                    for p in group["params"]:
                        if p.grad is not None:
                            p.mul_(1 - group["lr"] * h["weight_decay"])
            super().step()

    plain = [(s, {k: v for k, v in h.items() if k != "decoupled_weight_decay"}) for s, h in groups]
    plain = [(s, {**h, "weight_decay": 0.0}) for s, h in plain]
    theirs, _ = run(lambda gs: ShrinkThenSGD(gs, 0.1), plain, lr_scale, has_grad, seed)
    assert max_diff(ours, theirs) <= TOL


def test_decoupled_differs_from_l2_with_momentum():
    """L2 decay passes through the buffer and compounds; decoupled decay does not. By hand,
    lr=0.1, mu=0.9, wd=0.5, zero gradients, p0=1, two steps:
      L2:        v1 = 0.5,  p1 = 0.95;  v2 = 0.9*0.5 + 0.5*0.95,  p2 = 0.95 - 0.1*v2
      decoupled: p <- p*(1 - 0.1*0.5) twice; the buffer only ever sees zeros."""
    expected = {False: 0.95 - 0.1 * (0.9 * 0.5 + 0.5 * 0.95), True: 0.95**2}
    for decoupled in (False, True):
        p = torch.nn.Parameter(torch.ones(1))
        opt = SGD([p], 0.1, momentum=0.9, weight_decay=0.5, decoupled_weight_decay=decoupled)
        for _ in range(2):
            p.grad = torch.zeros(1)
            opt.step()
        assert p.item() == pytest.approx(expected[decoupled], abs=1e-7)


@given(problems(), st.integers(1, 7), st.booleans())
def test_state_dict_round_trip_continues_identically(problem, cut, foreach):
    groups, lr_scale, has_grad, seed = problem
    cut = min(cut, len(lr_scale))
    first = (groups, lr_scale[:cut], has_grad[:cut], seed)
    params, opt = run(lambda gs: SGD(gs, 0.1, foreach=foreach), *first)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)  # as a checkpoint would
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in params]

    def resumed(gs):
        new = SGD([{"params": g["params"]} for g in gs], 0.5, momentum=0.1, foreach=foreach)
        saved.seek(0)
        new.load_state_dict(torch.load(saved))
        return new

    rest = (groups, lr_scale[cut:], has_grad[cut:], seed + 7)
    a, _ = run(lambda gs: opt, *rest, params=params)
    b, _ = run(resumed, *rest, params=copies)
    assert max_diff(a, b) == 0


def test_state_dict_is_a_copy_and_in_torchs_layout():
    p = torch.nn.Parameter(torch.ones(3))
    ours = SGD([p], 0.1, momentum=0.9)
    p.grad = torch.ones(3)
    ours.step()
    saved = ours.state_dict()
    ours.step()  # must not change what was saved
    assert torch.equal(saved["state"][0]["momentum_buffer"], torch.ones(3))
    loaded = SGD([torch.nn.Parameter(torch.ones(3))], 0.1, momentum=0.9)
    loaded.load_state_dict(saved)
    loaded.param_groups[0]["params"][0].grad = torch.ones(3)
    loaded.step()  # must not write into the dict it was loaded from
    assert torch.equal(saved["state"][0]["momentum_buffer"], torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    theirs = torch.optim.SGD([q], 0.1, momentum=0.9)
    theirs.load_state_dict(saved)  # torch reads our layout
    assert torch.equal(theirs.state[q]["momentum_buffer"], torch.ones(3))


@pytest.mark.parametrize("foreach", [False, True])
def test_params_without_grad_are_skipped_and_keep_no_state(foreach):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SGD([a, b], 0.1, momentum=0.9, weight_decay=0.1, foreach=foreach)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b, torch.ones(2)) and b not in opt.state  # weight decay did not touch b
    assert a in opt.state and not torch.equal(a, torch.ones(2))


@pytest.mark.parametrize("foreach", [False, True])
def test_step_leaves_grads_alone_and_params_leaves(foreach):
    p = torch.nn.Parameter(torch.ones(4))
    opt = SGD([p], 0.1, momentum=0.9, nesterov=True, foreach=foreach)
    for _ in range(2):
        p.grad = torch.full((4,), 2.0)
        opt.step()
        assert torch.equal(p.grad, torch.full((4,), 2.0))  # torch's foreach Nesterov writes into it
    assert p.is_leaf and p.grad_fn is None


def test_zero_grad_and_closure():
    p = torch.nn.Parameter(torch.ones(2))
    opt = SGD([p], 0.5)

    def closure():  # what L-BFGS-style callers pass: recompute the loss and its gradient
        loss = (p**2).sum()
        loss.backward()
        return loss.item()

    assert opt.step(closure) == 2.0 and torch.equal(p.detach(), torch.zeros(2))  # 1 - 0.5*2 = 0
    grad = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is grad and torch.equal(grad, torch.zeros(2))
    opt.zero_grad()
    assert p.grad is None


def test_per_group_overrides_and_add_param_group():
    a, b, c = (torch.nn.Parameter(torch.ones(1)) for _ in range(3))
    opt = SGD([{"params": [a]}, {"params": b, "lr": 0.5, "name": "head"}], 0.1, momentum=0.9)
    opt.add_param_group({"params": [c], "momentum": 0.0})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5, 0.1]
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9, 0.0]
    assert opt.param_groups[1]["name"] == "head"
    for p in (a, b, c):
        p.grad = torch.ones(1)
    opt.step()
    assert [p.item() for p in (a, b, c)] == pytest.approx([0.9, 0.5, 0.9]) and c not in opt.state


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "lr=-0.1"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(lr=float("inf")), "lr=inf"),
    (dict(lr=0.1, weight_decay=-1e-4), "weight_decay=-0.0001"),
    (dict(lr=0.1, momentum=-0.9), "momentum=-0.9"),
    (dict(lr=0.1, momentum=1.5), r"momentum=1.5.*\[0, 1\)"),
    (dict(lr=0.1, momentum=1.0), r"momentum=1.0.*\[0, 1\)"),
    (dict(lr=0.1, dampening=1.5), "dampening=1.5"),
    (dict(lr=0.1, nesterov=True), "nesterov.*momentum"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov.*dampening"),
])
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGD([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_bad_params():
    p = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="params is empty"):
        SGD([], 0.1)
    for model in (torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2))):  # iterable
        with pytest.raises(TypeError, match=r"model.parameters\(\)"):
            SGD(model, 0.1)
    with pytest.raises(ValueError, match="twice"):
        SGD([p, p], 0.1)
    opt = SGD([p], 0.1)
    with pytest.raises(ValueError, match="twice"):
        opt.add_param_group({"params": [p]})
    with pytest.raises(ValueError, match="momentum=-1.0"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "momentum": -1.0})
    assert len(opt.param_groups) == 1
    other = SGD([p, torch.nn.Parameter(torch.ones(1))], 0.1)
    with pytest.raises(ValueError, match=r"group sizes \[2\].*\[1\]"):
        opt.load_state_dict(other.state_dict())


def test_one_tensor_is_one_parameter():
    """torch refuses SGD(tensor); here it is [tensor] (iterating it would give its rows, which
    never get a gradient)."""
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = SGD(p, 0.5)
    assert opt.param_groups[0]["params"] == [p]
    p.grad = torch.ones(2, 3)
    opt.step()
    assert torch.equal(p.detach(), torch.full((2, 3), 0.5))


def stepped(opt_class, **kwargs):
    p = torch.nn.Parameter(torch.ones(3))
    opt = opt_class([p], lr=0.1, **kwargs)
    p.grad = torch.ones(3)
    opt.step()
    return opt


def assert_unchanged(opt, groups_before, state_before):
    assert opt.param_groups == groups_before
    assert opt.state.keys() == state_before.keys()
    for p in opt.state:
        assert torch.equal(opt.state[p]["momentum_buffer"], state_before[p]["momentum_buffer"])


@pytest.mark.parametrize("other, missing", [
    (lambda: stepped(torch.optim.SGD, momentum=0.9).state_dict(), r"lacks \['decoupled_weight_decay'\]"),
    (lambda: stepped(torch.optim.Adam).state_dict(), r"lacks \['dampening', 'momentum', 'nesterov'\]"),
    (lambda: stepped(torch.optim.AdamW).state_dict(), "lacks.*momentum"),
    (lambda: {**stepped(SGD, momentum=0.9).state_dict(), "param_groups": [
        {**stepped(SGD, momentum=0.9).state_dict()["param_groups"][0], "maximize": True}]}, "maximize"),
], ids=["torch SGD", "Adam", "AdamW", "maximize"])
def test_load_state_dict_of_another_optimizer_is_refused_before_anything_changes(other, missing):
    ours = stepped(SGD, momentum=0.5, weight_decay=0.1)
    groups_before = [dict(g) for g in ours.param_groups]
    state_before = {p: {"momentum_buffer": s["momentum_buffer"].clone()} for p, s in ours.state.items()}
    with pytest.raises(ValueError, match="state_dict of another optimizer") as info:
        ours.load_state_dict(other())
    assert re.search(missing, str(info.value)), str(info.value)
    assert_unchanged(ours, groups_before, state_before)
    p = ours.param_groups[0]["params"][0]
    p.grad = torch.ones(3)
    ours.step()  # and it still steps, with its own state


def test_load_state_dict_checks_every_group_and_buffer_before_changing_one():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    ours = SGD([{"params": [a]}, {"params": [b]}], 0.1, momentum=0.9)
    groups_before, state_before = [dict(g) for g in ours.param_groups], {}
    saved = SGD([{"params": [torch.nn.Parameter(torch.ones(2))]}, {"params": [torch.nn.Parameter(torch.ones(3))]}],
                0.5, momentum=0.5).state_dict()
    saved["param_groups"][1]["momentum"] = 1.5  # the second group is bad: the first must not change either
    with pytest.raises(ValueError, match="momentum=1.5"):
        ours.load_state_dict(saved)
    assert_unchanged(ours, groups_before, state_before)
    saved["param_groups"][1]["momentum"] = 0.5
    saved["state"] = {1: {"momentum_buffer": torch.ones(2)}}  # b has 3 numbers
    with pytest.raises(ValueError, match="buffers"):
        ours.load_state_dict(saved)
    assert_unchanged(ours, groups_before, state_before)
    saved["state"] = {1: {"momentum_buffer": None}}  # torch.optim.SGD's, with momentum 0
    with pytest.raises(ValueError, match="buffers"):
        ours.load_state_dict(saved)
    assert_unchanged(ours, groups_before, state_before)


def test_the_advice_for_a_torch_sgd_state_dict_works():
    """docs/sgd.md: with decoupled_weight_decay=False added to each group, a torch.optim.SGD
    state dict loads, and the run continues as torch.optim.SGD would."""
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    theirs = torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(2):
        p.grad = torch.arange(3.0)
        theirs.step()
    saved = theirs.state_dict()
    saved["param_groups"] = [{**g, "decoupled_weight_decay": False} for g in saved["param_groups"]]
    ours = SGD([q], lr=0.5)
    with torch.no_grad():
        q.copy_(p)
    ours.load_state_dict(saved)
    for opt, param in ((theirs, p), (ours, q)):
        param.grad = torch.full((3,), 0.5)
        opt.step()
    assert torch.equal(p, q)
