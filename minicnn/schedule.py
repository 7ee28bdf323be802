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
import numbers


def _integer(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _real(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _lr_range(lr_max, lr_min):
    if _real("lr_max", lr_max, 0) == 0:
        raise ValueError("lr_max must be > 0, got 0; a schedule that never moves needs no schedule")
    if _real("lr_min", lr_min, 0) > lr_max:
        raise ValueError(f"lr_min ({lr_min}) must not exceed lr_max ({lr_max}); swap them?")


def _cycle_args(steps_per_cycle, cycle_mult):
    steps_per_cycle = _integer("steps_per_cycle", steps_per_cycle, 1)
    m = _real("cycle_mult", cycle_mult, 1)  # cycles that shrink would never end
    return steps_per_cycle, int(m) if float(m).is_integer() else float(m)


def _cycle_start(k, steps_per_cycle, m):
    """B_k, the first step of cycle k: exact integers for integer m, rounded half up otherwise."""
    if m == 1:
        return steps_per_cycle * k
    if isinstance(m, int):
        return steps_per_cycle * (m**k - 1) // (m - 1)
    return math.floor(steps_per_cycle * (m**k - 1) / (m - 1) + 0.5)  # float64, then half up


def cycle_position(step, *, steps_per_cycle, cycle_mult=1):
    """(cycle, step_in_cycle, cycle_steps) of a global step, counting from 0."""
    step = _integer("step", step, 0)
    n, m = _cycle_args(steps_per_cycle, cycle_mult)
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


def total_steps(n_cycles, *, steps_per_cycle, cycle_mult=1):
    """Steps in the first n_cycles cycles. fastai: 3 cycles of 1 epoch, cycle_mult=2 ->
    7 epochs."""
    return _cycle_start(_integer("n_cycles", n_cycles, 1),
                        *_cycle_args(steps_per_cycle, cycle_mult))


def cycle_end_steps(n_cycles, *, steps_per_cycle, cycle_mult=1):
    """Global index of the last step of each of the first n_cycles cycles (train.fit's
    cycle_ends)."""
    n, m = _cycle_args(steps_per_cycle, cycle_mult)
    return [_cycle_start(k + 1, n, m) - 1 for k in range(_integer("n_cycles", n_cycles, 1))]


def sgdr_lr(step, *, steps_per_cycle, cycle_mult=1, lr_max, lr_min=0.0, warmup_steps=0,
            cycle_decay=1.0):
    """SGDR: cosine from peak_k down towards lr_min in every cycle, restarts at peak_k (see
    above)."""
    _lr_range(lr_max, lr_min)
    steps_per_cycle, cycle_mult = _cycle_args(steps_per_cycle, cycle_mult)
    if not 0 < _real("cycle_decay", cycle_decay, 0) <= 1:
        raise ValueError(f"cycle_decay must be in (0, 1], got {cycle_decay}")
    warmup = _integer("warmup_steps", warmup_steps, 0)
    if warmup >= steps_per_cycle:
        raise ValueError(f"warmup_steps ({warmup}) must be shorter than the first cycle "
                         f"({steps_per_cycle} steps)")
    cycle, t, cycle_steps = cycle_position(step, steps_per_cycle=steps_per_cycle,
                                           cycle_mult=cycle_mult)
    if cycle == 0 and warmup:
        if t < warmup:
            lr_start = max(lr_min, lr_max / 100)               # fastai 0.7's warm-up LR
            return lr_start + (lr_max - lr_start) * t / warmup   # linear up to lr_max at step w
        t, cycle_steps = t - warmup, cycle_steps - warmup  # the cosine fills the rest of cycle 0
    peak = max(lr_min, lr_max * cycle_decay**cycle)       # peak_k
    if t == 0:
        return peak  # exactly, where lr_min + (peak - lr_min) may be off in the last bit
    lr = lr_min + (peak - lr_min) * (1 + math.cos(math.pi * t / cycle_steps)) / 2  # the cosine
    return min(peak, lr)  # in a cycle of ~1e9 steps, 1 + cos(pi * 1 / T) rounds to 2


def sgdr_lrs(step, *, lr_maxes, steps_per_cycle, cycle_mult=1, lr_min=0.0, warmup_steps=0,
             cycle_decay=1.0):
    """[sgdr_lr(step, lr_max=x, ...) for x in lr_maxes]: one SGDR LR per param group.

    Every group follows the same cosine, so with lr_min=0 the ratios between the groups stay
    fixed (differential LRs, fastai 0.7). As fit's lr_at:
    functools.partial(sgdr_lrs, lr_maxes=[1e-4, 1e-3, 1e-2], steps_per_cycle=len(train),
                      cycle_mult=2)
    """
    if (isinstance(lr_maxes, (numbers.Real, str)) or not hasattr(lr_maxes, "__len__")
            or not len(lr_maxes)):
        raise TypeError("lr_maxes must be a list of peak LRs, one per param group, "
                        f"got {lr_maxes!r}; for a single group pass [lr] (or use sgdr_lr)")
    return [sgdr_lr(step, steps_per_cycle=steps_per_cycle, cycle_mult=cycle_mult, lr_max=lr_max,
                    lr_min=lr_min, warmup_steps=warmup_steps, cycle_decay=cycle_decay)
            for lr_max in lr_maxes]


def _before_end(step, total_steps):
    step, total_steps = _integer("step", step, 0), _integer("total_steps", total_steps, 1)
    if step >= total_steps:
        raise ValueError(f"step {step} is past the schedule's end "
                         f"(total_steps={total_steps}: steps 0..{total_steps - 1})")


def cosine_lr(step, *, total_steps, lr_max, lr_min=0.0):
    """One cosine from lr_max (step 0) towards lr_min over total_steps: SGDR with a single cycle."""
    _before_end(step, total_steps)
    return sgdr_lr(step, steps_per_cycle=total_steps, lr_max=lr_max, lr_min=lr_min)


def linear_lr(step, *, total_steps, lr_start, lr_end=0.0):
    """lr_start + (lr_end - lr_start) * step / total_steps: a straight line (up or down)."""
    _before_end(step, total_steps)
    _real("lr_start", lr_start, 0), _real("lr_end", lr_end, 0)
    return lr_start + (lr_end - lr_start) * step / total_steps


def step_decay_lr(step, *, lr_max, decay_every, factor=10.0):
    """lr_max / factor**(step // decay_every): the "naive way", divide by 10 every few epochs."""
    _lr_range(lr_max, 0.0)
    step, decay_every = _integer("step", step, 0), _integer("decay_every", decay_every, 1)
    factor = _real("factor", factor, 1)
    try:
        return lr_max / factor ** (step // decay_every)      # lr_max / factor**k
    except OverflowError:                                    # factor**k past 1.8e308: lr_max / inf
        return 0.0
