"""Lesson 2, step 2: the LR range test, and what its suggestion is worth.

Run:
    python lessons/lesson2_lr_find.py            # CPU: about 3-4 minutes on 2 cores
    python lessons/lesson2_lr_find.py --quick    # a smoke run, under 30 seconds
    python lessons/notebooks.py lesson2_lr_find  # this file as an executed notebook
Writes lr_find.png, losses_{0.1x,1x,10x}.png, report.json (the curve, every run's history
and diagnosis) and model.pt (the run at the suggested rate) to --out (default
runs/lesson2_lr_find), and prints the table and the diagnoses. --help lists the options.
"""
import copy
import json
import time

import torch

from common import (check, check_accuracy, command_line, fashion_data, int_in, parse_args, show,
                    threads_note)
from minicnn.atomic import atomic_write
from minicnn.diagnose import diagnose
from minicnn.export import export_model
from minicnn.lr_find import lr_find
from minicnn.models import simple_resnet
from minicnn.plots import plot_losses, plot_lr_find
from minicnn.schedule import cosine_lr
from minicnn.train import fit

# %% [markdown]
# # Lesson 2, step 2: the learning-rate range test
#
# Step 2 of the fast.ai recipe: before training, ask `lr_find` for a learning rate instead of
# guessing one. The test trains for a few dozen minibatches while the rate grows exponentially,
# from `start_lr=1e-7` to `end_lr=10` (lr_find's defaults), and records the smoothed loss at
# each rate. At tiny rates the loss does not move; at huge ones it blows up; in between it
# falls. The course picks "the highest rate at which the loss is still clearly improving": as
# fast as training can go while it is still stable. Then the test puts the model and the
# optimizer back as they were, so it costs seconds and changes nothing.
#
# A suggestion read off a few noisy minibatches deserves a check, so this lesson then trains
# three short runs from the same starting weights, at 0.1x, 1x and 10x the suggested rate.

# %% tags=["parameters"]
# The options of a notebook run (a script takes its command line instead), e.g. ["--quick"].
ARGV = []

# %% [markdown]
# ## Settings
#
# `--quick` runs the range test for 40 steps and each short run for 2 epochs, on 1,024
# training images at batch 64 (a smoke run); the default, 100 steps and 3 epochs on 20,000
# images at batch 128. A tenth as many images again are held out for validation: the three
# runs are compared on them. The quick run's self-check floor sits far below what it
# measured, because the same seed gives other numbers on another processor or thread count.

# %%
LIMIT = 20_000  # training images by default (not all 50,000), so that three runs fit in minutes
NUM_ITER, QUICK_NUM_ITER = 100, 40  # steps (minibatches) of the range test
EPOCHS, QUICK_EPOCHS = 3, 2  # epochs of each short run
QUICK_BATCH_SIZE = 64  # --quick: 16 steps an epoch on 1,024 images
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # SGD's, in the range test and in every run
QUICK_FLOOR = 0.3  # the 1x run's validation accuracy 0.500-0.539 over seeds 0-2 x 1-2 threads


def check_options(args, error):
    """The defaults that depend on --quick; the types already checked each option alone."""
    if args.limit is None:  # --quick already set 1,024
        args.limit = LIMIT
    args.num_iter = args.num_iter or (QUICK_NUM_ITER if args.quick else NUM_ITER)
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)


args = parse_args(
    "Lesson 2, step 2: the LR range test suggests a learning rate, and three short runs from the "
    "same weights, at 0.1x, 1x and 10x it, show what the suggestion is worth.",
    out="lesson2_lr_find", argv=command_line(ARGV), check_options=check_options,
    limit_help="use only this many training images, and a tenth as many for validation and test "
               f"(default {LIMIT:,}; --quick: 1,024)",
    quick_batch_size=QUICK_BATCH_SIZE, extra=lambda p: (
        p.add_argument("--epochs", type=int_in(1), default=None,
                       help=f"epochs of each short run (default {EPOCHS}; --quick {QUICK_EPOCHS})"),
        p.add_argument("--num-iter", type=int_in(10), default=None,
                       help=f"steps of the range test, at least 10 (default {NUM_ITER}; "
                            f"--quick {QUICK_NUM_ITER})")))
