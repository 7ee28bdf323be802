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
import torch


def predict_tta(model, batches, *, augment, n_aug=4, generator=None, beta=None):
    """-> probabilities (N, n_classes), float32 on the CPU, in the order of `batches`.

    batches: an iterable of (x, y) with x float in [0, 1] on the model's device (y unused).
    augment: a function x -> x, or "side_on" / "top_down" built with `generator`.
    n_aug: augmented views per image (0: the plain prediction).
    beta: weight of the plain view (fastai 2 uses 0.25); None: all n_aug + 1 views equal.
    """
    if n_aug < 0 or beta is not None and not 0 <= beta <= 1:  # NaN fails too
        raise ValueError(f"n_aug={n_aug}, beta={beta}: need n_aug >= 0, beta None or in [0, 1]")
    augment = _augmentation(augment, generator)
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
        raise ValueError("predict_tta got no batches (an empty data set, or an iterator used up?)")
    return torch.cat(probs)


def _predict_batch(model, x, augment, n_aug, beta):
    plain = _softmax(model(x), x)                         # p_plain, (B, n_classes)
    if n_aug == 0:
        return plain
    # (p_aug_1 + ... + p_aug_n) / n
    augmented = sum(_softmax(model(augment(x)), x) for _ in range(n_aug)) / n_aug
    if beta is None:
        return (plain + n_aug * augmented) / (n_aug + 1)  # (p_plain + sum p_aug) / (n + 1)
    return beta * plain + (1 - beta) * augmented          # beta * p_plain + (1 - beta) * mean


def _softmax(logits, x):
    """softmax(logits) (B, n_classes) for the B images of x; torch would broadcast other shapes."""
    if logits.dim() != 2 or len(logits) != len(x):
        raise ValueError(f"the model gave {tuple(logits.shape)} for {len(x)} images: not logits")
    return torch.softmax(logits, dim=1)                                  # (B, n_classes)


def _augmentation(augment, generator):
    """A preset name -> its function, drawing from generator; a function x -> x as it is (it
    draws from its own generator: `generator` is not used)."""
    if isinstance(augment, str):
        from minicnn.augment import AUGMENTATIONS               # only for a preset given by name
        return AUGMENTATIONS[augment](generator=generator)    # KeyError: not a preset's name
    return augment


def _images(batch, i):
    """x of batch i, a pair (x, y): float images (B, C, H, W)."""
    x = batch[0]  # a batch that is one tensor (batches = x, or [x]) gives images of 2 or 3 dims
    if not (x.is_floating_point() and x.dim() == 4):  # the model would fail deep inside
        raise TypeError(f"batch {i}: x is {x.dtype} {tuple(x.shape)}; need float x (B, C, H, W)")
    return x
