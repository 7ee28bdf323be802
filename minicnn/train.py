"""The training loop, written out: one `for` over minibatches, its phases labelled.

Per minibatch, in this order (the order fastai's callbacks hide):
    lrs = lr_at(step)                 set every param group's LR (the schedule)
    loss = loss_fn(model(augment(x)), y)
    loss.backward(); after_backward(model, n, loss)    the one place another process may join in
    opt.step(); opt.zero_grad()                       theta <- theta - lr * grad(loss)
    record loss and LRs; at a cycle's last step call on_cycle_end(model, step)
Under torchrun, after_backward=distributed.average_gradients (g = (1/W) * sum_r g_r) and
all_sum=distributed.all_sum (evaluate adds up the ranks' sums): docs/distributed.md.
`step` counts minibatches over the whole run (epoch * len(train) + i), so a schedule is a
pure function of it and a run resumed at `start_step` sees the same LRs and the same batches.
Sources: fast.ai 2018 lessons 1-2; the loop's shape follows nanoGPT's train.py.
Needs minicnn/fit_checks.py: what fit refuses before its first step, and its words for torch's
errors.
docs/training_loop.md: what `train` may be, bad input and NaN, mixed precision, the loop's cost.
"""
import itertools
import math
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from minicnn.fit_checks import (check_epoch_length, check_fit, check_one_process, end_epoch_from,
                                lrs_for, not_finite, raise_clearly)


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


def join_histories(histories):
    """The consecutive fits of one run (e.g. one per SGDR cycle) as one History, lists in order."""
    histories = list(histories)
    if not histories:
        raise ValueError("join_histories got no histories; pass the list of fit()'s results")
    for i, history in enumerate(histories):
        if not isinstance(history, History):
            raise TypeError(f"histories[{i}] is a {type(history).__name__}, not a train.History")
    for name in ("valid_loss", "valid_acc", "train_eval_loss"):  # per epoch, recorded or not
        recorded = [bool(getattr(h, name)) for h in histories if h.train_loss]
        if any(recorded) and not all(recorded):
            raise ValueError(f"join_histories: fits {[i for i, r in enumerate(recorded) if not r]} "
                             f"recorded no {name} and the others did, so the epochs would not line "
                             "up; join fits that were given the same valid= and train_eval=")
    joined = History()
    for f in fields(History):
        for history in histories:
            getattr(joined, f.name).extend(getattr(history, f.name))
    return joined


def accuracy(scores, y):
    """Fraction of samples whose highest score is their label: probabilities or logits (same
    argmax)."""
    scores, y = torch.as_tensor(scores), torch.as_tensor(y)
    if scores.dim() != 2 or y.dim() != 1 or len(scores) != len(y) or len(y) == 0:
        raise ValueError(f"accuracy needs scores (N, n_classes) and N labels (N,), N >= 1; got "
                         f"scores {tuple(scores.shape)} and labels {tuple(y.shape)}")
    return (scores.argmax(1) == y.to(scores.device)).float().mean().item()


def _use_cuda_tricks(device, flag):
    return device.type == "cuda" if flag is None else flag


def _autocast(device, mixed_precision):
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=_use_cuda_tricks(device, mixed_precision))


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


def evaluate(model, batches, *, loss_fn=F.cross_entropy, mixed_precision=None, all_sum=None):
    """-> (mean loss, accuracy) over all samples, in eval mode under no_grad; modes restored.

    Kept as sums (loss * samples, correct, samples). Under torchrun pass all_sum=distributed.all_sum
    and call it on every rank, each with its own part (distributed.rank_slice): the ranks' sums are
    added up, so each sample counts once."""
    check_one_process("evaluate", all_sum, "all_sum=distributed.all_sum")
    device, restore = _model_device(model), _eval_mode(model)
    loss_sum, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad(), _autocast(device, mixed_precision):
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
    finally:
        restore()
    if all_sum is not None:  # several processes: the sums of every rank's part, added up
        sums = all_sum(torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=device))
        loss_sum, correct, count = sums[0].item(), int(sums[1]), int(sums[2])
    if count == 0:
        raise ValueError("evaluate got no samples (an empty list, or a generator already used "
                         "up?); pass batches that hold at least one sample")
    return loss_sum / count, correct / count


