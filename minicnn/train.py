"""The training loop, written out: one `for` over minibatches, its phases labelled.

Per minibatch, in this order (the order fastai's callbacks hide):
    lrs = lr_at(step)                 set every param group's LR (the schedule)
    loss = loss_fn(model(augment(x)), y)
    loss.backward(); after_backward(model, n, loss)    the one place another process may join in
    opt.step(); opt.zero_grad()                       theta <- theta - lr * grad(loss)
    record loss and LRs; at a cycle's last step call on_cycle_end(model, step)
`step` counts minibatches over the whole run (epoch * len(train) + i), so a schedule is a
pure function of it and a run resumed at `start_step` sees the same LRs and the same batches.
Sources: fast.ai 2018 lessons 1-2; the loop's shape follows nanoGPT's train.py.
Copy with minicnn/fit_checks.py (what fit refuses). docs/training_loop.md: bad input, torchrun.
"""
import contextlib
import itertools
import math
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from minicnn.fit_checks import (check_epoch_length, check_fit, check_one_process, lrs_for,
                                not_finite, raise_clearly)


def fit(model, train, valid, opt, lr_at, end_epoch, *, loss_fn=F.cross_entropy, augment=None,
        on_cycle_end=None, cycle_ends=(), start_step=0, train_eval=None, device=None,
        mixed_precision=None, channels_last=None, verbose=True, after_backward=None, all_sum=None):
    """Train from global step start_step up to (not including) epoch end_epoch -> History.

    train: (x, y) minibatches with a len(), read again each epoch: Batches, a DataLoader, a list.
    end_epoch: the epoch to stop before (from scratch, the number of epochs).
    lr_at(step): one LR, or a list with one per param group; each finite and >= 0.
    valid, train_eval (a training sample): evaluated after each epoch; augment: x -> x, train only.
    on_cycle_end(model, step): after each step in cycle_ends.
    after_backward(model, n, loss) -> loss: between backward and step (n: the batch's samples);
        under torchrun distributed.average_gradients, with all_sum=distributed.all_sum.
    mixed_precision (bf16), channels_last: None = on for CUDA only.
    """
    steps_per_epoch, cycle_ends = check_fit(model, train, valid, train_eval, end_epoch, start_step,
                                            cycle_ends, on_cycle_end)
    check_one_process("fit", after_backward, "after_backward=distributed.average_gradients")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    use_channels_last = device.type == "cuda" if channels_last is None else channels_last
    model.to(device,
             memory_format=torch.channels_last if use_channels_last else torch.preserve_format)
    history, live = History(), verbose and sys.stdout.isatty()
    for epoch in range(start_step // steps_per_epoch, end_epoch):
        model.train()
        started, losses = time.perf_counter(), []
        skip = max(0, start_step - epoch * steps_per_epoch)  # resumed mid-epoch: batches done
        batches = (iter(train.epoch(epoch, skip=skip)) if hasattr(train, "epoch")  # Batches
                   else itertools.islice(iter(train), skip, None))  # a DataLoader, a list
        for i, (x, y) in zip(range(skip, steps_per_epoch), batches):
            step = epoch * steps_per_epoch + i
            # set lr: the schedule is a function of the global step
            lrs = lrs_for(opt, lr_at, step)
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
            # forward
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if augment is not None:
                x = augment(x)
            if use_channels_last and x.dim() == 4:  # feature batches (N, F) have no layout
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                with _autocast(device, mixed_precision):
                    logits = model(x).float()
                    loss = loss_fn(logits, y)
            except (RuntimeError, IndexError, ValueError) as error:  # torch's words -> what to do
                raise_clearly(error, x, y, model, f"fit, step {step} (epoch {epoch})")
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(not_finite(loss_value, step, epoch, lrs, x, y, logits,
                                                    model, loss_fn, history.batch_loss))
            # backward; the hook (torchrun: g = (1/W) * sum_r g_r, the mean loss); step
            loss.backward()
            if after_backward is not None:
                loss_value = after_backward(model, len(y), loss_value)
            opt.step()
            opt.zero_grad()
            # record; the hook sees the weights as they are at the end of the cycle
            history.batch_loss.append(loss_value)
            history.batch_lr.append(lrs)
            losses.append(loss_value)
            if step in cycle_ends:
                on_cycle_end(model, step)
            if live:  # images/s so far; left = elapsed / batches done * batches to go
                done, elapsed = i + 1 - skip, time.perf_counter() - started
                print(f"\r  epoch {epoch}: batch {i + 1}/{steps_per_epoch} loss {loss_value:.4f}, "
                      f"{done * len(y) / elapsed:.0f} images/s, {elapsed:.0f}s elapsed, "
                      f"{elapsed / done * (steps_per_epoch - i - 1):.0f}s left", end="", flush=True)
        check_epoch_length(batches, epoch, skip + len(losses), steps_per_epoch)
        # evaluate
        history.train_loss.append(sum(losses) / max(len(losses), 1))
        measure = dict(loss_fn=loss_fn, mixed_precision=mixed_precision, all_sum=all_sum)
        if train_eval is not None:
            history.train_eval_loss.append(evaluate(model, train_eval, **measure)[0])
        if valid is not None:
            valid_loss, valid_acc = evaluate(model, valid, **measure)
            history.valid_loss.append(valid_loss)
            history.valid_acc.append(valid_acc)
        history.seconds.append(time.perf_counter() - started)
        if verbose:
            line = f"epoch {epoch:3d}  train loss {history.train_loss[-1]:.4f}"
            if valid is not None:
                line += f"  valid loss {valid_loss:.4f}  accuracy {valid_acc:.4f}"
            print(("\r" if live else "") + line + f"  {history.seconds[-1]:.1f}s", flush=True)
    return history


@dataclass
class History:
    """Per-minibatch and per-epoch records of a run, as plain lists."""
    batch_loss: list = field(default_factory=list)       # one float per step
    batch_lr: list = field(default_factory=list)         # one list of group LRs per step
    train_loss: list = field(default_factory=list)  # mean minibatch loss per epoch (train mode)
    valid_loss: list = field(default_factory=list)
    valid_acc: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    train_eval_loss: list = field(default_factory=list)  # eval-mode loss on a training sample


def evaluate(model, batches, *, loss_fn=F.cross_entropy, mixed_precision=None, all_sum=None):
    """-> (mean loss, accuracy) over all samples, in eval mode under no_grad; modes restored.
    Under torchrun all_sum=distributed.all_sum adds up the ranks' sums (loss * n, correct, n)."""
    check_one_process("evaluate", all_sum, "all_sum=distributed.all_sum")
    device, loss_sum, correct, count = next(model.parameters()).device, 0.0, 0, 0
    with _eval_mode(model), _autocast(device, mixed_precision):
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            try:
                logits = model(x).float()
                loss = loss_fn(logits, y)
            except (RuntimeError, IndexError, ValueError) as error:
                raise_clearly(error, x, y, model, "evaluate")
            loss_sum += float(loss) * len(y)  # mean -> sum
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    if all_sum is not None:  # several processes: the sums of every rank's part, added up
        sums = all_sum(torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=device))
        loss_sum, correct, count = sums[0].item(), int(sums[1]), int(sums[2])
    if count == 0:
        raise ValueError("evaluate got no samples (a generator already used up?)")
    return loss_sum / count, correct / count


