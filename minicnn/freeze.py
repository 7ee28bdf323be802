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
import numbers
import weakref

import torch
from torch import nn

# SyncBatchNorm: what convert_sync_batchnorm turns them into
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# BN layer -> handle of its eval-mode forward pre-hook (torch's own extension point; nothing is
# patched). A deep copy of a model keeps the hooks but not these entries: copy state_dicts.
_hooks = weakref.WeakKeyDictionary()


def _layer_groups(model):
    groups = getattr(model, "layer_groups", None)
    if groups is None:
        raise TypeError(f"{type(model).__name__} has no layer_groups; use a model from "
                        "minicnn.models or give yours a `layer_groups` list of modules "
                        "(early body, ..., head)")
    if not isinstance(groups, (list, tuple, nn.ModuleList, nn.Sequential)) or not groups \
            or not all(isinstance(g, nn.Module) for g in groups):
        raise TypeError(f"{type(model).__name__}.layer_groups must be a non-empty list of modules "
                        f"(early body, ..., head), got {type(groups).__name__} {groups!r:.80}")
    return list(groups)


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


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


def freeze_to(model, n, *, train_bn=True):
    """Freeze layer groups 0..n-1, make groups n.. trainable; 0 <= n < number of groups.

    train_bn=True (fastai 2's default): BatchNorm layers in frozen groups still train (weights
    and statistics); False (fastai 0.7): they are frozen and stay in eval mode, on their running
    statistics, even after model.train(), so the frozen body is exactly the function it was.
    """
    groups = _layer_groups(model)
    _check_bool("train_bn", train_bn)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n < len(groups):
        raise ValueError(f"freeze_to: n={n!r} must be an int in 0..{len(groups) - 1} "
                         f"(this model has {len(groups)} layer groups; n={len(groups)} would "
                         "leave nothing to train)")
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
    freeze_to(model, len(_layer_groups(model)) - 1, train_bn=train_bn)


def unfreeze(model):
    """Every layer group trains; BatchNorm layers go back to the model's mode."""
    freeze_to(model, 0)


def bn_freeze(model, frozen=True):
    """frozen=True: every BatchNorm layer of the body (all groups but the head) runs in eval mode,
    on its running statistics, even after model.train(); its weights still train if their group
    does. False: back to freeze_to's state (only frozen groups' BN with train_bn=False stay).
    freeze_to and unfreeze undo it: call it after them. The head's BN layers were made for
    this data and keep training (fastai 0.7 froze those too)."""
    groups = _layer_groups(model)
    _check_bool("frozen", frozen)
    for group in groups[:-1]:
        for bn in (m for m in group.modules() if isinstance(m, BATCH_NORMS)):
            if frozen:
                _keep_in_eval(bn)
            elif bn.weight is not None and bn.weight.requires_grad:  # frozen by freeze_to: keep
                _release(bn, model.training)


def _check_lr(lr, what):
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0 or lr == float("inf"):
        raise ValueError(f"{what} must be a positive finite number, got {lr!r}")


def param_groups(model, lrs, **hyper):
    """One optimizer param group per layer group, frozen ones included -> list of dicts.

    lrs: one number for all groups, or a list with one LR per layer group.
    hyper: other settings copied into every group (momentum=0.9, weight_decay=1e-4, ...).
    Use: SGD(param_groups(model, differential_lrs(1e-2, 3, ratio=10), momentum=0.9), lr=1e-2).
    """
    groups = _layer_groups(model)
    for key in ("params", "lr"):
        if key in hyper:
            raise ValueError(f"param_groups: {key}= is set here, one per layer group; "
                             "give lrs instead and only other settings (momentum=, weight_decay=) "
                             "as keywords")
    grouped = [id(p) for group in groups for p in group.parameters()]
    if len(grouped) != len(set(grouped)):
        raise ValueError("param_groups: a parameter is in more than one layer group; "
                         "each must hold its own")
    everything = model.parameters() if isinstance(model, nn.Module) else ()
    outside = len({id(p) for p in everything} - set(grouped))
    if outside:
        raise ValueError(f"param_groups: {outside} parameter tensors of the model are in no "
                         "layer group, so no optimizer group would train them; put every module "
                         "in one of model.layer_groups")
    if isinstance(lrs, torch.Tensor) and lrs.dim() == 0:
        lrs = lrs.item()
    if isinstance(lrs, numbers.Real):
        lrs = [lrs] * len(groups)
    if isinstance(lrs, (str, bytes)) or not hasattr(lrs, "__iter__"):
        raise ValueError(f"param_groups: lrs must be a number or a list of {len(groups)} numbers "
                         f"(one per layer group), got {lrs!r}")
    lrs = list(lrs)
    if len(lrs) != len(groups):
        raise ValueError(f"param_groups: {len(lrs)} learning rates for {len(groups)} layer groups; "
                         f"give one per group, e.g. differential_lrs(lr, {len(groups)}, ratio=3)")
    for i, lr in enumerate(lrs):
        _check_lr(lr, f"param_groups: lrs[{i}]")
    return [{"params": list(group.parameters()), "lr": lr, **hyper}
            for group, lr in zip(groups, lrs)]


def differential_lrs(lr, n_groups, *, ratio):
    """[lr / ratio**(n_groups-1), ..., lr / ratio, lr]: each group `ratio` times lower than the
    next."""
    _check_lr(lr, "differential_lrs: lr")
    if isinstance(n_groups, bool) or not isinstance(n_groups, numbers.Integral) or n_groups < 1:
        raise ValueError(f"differential_lrs: n_groups={n_groups!r} must be an int >= 1")
    if (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)
            or not 1 <= ratio < float("inf")):
        raise ValueError(f"differential_lrs: ratio={ratio!r} must be >= 1 "
                         "(3 to 10 is usual; 1 = one LR)")
    return [lr / ratio ** (n_groups - 1 - i) for i in range(n_groups)]  # lr_g = lr / ratio**(G-1-g)


def discriminative_lrs(lr, n_groups, *, ratio):
    """Deprecated name of differential_lrs (fastai 2 says "discriminative", the course
    "differential")."""
    import warnings
    warnings.warn("discriminative_lrs is now differential_lrs", DeprecationWarning, stacklevel=2)
    return differential_lrs(lr, n_groups, ratio=ratio)
