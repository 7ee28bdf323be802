"""Learning-rate schedules as pure functions of the step: SGDR (cosine with warm restarts)
and others.

SGDR, stepped once per minibatch. Cycle k lasts T_k steps; t = steps since it began (0..T_k-1):
    lr     = lr_min + (peak_k - lr_min) * (1 + cos(pi * t / T_k)) / 2
    peak_k = max(lr_min, lr_max * cycle_decay**k)        (cycle_decay=1: every restart at lr_max)
    T_k    = steps_per_cycle * cycle_mult**k, in whole steps: cycle k starts at step
    B_k    = steps_per_cycle * (m**k - 1) / (m - 1)      (m = cycle_mult; rounded half up)
Warm-up: the first warmup_steps steps rise linearly from lr_max/100 to lr_max.
Sources: Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts";
fastai 0.7 fit(lr, n_cycle, cycle_len, cycle_mult); timm CosineLRScheduler (cycle_decay).
docs/sgdr.md: the closed-form cycle, rounding, the last step of a cycle, torch and fastai.
"""
import math
import operator


def sgdr_lr(step, *, steps_per_cycle, cycle_mult=1, lr_max, lr_min=0.0, warmup_steps=0,
            cycle_decay=1.0):
    """SGDR: cosine from peak_k down towards lr_min in every cycle, restarts at peak_k (see
    above)."""
    _check_ranges(steps_per_cycle=(1, steps_per_cycle, math.inf), lr_max=(0, lr_max, math.inf),
                  lr_min=(0, lr_min, lr_max), warmup_steps=(0, warmup_steps, steps_per_cycle - 1),
                  cycle_decay=(0, cycle_decay, 1))
    cycle, t, cycle_steps = cycle_position(step, steps_per_cycle=steps_per_cycle,
                                           cycle_mult=cycle_mult)
    if cycle == 0 and warmup_steps:
        if t < warmup_steps:
            lr_start = max(lr_min, lr_max / 100)                      # fastai 0.7's warm-up LR
            return lr_start + (lr_max - lr_start) * t / warmup_steps  # linear up to lr_max at w
        t, cycle_steps = t - warmup_steps, cycle_steps - warmup_steps  # the cosine: the rest
    peak = max(lr_min, lr_max * cycle_decay**cycle)       # peak_k
    if t == 0:
        return peak  # exactly, where lr_min + (peak - lr_min) may be off in the last bit
    lr = lr_min + (peak - lr_min) * (1 + math.cos(math.pi * t / cycle_steps)) / 2  # the cosine
    return min(peak, lr)  # in a cycle of ~1e9 steps, 1 + cos(pi * 1 / T) rounds to 2


def cycle_position(step, *, steps_per_cycle, cycle_mult=1):
    """(cycle, step_in_cycle, cycle_steps) of a global step, counting from 0."""
    n, m = _cycles(steps_per_cycle, cycle_mult)
    _check_ranges(step=(0, step, math.inf))
    step = operator.index(step)  # an int, as range() needs
    if m == 1:
        k = step // n
    else:
        k = int(math.log(step * (m - 1) / n + 1) / math.log(m))  # the geometric series inverted
        while _cycle_start(k + 1, n, m) <= step:  # floating point: at most a step or two off
            k += 1
        while _cycle_start(k, n, m) > step:
            k -= 1
    start = _cycle_start(k, n, m)
    return k, step - start, _cycle_start(k + 1, n, m) - start


def _cycle_start(k, steps_per_cycle, m):
    """B_k, the first step of cycle k: exact integers for integer m, rounded half up otherwise."""
    if m == 1:
        return steps_per_cycle * k
    if isinstance(m, int):
        return steps_per_cycle * (m**k - 1) // (m - 1)
    return math.floor(steps_per_cycle * (m**k - 1) / (m - 1) + 0.5)  # float64, then half up


