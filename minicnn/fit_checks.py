"""What fit refuses before its first step, and what it says when torch fails on a batch.

fit (minicnn/train.py) calls these. Each turns a mistake that would surface minutes into a run, or
as torch's own words, into a sentence that names the argument and says what to do:
    end_epoch_from(...)        end_epoch, or its old name epochs= (with a DeprecationWarning)
    check_fit(...)             every argument, before any work -> (steps per epoch, cycle-end steps)
    lrs_for(opt, lr_at, step)  lr_at(step) as one LR per param group, each finite and >= 0
    check_epoch_length(...)    an epoch gave exactly the len(train) batches every step count
                               rests on
    raise_clearly(error, ...)  torch's error on a batch again: labels, dtypes, channels, BatchNorm
    not_finite(...)            what a NaN or inf loss came from: the data, the weights, the LR
docs/training_loop.md: what `train` may be, bad input and NaN.
"""
import functools
import math
import numbers
import re
import warnings

import torch
import torch.distributed as dist


def end_epoch_from(end_epoch, epochs):
    """end_epoch, or epochs= (its old name: a DeprecationWarning); one of the two, not both."""
    if epochs is not None:
        if end_epoch is not None:
            raise TypeError("fit got end_epoch and epochs (its old name); pass end_epoch only")
        warnings.warn("fit(epochs=) is now fit(end_epoch=): the epoch to stop before",
                      DeprecationWarning, stacklevel=3)
        end_epoch = epochs
    if end_epoch is None:
        raise TypeError("fit needs end_epoch, the epoch to stop before "
                        "(from scratch, the number of epochs)")
    return end_epoch


def check_fit(model, train, valid, opt, lr_at, end_epoch, start_step, train_eval, cycle_ends,
              on_cycle_end):
    """Every argument checked before the first step -> (steps per epoch, set of cycle-end steps)."""
    for name, value in (("end_epoch", end_epoch), ("start_step", start_step)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"fit: {name} must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"fit: {name}={value} must be >= 0")
    if not callable(lr_at):
        raise TypeError(f"fit: lr_at must be a function of the step, got {lr_at!r}; "
                        "for a constant LR pass lambda step: 0.1")
    if not hasattr(opt, "param_groups"):
        raise TypeError("fit: opt must be an optimizer with param_groups, "
                        f"got a {type(opt).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("fit: the model has no parameters to train")
    sizes = {}
    for name, batches in (("train", train), ("valid", valid), ("train_eval", train_eval)):
        if batches is None and name != "train":
            continue
        try:
            sizes[name] = len(batches)
        except TypeError:
            raise TypeError(f"fit: {name} is read every epoch and must have a len(): Batches, a "
                            "DataLoader or a list of (x, y) batches; got a "
                            f"{type(batches).__name__} (a generator: list(...) it)") from None
        if sizes[name] == 0:
            raise ValueError(f"fit: {name} holds no batches (is it empty, or fewer samples than "
                             "one batch with drop_last?)"
                             + (f"; pass {name}=None to skip it" if name != "train" else ""))
    steps_per_epoch = sizes["train"]
    if start_step and start_step >= end_epoch * steps_per_epoch:
        raise ValueError(f"fit: start_step={start_step} is at or past the run's end: "
                         f"end_epoch={end_epoch} x {steps_per_epoch} batches ends before step "
                         f"{end_epoch * steps_per_epoch}. end_epoch is the epoch to stop before, "
                         "not a number of further epochs: to train k more, "
                         f"pass end_epoch={start_step // steps_per_epoch} + k")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in cycle_ends):
        raise TypeError("fit: cycle_ends must be global step numbers (integers >= 0), "
                        f"got {list(cycle_ends)}")
    cycle_ends = {int(s) for s in cycle_ends}
    if bool(cycle_ends) != (on_cycle_end is not None):
        raise ValueError("fit: on_cycle_end and cycle_ends go together: the hook is called after "
                         "each step in cycle_ends (schedule.cycle_end_steps gives them); pass "
                         "both or neither")
    return steps_per_epoch, cycle_ends


def check_one_process(name, hook, advice):
    """Under torchrun, fit without after_backward (evaluate without all_sum) would train (count)
    each rank on its share alone: refused, naming the hook to pass."""
    if hook is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"{name}: {dist.get_world_size()} processes (torchrun) and no "
                         f"{advice.split('=')[0]}: each rank would work on its share alone; "
                         f"pass {advice}")


def lrs_for(opt, lr_at, step):
    """lr_at(step) as one float per param group, each finite and >= 0: checked before it is used."""
    lrs = lr_at(step)
    try:
        lrs = ([float(lrs)] * len(opt.param_groups) if isinstance(lrs, numbers.Real)
               else [float(lr) for lr in lrs])
    except (TypeError, ValueError):
        raise TypeError(f"lr_at({step}) returned {lrs!r}; it must return a number, or a list with "
                        "one number per param group") from None
    if len(lrs) != len(opt.param_groups):
        raise ValueError(f"lr_at({step}) gave {len(lrs)} learning rates for "
                         f"{len(opt.param_groups)} param groups; give one per group (or a single "
                         "number for all)")
    for group, lr in enumerate(lrs):
        if not 0.0 <= lr < math.inf:  # False for NaN too
            raise ValueError(f"lr_at({step}) gave lr {lr} for param group {group}, before step "
                             f"{step} changed anything: a learning rate must be finite and >= 0 "
                             "(a negative one climbs the loss, NaN or inf wrecks the weights); "
                             "check lr_at")
    return lrs