def predict(model, batches, *, mixed_precision=None):
    """-> softmax probabilities (N, n_classes), float32 on the CPU, in the batches' order."""
    device, restore = _model_device(model), _eval_mode(model)
    probs = []
    try:
        with torch.no_grad(), _autocast(device, mixed_precision):
            for x, _ in batches:
                x = x.to(device, non_blocking=True)
                try:
                    logits = model(x).float()
                except (RuntimeError, ValueError) as error:
                    raise_clearly(error, x, None, model, "predict")
                probs.append(torch.softmax(logits, dim=1).cpu())
    finally:
        restore()
    if not probs:
        raise ValueError("predict got no batches (an empty list, or a generator already used up?); "
                         "pass batches that hold at least one image")
    return torch.cat(probs)


def fit(model, train, valid, opt, lr_at, end_epoch=None, *, loss_fn=F.cross_entropy, augment=None,
        on_cycle_end=None, cycle_ends=(), start_step=0, train_eval=None, device=None,
        mixed_precision=None, channels_last=None, verbose=True, epochs=None, after_backward=None,
        all_sum=None):
    """Train up to (not including) epoch `end_epoch`, from global step start_step -> History of the
    steps run.

    train: (x, y) minibatches with len() = batches per epoch, read once each epoch: minicnn's
        Batches (as train.epoch(e, skip=k)), a torch DataLoader or a list (iter(train), the first
        k batches skipped when a run resumes mid-epoch). Each batch is moved to the model's device.
    end_epoch: the epoch to stop before: from scratch, the number of epochs; resumed, where the
        whole run ends (steps start_step .. end_epoch * len(train) - 1). epochs= is its old name.
    lr_at(step): a number, or a list with one LR per param group; each must be finite and >= 0.
    valid, train_eval (a training sample, no augmentation): evaluated at each epoch's end; None
        skips.
    augment: x -> x on training batches only. on_cycle_end(model, step) runs after each step in
    cycle_ends. mixed_precision (bf16), channels_last: None = on for CUDA only.
    after_backward(model, n, loss) -> loss: runs between backward and the step (n: the batch's
    samples); under torchrun distributed.average_gradients, with all_sum=distributed.all_sum.
    """
    end_epoch = end_epoch_from(end_epoch, epochs)
    steps_per_epoch, cycle_ends = check_fit(model, train, valid, opt, lr_at, end_epoch, start_step,
                                            train_eval, cycle_ends, on_cycle_end)
    device = torch.device(device) if device is not None else _model_device(model)
    use_channels_last = _use_cuda_tricks(device, channels_last)
    model.to(device,
             memory_format=torch.channels_last if use_channels_last else torch.preserve_format)
    check_one_process("fit", after_backward, "after_backward=distributed.average_gradients")
    history, live = History(), verbose and sys.stdout.isatty()
    for epoch in range(start_step // steps_per_epoch, end_epoch):
        model.train()
        started, losses = time.perf_counter(), []
        # resumed mid-epoch: batches already done
        skip = max(0, start_step - epoch * steps_per_epoch)
        batches, i = _epoch(train, epoch, skip), skip - 1
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
            # feature batches (N, F) have no layout to change
            if use_channels_last and x.dim() == 4:
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
                                                    model, loss_fn, history.batch_loss,
                                                    step == start_step))
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
        check_epoch_length(batches, epoch, i + 1 - skip, steps_per_epoch, skip)
        # evaluate
        history.train_loss.append(sum(losses) / max(len(losses), 1))
        if train_eval is not None:
            history.train_eval_loss.append(evaluate(
                model, train_eval, loss_fn=loss_fn, mixed_precision=mixed_precision,
                all_sum=all_sum)[0])
        if valid is not None:
            valid_loss, valid_acc = evaluate(model, valid, loss_fn=loss_fn,
                                             mixed_precision=mixed_precision, all_sum=all_sum)
            history.valid_loss.append(valid_loss)
            history.valid_acc.append(valid_acc)
        history.seconds.append(time.perf_counter() - started)
        if verbose:
            line = f"epoch {epoch:3d}  train loss {history.train_loss[-1]:.4f}"
            if valid is not None:
                line += (f"  valid loss {history.valid_loss[-1]:.4f}"
                         f"  accuracy {history.valid_acc[-1]:.4f}")
            print(("\r" if live else "") + line + f"  {history.seconds[-1]:.1f}s", flush=True)
    return history


def _epoch(train, epoch, skip):
    """Epoch `epoch`'s batches from batch `skip` on: train.epoch(epoch, skip=skip) if it has it."""
    if hasattr(train, "epoch"):
        return iter(train.epoch(epoch, skip=skip))
    return itertools.islice(iter(train), skip, None)