def _cycles(steps_per_cycle, cycle_mult):
    """(steps_per_cycle, m), m an int where it is one: integer cycle starts are exact."""
    _check_ranges(steps_per_cycle=(1, steps_per_cycle, math.inf),
                  cycle_mult=(1, cycle_mult, math.inf))  # cycles that shrink would never end
    m = int(cycle_mult) if float(cycle_mult).is_integer() else float(cycle_mult)
    return operator.index(steps_per_cycle), m


def total_steps(n_cycles, *, steps_per_cycle, cycle_mult=1):
    """Steps in the first n_cycles cycles. fastai: 3 cycles of 1 epoch, cycle_mult=2 ->
    7 epochs."""
    _check_ranges(n_cycles=(1, n_cycles, math.inf))
    return _cycle_start(operator.index(n_cycles), *_cycles(steps_per_cycle, cycle_mult))


def cycle_end_steps(n_cycles, *, steps_per_cycle, cycle_mult=1):
    """Global index of the last step of each of the first n_cycles cycles (train.fit's
    cycle_ends)."""
    _check_ranges(n_cycles=(1, n_cycles, math.inf))
    n, m = _cycles(steps_per_cycle, cycle_mult)
    return [_cycle_start(k + 1, n, m) - 1 for k in range(n_cycles)]


def sgdr_lrs(step, *, lr_maxes, steps_per_cycle, cycle_mult=1, lr_min=0.0, warmup_steps=0,
             cycle_decay=1.0):
    """[sgdr_lr(step, lr_max=x, ...) for x in lr_maxes]: one SGDR LR per param group.

    Every group follows the same cosine, so with lr_min=0 the ratios between the groups stay
    fixed (differential LRs, fastai 0.7). As fit's lr_at:
    functools.partial(sgdr_lrs, lr_maxes=[1e-4, 1e-3, 1e-2], steps_per_cycle=len(train),
                      cycle_mult=2)
    """
    return [sgdr_lr(step, steps_per_cycle=steps_per_cycle, cycle_mult=cycle_mult, lr_max=lr_max,
                    lr_min=lr_min, warmup_steps=warmup_steps, cycle_decay=cycle_decay)
            for lr_max in lr_maxes]


def cosine_lr(step, *, total_steps, lr_max, lr_min=0.0):
    """One cosine from lr_max (step 0) towards lr_min over total_steps: SGDR with a single cycle."""
    _check_ranges(total_steps=(1, total_steps, math.inf), step=(0, step, total_steps - 1))
    return sgdr_lr(step, steps_per_cycle=total_steps, lr_max=lr_max, lr_min=lr_min)


def linear_lr(step, *, total_steps, lr_start, lr_end=0.0):
    """lr_start + (lr_end - lr_start) * step / total_steps: a straight line (up or down)."""
    _check_ranges(total_steps=(1, total_steps, math.inf), step=(0, step, total_steps - 1),
                  lr_start=(0, lr_start, math.inf), lr_end=(0, lr_end, math.inf))
    return lr_start + (lr_end - lr_start) * step / total_steps


def step_decay_lr(step, *, lr_max, decay_every, factor=10.0):
    """lr_max / factor**(step // decay_every): the "naive way", divide by 10 every few epochs."""
    _check_ranges(step=(0, step, math.inf), lr_max=(0, lr_max, math.inf),
                  decay_every=(1, decay_every, math.inf), factor=(1, factor, math.inf))
    try:
        return lr_max / factor ** (step // decay_every)      # lr_max / factor**k
    except OverflowError:                                    # factor**k past 1.8e308: lr_max / inf
        return 0.0


def _check_ranges(**ranges):
    """ValueError naming the first argument not finite and in its range: name=(low, value, high).
    A schedule's LRs are finite and >= 0; a count or a length below its minimum would give an
    empty or a silently wrong schedule."""
    for name, (low, value, high) in ranges.items():
        if not low <= value <= high or value == math.inf:  # NaN fails every comparison
            raise ValueError(f"{name} must be finite and in [{low}, {high}], got {value!r}")
