"""The figures of the lessons: LR finder curve, schedules, losses, augmented samples, confusions.

Each function draws a matplotlib Figure on the Agg canvas (no pyplot: no window, no global
figure list to leak memory), saves it as a PNG when given a path and returns it. Inputs are read
by attribute (an LRFindResult, a History, ...); images are float (K, C, H, W) in [0, 1], C = 1 or 3.

    top losses: loss_i = -log p_i(true class), worst first

Needs minicnn/atomic.py (atomic_write: a kill mid-save leaves the old PNG) and
minicnn/augment.py (check_images). Source: fastai 0.7's sched.plot, most_by_uncertain, redrawn.
"""
import io
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minicnn.augment import check_images
from minicnn.atomic import atomic_write


def _new_figure(width, height):
    fig = Figure(figsize=(width, height), dpi=100, layout="tight")  # tight: no label clipped
    FigureCanvasAgg(fig)  # attaches the Agg canvas; savefig and draw use it
    return fig


def save_png(fig, path):
    """fig as a PNG at `path`, written all or nothing (folders made); returns path."""
    path = Path(path)
    if path.suffix.lower() != ".png":  # else PNG bytes under another name
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    image = io.BytesIO()
    fig.savefig(image, format="png")  # drawn in memory, then written all or nothing
    atomic_write(path, image.getvalue())
    return path


def _save(fig, path):
    if path is not None:
        save_png(fig, path)
    return fig


def plot_lr_find(result, path=None):
    """result.smoothed_losses against result.lrs (log axis) from skip_start to stop, suggested_lr
    marked (at suggested_index if given); loss_fell=False marks it as the lowest loss, not a
    recommendation, never "suggested". reason, if any, is the title."""
    lrs = np.asarray(result.lrs, dtype=float)
    smoothed = np.asarray(result.smoothed_losses, dtype=float)
    first = getattr(result, "skip_start", 0) or 0
    stop = len(lrs) if getattr(result, "stop", None) is None else result.stop
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    lr = result.suggested_lr
    ax.plot(lrs[first:stop], smoothed[first:stop],
            label="smoothed loss" if lr is not None else "smoothed loss (no suggested LR)")
    ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="loss (bias-corrected EMA)")
    if lr is not None:
        index = getattr(result, "suggested_index", None)
        if index is None:  # nearest point on the log axis
            index = int(np.argmin(np.abs(np.log(lrs) - math.log(lr))))
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
    schedules = schedules if isinstance(schedules, dict) else {"lr": schedules}
    arrays = {name: np.asarray(lrs, dtype=float) for name, lrs in schedules.items()}
    fig = _new_figure(6, 3.5)
    ax = fig.add_subplot()
    for name, lrs in arrays.items():
        ax.plot(np.arange(len(lrs)), lrs, label=str(name))
    ax.legend()
    ax.set(xlabel="step (minibatch)", ylabel="learning rate", title=title)
    return _save(fig, path)


def plot_losses(history, path=None, *, title="", restarts=()):
    """Per-minibatch training loss (faint) and per-epoch losses, x in epochs; title = diagnosis.
    Reads history.train_loss, valid_loss and, if present, batch_loss and train_eval_loss.
    restarts: steps where SGDR cycles restart: dotted lines where they begin (need batch_loss)."""
    batch_loss = list(getattr(history, "batch_loss", []) or [])
    per_epoch = {"train (running)": history.train_loss or [], "valid": history.valid_loss or [],
                 "train (eval mode)": getattr(history, "train_eval_loss", []) or []}
    epochs = max(len(v) for v in per_epoch.values())
    restarts = list(restarts)
    if not all(0 < r < len(batch_loss) for r in restarts):  # else drawn off the curve or not at all
        raise ValueError(f"restarts {restarts} must lie in 1..{len(batch_loss) - 1} (batch_loss)")
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
    ax.set(xlabel="epoch", ylabel="loss")
    ax.legend()
    ax.set_title(title, fontsize=8, wrap=True)
    return _save(fig, path)


