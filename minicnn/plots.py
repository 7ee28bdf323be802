"""The figures of the lessons: LR finder curve, schedules, losses, augmented samples, confusions.

Each function builds a matplotlib Figure on the Agg canvas (no pyplot: no window, no global
figure list to leak memory in long runs), saves it as a PNG when given a path (save_png, with
minicnn/checkpoint.py's atomic_write: a kill or a full disk leaves the old file) and returns
the Figure, so a test or notebook can look inside. Inputs are read by attribute (an
LRFindResult, a History, or anything with the same fields). Images are float tensors
(K, C, H, W) in [0, 1], C = 1 or 3.

    top losses: loss_i = -log p_i(true class), worst first

Source: the plots of fastai 0.7 (sched.plot, sched.plot_lr, most_by_uncertain), redrawn.
"""
import io
import math
import numbers
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minicnn.checkpoint import atomic_write


def _new_figure(width, height):
    fig = Figure(figsize=(width, height), dpi=100, layout="tight")  # tight: no label clipped
    FigureCanvasAgg(fig)  # attaches the Agg canvas; savefig and draw use it
    return fig


def save_png(fig, path):
    """fig as a PNG at `path` (parent folders made); a kill or a full disk mid-write leaves the
    old file."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are saved as PNG: give a path ending in .png, not {str(path)!r}")
    image = io.BytesIO()
    fig.savefig(image, format="png")  # drawn in memory, then written all or nothing
    atomic_write(path, image.getvalue())
    return path


def _save(fig, path):
    if path is not None:
        save_png(fig, path)
    return fig


def plot_lr_find(result, path=None):
    """Smoothed loss against LR (log axis), usable points only, the suggestion marked by a dot.

    Reads result.lrs, result.smoothed_losses, result.suggested_lr and, when present,
    suggested_index, skip_start (noisy head dropped), stop (one past the last usable point),
    reason (the title) and loss_fell: False marks the point as the lowest loss, not a
    recommendation, and never says "suggested". Without a suggested_lr nothing is marked.
    """
    lrs = np.asarray(result.lrs, dtype=float)
    smoothed = np.asarray(result.smoothed_losses, dtype=float)
    if lrs.ndim != 1 or lrs.shape != smoothed.shape:
        raise ValueError(f"plot_lr_find: result.lrs has shape {lrs.shape} and "
                         f"result.smoothed_losses {smoothed.shape}; give one smoothed loss per LR")
    if len(lrs) == 0:
        raise ValueError("plot_lr_find: the result holds no points; "
                         "run the sweep for at least 2 steps")
    if not (np.isfinite(lrs) & (lrs > 0)).all():
        raise ValueError("plot_lr_find: result.lrs must be positive finite rates "
                         "(the axis is logarithmic)")
    first = getattr(result, "skip_start", 0) or 0
    stop = getattr(result, "stop", None)
    stop = len(lrs) if stop is None else stop
    if not 0 <= first < stop <= len(lrs):
        raise ValueError(f"plot_lr_find: usable points skip_start={first} .. stop={stop} must lie "
                         f"in 0..{len(lrs)} and hold at least one point")
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    lr = result.suggested_lr
    ax.plot(lrs[first:stop], smoothed[first:stop],
            label="smoothed loss" if lr is not None else "smoothed loss (no suggested LR)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss (bias-corrected EMA)")
    if lr is not None:
        index = getattr(result, "suggested_index", None)
        if index is None:  # nearest point on the log axis
            index = int(np.argmin(np.abs(np.log(lrs) - math.log(lr))))
        if not 0 <= index < len(lrs):
            raise ValueError(f"plot_lr_find: suggested_index={index} is not a point of the sweep "
                             f"(0..{len(lrs) - 1})")
        if getattr(result, "loss_fell", True):
            ax.plot([lr], [smoothed[index]], "o", color="red", label=f"suggested {lr:.2g}")
        else:  # the rate of the lowest loss: a fact about the curve, not advice
            ax.plot([lr], [smoothed[index]], "x", color="0.3",
                    label=f"lowest loss at {lr:.2g} (no clear fall: not a recommendation)")
    ax.legend()
    ax.set_title(getattr(result, "reason", "") or "LR range test", fontsize=8, wrap=True)
    return _save(fig, path)


def plot_schedule(schedules, path=None, *, title=""):
    """LR against step: one line per named schedule (a dict), or a single list."""
    if not isinstance(schedules, dict):
        schedules = {"lr": schedules}
    if not schedules:
        raise ValueError("plot_schedule needs at least one schedule")
    arrays = {}
    for name, lrs in schedules.items():
        try:
            arrays[name] = np.asarray(lrs, dtype=float)
        except (TypeError, ValueError) as e:
            raise ValueError(f"plot_schedule: schedule {name!r} must be a list of learning rates "
                             f"({e})") from e
        if arrays[name].ndim == 0 or len(arrays[name]) == 0:
            raise ValueError(f"plot_schedule: schedule {name!r} holds no steps; "
                             "give one LR per step")
    fig = _new_figure(6, 3.5)
    ax = fig.add_subplot()
    for name, lrs in arrays.items():
        ax.plot(np.arange(len(lrs)), lrs, label=str(name))
    ax.set_xlabel("step (minibatch)")
    ax.set_ylabel("learning rate")
    ax.legend()
    ax.set_title(title)
    return _save(fig, path)


def plot_losses(history, path=None, *, title="", restarts=()):
    """Per-minibatch training loss (faint) and per-epoch losses, x in epochs; title = diagnosis.

    Reads history.train_loss, valid_loss and, when present, batch_loss and train_eval_loss.
    restarts: the global steps where an SGDR cycle restarts (the first step of each cycle after
    the first), drawn as dotted vertical lines where that step begins; they need batch_loss.
    """
    missing = [name for name in ("train_loss", "valid_loss") if not hasattr(history, name)]
    if missing:
        raise TypeError("plot_losses: history must have train_loss and valid_loss (a "
                        f"train.History); {type(history).__name__} lacks {missing} (for a dict d "
                        "pass types.SimpleNamespace(**d))")
    batch_loss = list(getattr(history, "batch_loss", []) or [])
    per_epoch = {"train (running)": history.train_loss or [], "valid": history.valid_loss or [],
                 "train (eval mode)": getattr(history, "train_eval_loss", []) or []}
    epochs = max(len(v) for v in per_epoch.values())
    if epochs == 0 and not batch_loss:
        raise ValueError("plot_losses: the history holds no losses yet")
    restarts = list(restarts)
    if restarts and not batch_loss:
        raise ValueError("plot_losses: restarts= needs history.batch_loss to place its steps")
    bad = [r for r in restarts if isinstance(r, bool) or not isinstance(r, numbers.Integral)
           or not 0 < r < len(batch_loss)]
    if bad:
        raise ValueError(f"plot_losses: restarts {bad} are not steps 1..{len(batch_loss) - 1} of "
                         "the history (a restart is the first step of a cycle after the first)")
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    if batch_loss:
        # Step s ends at epoch (s+1)/steps_per_epoch, so per-epoch points line up with batches.
        steps_per_epoch = len(batch_loss) / max(epochs, 1)
        x = (np.arange(len(batch_loss)) + 1) / steps_per_epoch
        ax.plot(x, batch_loss, color="0.7", linewidth=0.8, label="train (per minibatch)")
        for i, r in enumerate(restarts):  # where step r begins: where step r - 1 ends
            ax.axvline(r / steps_per_epoch, color="0.4", linestyle=":", linewidth=0.8,
                       label="SGDR restart" if i == 0 else "_nolegend_")
    for name, values in per_epoch.items():
        if len(values):
            ax.plot(np.arange(1, len(values) + 1), values, "o-", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title, fontsize=8, wrap=True)
    return _save(fig, path)


def _check_images(x, name):
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor (K, C, H, W) with C = 1 or 3, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected float images in [0, 1], got {x.dtype}; "
                        "divide uint8 by 255")


def _show(ax, image):
    """image (C, H, W) float; clipped to [0, 1] since lighting may step a little outside."""
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image.permute(1, 2, 0).numpy())  # (H, W, 3)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_augmented(rows, path=None, *, title=""):
    """A grid: one row per named batch of images (e.g. "original", "side_on"), K columns."""
    if not isinstance(rows, dict):
        raise TypeError(f"plot_augmented: rows must be a dict {{name: images (K, C, H, W)}}, "
                        f"got {type(rows).__name__}")
    if not rows:
        raise ValueError("plot_augmented needs at least one row of images")
    for name, images in rows.items():
        _check_images(images, f"plot_augmented row {name!r}")
        if len(images) == 0:
            raise ValueError(f"plot_augmented row {name!r} holds no images")
    n_cols = max(len(images) for images in rows.values())
    fig = _new_figure(1.5 * n_cols + 1, 1.5 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n_cols):
            if c < len(images):
                _show(axes[r, c], images[c])
            else:
                axes[r, c].axis("off")
        axes[r, 0].set_ylabel(str(name))
    fig.suptitle(title)
    return _save(fig, path)


def _labels(values, name):
    """Class indices (N,) as a long tensor; floats only when whole numbers (never truncated)."""
    labels = torch.as_tensor(values)
    if labels.dim() > 1:
        raise ValueError(f"{name} must be class indices (N,), got shape {tuple(labels.shape)}; "
                         "for probabilities (N, n_classes) pass probs.argmax(1)")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"{name} must be whole class indices, got fractions "
                         "(probabilities? pass probs.argmax(1))")
    return labels.long().flatten()


def plot_confusion(y_true, y_pred, classes, path=None):
    """Confusion matrix: row = true class, column = predicted class, counts written in."""
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    n = len(classes)
    if n == 0:
        raise ValueError("plot_confusion: classes is empty; give one name per class")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0
                        or max(y_true.max(), y_pred.max()) >= n):
        raise ValueError(f"labels must lie in 0..{n - 1} for {n} classes")
    counts = torch.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n).numpy()
    fig = _new_figure(0.6 * n + 2.5, 0.6 * n + 2)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    for i in range(n):
        for j in range(n):
            color = "white" if counts[i, j] > counts.max() / 2 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=7)
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=90)
    ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {np.trace(counts) / max(counts.sum(), 1):.3f}")
    return _save(fig, path)


def plot_top_losses(x, y_true, probs, classes, path=None, *, k=9):
    """The k images with the highest loss -log p(true class), worst first, titled
    pred/true/loss/p."""
    _check_images(x, "plot_top_losses x")
    y_true = _labels(y_true, "y_true")
    probs = torch.as_tensor(probs).float()
    if probs.dim() != 2 or not (len(x) == len(y_true) == len(probs)):
        raise ValueError(f"x, y_true and probs (N, n_classes) must agree: {len(x)}, {len(y_true)}, "
                         f"{tuple(probs.shape)}")
    if len(x) == 0:
        raise ValueError("plot_top_losses: no images given")
    if probs.shape[1] != len(classes):
        raise ValueError(f"probs has {probs.shape[1]} columns but classes names {len(classes)}; "
                         "one name per class")
    if y_true.min() < 0 or y_true.max() >= len(classes):
        raise ValueError(f"y_true must lie in 0..{len(classes) - 1} for {len(classes)} classes")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    p_true = probs[torch.arange(len(y_true)), y_true]  # (N,)
    losses = -torch.log(p_true.clamp_min(1e-12))  # loss_i = -log p_i(true class)
    top = torch.argsort(losses, descending=True, stable=True)[:k]
    n_cols = math.ceil(math.sqrt(len(top)))
    n_rows = math.ceil(len(top) / n_cols)
    fig = _new_figure(2.2 * n_cols, 2.4 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
    for ax, i in zip(axes, top.tolist()):
        _show(ax, x[i])
        pred = int(probs[i].argmax())
        ax.set_title(f"{classes[pred]}/{classes[y_true[i]]}\n{losses[i]:.2f}/{p_true[i]:.2f}",
                     fontsize=8)
    for ax in axes[len(top):]:
        ax.axis("off")
    fig.suptitle("predicted/actual, loss/probability of actual class", fontsize=9)
    return _save(fig, path)
