"""minicnn.schedule: SGDR pinned down by properties (hypothesis) and by torch's schedulers.

Tolerances: the restart values are exact (==). Against torch, 1e-12 relative: the same formula
in the same order, so in practice equal, but torch's StepLR and CosineAnnealingLR multiply
recursively and drift by a few ulps. The last step of a cycle sits above lr_min by exactly
(peak - lr_min) * sin(pi / (2 T))**2 (lr_min itself would be t = T, the next cycle's first step),
which is at most (peak - lr_min) * 2.5 / T**2: 0.025% of the range for a 100-step cycle.
"""
import functools
import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from minicnn.schedule import (cosine_lr, cycle_end_steps, cycle_position, linear_lr,
                              sgdr_lr, sgdr_lrs, step_decay_lr, total_steps)

steps_per_cycle = st.integers(1, 30)
integer_mult = st.integers(1, 3)
any_mult = integer_mult | st.sampled_from([1.25, 1.5, 1.75, 2.5]) | st.floats(1.0, 3.0)
lr_pair = st.tuples(st.floats(1e-4, 10.0), st.floats(0.0, 1.0)).map(lambda t: (t[0], t[0] * t[1]))


@st.composite
def sgdr_args(draw, mult=any_mult):
    n = draw(steps_per_cycle)
    lr_max, lr_min = draw(lr_pair)
    return dict(steps_per_cycle=n, cycle_mult=draw(mult), lr_max=lr_max, lr_min=lr_min,
                warmup_steps=draw(st.integers(0, n - 1) | st.just(0)),
                cycle_decay=draw(st.just(1.0) | st.floats(0.1, 1.0)))


def cycles(args):
    return {k: args[k] for k in ("steps_per_cycle", "cycle_mult")}


