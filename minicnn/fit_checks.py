"""What fit refuses, and its words when torch fails on a batch or the loss is not finite.

minicnn/train.py calls these (minicnn/lr_find.py calls raise_clearly):
    check_fit(...)             before the first step -> (steps per epoch, cycle-end steps)
    check_one_process(...)     under torchrun: fit and evaluate need the hook that joins the ranks
    lrs_for(opt, lr_at, step)  lr_at(step) as one LR per param group, each finite and >= 0
    check_epoch_length(...)    an epoch gave the len(train) batches every step number rests on
    raise_clearly(error, ...)  torch's error on a batch told as the mistake: labels, dtype, channels
    not_finite(...)            what a NaN or inf loss came from: the data, the weights, the LR
docs/training_loop.md: bad input and NaN.
"""
import functools
import math
import numbers
import re

import torch
import torch.distributed as dist


def check_fit(model, train, valid, train_eval, end_epoch, start_step, cycle_ends, on_cycle_end):
    """Before the first step -> (steps per epoch, the set of cycle-end steps)."""
    if next(model.parameters(), None) is None:
        raise ValueError("fit: the model has no parameters")
    named = (("train", train), ("valid", valid), ("train_eval", train_eval))
    sizes = {name: len(b) for name, b in named if b is not None}  # len(): read every epoch
    if empty := [name for name, size in sizes.items() if size == 0]:
        raise ValueError(f"fit: {empty[0]} holds no batches (fewer samples than one batch?)")
    steps = sizes["train"]
    if start_step < 0 or end_epoch < 0 or (start_step and start_step >= end_epoch * steps):
        raise ValueError(f"fit: {start_step=} must be in [0, {end_epoch=} * {steps})")
    if bool(cycle_ends) != (on_cycle_end is not None):
        raise ValueError("fit: pass on_cycle_end and cycle_ends together, or neither")
    return steps, set(cycle_ends)


def check_one_process(name, hook, advice):
    """Under torchrun, fit without after_backward (evaluate without all_sum) would train (count)
    each rank on its share alone."""
    if hook is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"{name}: {dist.get_world_size()} processes (torchrun): pass {advice}")


def lrs_for(opt, lr_at, step):
    """lr_at(step) as one float per param group, each finite and >= 0, before it is set."""
    lrs, n = lr_at(step), len(opt.param_groups)
    lrs = [float(lrs)] * n if isinstance(lrs, numbers.Real) else [float(lr) for lr in lrs]
    if len(lrs) != n or not all(0 <= lr < math.inf for lr in lrs):  # False for NaN too
        raise ValueError(f"lr_at({step}) gave {lrs} for {n} param groups: one finite lr >= 0 each")
    return lrs


def check_epoch_length(batches, epoch, seen, steps_per_epoch):
    """Fewer or more batches than len(train) would shift every later step (and its LR)."""
    if seen < steps_per_epoch or next(batches, None) is not None:
        raise ValueError(f"train gave {seen if seen < steps_per_epoch else 'more'} batches in "
                         f"epoch {epoch}, len(train) = {steps_per_epoch}: pass Batches or a list")


def raise_clearly(error, x, y, model, where):
    """Raise torch's error on a batch again as the mistake it comes from; others unchanged."""
    text, weight = str(error), next(model.parameters())
    if y is not None and "out of bounds" in text:  # IndexError: Target 7 is out of bounds.
        raise ValueError(f"{where}: labels run {int(y.min())} .. {int(y.max())}; they must be "
                         "class indices 0 .. n_classes - 1") from error
    if y is not None and "target" in text and y.dtype != torch.long:  # target dtype ... Long
        raise TypeError(f"{where}: the labels are {y.dtype}: pass y.long()") from error
    if "more than 1 value per channel" in text:  # BatchNorm in train mode
        raise ValueError(f"{where}: BatchNorm got a batch of {len(x)}: drop_last=True") from error
    if channels := re.search(r"to have (\d+) channels, but got (\d+) channels", text):
        raise ValueError(f"{where}: {channels[2]} channels; model takes {channels[1]}") from error
    if widths := re.search(r"running_mean should contain (\d+) elements not (\d+)", text):
        got, want = (int(n) for n in widths.groups())  # the layer: its running_mean is `want` wide
        layers = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if isinstance(
            getattr(m, "running_mean", None), torch.Tensor) and m.running_mean.numel() == want]
        raise ValueError(f"{where}: layer {' or '.join(layers)} takes {want} features, got {got} "
                         "(input and layer from different models?)") from error
    if x.dtype != weight.dtype and "type" in text:  # expected scalar type Double but found Float
        raise TypeError(f"{where}: the images are {x.dtype}, the weights {weight.dtype}") from error
    if y is not None and "to match target batch_size" in text:
        raise ValueError(f"{where}: a batch of {len(x)} images and {len(y)} labels") from error
    raise error


def not_finite(loss, step, epoch, lrs, x, y, logits, model, loss_fn, batch_losses):
    """What a non-finite loss came from, in words; computed only on the way to the error.
    batch_losses: this fit's losses so far (none: before any step of this fit)."""
    where = f"loss is {loss} at step {step} (epoch {epoch}) with lr {lrs}: "
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()][:5]
    ignore = (loss_fn.keywords if isinstance(loss_fn, functools.partial) else {}).get(
        "ignore_index", getattr(loss_fn, "ignore_index", -100))  # cross_entropy's default
    if not y.is_floating_point() and bool((y == ignore).all()):
        return where + f"every label is ignore_index ({ignore}): a mean over no samples"
    if x.is_floating_point() and not torch.isfinite(x).all():
        return where + f"the inputs hold {int((~torch.isfinite(x)).sum())} NaN/inf: check the data"
    if not torch.isfinite(logits).all() and not batch_losses:
        return where + (f"weights {bad} hold NaN/inf before any step" if bad else "the forward "
                        "pass makes NaN/inf from finite inputs and weights") + " (not the lr)"
    if not torch.isfinite(logits).all():
        return where + f"outputs went NaN/inf (weights {bad}): lower the learning rate (10x)"
    recent = batch_losses[-20:]
    if recent and recent[-1] > 2 * min(recent):
        return where + (f"the loss grew from {min(recent):.4g} to {recent[-1]:.4g}: lower the "
                        "learning rate (10x)")
    return where + "outputs are finite, so check loss_fn and the labels, or lower the learning rate"