def _show(ax, image):
    """image (C, H, W) float; clipped to [0, 1] since lighting may step a little outside."""
    image = image.detach().float().cpu().clamp(0, 1)
    grey = image.shape[0] == 1  # cmap, vmin and vmax apply to grey images only
    ax.imshow((image[0] if grey else image.permute(1, 2, 0)).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set(xticks=[], yticks=[])


def plot_augmented(rows, path=None, *, title=""):
    """A grid: one row per named batch of images (e.g. "original", "side_on"), K columns."""
    n_cols = max((len(images) for images in rows.values()), default=0)
    fig = _new_figure(1.5 * n_cols + 1, 1.5 * len(rows) + 0.5)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        check_images(images, f"rows[{name!r}]")
        for ax, image in zip(axes[r], images):
            _show(ax, image)
        for ax in axes[r, len(images):]:
            ax.axis("off")
        axes[r, 0].set_ylabel(str(name))
    fig.suptitle(title)
    return _save(fig, path)


def _labels(values, name):
    """Class indices (N,) as a long tensor; floats only when whole numbers (never truncated)."""
    labels = torch.as_tensor(values)
    if labels.dim() > 1 or labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"{name} must be labels (N,), got {labels.dtype} {list(labels.shape)}")
    return labels.long().flatten()


def plot_confusion(y_true, y_pred, classes, path=None):
    """Confusion matrix: row = true class, column = predicted class, counts written in."""
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    n, labels = len(classes), torch.cat([y_true, y_pred])  # else miscounted without a word:
    if len(y_true) != len(y_pred) or len(labels) and not 0 <= labels.min() <= labels.max() < n:
        raise ValueError(f"y_true, y_pred must be as long, in 0..{n - 1}, got {len(y_true)}, "
                         f"{len(y_pred)} labels")
    counts = torch.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n).numpy()
    fig = _new_figure(0.6 * n + 2.5, 0.6 * n + 2)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    for i, j in np.ndindex(n, n):
        color = "white" if counts[i, j] > counts.max() / 2 else "black"
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=7)
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=90)
    ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set(xlabel="predicted", ylabel="true",
           title=f"accuracy {np.trace(counts) / max(counts.sum(), 1):.3f}")
    return _save(fig, path)


def plot_top_losses(x, y_true, probs, classes, path=None, *, k=9):
    """The k images of highest loss -log p(true class), worst first, titled pred/true/loss/p."""
    check_images(x)
    y_true, probs, n = _labels(y_true, "y_true"), torch.as_tensor(probs).float(), len(classes)
    if not (0 < len(x) == len(y_true) == len(probs) and probs.shape[1:] == (n,) and k >= 1
            and 0 <= y_true.min() and y_true.max() < n):  # else wrong rows, shown without a word
        raise ValueError(f"need N > 0 images x, y_true (N,) in 0..{n - 1}, probs (N, {n}) and k "
                         f">= 1, got {len(x)}, {len(y_true)}, {tuple(probs.shape)}, k={k}")
    p_true = probs[torch.arange(len(y_true)), y_true]  # (N,)
    losses = -torch.log(p_true.clamp_min(1e-12))  # loss_i = -log p_i(true class)
    top = torch.argsort(losses, descending=True, stable=True)[:k]
    n_cols = math.ceil(math.sqrt(len(top)))
    n_rows = math.ceil(len(top) / n_cols)
    fig = _new_figure(2.2 * n_cols, 2.4 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
    for ax, i in zip(axes, top.tolist()):
        _show(ax, x[i])
        pred, true = classes[int(probs[i].argmax())], classes[y_true[i]]
        ax.set_title(f"{pred}/{true}\n{losses[i]:.2f}/{p_true[i]:.2f}", fontsize=8)
    for ax in axes[len(top):]:
        ax.axis("off")
    fig.suptitle("predicted/actual, loss/probability of actual class", fontsize=9)
    return _save(fig, path)