def torch_lrs(n_steps, lr_max, make_scheduler):
    """The LR torch's scheduler gives at each of n_steps minibatches (stepped once per batch)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr_max)
    scheduler, lrs = make_scheduler(opt), []
    with warnings.catch_warnings():  # no opt.step() in between: it would only cost time
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        for _ in range(n_steps):
            lrs.append(opt.param_groups[0]["lr"])
            scheduler.step()
    return lrs


@given(steps_per_cycle, integer_mult, lr_pair)
def test_sgdr_matches_torch_cosine_annealing_warm_restarts(n, mult, lrs):
    lr_max, lr_min = lrs
    n_steps = min(total_steps(4, steps_per_cycle=n, cycle_mult=mult), 400)
    theirs = torch_lrs(n_steps, lr_max, lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=n, T_mult=mult, eta_min=lr_min))
    ours = [sgdr_lr(s, steps_per_cycle=n, cycle_mult=mult, lr_max=lr_max, lr_min=lr_min) for s in range(n_steps)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)


@given(sgdr_args(), st.integers(0, 5000))
def test_lr_within_bounds(args, step):
    assert args["lr_min"] <= sgdr_lr(step, **args) <= args["lr_max"]


@given(sgdr_args())
def test_every_restart_is_exactly_peak_and_cycles_fall_to_near_lr_min(args):
    lr_min = args["lr_min"]
    for k, end in enumerate(cycle_end_steps(5, **cycles(args))):
        _, _, length = cycle_position(end, **cycles(args))
        start = end - length + 1
        peak = max(lr_min, args["lr_max"] * args["cycle_decay"] ** k)
        if k > 0 or args["warmup_steps"] == 0:  # with warm-up, cycle 0 starts at lr_max/100
            assert sgdr_lr(start, **args) == peak
        if k > 0 or length - args["warmup_steps"] > 0:
            cosine_steps = length - (args["warmup_steps"] if k == 0 else 0)
            above = (peak - lr_min) * math.sin(math.pi / (2 * cosine_steps)) ** 2
            assert sgdr_lr(end, **args) - lr_min == pytest.approx(above, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("lr_max, lr_min", [(0.42, 0.169), (0.795, 0.065)])
def test_restarts_exact_where_the_formula_rounds_off(lr_max, lr_min):
    # lr_min + (lr_max - lr_min) * 2 / 2 is 0.42000000000000004 and 0.7949999999999999 here
    # (torch gives those); so the restart is returned as peak itself, and capped by it.
    assert lr_min + (lr_max - lr_min) * (1 + math.cos(0.0)) / 2 != lr_max
    for step in (0, 5, 15, 35):
        assert sgdr_lr(step, steps_per_cycle=5, cycle_mult=2, lr_max=lr_max, lr_min=lr_min) == lr_max
    # In a 1e9-step cycle 1 + cos(pi * 1 / T) rounds to 2: step 1 must still not pass lr_max.
    assert sgdr_lr(1, steps_per_cycle=10**9, lr_max=lr_max, lr_min=lr_min) <= lr_max


@given(sgdr_args())
def test_non_increasing_inside_each_cycle_after_warmup(args):
    for k, end in enumerate(cycle_end_steps(4, **cycles(args))):
        _, _, length = cycle_position(end, **cycles(args))
        first = end - length + 1 + (args["warmup_steps"] if k == 0 else 0)
        lrs = [sgdr_lr(s, **args) for s in range(first, end + 1)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@given(sgdr_args(), st.sampled_from([1.0, 0.5]))
def test_warmup_is_linear_from_lr_max_over_100_and_moves_no_restart(args, lr_min_fraction):
    args = {**args, "lr_min": args["lr_max"] * lr_min_fraction / 100, "warmup_steps": max(1, args["warmup_steps"])}
    assume(args["steps_per_cycle"] > 1)
    w, lr_max = args["warmup_steps"], args["lr_max"]
    warm = [sgdr_lr(s, **args) for s in range(w + 1)]
    assert warm[0] == max(args["lr_min"], lr_max / 100) and warm[w] == lr_max
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert steps == pytest.approx([steps[0]] * w, rel=1e-9) and steps[0] > 0
    plain = {**args, "warmup_steps": 0}  # from the second cycle on, warm-up changes nothing
    later = range(total_steps(1, **cycles(args)), total_steps(3, **cycles(args)))
    assert [sgdr_lr(s, **args) for s in later] == [sgdr_lr(s, **plain) for s in later]


def brute_force_position(step, n, mult):
    """Walk the cycles one by one; cycle starts are the exact rational geometric sums, rounded half up."""
    k, exact_sum = 0, Fraction(0)
    while True:
        start = math.floor(n * exact_sum + Fraction(1, 2))
        exact_sum += Fraction(mult) ** k
        end = math.floor(n * exact_sum + Fraction(1, 2))
        if step < end:
            return k, step - start, end - start
        k += 1


@given(steps_per_cycle, integer_mult | st.sampled_from([1.25, 1.5, 1.75, 2.5]), st.integers(0, 3000))
def test_cycle_position_equals_a_brute_force_walk(n, mult, step):
    """Integer and short binary fractions: float64 is exact there, so the rule can be checked exactly."""
    assert cycle_position(step, steps_per_cycle=n, cycle_mult=mult) == brute_force_position(step, n, mult)


@given(steps_per_cycle, any_mult, st.integers(1, 12))
def test_cycle_lengths_add_up_to_total_steps(n, mult, n_cycles):
    ends = cycle_end_steps(n_cycles, steps_per_cycle=n, cycle_mult=mult)
    lengths = [cycle_position(e, steps_per_cycle=n, cycle_mult=mult)[2] for e in ends]
    assert sum(lengths) == total_steps(n_cycles, steps_per_cycle=n, cycle_mult=mult) == ends[-1] + 1
    for k, (end, length) in enumerate(zip(ends, lengths)):
        assert cycle_position(end, steps_per_cycle=n, cycle_mult=mult)[:2] == (k, length - 1)
        assert cycle_position(end + 1, steps_per_cycle=n, cycle_mult=mult)[:2] == (k + 1, 0)
        assert length >= 1 and abs(length - n * mult**k) <= 1 + 1e-9  # within one step of the ideal


@given(st.integers(1, 500))
def test_fastai_count_three_cycles_with_mult_two_is_seven_epochs(batches_per_epoch):
    assert total_steps(3, steps_per_cycle=batches_per_epoch, cycle_mult=2) == 7 * batches_per_epoch
    assert cycle_end_steps(3, steps_per_cycle=batches_per_epoch, cycle_mult=2) == [
        batches_per_epoch - 1, 3 * batches_per_epoch - 1, 7 * batches_per_epoch - 1]


def test_closed_form_where_the_float_log_falls_short():
    # log_3(243) = 4.999... in floating point; step 121 (T_mult=3, T_0=1) starts cycle 5.
    assert cycle_position(121, steps_per_cycle=1, cycle_mult=3) == (5, 0, 243)
    assert sgdr_lr(121, steps_per_cycle=1, cycle_mult=3, lr_max=1.0) == 1.0
    assert cycle_position(2**60 - 1, steps_per_cycle=1, cycle_mult=2) == (60, 0, 2**60)
    assert cycle_position(2**60 - 2, steps_per_cycle=1, cycle_mult=2) == (59, 2**59 - 1, 2**59)


@given(st.integers(1, 200), lr_pair)
def test_cosine_lr_matches_torch_cosine_annealing_lr(n, lrs):
    lr_max, lr_min = lrs
    theirs = torch_lrs(n, lr_max, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=n, eta_min=lr_min))
    ours = [cosine_lr(s, total_steps=n, lr_max=lr_max, lr_min=lr_min) for s in range(n)]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12 * lr_max)


@given(st.integers(1, 50), st.floats(1e-3, 1.0))
def test_step_decay_lr_matches_torch_step_lr(every, lr_max):
    theirs = torch_lrs(5 * every, lr_max, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=every, gamma=0.1))
    ours = [step_decay_lr(s, lr_max=lr_max, decay_every=every) for s in range(5 * every)]
    assert ours == pytest.approx(theirs, rel=1e-12)


@given(st.integers(1, 300), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_linear_lr_is_a_straight_line_from_start_to_end(n, lr_start, lr_end):
    lrs = [linear_lr(s, total_steps=n, lr_start=lr_start, lr_end=lr_end) for s in range(n)]
    assert lrs[0] == lr_start
    expected = [lr_start + (lr_end - lr_start) * s / n for s in range(n)]
    assert lrs == pytest.approx(expected, abs=1e-15)  # reaches lr_end at step n, one past the last
    assert min(lr_start, lr_end) <= min(lrs) and max(lrs) <= max(lr_start, lr_end)


@given(sgdr_args(), st.lists(st.floats(1e-3, 1.0), min_size=1, max_size=4), st.integers(0, 3000))
def test_sgdr_lrs_is_sgdr_lr_for_each_group(args, fractions, step):
    lr_maxes = [args["lr_max"] * f for f in fractions]
    args = {**args, "lr_min": min(args["lr_min"], min(lr_maxes))}
    kwargs = {k: v for k, v in args.items() if k != "lr_max"}
    assert sgdr_lrs(step, lr_maxes=lr_maxes, **kwargs) == [sgdr_lr(step, **kwargs, lr_max=x) for x in lr_maxes]


@given(sgdr_args(), st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=4))
def test_sgdr_lrs_keeps_the_ratios_between_groups_with_lr_min_zero(args, fractions):
    lr_maxes = [args["lr_max"] * f for f in fractions]
    kwargs = {k: v for k, v in args.items() if k not in ("lr_max", "lr_min")}
    lr_at = functools.partial(sgdr_lrs, lr_maxes=lr_maxes, **kwargs)  # as fit's lr_at
    for step in range(0, total_steps(3, **cycles(args))):
        lrs = lr_at(step)
        if lrs[-1] > 1e-300:  # far below, the cosine's last bits are subnormal
            assert [lr / lrs[-1] for lr in lrs] == pytest.approx([x / lr_maxes[-1] for x in lr_maxes], rel=1e-9)


def test_step_decay_far_past_the_float_range_is_zero_not_an_overflow():
    assert step_decay_lr(400, lr_max=0.1, decay_every=1) == 0.0  # 10**400 is past 1.8e308
    assert step_decay_lr(300, lr_max=0.1, decay_every=1) == 0.1 / 10.0**300


def test_a_zero_lr_max_is_a_schedule_of_zeros():
    """LRs are finite and >= 0; 0 is one (a param group that should not move, as in torch)."""
    assert [sgdr_lr(s, steps_per_cycle=4, cycle_mult=2, lr_max=0.0, warmup_steps=1) for s in range(12)] == [0.0] * 12
    assert sgdr_lrs(3, lr_maxes=[0.0, 0.1], steps_per_cycle=4)[0] == 0.0


@pytest.mark.parametrize("call, match", [
    (lambda: sgdr_lrs(0, lr_maxes=[0.1, -1.0], steps_per_cycle=5), r"lr_max.*-1.0"),
    (lambda: sgdr_lrs(0, lr_maxes=[0.1, 0.01], steps_per_cycle=5, lr_min=0.05), r"lr_min.*0.01.*0.05"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, lr_max=float("nan")), "lr_max.*nan"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, lr_max=float("inf")), "lr_max.*inf"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, lr_max=0.1, lr_min=0.2), r"lr_min.*0.1.*0.2"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, lr_max=0.1, lr_min=-0.1), r"lr_min.*-0.1"),
    (lambda: sgdr_lr(0, steps_per_cycle=0, lr_max=1.0), r"steps_per_cycle.*\[1, .*0"),
    (lambda: sgdr_lr(0, steps_per_cycle=-3, lr_max=1.0), r"steps_per_cycle.*-3"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, cycle_mult=0.5, lr_max=1.0), r"cycle_mult.*0.5"),
    (lambda: sgdr_lr(-1, steps_per_cycle=5, lr_max=1.0), r"step.*-1"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, lr_max=1.0, warmup_steps=5), r"warmup_steps.*4\].*5"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, lr_max=1.0, warmup_steps=-1), r"warmup_steps.*-1"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, lr_max=1.0, cycle_decay=1.5), r"cycle_decay.*1.5"),
    (lambda: sgdr_lr(0, steps_per_cycle=5, lr_max=1.0, cycle_decay=float("nan")), "cycle_decay"),
    (lambda: cycle_position(-2, steps_per_cycle=5), r"step.*-2"),
    (lambda: total_steps(0, steps_per_cycle=5), r"n_cycles.*0"),
    (lambda: cycle_end_steps(0, steps_per_cycle=5), r"n_cycles.*0"),
    (lambda: cosine_lr(10, total_steps=10, lr_max=1.0), r"step.*9\].*10"),
    (lambda: cosine_lr(0, total_steps=0, lr_max=1.0), r"total_steps.*0"),
    (lambda: linear_lr(-1, total_steps=10, lr_start=1.0), r"step.*-1"),
    (lambda: linear_lr(10, total_steps=10, lr_start=1.0), r"step.*10"),
    (lambda: linear_lr(0, total_steps=10, lr_start=1.0, lr_end=-0.5), r"lr_end.*-0.5"),
    (lambda: step_decay_lr(3, lr_max=1.0, decay_every=0), r"decay_every.*0"),
    (lambda: step_decay_lr(3, lr_max=-1.0, decay_every=2), r"lr_max.*-1.0"),
    (lambda: step_decay_lr(3, lr_max=1.0, decay_every=2, factor=0.5), r"factor.*0.5"),
])
def test_errors_name_the_argument_its_range_and_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
