"""Lesson 2, the learning rate over time: SGD with momentum, then from "divide by 10" to SGDR.

Run:
    python lessons/lesson2_sgdr.py            # CPU: about 3-4 minutes on 2 cores
    python lessons/lesson2_sgdr.py --quick    # a smoke run, under 30 seconds
    python lessons/notebooks.py lesson2_sgdr  # this file as an executed notebook
Writes sgd_momentum.png, schedules.png, training.png and model.pt (the SGDR arm) to --out
(default runs/lesson2_sgdr), and prints each schedule's validation accuracy, losses and seconds.
--help lists the options.
Library: minicnn/optim.py (SGD), minicnn/schedule.py (sgdr_lr, step_decay_lr, ...).
"""
import math
import time

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import (check, check_accuracy, check_size, command_line, fashion_data, float_above,
                    int_in, parse_args, show, split_sizes, threads_note)
from minicnn.data import Batches, stratified_subset
from minicnn.export import export_model
from minicnn.models import simple_resnet
from minicnn.optim import SGD
from minicnn.plots import save_png
from minicnn.schedule import (cosine_lr, cycle_end_steps, linear_lr, sgdr_lr, step_decay_lr,
                              total_steps)
from minicnn.train import evaluate, fit

# %% [markdown]
# # Lesson 2, the learning rate over time: momentum, step decay and SGDR
#
# From step 4 of the fast.ai recipe on, training runs with SGDR, stochastic gradient descent
# with warm restarts: within a cycle the learning rate falls along half a cosine from its peak
# towards 0, then jumps back to the peak; with `cycle_mult=2` each cycle is twice as long as
# the one before. The course prefers it to the older habit of dividing the rate by 10 every
# few epochs. A rate that ends each cycle small lets the weights settle, and the jump back up
# kicks them out of a sharp minimum, where a small change of the weights makes the loss much
# worse; a wide, flat basin holds them, and such a minimum tends to generalize better.
#
# Three parts: what momentum does to SGD's path, the schedules side by side, and three
# trainings of the same network that differ only in their schedule.

# %% tags=["parameters"]
# The options of a notebook run (a script takes its command line instead), e.g. ["--quick"].
ARGV = []

# %% [markdown]
# ## Settings
#
# `--quick` trains each arm on 448 images at batch 64 (a smoke run); the default, on 7,000 of
# the 50,000 training images at batch 128, so that three trainings of 7 epochs fit in
# minutes. `--lr` is the constant rate, the first rate of step decay and the peak of every
# SGDR cycle alike. The quick run's self-check floor sits far below what it measured, because
# the same seed gives other numbers on another processor or thread count.

# %%
RAVINE_LR, RAVINE_STEPS = 0.06, 30  # part 1: SGD's rate and steps in the ravine
LR = 0.1  # --lr's default
TRAIN_SIZE, QUICK_TRAIN_SIZE = 7000, 448  # part 3's training images (--train-size's defaults)
QUICK_BATCH_SIZE = 64  # --quick: 7 steps an epoch on 448 images
QUICK_FLOOR = 0.35  # annealed arms' validation accuracy 0.539-0.677 over seeds 0-2 x 1-2 threads


def check_options(args, error):
    """--train-size: 7,000 (--quick: 448) or all that --limit leaves; at most the training split."""
    train = split_sizes(args.limit)["train"]
    args.train_size = args.train_size or min(QUICK_TRAIN_SIZE if args.quick else TRAIN_SIZE, train)
    check_size(error, "--train-size", args.train_size, high=train,
               what=f"the training split holds {train:,} images; a bigger --limit gives more")


args = parse_args(
    "Lesson 2, the learning rate over time: SGD with and without momentum on a narrow valley, "
    "then one small ResNet trained three times from the same weights, at a constant rate, with "
    "step decay and with SGDR.",
    out="lesson2_sgdr", argv=command_line(ARGV), check_options=check_options,
    quick_batch_size=QUICK_BATCH_SIZE, extra=lambda p: (
        p.add_argument("--train-size", type=int_in(1), default=None,
                       help=f"training images of each arm, every class in its share (default "
                            f"{TRAIN_SIZE:,}, or all of the training split if --limit leaves "
                            f"fewer; --quick {QUICK_TRAIN_SIZE})"),
        p.add_argument("--lr", type=float_above(0), default=LR,
                       help=f"the constant LR, step decay's first LR and the peak of every "
                            f"SGDR cycle (default {LR})")))

