"""Test-time augmentation (TTA): predict each image as the mean of the model's probabilities
over its plain view and n_aug randomly augmented views, in eval mode under no_grad.

    beta=None:  p = (p_plain + p_aug_1 + ... + p_aug_n) / (n + 1)                  (fastai 0.7)
    beta given: p = beta * p_plain + (1 - beta) * (p_aug_1 + ... + p_aug_n) / n    (fastai 2)
with p_v = softmax(model(view v)): probabilities, not logits (softmax of the mean logit is
a geometric mean, where one confident view vetoes a class the others agree on).

Source: fast.ai 2018 lesson 2 (learn.TTA(): the plain view plus 4 augmented views); fastai 2's
Learner.tta (n=4, beta=0.25). Copied alone it works with any augment function; a preset given
by name ("side_on") needs minicnn/augment.py too (imported only then).
"""
import numbers

import torch


def _augmentation(augment, generator):
    if isinstance(augment, str):
        from minicnn.augment import AUGMENTATIONS               # only for a preset given by name
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)} or a function "
                             f"x -> x, got {augment!r}")
        return AUGMENTATIONS[augment](generator=generator)
    if not callable(augment):
        raise TypeError("augment must be a function x -> x or a preset name, "
                        f"got {type(augment).__name__}")
    if generator is not None:
        raise ValueError("generator is used only with a preset name; a function x -> x draws from "
                         "its own generator (make it with side_on(generator=g))")
    return augment


def predict_tta(model, batches, *, augment, n_aug=4, generator=None, beta=None):
    """-> probabilities (N, n_classes), float32 on the CPU, in the order of `batches`.

    batches: an iterable of (x, y) with x float in [0, 1] on the model's device (y unused).
    augment: a function x -> x, or "side_on" / "top_down" built with `generator`.
    n_aug: augmented views per image (0: the plain prediction).
    beta: weight of the plain view (fastai 2 uses 0.25); None: all n_aug + 1 views equal.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a module (x -> logits), got {type(model).__name__}")
    if isinstance(batches, torch.Tensor) or not hasattr(batches, "__iter__"):
        raise TypeError("batches must be an iterable of (x, y) pairs (a Batches, a DataLoader, "
                        f"a list), got {type(batches).__name__}; "
                        "for one tensor x pass [(x, None)]")
    augment = _augmentation(augment, generator)
    if isinstance(n_aug, bool) or not isinstance(n_aug, int) or n_aug < 0:
        raise ValueError(f"n_aug must be an int >= 0, got {n_aug!r}")
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, numbers.Real)
                             or not 0 <= beta <= 1):
        raise ValueError(f"beta must be in [0, 1] or None, got {beta!r}")
    if beta is not None and n_aug == 0 and beta != 1:
        raise ValueError("beta mixes the plain view with augmented ones; give n_aug >= 1")
    # eval mode (running BN statistics, no dropout); each module's own mode is put back, even
    # after an error, so a frozen BN inside a training model stays in eval mode
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            probs = [_predict_batch(model, _images(batch, i), augment, n_aug, beta).float().cpu()
                     for i, batch in enumerate(batches)]
    finally:
        for module, training in modes.items():
            module.training = training
    if not probs:
        raise ValueError("predict_tta got no batches "
                         "(an empty dataset, or an iterator already used up?)")
    return torch.cat(probs)


def _images(batch, i):
    """x of batch i, a pair (x, y): float images (B, C, H, W)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = (f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor)
                else type(batch).__name__)
        raise TypeError(f"batch {i} must be a pair (x, y), got {what}; "
                        "pass [(x, None)] for images alone")
    x = batch[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"batch {i}: x must be float images in [0, 1], got {what}; "
                        "convert uint8 with x.float() / 255")
    return x


def _softmax(logits, x):
    if logits.dim() != 2 or len(logits) != len(x):
        raise ValueError(f"the model gave {tuple(logits.shape)} for {len(x)} images; "
                         f"predict_tta needs logits ({len(x)}, n_classes)")
    return torch.softmax(logits, dim=1)                                  # (B, n_classes)


def _predict_batch(model, x, augment, n_aug, beta):
    plain = _softmax(model(x), x)                         # p_plain, (B, n_classes)
    if n_aug == 0:
        return plain
    # (p_aug_1 + ... + p_aug_n) / n
    augmented = sum(_softmax(model(augment(x)), x) for _ in range(n_aug)) / n_aug
    if beta is None:
        return (plain + n_aug * augmented) / (n_aug + 1)  # (p_plain + sum p_aug) / (n + 1)
    return beta * plain + (1 - beta) * augmented          # beta * p_plain + (1 - beta) * mean
