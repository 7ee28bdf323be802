"""Plots: what is drawn on the axes is the data given, files written are PNGs, bad input fails."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minicnn.plots import (plot_augmented, plot_confusion, plot_losses, plot_lr_find,
                           plot_schedule, plot_top_losses, save_png)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    return path.read_bytes()[:8] == PNG_MAGIC


def _lr_result(**extra):
    lrs = [1e-4 * 10 ** (i / 4) for i in range(20)]
    smoothed = [2.0 - 0.1 * i for i in range(15)] + [1.0, 1.5, 3.0, float("nan"), float("nan")]
    fields = dict(lrs=lrs, smoothed_losses=smoothed, suggested_lr=lrs[7], suggested_index=7,
                  skip_start=2, stop=18, reason="middle of the steepest fall")
    fields.update(extra)
    return SimpleNamespace(**fields)


def test_plot_lr_find_draws_usable_points_and_marks_suggestion(tmp_path):
    result = _lr_result()
    fig = plot_lr_find(result, tmp_path / "sub" / "lr.png")
    ax = fig.axes[0]
    curve, marker = ax.lines
    np.testing.assert_allclose(curve.get_xdata(), result.lrs[2:18])
    np.testing.assert_allclose(curve.get_ydata(), result.smoothed_losses[2:18])
    assert np.isfinite(curve.get_ydata()).all()  # the NaN tail is left out
    assert list(marker.get_xdata()) == [result.lrs[7]]
    assert list(marker.get_ydata()) == [result.smoothed_losses[7]]
    assert ax.get_xscale() == "log"
    assert ax.get_title() == "middle of the steepest fall"
    assert _is_png(tmp_path / "sub" / "lr.png")


def test_plot_lr_find_finds_marker_without_index_and_draws_none_without_suggestion():
    result = _lr_result(suggested_index=None, suggested_lr=1.01e-4 * 10 ** (5 / 4))
    marker = plot_lr_find(result).axes[0].lines[1]
    assert list(marker.get_ydata()) == [result.smoothed_losses[5]]  # nearest in log LR
    bare = SimpleNamespace(lrs=[1e-3, 1e-2], smoothed_losses=[1.0, 2.0], suggested_lr=None)
    assert len(plot_lr_find(bare).axes[0].lines) == 1


def test_plot_lr_find_marks_index_zero():
    result = _lr_result(suggested_lr=1e-4, suggested_index=0, skip_start=0)
    marker = plot_lr_find(result).axes[0].lines[1]
    assert list(marker.get_xdata()) == [1e-4]


def legend_texts(fig):
    return [text.get_text() for text in fig.axes[0].get_legend().get_texts()]


def test_plot_lr_find_legend_says_suggested_only_for_a_recommendation():
    suggested = f"suggested {1e-4 * 10 ** (7 / 4):.2g}"
    assert legend_texts(plot_lr_find(_lr_result(loss_fell=True))) == ["smoothed loss", suggested]
    flat = _lr_result(suggested_lr=10.0, suggested_index=17, loss_fell=False,
                      reason="no usable suggestion: the loss never clearly fell; lowest at lr 10")
    fig = plot_lr_find(flat)
    texts = legend_texts(fig)
    assert texts == ["smoothed loss", "lowest loss at 10 (no clear fall: not a recommendation)"]
    assert not any("suggested" in t for t in texts)
    marker = fig.axes[0].lines[1]
    assert marker.get_marker() == "x" and list(marker.get_xdata()) == [10.0]
    bare = SimpleNamespace(lrs=[1e-3, 1e-2], smoothed_losses=[1.0, 2.0], suggested_lr=None)
    assert legend_texts(plot_lr_find(bare)) == ["smoothed loss (no suggested LR)"]


def test_plot_lr_find_with_a_real_flat_sweep_never_says_suggested():
    from minicnn.lr_find import suggest_lr
    lrs = [1e-5 * 10 ** (i / 5) for i in range(30)]
    smoothed = [1.0] * 30                              # the loss never falls
    s = suggest_lr(lrs, smoothed)
    assert not s.loss_fell and s.lr is not None
    result = SimpleNamespace(lrs=lrs, smoothed_losses=smoothed, suggested_lr=s.lr,
                             suggested_index=s.index, loss_fell=s.loss_fell, reason=s.reason,
                             skip_start=s.skip_start, stop=s.stop)
    assert not any("suggested" in t for t in legend_texts(plot_lr_find(result)))


def test_plot_schedule_dict_and_list(tmp_path):
    a, b = [0.1, 0.05, 0.0], [0.2, 0.2, 0.1, 0.0]
    ax = plot_schedule({"a": a, "b": b}, tmp_path / "s.png", title="two").axes[0]
    assert [line.get_label() for line in ax.lines] == ["a", "b"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), b)
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [0, 1, 2, 3])
    assert ax.get_title() == "two" and _is_png(tmp_path / "s.png")
    np.testing.assert_allclose(plot_schedule(a).axes[0].lines[0].get_ydata(), a)


def test_plot_losses_epoch_axis_lines_up_with_batches(tmp_path):
    history = SimpleNamespace(batch_loss=[2.0, 1.8, 1.5, 1.4, 1.2, 1.1], train_loss=[1.8, 1.3, 1.1],
                              valid_loss=[1.5, 1.2, 1.15], train_eval_loss=[1.4, 1.1, 0.9])
    fig = plot_losses(history, tmp_path / "l.png", title="good fit: ...")
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    np.testing.assert_allclose(lines["train (per minibatch)"].get_xdata(), [0.5, 1, 1.5, 2, 2.5, 3])
    np.testing.assert_allclose(lines["valid"].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(lines["valid"].get_ydata(), history.valid_loss)
    np.testing.assert_allclose(lines["train (eval mode)"].get_ydata(), history.train_eval_loss)
    assert fig.axes[0].get_title() == "good fit: ..." and _is_png(tmp_path / "l.png")


def test_plot_losses_hand_made_history_without_batches():
    history = SimpleNamespace(train_loss=[1.0, 0.8], valid_loss=[0.5, 0.4], valid_acc=[0.8, 0.9])
    labels = [line.get_label() for line in plot_losses(history).axes[0].lines]
    assert labels == ["train (running)", "valid"]


def test_plot_losses_marks_sgdr_restarts_where_their_step_begins():
    # 3 epochs of 4 steps, cycles of 1 epoch: cycles 2 and 3 begin at steps 4 and 8
    history = SimpleNamespace(batch_loss=[2.0 - 0.1 * s for s in range(12)],
                              train_loss=[1.8, 1.4, 1.1], valid_loss=[1.5, 1.2, 1.1])
    ax = plot_losses(history, restarts=[4, 8]).axes[0]
    dotted = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in dotted] == [1.0, 2.0]  # epoch ends, as the points
    assert all(line.get_xdata()[0] == line.get_xdata()[1] for line in dotted)  # vertical
    batches = next(line for line in ax.lines if line.get_label() == "train (per minibatch)")
    assert [batches.get_xdata()[r - 1] for r in (4, 8)] == [1.0, 2.0]  # where step r - 1 ends
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend.count("SGDR restart") == 1
    off_edge = plot_losses(history, restarts=(np.int64(6),)).axes[0]  # mid-epoch: step 6 of 12
    assert [line.get_xdata()[0] for line in off_edge.lines if line.get_linestyle() == ":"] == [1.5]
    plain = plot_losses(history).axes[0]
    assert not [line for line in plain.lines if line.get_linestyle() == ":"]
    assert "SGDR restart" not in [text.get_text() for text in plain.get_legend().get_texts()]
    for bad in ([0], [12], [4, -8]):
        with pytest.raises(ValueError, match=r"restarts.*1\.\.11"):
            plot_losses(history, restarts=bad)
    with pytest.raises(ValueError, match="restarts.*batch_loss"):  # nowhere to place them
        plot_losses(SimpleNamespace(train_loss=[1.0], valid_loss=[0.9]), restarts=[1])


def test_plot_augmented_shows_pixels_grey_and_rgb(tmp_path):
    grey = torch.rand(3, 1, 8, 8)
    rgb = torch.rand(2, 3, 8, 8)
    fig = plot_augmented({"grey": grey, "rgb": rgb}, tmp_path / "a.png", title="aug")
    axes = np.array(fig.axes).reshape(2, 3)
    np.testing.assert_allclose(axes[0, 1].images[0].get_array(), grey[1, 0].numpy())
    np.testing.assert_allclose(axes[1, 0].images[0].get_array(), rgb[0].permute(1, 2, 0).numpy())
    assert not axes[1, 2].images and axes[1, 0].get_ylabel() == "rgb"
    assert _is_png(tmp_path / "a.png")


def test_plot_augmented_rejects_bad_images():
    """augment.check_images, named by the row: shape, dtype and the [0, 1] range."""
    with pytest.raises(ValueError, match=r"rows\['x'\].*\(8, 8\)"):
        plot_augmented({"x": torch.rand(8, 8)})
    with pytest.raises(ValueError, match=r"rows\['x'\].*uint8"):
        plot_augmented({"x": torch.zeros(1, 1, 8, 8, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"rows\['b'\].*255"):  # 0..255 floats: all white
        plot_augmented({"a": torch.rand(1, 1, 4, 4), "b": torch.rand(1, 1, 4, 4) * 255})


def test_plot_confusion_counts(tmp_path):
    y_true = torch.tensor([0, 0, 1, 1, 1, 2])
    y_pred = torch.tensor([0, 1, 1, 1, 2, 2])
    fig = plot_confusion(y_true, y_pred, ["a", "b", "c"], tmp_path / "c.png")
    expected = np.array([[1, 1, 0], [0, 2, 1], [0, 0, 1]])
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), expected)
    assert fig.axes[0].get_title() == "accuracy 0.667" and _is_png(tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"0\.\.2"):
        plot_confusion([0, 3], [0, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        plot_confusion([0, -1], [0, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="2, 1"):  # one label would broadcast against two
        plot_confusion([0, 1], [0], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"0\.\.-1"):
        plot_confusion([0], [0], [])
    with pytest.raises(ValueError, match=r"y_pred.*\[2, 2\]"):  # probabilities, not classes
        plot_confusion([0, 1], torch.tensor([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    with pytest.raises(ValueError, match="y_pred.*float"):  # would truncate to class 0
        plot_confusion([0, 1], [0.9, 0.7], ["a", "b"])


def test_plot_top_losses_worst_first(tmp_path):
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 0, 1])
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    fig = plot_top_losses(x, y, probs, ["cat", "dog"], tmp_path / "t.png", k=2)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 2
    # losses: -log p(true) = 0.105, 0.916, 1.609, 0.693 -> worst are samples 2 then 1
    assert shown[0].get_title() == "dog/cat\n1.61/0.20"
    np.testing.assert_allclose(shown[0].images[0].get_array(), x[2, 0].numpy())
    assert shown[1].get_title() == "cat/dog\n0.92/0.40"
    assert _is_png(tmp_path / "t.png")
    cases = [((x, y[:3], probs, ["cat", "dog"]), {}, "4, 3, "),
             ((x, y, probs, ["cat", "dog"]), dict(k=0), "k=0"),
             ((x, y, probs, ["cat", "dog"]), dict(k=-1), "k=-1"),  # would show all but one
             ((x, torch.tensor([0, 1, 5, 1]), probs, ["cat", "dog"]), {}, r"y_true.*0\.\.1"),
             ((x, torch.tensor([0, 1, -1, 1]), probs, ["cat", "dog"]), {}, r"y_true.*0\.\.1"),
             ((x, y, probs, ["cat", "dog", "cow"]), {}, r"probs \(N, 3\).*\(4, 2\)"),
             ((x[:0], y[:0], probs[:0], ["cat", "dog"]), {}, "N > 0")]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            plot_top_losses(*args, **kwargs)
    with pytest.raises(ValueError, match=r"x must be float.*\[0, 1\]"):  # normalised images
        plot_top_losses(x - 0.5, y, probs, ["cat", "dog"])


def test_path_must_be_png(tmp_path):
    with pytest.raises(ValueError, match=r"\.png.*s\.jpg"):
        plot_schedule([0.1], tmp_path / "s.jpg")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_saving_a_figure_keeps_the_old_png(tmp_path, monkeypatch):
    import errno
    import io
    import os
    path = tmp_path / "s.png"
    plot_schedule([0.1, 0.2], path)
    old = path.read_bytes()
    assert old[:8] == b"\x89PNG\r\n\x1a\n"

    class FullDisk(io.FileIO):  # half the bytes fit, then the disk is full
        def write(self, data):
            super().write(bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        plot_schedule([0.3, 0.1, 0.05], path)
    monkeypatch.undo()
    assert path.read_bytes() == old  # the figure there before, whole
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]  # no half-written temporary left
    fig = plot_schedule([0.3, 0.1, 0.05])
    assert save_png(fig, path) == path and path.read_bytes() != old  # the next save replaces it