def check_epoch_length(batches, epoch, seen, steps_per_epoch, skip):
    """An epoch must give as many batches as len(train) says: fewer or more would shift every
    step."""
    expected = steps_per_epoch - skip  # a resumed epoch skips the batches already done
    if seen < expected:
        raise ValueError(f"train gave {seen} batches in epoch {epoch} but len(train) = "
                         f"{steps_per_epoch}"
                         f"{f' (less the {skip} skipped on resuming)' if skip else ''}: a one-shot "
                         "generator or iterator runs dry after one pass. Give fit batches it can "
                         "read every epoch: Batches, a DataLoader or a list")
    if next(batches, None) is not None:
        raise ValueError(f"train gave more batches in epoch {epoch} than len(train) = "
                         f"{steps_per_epoch}: make its len() the number of batches an epoch gives")


def raise_clearly(error, x, y, model, where):
    """Raise an error torch gave on a batch again, in words that say what to do; unknown ones
    unchanged."""
    text, weight = str(error), next(model.parameters())
    if y is not None and "out of bounds" in text:  # IndexError: Target 7 is out of bounds.
        raise ValueError(f"{where}: labels must be class indices 0 .. n_classes - 1; this batch's "
                         f"run {int(y.min())} .. {int(y.max())} ({text}) Check the labels, or give "
                         "the model as many outputs as there are classes") from error
    # torch: "expected target dtype to be Long"
    if y is not None and "target" in text and not y.dtype == torch.long:
        raise TypeError(f"{where}: the labels are {y.dtype}, the loss needs integer class indices "
                        f"(torch.long): pass y.long() ({text})") from error
    if "Expected more than 1 value per channel when training" in text:
        raise ValueError(f"{where}: a training batch of {len(x)} sample; BatchNorm in train mode "
                         "needs more than one. It is the last, short batch of the epoch (one "
                         "sample left over after the full batches): use "
                         "Batches(..., drop_last=True) (or DataLoader(..., drop_last=True)), or "
                         "another batch_size") from error
    channels = re.search(r"to have (\d+) channels, but got (\d+) channels", text)
    if channels:
        want, got = channels.groups()
        raise ValueError(f"{where}: the images have {got} channels, the model's first layer takes "
                         f"{want} (input {tuple(x.shape)}): build the model for {got} channels, or "
                         "convert the images (grey to RGB: x.expand(-1, 3, -1, -1); RGB to grey: "
                         "x.mean(1, keepdim=True))") from error
    widths = re.search(r"running_mean should contain (\d+) elements not (\d+)", text)
    if widths:  # a BatchNorm layer fed another width: its name, from the running_mean it holds
        got, want = (int(n) for n in widths.groups())
        layers = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
                  if isinstance(getattr(m, "running_mean", None), torch.Tensor)
                  and m.running_mean.numel() == want]
        raise ValueError(f"{where}: layer {' or '.join(layers) or '(a BatchNorm)'} expects {want} "
                         f"features per sample (channels, for images) but got {got} (input "
                         f"{tuple(x.shape)}): the input and this layer come from different models "
                         "or widths. A head on precomputed features: take the body and the head "
                         f"from one model (body_and_head), or build the head for {got} "
                         "features") from error
    if x.dtype != weight.dtype and "type" in text:  # Input type (double) and bias type (float) ...
        raise TypeError(f"{where}: the images are {x.dtype}, the model's weights {weight.dtype}: "
                        f"pass x.to({weight.dtype}) (uint8 pixels: x.float() / 255, as Batches "
                        f"does) ({text})") from error
    if "to match target batch_size" in text:
        raise ValueError(f"{where}: the batch holds {len(x)} images but {len(y)} labels; "
                         "check how it is built") from error
    raise error


def _ignore_index(loss_fn):
    """cross_entropy's ignore_index as loss_fn sets it (a partial, nn.CrossEntropyLoss), else
    -100."""
    if isinstance(loss_fn, functools.partial):
        return loss_fn.keywords.get("ignore_index", -100)
    return getattr(loss_fn, "ignore_index", -100)


def not_finite(loss_value, step, epoch, lrs, x, y, logits, model, loss_fn, batch_losses, first):
    """What a non-finite loss came from, in words; only computed on the way to the error."""
    where = f"loss is {loss_value} at step {step} (epoch {epoch}) with lr {lrs}: "
    bad_weights = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    bad_inputs = int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
    if not y.is_floating_point() and bool((y == _ignore_index(loss_fn)).all()):
        return where + (f"every label in this batch is ignore_index ({_ignore_index(loss_fn)}), "
                        "so the mean is over no samples; drop such batches (or mask them out) "
                        "before fit")
    if bad_inputs:
        return where + (f"this batch's inputs hold {bad_inputs} NaN/inf values: "
                        "check the data (and augment)")
    if not torch.isfinite(logits).all():
        if first and bad_weights:
            return where + ("the model's outputs are non-finite before any step of this fit: its "
                            f"weights {bad_weights[:5]} already hold NaN/inf. Reload or "
                            "re-initialise them (the learning rate is not the cause)")
        if first:
            return where + ("the model's outputs are non-finite before any step of this fit, "
                            "from finite inputs and weights: the forward pass makes them (a log, "
                            "sqrt or division in the model, or an overflow); check the model (the "
                            "learning rate is not the cause)")
        return where + ("the model's outputs went non-finite during training (non-finite weights: "
                        f"{bad_weights[:5] or 'none'}): the steps blew the weights up; lower the "
                        "learning rate (try 10x lower)")
    recent = batch_losses[-20:]
    if recent and recent[-1] > 2 * min(recent):
        return where + (f"the loss grew from {min(recent):.4g} to {recent[-1]:.4g} over the last "
                        f"{len(recent)} steps and overflowed; lower the learning rate "
                        "(try 10x lower)")
    return where + ("the model's outputs are finite, so loss_fn made it: check loss_fn and the "
                    "labels; if the loss was rising, lower the learning rate (try 10x lower)")
