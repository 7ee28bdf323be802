"""Lesson 1, the baseline: a small ResNet from scratch, plain SGD at one constant LR.

Run:
    python lessons/lesson1_baseline.py            # the CPU default: 3 epochs, minutes on 2 cores
    python lessons/lesson1_baseline.py --quick    # a smoke run of a few seconds
    python lessons/notebooks.py lesson1_baseline  # this file as an executed notebook
Writes runs/lesson1_baseline/losses.png and model.pt (the trained model), and prints one line
per epoch.
"""

import time

import torch

from common import (check, check_accuracy, command_line, fashion_data, float_above, int_in,
                    parse_args, show, threads_note)
from minicnn.export import export_model
from minicnn.models import simple_resnet
from minicnn.plots import plot_losses
from minicnn.train import evaluate, fit

# %% [markdown]
# # Lesson 1: the baseline every later lesson improves on
#
# The naive way to train an image classifier: a small ResNet from random weights, plain SGD
# with momentum at **one constant learning rate**, no LR finder, no schedule, no augmentation,
# no pretrained body. Fashion-MNIST: 50,000 training images (10,000 more held out for
# validation); the 10,000 test images are used once, for the final check.
#
# The lessons of lesson 2 each change one of these choices and measure what it buys.

# %% tags=["parameters"]
# The options of a notebook run (a script takes its command line instead), e.g. ["--quick"].
ARGV = []

# %% [markdown]
# ## Settings
#
# `--quick` trains 2 epochs on 1,024 images at batch 64 (a smoke run); the default, 3 epochs
# on all 50,000 at batch 128. Its self-check floor sits far below what the quick run measured,
# because the same seed gives other numbers on another processor or thread count.

# %%
QUICK_BATCH_SIZE = 64  # --quick: 2 epochs of 16 steps on 1,024 images
# --quick's test accuracy was 0.265-0.539 over seeds 0-9 (1 thread), 0.333-0.529 over seeds 0-2
# with 1 and 2 threads: the floor sits 10 points below the worst
QUICK_FLOOR = 0.15
args = parse_args(
    "Lesson 1, the baseline: a small ResNet from scratch, plain SGD at one constant learning rate.",
    out="lesson1_baseline",
    argv=command_line(ARGV),
    quick_batch_size=QUICK_BATCH_SIZE,
    extra=lambda p: (
        p.add_argument("--epochs", type=int_in(1), default=None,
                       help="epochs (default 3; --quick 2)"),
        p.add_argument("--lr", type=float_above(0), default=0.05, help="the constant LR (0.05)"),
    ),
)
epochs = args.epochs or (2 if args.quick else 3)
data = fashion_data(args)
print(
    f"Fashion-MNIST: {len(data['x_train'])} train, {len(data['x_valid'])} valid, "
    f"{len(data['x_test'])} test images; {args.device} ({threads_note()})"
)

# %% [markdown]
# ## Train at one constant learning rate
#
# `fit` is one visible loop (minicnn/train.py): per minibatch it sets the LR, runs forward,
# backward, `opt.step()`, `opt.zero_grad()`, and records the loss. Here the LR is the same
# at every step: `lambda step: args.lr`.

# %%
model = simple_resnet(10).to(args.device)
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
started = time.perf_counter()
history = fit(
    model,
    data["train"],
    data["valid"],
    opt,
    lambda step: args.lr,
    epochs,
    train_eval=data["train_eval"],
)
seconds = time.perf_counter() - started

# %% [markdown]
# ## The losses, and the test accuracy
#
# Look at the faint per-minibatch training loss: at a constant LR it stops falling and stays
# noisy, because every step is as large as the first. Lesson 2 anneals the LR (SGDR) so the
# last steps are small and the weights settle.

# %%
test_loss, test_acc = evaluate(model, data["test"])
title = f"constant lr {args.lr}: test accuracy {test_acc:.4f}"
show(plot_losses(history, args.out / "losses.png", title=title))
print(
    f"test loss {test_loss:.4f}, test accuracy {test_acc:.4f}, training took {seconds:.0f}s; "
    f"figure in {args.out / 'losses.png'}"
)

# %% [markdown]
# ## The model, kept
#
# `model.pt` holds the trained weights with all a prediction needs: the architecture, the class
# names, the image size and channels, and the test accuracy just measured.
# `python -m minicnn.predict runs/lesson1_baseline/model.pt IMAGES...` predicts new images with
# it, and `minicnn.export.load_model` rebuilds it without any training code.

# %%
export_model(args.out / "model.pt", model, arch="simple_resnet",
             arch_kwargs={"widths": (16, 32, 64)},  # simple_resnet's default, as built above
             classes=data["classes"], size=28, channels=1, test_accuracy=test_acc)
print(f"the model (test accuracy {test_acc:.4f}) in {args.out / 'model.pt'}")

# %% [markdown]
# ## Self-check
#
# The quick run's last weights at a constant LR are a noisy point, so its steady sign is the
# training loss (the last epoch's mean was 0.66-0.71 of the first minibatch's over seeds 0-2 x
# 1-2 threads); the test accuracy must beat a floor, the most common class, and luck.

# %%
check(
    history.train_loss[-1] < 0.8 * history.batch_loss[0],
    f"the training loss fell from {history.batch_loss[0]:.3f} (first minibatch) to "
    f"{history.train_loss[-1]:.3f} (last epoch's mean) < 80% of it",
)
floor = QUICK_FLOOR if args.quick else 0.85
check_accuracy(test_acc, data["y_test"], floor=floor, what="test accuracy")