num_iter, epochs = args.num_iter, args.epochs
data = fashion_data(args)
print(f"Fashion-MNIST: {len(data['x_train'])} train, {len(data['x_valid'])} valid images; "
      f"{args.device} ({threads_note()})")
started = time.perf_counter()

# %% [markdown]
# ## The range test
#
# The test runs on the very model we are about to train, with the same kind of optimizer.
# Its starting weights are copied first (`initial`, BatchNorm's running statistics included):
# to check afterwards that the test put everything back bit for bit, and so that the three
# runs below all start from them.
#
# In the figure, the smoothed loss against the rate on a log axis. Look for the flat start
# (rates too small to matter), the fall, and the climb on the right, where the rate is too
# high. The red dot is the suggestion: the middle of the longest steep fall, not the lowest
# point. At the lowest point the loss is about to blow up, so that rate is already too high.

# %%
def make_opt(model):
    # lr is a placeholder: lr_find sweeps it and fit sets it every step
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=MOMENTUM,
                           weight_decay=WEIGHT_DECAY)


model = simple_resnet(10).to(args.device)
initial = copy.deepcopy(model.state_dict())  # weights AND BatchNorm statistics
result = lr_find(model, data["train"], make_opt(model), num_iter=num_iter)
show(plot_lr_find(result, args.out / "lr_find.png"))
restored = all(torch.equal(v, model.state_dict()[k]) for k, v in initial.items())
lr = result.suggested_lr
print(f"\nLR range test ({len(result.lrs)} steps, {time.perf_counter() - started:.0f}s): "
      f"{result.reason}")
print(f"suggested lr: {lr:.3g}   (figure: {args.out / 'lr_find.png'})")

# %% [markdown]
# ## Three short runs from the same weights: 0.1x, 1x and 10x the suggestion
#
# Each run loads the same starting weights and trains for the same epochs; only the peak rate
# differs, so any difference is the rate's. Each anneals its rate along one cosine from the
# peak down to 0 (step 4's SGDR with a single cycle), as the course uses the rate it found:
# the last steps are small and the weights settle, so the final losses compare the peak
# rates, not the noise a constant high rate leaves in the last minibatches. `diagnose` puts
# each history into words: underfitting, overfitting, still improving, or a good fit.
#
# In each figure the faint line is the loss of every minibatch; the dots, once an epoch, are
# the running training loss, the validation loss, and the training loss measured like the
# validation loss (eval mode, on a sample of training images). Compare 0.1x, which creeps
# down, with 1x. At 10x look at the first epoch: a rate that high can throw the weights far
# off (a validation loss far above the others), or end in a NaN loss, reported as diverged.

# %%
def short_run(initial, lr, data, args, epochs):
    """Train a copy of the initial weights, lr annealed to 0 -> (model, history, diagnosis), all
    three None if it diverged."""
    model = simple_resnet(10).to(args.device)
    model.load_state_dict(initial)  # every arm starts from the same weights
    try:
        total = epochs * len(data["train"])
        history = fit(model, data["train"], data["valid"], make_opt(model),
                      lambda step: cosine_lr(step, total_steps=total, lr_max=lr), epochs,
                      train_eval=data["train_eval"])
    except FloatingPointError as error:  # 10x may blow up; that is a result, not a crash
        print(f"  lr {lr:.3g}: diverged ({error})")
        return None, None, None
    return model, history, diagnose(history)


rows, models = [], {}
for name, factor in [("0.1x", 0.1), ("1x", 1.0), ("10x", 10.0)]:
    print(f"\n{name}: lr {lr * factor:.3g} annealed to 0 over {epochs} epochs")
    models[name], history, diagnosis = short_run(initial, lr * factor, data, args, epochs)
    if history is not None:
        show(plot_losses(history, args.out / f"losses_{name}.png",
                         title=f"lr {lr * factor:.3g}: {diagnosis.verdict}"))
    rows.append((name, lr * factor, history, diagnosis))

