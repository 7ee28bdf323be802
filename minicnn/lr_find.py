"""LR range test: raise the LR exponentially batch by batch, watch the loss, put everything back.

    lr_i = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))       i = 0 .. num_iter-1
    avg_i = beta * avg_{i-1} + (1 - beta) * loss_i,  avg_{-1} = 0
    smoothed_i = avg_i / (1 - beta ** (i + 1))     bias-corrected: smoothed_0 == loss_0
Stops after a smoothed loss above diverge * best, a NaN/inf loss, or when the batches run out.
Several param groups keep their ratios (the swept lr is the last group's). Afterwards the model,
the optimizer and the RNG states are as they were, bit for bit. suggest_lr: the middle, in log
lr, of the longest run of steps falling at least as steeply as the mean descent to the minimum.
Sources: Smith 2015, "Cyclical Learning Rates for Training Neural Networks"; fast.ai 2018
lesson 2, steps 2 and 7 ("the highest rate where the loss is clearly improving").
Copy with minicnn/fit_checks.py (raise_clearly). docs/lr_find.md: the rule, what is restored, peers.
"""
import copy
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from minicnn.fit_checks import raise_clearly

RULE = "middle of the longest steep fall"


class Suggestion(NamedTuple):
    lr: Optional[float]     # None only with fewer than 2 usable points
    index: Optional[int]    # into lrs
    loss_fell: bool         # False: the loss never clearly fell; lr is not a recommendation
    reason: str
    skip_start: int         # usable points are skip_start .. stop-1
    stop: int


@dataclass
class LRFindResult:
    lrs: list               # the swept (last group's) LR of every step taken
    losses: list            # raw minibatch losses
    smoothed_losses: list   # bias-corrected EMA; NaN from the first non-finite loss on
    suggested_lr: Optional[float]
    suggested_index: Optional[int]
    rule: str
    reason: str             # one sentence: where, why, and where the loss blew up
    loss_fell: bool
    skip_start: int
    stop: int
    stop_reason: str


def suggest_lr(lrs, losses, *, skip_start=None, min_fall=0.02):
    """Suggest an LR from a sweep's LRs and SMOOTHED losses (raw ones are too noisy) -> Suggestion.

    1. keep points skip_start (default len(lrs) // 10, the noisy head) .. the first non-finite loss;
    2. a step is steep when its fall per decade of lr is at least the mean fall per decade from
       the highest point before the minimum down to the minimum;
    3. take the longest run of steep steps, measured in decades of lr, not in points;
    4. suggest its point nearest the middle in log lr, never its last point (a minimum).
    If the loss never fell by min_fall, loss_fell is False and lr is the lowest loss's rate.
    """
    if len(lrs) != len(losses):
        raise ValueError(f"{len(lrs)} lrs but {len(losses)} losses; give one loss per LR")
    lrs, losses = [float(v) for v in lrs], [float(v) for v in losses]
    bad = (i for i, (lr, y) in enumerate(zip(lrs, losses))
           if not (lr > 0 and math.isfinite(lr) and math.isfinite(y)))
    stop = next(bad, len(lrs))
    skip = len(lrs) // 10 if skip_start is None else skip_start
    skip = max(0, min(skip, stop - 2))  # keep two points when there are two
    if stop - skip < 2:
        return Suggestion(None, None, False, f"only {stop} usable point(s) (finite, before any "
                          "non-finite loss); need 2: lower start_lr or raise num_iter", skip, stop)
    x = [math.log10(lr) for lr in lrs]
    lowest = min(range(skip, stop), key=lambda k: losses[k])
    highest = max(range(skip, lowest + 1), key=lambda k: losses[k])
    fall = losses[highest] - losses[lowest]
    if lowest == skip or fall <= min_fall * abs(losses[highest]):
        return Suggestion(lrs[lowest], lowest, False, f"the smoothed loss never clearly fell (by "
                          f"{min_fall:.0%}); lowest at lr {lrs[lowest]:.2g}, not a recommendation: "
                          "lower start_lr, or check the model and the data", skip, stop)
    steep = fall / (x[lowest] - x[highest])  # mean fall per decade, highest -> lowest
    best_run, start = (skip, skip), None
    for k in range(skip, stop):  # run = points start..k joined by steep steps
        if k + 1 < stop and (losses[k] - losses[k + 1]) >= steep * (x[k + 1] - x[k]):
            start = k if start is None else start
        elif start is not None:
            if x[k] - x[start] > x[best_run[1]] - x[best_run[0]]:
                best_run = (start, k)
            start = None
    first, last = best_run if best_run[1] > best_run[0] else (highest, lowest)  # rounding left none
    middle = (x[first] + x[last]) / 2
    index = min(range(first, last), key=lambda k: abs(x[k] - middle))
    return Suggestion(lrs[index], index, True, f"{RULE} of the smoothed loss ({lrs[first]:.2g} to "
                      f"{lrs[last]:.2g}): {lrs[index]:.2g}", skip, stop)