# %% [markdown]
# ## Part 1: momentum, on a long narrow valley
#
# SGD on f(w) = (w0^2 + 20 w1^2) / 2, from the same point, three ways: plain, with momentum
# 0.7, and with Nesterov momentum. The valley is 20 times steeper across (w1) than along
# (w0). The steep direction caps the rate: a bigger step would overshoot across the valley
# and blow up. At that rate plain SGD crawls along the shallow direction. Momentum adds up
# the small steps that keep pointing the same way, along the valley, while the steps that
# flip sign, across it, cancel out.
#
# In the figure, look at how far along w0 each path gets in the same steps, and at the value
# of f at its end (in the legend). Plain SGD drops onto the valley floor in a few steps, then
# crawls along it. Momentum zig-zags across the valley but travels much further along it;
# Nesterov, which takes its gradient where momentum is about to carry it, damps the zig-zag
# sooner.

# %%
def ravine_paths(lr=RAVINE_LR, steps=RAVINE_STEPS):
    """SGD's path on f(w) = (w0^2 + 20 w1^2)/2 from (-4, 1). The steep direction caps the LR
    (lr*20 must stay below 2; at 1.2 each step overshoots the floor and w1 flips sign), so
    plain SGD crawls along the shallow w0; momentum adds up the small, consistent steps along
    it. (Momentum 0.9 overshoots for longer than 30 steps in a valley this narrow; 0.7 shows
    it.)"""
    settings = {"no momentum": {}, "momentum 0.7": dict(momentum=0.7),
                "Nesterov 0.7": dict(momentum=0.7, nesterov=True)}
    paths = {}
    for name, hyper in settings.items():
        w = torch.tensor([-4.0, 1.0], requires_grad=True)
        opt, path = SGD([w], lr, **hyper), [w.detach().clone()]
        for _ in range(steps):
            (0.5 * (w[0] ** 2 + 20 * w[1] ** 2)).backward()
            opt.step()
            opt.zero_grad()
            path.append(w.detach().clone())
        paths[name] = torch.stack(path).numpy()  # (steps + 1, 2)
    return paths


def plot_paths(paths, path):
    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    w0, w1 = np.meshgrid(np.linspace(-4.5, 1.5, 200), np.linspace(-1.3, 1.3, 200))
    ax.contour(w0, w1, 0.5 * (w0**2 + 20 * w1**2), levels=12, colors="0.8", linewidths=0.7)
    for name, p in paths.items():
        f_end = 0.5 * (p[-1] ** 2 * [1, 20]).sum()
        ax.plot(p[:, 0], p[:, 1], "o-", markersize=2.5, linewidth=1,
                label=f"{name}: f = {f_end:.1e}")
    ax.set_xlabel("w0")
    ax.set_ylabel("w1")
    ax.legend(fontsize=8)
    ax.set_title(f"{RAVINE_STEPS} steps of SGD, lr {RAVINE_LR}, on f(w) = (w0^2 + 20 w1^2) / 2",
                 fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    return fig


paths = ravine_paths()
show(plot_paths(paths, args.out / "sgd_momentum.png"))
final = {name: 0.5 * float((p[-1] ** 2 * [1, 20]).sum()) for name, p in paths.items()}
print(f"Part 1, f after {RAVINE_STEPS} steps: "
      + ", ".join(f"{k} {v:.1e}" for k, v in final.items()))

# %% [markdown]
# ## Part 2: the schedules, side by side
#
# Every schedule here is a plain function from the step (the minibatch count) to a learning
# rate, drawn over exactly the steps part 3 trains for: 7 epochs, the length of SGDR's 3
# cycles of 1, 2 and 4 epochs (fastai's `cycle_len=1, cycle_mult=2`). Constant; step decay,
# the rate divided by 10 every third of the run; linear and cosine decay to 0; and SGDR, with
# cycles of 1 epoch and with cycles that double.
#
# In the figure, compare where each schedule spends its steps: cosine stays near the top for
# a while (fast progress), then near the bottom (settling); SGDR does that once per cycle and
# jumps back to the peak at each restart. The rate changes every minibatch, not every epoch.

# %%
data = fashion_data(args)
x_train, y_train = stratified_subset(data["x_train"], data["y_train"], args.train_size,
                                     seed=args.seed)
generator = torch.Generator().manual_seed(args.seed)
train = Batches(x_train, y_train, args.batch_size, shuffle=True, generator=generator,
                device=args.device)
epochs = total_steps(3, steps_per_cycle=1, cycle_mult=2)  # 1 + 2 + 4 = 7
n_steps = epochs * len(train)


def schedules(n_steps, steps_per_epoch, lr):
    """Every schedule of the figure: step -> LR, all over the same n_steps (7 epochs)."""
    third = math.ceil(n_steps / 3)
    return {
        "constant": lambda s: lr,
        "step decay (/10 every third)": lambda s: step_decay_lr(s, lr_max=lr, decay_every=third),
        "linear": lambda s: linear_lr(s, total_steps=n_steps, lr_start=lr),
        "cosine": lambda s: cosine_lr(s, total_steps=n_steps, lr_max=lr),
        "SGDR, 7 cycles of 1 epoch": lambda s: sgdr_lr(s, steps_per_cycle=steps_per_epoch,
                                                       lr_max=lr),
        "SGDR, cycle_mult=2: 1+2+4": lambda s: sgdr_lr(s, steps_per_cycle=steps_per_epoch,
                                                       cycle_mult=2, lr_max=lr),
    }


def plot_schedules(lrs, path, title):
    """One small panel per schedule, the same axes everywhere: easier to compare than 6 lines in
    one."""
    fig = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3, sharex=True, sharey=True).ravel()
    for ax, (name, values) in zip(axes, lrs.items()):
        ax.plot(values)
        ax.set_title(name, fontsize=9)
    for ax in axes[3:]:
        ax.set_xlabel("step (minibatch)")
    for ax in axes[::3]:
        ax.set_ylabel("learning rate")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    return fig