def predict(model, batches, *, mixed_precision=None):
    """-> softmax probabilities (N, n_classes), float32 on the CPU, in the batches' order."""
    device, probs = next(model.parameters()).device, []
    with _eval_mode(model), _autocast(device, mixed_precision):
        for x, _ in batches:
            x = x.to(device, non_blocking=True)
            try:
                logits = model(x).float()
            except (RuntimeError, ValueError) as error:
                raise_clearly(error, x, None, model, "predict")
            probs.append(torch.softmax(logits, dim=1).cpu())
    if not probs:
        raise ValueError("predict got no batches (a generator already used up?)")
    return torch.cat(probs)


def accuracy(scores, y):
    """Fraction of samples whose highest score (probability or logit: same argmax) is the label."""
    scores, y = torch.as_tensor(scores), torch.as_tensor(y)
    if scores.dim() != 2 or y.shape != scores.shape[:1] or len(y) == 0:  # (N, 1) would broadcast
        raise ValueError(f"accuracy: scores {tuple(scores.shape)}, labels {tuple(y.shape)}")
    return (scores.argmax(1) == y.to(scores.device)).float().mean().item()


def join_histories(histories):
    """The consecutive fits of one run (e.g. one per SGDR cycle) as one History, lists in order."""
    histories = list(histories)
    for name in ("valid_loss", "valid_acc", "train_eval_loss"):  # per epoch, recorded or not
        recorded = {bool(getattr(h, name)) for h in histories if h.train_loss}
        if len(recorded) > 1:  # the epochs would not line up
            raise ValueError(f"join_histories: some fits recorded {name} and some did not")
    return History(**{f.name: [v for h in histories for v in getattr(h, f.name)]  # lists joined
                      for f in fields(History)})


def _autocast(device, mixed_precision):  # bf16, by default on CUDA only
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=(
        device.type == "cuda" if mixed_precision is None else mixed_precision))


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode under no_grad; then each module's own mode back (a frozen BatchNorm stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