def lr_find(model, train_batches, opt, *, loss_fn=F.cross_entropy, start_lr=1e-7, end_lr=10.0,
            num_iter=100, beta=0.98, diverge=4.0, skip_start=None, device=None):
    """Run the range test on `model` with `opt`'s groups, then restore everything -> LRFindResult.

    train_batches: (x, y) minibatches, read again from the start when they run out (Batches as
    .epoch(0), .epoch(1), ...; a list or a DataLoader with iter()); moved to the model's device.
    """
    _check_args(opt, start_lr, end_lr, num_iter, beta, diverge)
    ratios = [group["lr"] / opt.param_groups[-1]["lr"] for group in opt.param_groups]  # they stay
    device = torch.device(device) if device is not None else next(model.parameters()).device
    saved = _save_state(model, opt)
    lrs, losses, smoothed, avg, best, stop_reason = [], [], [], 0.0, math.inf, None
    try:
        model.train()
        opt.zero_grad()
        for i, (x, y) in zip(range(num_iter), _cycle(train_batches)):
            lr = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))  # lr_i, exponential
            for group, ratio in zip(opt.param_groups, ratios):
                group["lr"] = lr * ratio
            with torch.enable_grad():
                try:
                    loss = loss_fn(model(x.to(device)), y.to(device))
                except (RuntimeError, IndexError, ValueError) as error:  # torch's words -> ours
                    raise_clearly(error, x, y, model, f"lr_find, step {i}")
            value = loss.item()
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                smoothed.append(math.nan)
                stop_reason = f"the loss was {value} at lr {lr:.2g}"
                break
            avg = beta * avg + (1 - beta) * value                 # avg_i
            smoothed.append(avg / (1 - beta ** (i + 1)))          # smoothed_i, bias-corrected
            if smoothed[-1] > diverge * best:
                stop_reason = (f"the loss blew up past lr {lr:.2g} "
                               f"({smoothed[-1]:.3g} > {diverge:g} x best {best:.3g})")
                break
            best = min(best, smoothed[-1])
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        _restore_state(model, opt, saved)
    if not lrs:
        raise ValueError("lr_find: train_batches gave no batches (a generator already used up?)")
    if stop_reason is None:
        stop_reason = f"ran {num_iter} steps" if len(lrs) == num_iter else (
            f"the batches ran out after {len(lrs)} of {num_iter} steps, at lr {lrs[-1]:.2g}: a "
            "one-shot generator gives one pass; pass a list, a DataLoader or Batches")
    s = suggest_lr(lrs, smoothed, skip_start=skip_start)
    return LRFindResult(lrs, losses, smoothed, s.lr, s.index, RULE, f"{s.reason}; {stop_reason}",
                        s.loss_fell, s.skip_start, s.stop, stop_reason)


def _cycle(batches):
    """Pass after pass; Batches as .epoch(0), .epoch(1), ..., so its own epoch counter stays."""
    for e in itertools.count():
        n = 0
        for n, xy in enumerate(batches.epoch(e) if hasattr(batches, "epoch") else batches, 1):
            yield xy
        if n == 0:  # an empty pass: a used-up generator, or no batches at all
            return


def _save_state(model, opt):
    clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
    return dict(
        params=[(p, clone(p), clone(p.grad), p.requires_grad) for p in model.parameters()],
        buffers=[(b, clone(b)) for b in model.buffers()],
        modes=[(m, m.training) for m in model.modules()],
        # state_dict() returns the live momentum buffers: deepcopy, or the sweep overwrites them
        opt=copy.deepcopy(opt.state_dict()),
        rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _restore_state(model, opt, saved):
    with torch.no_grad():
        for p, value, grad, requires_grad in saved["params"]:
            p.copy_(value)
            p.grad = grad
            p.requires_grad_(requires_grad)
        for b, value in saved["buffers"]:
            b.copy_(value)
    for m, training in saved["modes"]:
        m.training = training
    if isinstance(getattr(opt, "state", None), dict):
        opt.state.clear()  # so a load_state_dict that merges cannot keep the sweep's momentum
    opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def _check_args(opt, start_lr, end_lr, num_iter, beta, diverge):
    """Each rule broken would give a sweep of NaN, or none (NaN fails every comparison)."""
    last_lr = opt.param_groups[-1]["lr"]  # the groups' LRs give the ratios the sweep keeps
    for rule, value, ok in (
            ("0 < start_lr < end_lr < inf", (start_lr, end_lr), 0 < start_lr < end_lr < math.inf),
            ("num_iter >= 2", num_iter, num_iter >= 2), ("0 <= beta < 1", beta, 0 <= beta < 1),
            ("diverge > 1", diverge, diverge > 1),
            ("the last param group's lr > 0", last_lr, last_lr > 0)):
        if not ok:
            raise ValueError(f"lr_find needs {rule}, got {value}")