lr_at = schedules(n_steps, len(train), args.lr)
show(plot_schedules({name: [f(s) for s in range(n_steps)] for name, f in lr_at.items()},
                    args.out / "schedules.png",
                    title=f"{n_steps} steps = {epochs} epochs of {len(train)} minibatches, "
                          f"lr {args.lr}"))

# %% [markdown]
# ## Part 3: three trainings that differ only in the schedule
#
# The same small ResNet is trained three times: at a constant rate, with step decay, and
# with SGDR over 3 cycles of 1, 2 and 4 epochs. Each arm starts from the same initial
# weights and sees the same minibatches in the same order (the order is a function of the
# seed and the epoch), so any difference between the arms is the schedule's. `fit` sets the
# rate the schedule gives before every minibatch.

# %%
print(f"Part 3: {len(x_train)} training images, {epochs} epochs of {len(train)} steps, "
      f"{len(data['x_valid'])} validation images; {args.device} ({threads_note()})")
model = simple_resnet(10).to(args.device)
initial = {k: v.clone() for k, v in model.state_dict().items()}
arms = {"constant": lr_at["constant"],
        "step decay (/10)": lr_at["step decay (/10 every third)"],
        "SGDR (1+2+4 epochs)": lr_at["SGDR, cycle_mult=2: 1+2+4"]}
histories, rows = {}, []
for name, schedule in arms.items():
    model.load_state_dict(initial)
    opt = SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=5e-4)
    started = time.perf_counter()
    histories[name] = fit(model, train, None, opt, schedule, epochs, verbose=False)
    seconds = time.perf_counter() - started
    loss, acc = evaluate(model, data["valid"])
    rows.append((name, acc, loss, histories[name].train_loss[-1],
                 histories[name].batch_lr[-1][0], seconds))
    print(f"  {name:22s} done in {seconds:.0f}s")

# %% [markdown]
# ## What each schedule bought
#
# The figure's top panel is the rate each arm used at every step; the bottom one its
# training loss, averaged over half an epoch of minibatches so the trend shows through the
# noise. Look at what happens to the loss when a rate drops: after step decay's cuts and
# towards the end of each SGDR cycle. Then look at the last steps: the annealed arms end at a
# small rate, the constant arm still takes full-size steps.
#
# The table gives each arm's validation accuracy and loss at the end, its training loss
# over the last epoch, its last rate and its seconds. The constant rate's last weights are
# wherever its last big step left them, so its numbers jump about from run to run; the
# annealed arms' are where the weights settled. In the quick run's few dozen steps any arm
# may come out ahead; the default run's self-check asks that an annealed one wins.

