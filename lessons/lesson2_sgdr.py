"""Lesson 2, the learning rate over time: SGD with momentum, then from "divide by 10" to SGDR.

Part 1 runs minicnn's SGD on a long narrow valley, f(w) = (w0^2 + 20 w1^2) / 2, without
momentum, with momentum 0.7 and with Nesterov, and draws the three paths (sgd_momentum.png).
Part 2 draws the schedules of the course's list over the same number of steps: constant,
step decay (/10 every third of the run), linear, cosine, and SGDR with cycle_mult 1 and 2
(schedules.png). Part 3 trains the same small ResNet three times from the same initial
weights on the same minibatches (the batch order is a function of the seed and the epoch):
constant LR, step decay, and SGDR with 3 cycles of 1, 2, 4 epochs (fastai's cycle_len=1,
cycle_mult=2, 7 epochs), and prints each arm's validation accuracy and time (training.png
draws the LR and the smoothed training loss of each arm).

Run:
    python lessons/lesson2_sgdr.py            # CPU: about 3-4 minutes on 2 cores
    python lessons/lesson2_sgdr.py --quick    # a smoke run, under 30 seconds
Common options (lessons/common.py): --device, --out (default runs/lesson2_sgdr), --seed (0),
--threads, --batch-size (128), --limit. Own options: --train-size (7,000 of the 50,000
training images, so 3 x 7 epochs fit in minutes; 448 with --quick), --lr (0.1: the constant
LR, the first step-decay LR, the peak of every SGDR cycle).
Library: minicnn/optim.py (SGD), minicnn/schedule.py (sgdr_lr, step_decay_lr, ...).
"""
import math
import time

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import (check, check_accuracy, check_size, fashion_data, float_above, int_in, parse_args, split_sizes,
                    threads_note)
from minicnn.data import Batches, stratified_subset
from minicnn.models import simple_resnet
from minicnn.optim import SGD
from minicnn.plots import save_png
from minicnn.schedule import cosine_lr, cycle_end_steps, linear_lr, sgdr_lr, step_decay_lr, total_steps
from minicnn.train import evaluate, fit


RAVINE_LR, RAVINE_STEPS = 0.06, 30
QUICK_FLOOR = 0.35  # the annealed arms' validation accuracy 0.539-0.677 over seeds 0-2 x 1-2 threads


