"""The training loop, written out: one `for` over minibatches, its phases labelled.

Per minibatch, in this order (the order fastai's callbacks hide):
    lrs = lr_at(step)                 set every param group's LR (the schedule)
    loss = loss_fn(model(augment(x)), y)
    loss.backward(); opt.step(); opt.zero_grad()
    record loss and LRs; at a cycle's last step call on_cycle_end(model, step)
`step` counts minibatches over the whole run, so a schedule is a pure function of
it and a run resumed at `start_step` sees the same LRs and the same batches.

On CUDA the forward pass runs under bf16 autocast (no loss scaling needed, unlike
fp16) with channels_last memory; on the CPU both stay off by default (bf16 is
slower than fp32 on most CPUs, channels_last was no faster for these small nets).

Differs from fastai's Learner.fit: no callbacks, one hook; from a Lightning
Trainer: no hidden state; the loop below is all there is.
"""
import math
import numbers
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class History:
    """Per-minibatch and per-epoch records of a run, as plain lists."""
    batch_loss: list = field(default_factory=list)       # one float per step
    batch_lr: list = field(default_factory=list)         # one list of group LRs per step
    train_loss: list = field(default_factory=list)       # mean minibatch loss per epoch (train mode)
    valid_loss: list = field(default_factory=list)
    valid_acc: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    train_eval_loss: list = field(default_factory=list)  # eval-mode loss on a training sample


def _use_cuda_tricks(device, flag):
    return device.type == "cuda" if flag is None else flag


def _autocast(device, mixed_precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_use_cuda_tricks(device, mixed_precision))


def _model_device(model):
    return next(model.parameters()).device


def _eval_mode(model):
    """Eval mode now; returns a function that gives every module its own mode back (a frozen
    BatchNorm kept in eval mode stays so, which model.train(True) would undo)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()

    def restore():
        for module, training in modes:
            module.training = training
    return restore


def evaluate(model, batches, *, loss_fn=F.cross_entropy, mixed_precision=None):
    """-> (mean loss, accuracy) over all samples, in eval mode under no_grad; modes restored."""
    device, restore = _model_device(model), _eval_mode(model)
    total_loss, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad(), _autocast(device, mixed_precision):
            for x, y in batches:
                logits = model(x).float()
                total_loss += float(loss_fn(logits, y)) * len(y)  # mean -> sum
                correct += int((logits.argmax(1) == y).sum())
                count += len(y)
    finally:
        restore()
    if count == 0:
        raise ValueError("evaluate got no samples")
    return total_loss / count, correct / count


def predict(model, batches, *, mixed_precision=None):
    """-> softmax probabilities (N, n_classes), float32 on the CPU, in the batches' order."""
    device, restore = _model_device(model), _eval_mode(model)
    try:
        with torch.no_grad(), _autocast(device, mixed_precision):
            probs = [torch.softmax(model(x).float(), dim=1).cpu() for x, _ in batches]
    finally:
        restore()
    return torch.cat(probs)


def _lrs_for(opt, lr_at, step):
    lrs = lr_at(step)
    lrs = [float(lrs)] * len(opt.param_groups) if isinstance(lrs, numbers.Real) else [float(lr) for lr in lrs]
    if len(lrs) != len(opt.param_groups):
        raise ValueError(f"lr_at({step}) gave {len(lrs)} learning rates for {len(opt.param_groups)} "
                         "param groups; give one per group (or a single number for all)")
    return lrs


def fit(model, train, valid, opt, lr_at, epochs, *, loss_fn=F.cross_entropy, augment=None,
        on_cycle_end=None, cycle_ends=(), start_step=0, train_eval=None, device=None,
        mixed_precision=None, channels_last=None, verbose=True):
    """Train for `epochs` epochs of `train` (global steps 0 .. epochs*len(train)-1) -> History.

    lr_at(step): a number, or a list with one LR per param group. augment: x -> x on
    float [0, 1] batches, training only. on_cycle_end(model, step) runs after the step
    of each index in cycle_ends. start_step: resume a run at that global step.
    train_eval: Batches of a training sample, evaluated each epoch without augmentation.
    """
    if epochs < 0 or start_step < 0:
        raise ValueError(f"epochs={epochs} and start_step={start_step} must be >= 0")
    device = torch.device(device) if device is not None else _model_device(model)
    use_channels_last = _use_cuda_tricks(device, channels_last)
    model.to(device, memory_format=torch.channels_last if use_channels_last else torch.preserve_format)
    steps_per_epoch, cycle_ends, history = len(train), set(cycle_ends), History()
    if steps_per_epoch == 0:
        raise ValueError("the training batches are empty (fewer samples than one batch with drop_last?)")
    live = verbose and sys.stdout.isatty()
    for epoch in range(start_step // steps_per_epoch, epochs):
        model.train()
        started, losses = time.perf_counter(), []
        skip = start_step - epoch * steps_per_epoch if epoch * steps_per_epoch < start_step else 0
        for i, (x, y) in enumerate(train.epoch(epoch, skip=skip), start=skip):
            step = epoch * steps_per_epoch + i
            # set lr: the schedule is a function of the global step
            lrs = _lrs_for(opt, lr_at, step)
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
            # forward
            if augment is not None:
                x = augment(x)
            if use_channels_last and x.dim() == 4:  # feature batches (N, F) have no layout to change
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, mixed_precision):
                loss = loss_fn(model(x).float(), y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step} (epoch {epoch}) with lr "
                                         f"{lrs}; lower the learning rate (try 10x lower)")
            # backward and step
            loss.backward()
            opt.step()
            opt.zero_grad()
            # record; the hook sees the weights as they are at the end of the cycle
            history.batch_loss.append(loss_value)
            history.batch_lr.append(lrs)
            losses.append(loss_value)
            if step in cycle_ends and on_cycle_end is not None:
                on_cycle_end(model, step)
            if live:
                print(f"\r  epoch {epoch}: batch {i + 1}/{steps_per_epoch} loss {loss_value:.4f}", end="", flush=True)
        # evaluate
        history.train_loss.append(sum(losses) / max(len(losses), 1))
        if train_eval is not None:
            history.train_eval_loss.append(evaluate(model, train_eval, loss_fn=loss_fn, mixed_precision=mixed_precision)[0])
        if valid is not None:
            valid_loss, valid_acc = evaluate(model, valid, loss_fn=loss_fn, mixed_precision=mixed_precision)
            history.valid_loss.append(valid_loss)
            history.valid_acc.append(valid_acc)
        history.seconds.append(time.perf_counter() - started)
        if verbose:
            line = f"epoch {epoch:3d}  train loss {history.train_loss[-1]:.4f}"
            if valid is not None:
                line += f"  valid loss {history.valid_loss[-1]:.4f}  accuracy {history.valid_acc[-1]:.4f}"
            print(("\r" if live else "") + line + f"  {history.seconds[-1]:.1f}s", flush=True)
    return history
