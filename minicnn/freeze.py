"""Freezing by layer group, and one optimizer group (with its own LR) per layer group.

model.layer_groups: modules (early body, late body, head) that hold every parameter once.
    freeze_to(model, n)            groups 0..n-1 frozen (requires_grad False), groups n.. train
    freeze(model), unfreeze(model) only the last group (the head) trains; every group trains
    bn_freeze(model)               the body's BatchNorm layers keep their running statistics
    param_groups(model, lrs)       [{"params": group 0's, "lr": lrs[0]}, ...], frozen groups too
    differential_lrs(lr, n, ratio=r) = [lr / r**(n-1), ..., lr / r, lr]
A frozen parameter gets no gradient, so SGD gives it no decay and no momentum: it stays the
same bit for bit. Earlier groups get 3x-10x lower LRs: differential learning rates.

Source: fast.ai 2018 lesson 2 (freeze, unfreeze, bn_freeze, lr=[1e-4, 1e-3, 1e-2]); fastai 2's
train_bn. How BatchNorm is kept in eval mode, and the measurements behind it: docs/fine_tuning.md.
"""
import math
import numbers
import weakref

import torch
from torch import nn

# SyncBatchNorm: what convert_sync_batchnorm turns them into
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# BN layer -> handle of its eval-mode forward pre-hook (torch's own extension point; nothing is
# patched). A deep copy of a model keeps the hooks but not these entries: copy state_dicts.
_hooks = weakref.WeakKeyDictionary()


def freeze_to(model, n, *, train_bn=True):
    """Freeze layer groups 0..n-1, make groups n.. trainable; 0 <= n < number of groups.

    train_bn=True (fastai 2's default): BatchNorm layers in frozen groups still train (weights
    and statistics); False (fastai 0.7): they are frozen and stay in eval mode, on their running
    statistics, even after model.train(), so the frozen body is exactly the function it was.
    """
    groups = list(model.layer_groups)
    if not 0 <= n < len(groups):  # n = len(groups) would leave nothing to train
        raise ValueError(f"freeze_to: n={n} must be in 0..{len(groups) - 1}")
    for i, group in enumerate(groups):
        frozen = i < n
        for module in group.modules():
            is_bn = isinstance(module, BATCH_NORMS)
            if is_bn:  # start clean: every BN layer in the model's mode, no hook
                _release(module, model.training)
            trainable = not frozen or (is_bn and train_bn)
            for p in module.parameters(recurse=False):
                # requires_grad = (group index >= n), or a BN with train_bn
                p.requires_grad_(trainable)
                if not trainable:
                    # an optimizer skips a parameter without gradient: no decay, no momentum
                    p.grad = None
            if is_bn and frozen and not train_bn:
                _keep_in_eval(module)


def freeze(model, *, train_bn=True):
    """Only the last layer group (the head) trains."""
    freeze_to(model, len(model.layer_groups) - 1, train_bn=train_bn)


def unfreeze(model):
    """Every layer group trains; BatchNorm layers go back to the model's mode."""
    freeze_to(model, 0)


def bn_freeze(model, frozen=True):
    """frozen=True: every BatchNorm layer of the body (all groups but the head) runs in eval mode,
    on its running statistics, even after model.train(); its weights still train if their group
    does. False: back to freeze_to's state (only frozen groups' BN with train_bn=False stay).
    freeze_to and unfreeze undo it: call it after them. The head's BN layers were made for
    this data and keep training (fastai 0.7 froze those too)."""
    for group in list(model.layer_groups)[:-1]:
        for bn in (m for m in group.modules() if isinstance(m, BATCH_NORMS)):
            if frozen:
                _keep_in_eval(bn)
            elif bn.weight is not None and bn.weight.requires_grad:  # frozen by freeze_to: keep
                _release(bn, model.training)


def _run_in_eval(bn, inputs):
    """Forward pre-hook: this BN layer normalises with its running statistics, which stay fixed."""
    bn.training = False  # only this layer; the rest of the model keeps its mode


def _keep_in_eval(bn):
    if bn not in _hooks:
        _hooks[bn] = bn.register_forward_pre_hook(_run_in_eval)
    bn.eval()


def _release(bn, training):
    if bn in _hooks:
        _hooks.pop(bn).remove()
        bn.train(training)


def differential_lrs(lr, n_groups, *, ratio):
    """[lr / ratio**(n_groups-1), ..., lr / ratio, lr]: each group `ratio` times lower than the
    next (3 to 10 is usual; 1 gives one LR)."""
    if not (0 < lr < math.inf and n_groups >= 1 and 1 <= ratio < math.inf):
        raise ValueError(f"need lr > 0, n_groups >= 1, ratio >= 1: {lr=}, {n_groups=}, {ratio=}")
    return [lr / ratio ** (n_groups - 1 - i) for i in range(n_groups)]  # lr_g = lr / ratio**(G-1-g)


def param_groups(model, lrs, **hyper):
    """One optimizer param group per layer group, frozen ones included -> list of dicts.

    lrs: one number for all groups, or a list with one LR per layer group.
    hyper: other settings copied into every group (momentum=0.9, weight_decay=1e-4, ...);
    params= and lr= are set here, per group (dict() refuses them twice).
    Use: SGD(param_groups(model, differential_lrs(1e-2, 3, ratio=10), momentum=0.9), lr=1e-2).
    An optimizer refuses a parameter that is in two layer groups.
    """
    groups = list(model.layer_groups)
    grouped = {id(p) for group in groups for p in group.parameters()}
    outside = [name for name, p in model.named_parameters() if id(p) not in grouped]
    if outside:  # no optimizer group would train them
        raise ValueError(f"param_groups: {', '.join(outside[:4])} in no layer group; add to one")
    if isinstance(lrs, torch.Tensor) and lrs.dim() == 0:
        lrs = lrs.item()
    lrs = [lrs] * len(groups) if isinstance(lrs, numbers.Real) else list(lrs)
    if len(lrs) != len(groups) or not all(0 < lr < math.inf for lr in lrs):  # NaN fails too
        raise ValueError(f"param_groups: lrs={lrs} must be {len(groups)} finite numbers > 0")
    return [dict(params=list(group.parameters()), lr=lr, **hyper)
            for group, lr in zip(groups, lrs)]