# %% [markdown]
# ## The table: what each rate bought
#
# One line a run: its training loss (eval mode) at the end, its validation loss after every
# epoch, its final validation accuracy and the verdict, then each diagnosis in full. Read the
# validation losses epoch by epoch. With the same number of steps, 0.1x is still high: a rate
# too low wastes the steps. The suggestion should be at or near the best of the three. 10x is
# the warning: annealed to 0, and with BatchNorm, it may catch up by the end, but its first
# epoch shows what the rate cost on the way. report.json keeps the curve and every history.

# %%
print(f"\n{'run':5} {'peak lr':>8} {'train loss*':>11}  {'valid loss, epoch by epoch':26} "
      f"{'valid acc':>9}  verdict")
for name, run_lr, history, diagnosis in rows:
    if history is None:
        print(f"{name:5} {run_lr:8.3g}  diverged (NaN loss)")
    else:
        per_epoch = " ".join(f"{v:.3f}" for v in history.valid_loss)
        print(f"{name:5} {run_lr:8.3g} {history.train_eval_loss[-1]:11.4f}  {per_epoch:26} "
              f"{history.valid_acc[-1]:9.4f}  {diagnosis.verdict}")
print("* eval mode, on a sample of up to 2,000 training images\n")
for name, _, _, diagnosis in rows:
    print(f"{name:5} {diagnosis if diagnosis is not None else 'diverged: lower the learning rate'}")
report = dict(suggested_lr=lr, reason=result.reason, lrs=result.lrs,
              smoothed_losses=result.smoothed_losses,
              runs={name: dict(peak_lr=run_lr, **(vars(history) if history else {}),
                               diagnosis=str(diagnosis) if diagnosis else "diverged")
                    for name, run_lr, history, diagnosis in rows})
atomic_write(args.out / "report.json", json.dumps(report, indent=1))
print(f"\ntotal {time.perf_counter() - started:.0f}s; figures and report.json in {args.out}")

# %% [markdown]
# ## The model, kept
#
# The suggested rate is the one the recipe goes on with, so `model.pt` keeps the 1x run's
# weights, with all a prediction needs: the architecture, the class names, the image size and
# channels. `python -m minicnn.predict runs/lesson2_lr_find/model.pt IMAGES...` predicts new
# images with it, and `minicnn.export.load_model` rebuilds it without any training code.

# %%
if models["1x"] is None:  # a diverged run's weights are NaN: nothing worth keeping
    print("the run at the suggested lr diverged: no model.pt")
else:  # no test accuracy: this lesson measures none
    export_model(args.out / "model.pt", models["1x"], arch="simple_resnet",
                 arch_kwargs={"widths": (16, 32, 64)},  # simple_resnet's default, as built above
                 classes=data["classes"], size=28, channels=1)
    print(f"the model of the run at the suggested lr {lr:.3g} (1x) in {args.out / 'model.pt'}")

# %% [markdown]
# ## Self-check
#
# The range test must have left the weights and BatchNorm statistics exactly as it found
# them (it only looks), and found a falling loss (otherwise its dot marks the lowest loss,
# not a recommendation). The run at the suggested rate must beat a floor, the most common
# class's share and luck on the validation images, so a model that learned nothing fails.
# The default run also asks that the suggestion ends within a point of the best of the three
# and clearly above 0.1x; the quick run is too short and noisy to rank the rates.

# %%
acc = {name: (history.valid_acc[-1] if history else 0.0) for name, _, history, _ in rows}
check(restored, "lr_find restored the weights and BatchNorm statistics bit for bit")
check(result.loss_fell, f"the range test found a falling loss: {result.reason}")
check_accuracy(acc["1x"], data["y_valid"], floor=QUICK_FLOOR if args.quick else 0.8,
               what=f"the run at the suggested lr {lr:.3g}: validation accuracy")
if not args.quick:
    check(acc["1x"] >= max(acc.values()) - 0.01 and acc["1x"] >= acc["0.1x"] + 0.03,
          f"suggested lr {lr:.3g} within 1 point of the best run and 3 points above 0.1x: "
          + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