# %%
def plot_training(histories, path, window):
    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, h in histories.items():
        top.plot([lrs[0] for lrs in h.batch_lr], label=name)
        smooth = np.convolve(h.batch_loss, np.ones(window) / window, mode="valid")  # mean of window
        bottom.plot(np.arange(window - 1, len(h.batch_loss)), smooth, label=name)
    top.set_ylabel("learning rate")
    bottom.set_ylabel(f"training loss (mean of {window})")
    bottom.set_xlabel("step (minibatch)")
    bottom.set_yscale("log")
    top.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return fig


show(plot_training(histories, args.out / "training.png", window=max(1, len(train) // 2)))
print(f"\n{'schedule':22s} {'valid acc':>9s} {'valid loss':>10s} {'train loss*':>11s} "
      f"{'last lr':>9s} {'seconds':>8s}")
for name, acc, loss, train_loss, last_lr, seconds in rows:
    print(f"{name:22s} {acc:9.4f} {loss:10.4f} {train_loss:11.4f} {last_lr:9.2e} {seconds:8.0f}")
print("* the mean minibatch loss of the last epoch (train mode)")
print(f"figures in {args.out}: sgd_momentum.png, schedules.png, training.png")

# %% [markdown]
# ## The model, kept
#
# The SGDR arm trained last, so `model` holds its weights now. `model.pt` keeps them with all a
# prediction needs: the architecture, the class names, the image size and channels.
# `python -m minicnn.predict runs/lesson2_sgdr/model.pt IMAGES...` predicts new images with it,
# and `minicnn.export.load_model` rebuilds it without any training code.

# %%
# model holds the last arm's weights, SGDR's; no test accuracy: this lesson measures none
export_model(args.out / "model.pt", model, arch="simple_resnet",
             arch_kwargs={"widths": (16, 32, 64)},  # simple_resnet's default, as built above
             classes=data["classes"], size=28, channels=1)
print(f"the SGDR arm's model in {args.out / 'model.pt'}")

# %% [markdown]
# ## Self-check
#
# The training loop applied SGDR as written: the peak rate at every restart, and at every
# step exactly what `sgdr_lr` gives. Momentum got much further than plain SGD in the valley.
# Every arm learned: its training loss fell well below its first minibatch's, and its
# validation accuracy beats a floor, the most common class's share and luck, so a network
# that learned nothing cannot pass. The quick run asks that accuracy of the annealed arms
# only, since the constant rate's last weights are a noisy point after so few steps. The
# default run also asks that an annealed schedule beat the constant rate.

# %%
# The constant LR's validation accuracy was 0.8324 with the defaults (make notebooks) and
# 0.24-0.63 in the 49-step quick run; quick runs' last-epoch training loss was 0.35-0.63 of the
# first minibatch's over seeds 0-2 x 1-2 threads.
sgdr = [lrs[0] for lrs in histories["SGDR (1+2+4 epochs)"].batch_lr]
starts = [0] + [end + 1 for end in cycle_end_steps(2, steps_per_cycle=len(train), cycle_mult=2)]
check(sgdr == [arms["SGDR (1+2+4 epochs)"](s) for s in range(n_steps)]
      and all(sgdr[s] == args.lr for s in starts),
      f"SGDR's LR was {args.lr} at steps {starts} and sgdr_lr everywhere")
check(max(final["momentum 0.7"], final["Nesterov 0.7"]) < final["no momentum"] / 100,
      f"momentum ends 100x lower in the ravine than plain SGD: {final}")
for name, h in histories.items():
    check(h.train_loss[-1] < 0.8 * h.batch_loss[0], f"{name}: the training loss fell from "
          f"{h.batch_loss[0]:.3f} (first minibatch) to {h.train_loss[-1]:.3f} (last epoch's "
          "mean) < 80% of it")
accs = {name: acc for name, acc, *_ in rows}
for name, acc in accs.items():
    if name != "constant" or not args.quick:
        check_accuracy(acc, data["y_valid"], floor=QUICK_FLOOR if args.quick else 0.6,
                       what=f"{name}: validation accuracy")
if not args.quick:
    best = max(accs["step decay (/10)"], accs["SGDR (1+2+4 epochs)"])
    check(best > max(0.8, accs["constant"]),
          f"an annealed schedule ({best:.4f}) beats 80% and the constant LR "
          f"({accs['constant']:.4f})")