def ravine_paths(lr=RAVINE_LR, steps=RAVINE_STEPS):
    """Part 1: SGD's path on f(w) = (w0^2 + 20 w1^2)/2 from (-4, 1). The steep direction caps the
    LR (lr*20 must stay below 2; at 1.2 each step overshoots the floor and w1 flips sign), so
    plain SGD crawls along the shallow w0; momentum adds up the small, consistent steps along
    it. (Momentum 0.9 overshoots for longer than 30 steps in a valley this narrow; 0.7 shows it.)"""
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
        ax.plot(p[:, 0], p[:, 1], "o-", markersize=2.5, linewidth=1, label=f"{name}: f = {f_end:.1e}")
    ax.set_xlabel("w0")
    ax.set_ylabel("w1")
    ax.legend(fontsize=8)
    ax.set_title(f"{RAVINE_STEPS} steps of SGD, lr {RAVINE_LR}, on f(w) = (w0^2 + 20 w1^2) / 2", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def schedules(n_steps, steps_per_epoch, lr):
    """Every schedule of the figure: step -> LR, all over the same n_steps (7 epochs)."""
    third = math.ceil(n_steps / 3)
    return {
        "constant": lambda s: lr,
        "step decay (/10 every third)": lambda s: step_decay_lr(s, lr_max=lr, decay_every=third),
        "linear": lambda s: linear_lr(s, total_steps=n_steps, lr_start=lr),
        "cosine": lambda s: cosine_lr(s, total_steps=n_steps, lr_max=lr),
        "SGDR, 7 cycles of 1 epoch": lambda s: sgdr_lr(s, steps_per_cycle=steps_per_epoch, lr_max=lr),
        "SGDR, cycle_mult=2: 1+2+4": lambda s: sgdr_lr(s, steps_per_cycle=steps_per_epoch, cycle_mult=2, lr_max=lr),
    }


def plot_schedules(lrs, path, title):
    """One small panel per schedule, the same axes everywhere: easier to compare than 6 lines in one."""
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


def plot_training(histories, path, window):
    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name, h in histories.items():
        top.plot([lrs[0] for lrs in h.batch_lr], label=name)
        smooth = np.convolve(h.batch_loss, np.ones(window) / window, mode="valid")  # mean of `window` steps
        bottom.plot(np.arange(window - 1, len(h.batch_loss)), smooth, label=name)
    top.set_ylabel("learning rate")
    bottom.set_ylabel(f"training loss (mean of {window})")
    bottom.set_xlabel("step (minibatch)")
    bottom.set_yscale("log")
    top.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def check_options(args, error):
    """--train-size: 7,000 (--quick: 448) or all that --limit leaves; at most the training split."""
    train = split_sizes(args)["train"]
    args.train_size = args.train_size or min(448 if args.quick else 7000, train)
    check_size(error, "--train-size", args.train_size, high=train, what=f"the training split holds {train:,} images; "
               "a bigger --limit gives more")


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], out="lesson2_sgdr", argv=argv, extra=lambda p: (
        p.add_argument("--train-size", type=int_in(1), default=None),
        p.add_argument("--lr", type=float_above(0), default=0.1)), check_options=check_options, quick_batch_size=64)

    # Part 1: momentum on a ravine (milliseconds).
    paths = ravine_paths()
    plot_paths(paths, args.out / "sgd_momentum.png")
    final = {name: 0.5 * float((p[-1] ** 2 * [1, 20]).sum()) for name, p in paths.items()}
    print(f"Part 1, f after {RAVINE_STEPS} steps: " + ", ".join(f"{k} {v:.1e}" for k, v in final.items()))

    # Part 2: the schedules, over the steps that part 3 trains for.
    data = fashion_data(args)
    x_train, y_train = stratified_subset(data["x_train"], data["y_train"], args.train_size, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train = Batches(x_train, y_train, args.batch_size, shuffle=True, generator=generator, device=args.device)
    epochs = total_steps(3, steps_per_cycle=1, cycle_mult=2)  # 1 + 2 + 4 = 7
    n_steps = epochs * len(train)
    lr_at = schedules(n_steps, len(train), args.lr)
    plot_schedules({name: [f(s) for s in range(n_steps)] for name, f in lr_at.items()}, args.out / "schedules.png",
                   title=f"{n_steps} steps = {epochs} epochs of {len(train)} minibatches, lr {args.lr}")

    # Part 3: three arms, the same initial weights and minibatches; only the schedule differs.
    print(f"Part 3: {len(x_train)} training images, {epochs} epochs of {len(train)} steps, "
          f"{len(data['x_valid'])} validation images; {args.device} ({threads_note()})")
    model = simple_resnet(10).to(args.device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    arms = {"constant": lr_at["constant"], "step decay (/10)": lr_at["step decay (/10 every third)"],
            "SGDR (1+2+4 epochs)": lr_at["SGDR, cycle_mult=2: 1+2+4"]}
    histories, rows = {}, []
    for name, schedule in arms.items():
        model.load_state_dict(initial)
        opt = SGD(model.parameters(), args.lr, momentum=0.9, weight_decay=5e-4)
        started = time.perf_counter()
        histories[name] = fit(model, train, None, opt, schedule, epochs, verbose=False)
        seconds = time.perf_counter() - started
        loss, acc = evaluate(model, data["valid"])
        rows.append((name, acc, loss, histories[name].train_loss[-1], histories[name].batch_lr[-1][0], seconds))
        print(f"  {name:22s} done in {seconds:.0f}s")
    plot_training(histories, args.out / "training.png", window=max(1, len(train) // 2))

    print(f"\n{'schedule':22s} {'valid acc':>9s} {'valid loss':>10s} {'train loss*':>11s} {'last lr':>9s} "
          f"{'seconds':>8s}")
    for name, acc, loss, train_loss, last_lr, seconds in rows:
        print(f"{name:22s} {acc:9.4f} {loss:10.4f} {train_loss:11.4f} {last_lr:9.2e} {seconds:8.0f}")
    print("* the mean minibatch loss of the last epoch (train mode)")
    print(f"figures in {args.out}: sgd_momentum.png, schedules.png, training.png")

    # Self-checks: the loop applied SGDR as written (peak at each restart, every step equal to
    # sgdr_lr); momentum got further than plain SGD in the ravine; every arm learned: its training
    # loss fell, and its validation accuracy is above a floor and chance (the constant LR's last
    # weights are a noisy point, ~0.76 with the defaults, 0.24-0.63 in the 49-step quick run, so
    # the quick run asks this of the annealed arms only); and an annealed schedule ended ahead
    # of the constant LR (not asked of the quick run). Quick runs' last-epoch training loss was
    # 0.35-0.63 of the first minibatch's over seeds 0-2 x 1-2 threads.
    sgdr = [lrs[0] for lrs in histories["SGDR (1+2+4 epochs)"].batch_lr]
    starts = [0] + [end + 1 for end in cycle_end_steps(2, steps_per_cycle=len(train), cycle_mult=2)]
    check(sgdr == [arms["SGDR (1+2+4 epochs)"](s) for s in range(n_steps)] and
          all(sgdr[s] == args.lr for s in starts), f"SGDR's LR was {args.lr} at steps {starts} and sgdr_lr everywhere")
    check(max(final["momentum 0.7"], final["Nesterov 0.7"]) < final["no momentum"] / 100,
          f"momentum ends 100x lower in the ravine than plain SGD: {final}")
    for name, h in histories.items():
        check(h.train_loss[-1] < 0.8 * h.batch_loss[0], f"{name}: the training loss fell from "
              f"{h.batch_loss[0]:.3f} (first minibatch) to {h.train_loss[-1]:.3f} (last epoch's mean) < 80% of it")
    accs = {name: acc for name, acc, *_ in rows}
    for name, acc in accs.items():
        if name != "constant" or not args.quick:
            check_accuracy(acc, data["y_valid"], floor=QUICK_FLOOR if args.quick else 0.6,
                           what=f"{name}: validation accuracy")
    if not args.quick:
        best = max(accs["step decay (/10)"], accs["SGDR (1+2+4 epochs)"])
        check(best > max(0.8, accs["constant"]),
              f"an annealed schedule ({best:.4f}) beats 80% and the constant LR ({accs['constant']:.4f})")
    return rows


if __name__ == "__main__":
    main()
