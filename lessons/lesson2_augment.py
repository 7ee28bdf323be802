"""Lesson 2, augmentation: a small ResNet trained on plain images, on augmented images, and on
small then full-size images (progressive resizing), all from the same weights; then TTA.

Run:
    python lessons/lesson2_augment.py              # CPU: about 3 minutes on 2 cores
    python lessons/lesson2_augment.py --quick      # a smoke run, under 30 seconds
    python lessons/notebooks.py lesson2_augment    # this file as an executed notebook
Writes augmented.png, side_on_vs_top_down.png, losses_{plain,augmented,progressive}.png,
tta_views.png and model.pt (the augmented run) to runs/lesson2_augment (--out), and prints a
table of the three runs.
"""
import copy
import time

import torch

from common import (check, check_accuracy, check_size, command_line, fashion_data, float_above,
                    int_in, parse_args, show, split_sizes, threads_note, winner)
from minicnn.augment import lighting, random_affine, resize, side_on, top_down
from minicnn.data import Batches, stratified_subset
from minicnn.export import export_model
from minicnn.models import simple_resnet
from minicnn.plots import plot_augmented, plot_losses
from minicnn.schedule import cosine_lr
from minicnn.train import accuracy, fit, join_histories, predict
from minicnn.tta import predict_tta

# %% [markdown]
# # Lesson 2, augmentation: more pictures from the same pictures
#
# Step 1 of the fast.ai recipe is data augmentation. A network that sees the same few thousand
# pictures every epoch learns those exact pixels: its training loss keeps falling while its
# validation loss stops. So every time a picture is used it is changed a little: flipped left
# to right, turned a few degrees, zoomed in, made lighter or darker. A boot changed like that
# is still a boot, so the labels stay right and memorising pixels stops paying.
#
# Two ideas from the course ride along. **Test-time augmentation (TTA)**: ask the trained
# model about a few augmented views of each image and average its answers. **Progressive
# resizing**: train the first epochs on small images, which are cheap, then go on at full size.

# %% tags=["parameters"]
# The options of a notebook run (a script takes its command line instead), e.g. ["--quick"].
ARGV = []

# %% [markdown]
# ## Settings
#
# The default trains on 3,000 images for a budget of 14 epochs at batch 64: few enough
# images for the run without augmentation to overfit within minutes. `--quick` uses 512
# images, 2 epochs, batch 16 (a smoke run). `check_options` also checks the progressive
# run's budget: an epoch at 14x14 has a quarter of the pixels of one at 28x28, so it counts
# as a quarter of an epoch, and what is left must be a whole number of full-size epochs.

# %%
BATCH_SIZE, QUICK_BATCH_SIZE = 64, 16  # --quick: 32 steps an epoch on 512 images
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # SGD's, in every run
QUICK_FLOOR = 0.25  # the three runs' validation accuracy 0.382-0.549 over seeds 0-2 x 1-2 threads


def check_options(args, error):
    """Defaults that depend on --quick (cut to what --limit leaves); sizes within the splits; a
    pixel budget that adds up."""
    sizes = split_sizes(args.limit)
    args.n_train = args.n_train or min(512 if args.quick else 3000, sizes["train"])
    args.n_valid = args.n_valid or min(2000, sizes["valid"])
    args.epochs = args.epochs or (2 if args.quick else 14)
    for name, split in [("train", "training"), ("valid", "validation")]:
        check_size(error, f"--n-{name}", getattr(args, f"n_{name}"), high=sizes[name],
                   what=f"the {split} split holds {sizes[name]:,} images; a bigger --limit "
                        "gives more")
    # Pixel budget: an epoch at small x small costs (small / 28)^2 of a full-size epoch.
    big_epochs = args.epochs - args.small_epochs * (args.small / 28) ** 2
    if big_epochs < 1 or not float(big_epochs).is_integer():
        error(f"argument --small-epochs: {args.small_epochs} epochs at {args.small}px leave "
              f"{big_epochs:g} full-size epochs of the {args.epochs}-epoch budget (--epochs); "
              "choose values that leave a whole number >= 1 (4 epochs at 14px cost 1 at 28px)")
    args.big_epochs = int(big_epochs)


args = parse_args(
    "Lesson 2, augmentation: a small ResNet is trained without augmentation, with it, and with "
    "progressive resizing, from the same initial weights, and the augmented model is then "
    "tested with and without test-time augmentation.",
    out="lesson2_augment",
    argv=command_line(ARGV),
    batch_size=BATCH_SIZE,
    quick_batch_size=QUICK_BATCH_SIZE,
    check_options=check_options,
    extra=lambda p: (
        p.add_argument("--n-train", type=int_in(1), default=None,
                       help="training images, every class in its share: few enough for the run "
                            "without augmentation to overfit (default 3,000; --quick: 512; "
                            "fewer when --limit leaves fewer)"),
        p.add_argument("--n-valid", type=int_in(1), default=None,
                       help="held-out images the runs are measured on (default 2,000, or all "
                            "the validation split holds when --limit or --quick leaves fewer)"),
        p.add_argument("--epochs", type=int_in(1), default=None,
                       help="each run's budget in full-size epochs (default 14; --quick: 2)"),
        p.add_argument("--lr", type=float_above(0), default=0.05,
                       help="the peak LR of each run's one cosine schedule (default %(default)s)"),
        p.add_argument("--small", type=int_in(8, 27), default=14,
                       help="image side, 8 to 27, of the progressive run's first epochs "
                            "(default %(default)s)"),
        p.add_argument("--small-epochs", type=int_in(1), default=4,
                       help="the progressive run's epochs at --small; each counts (small/28)^2 "
                            "of an epoch against --epochs (default %(default)s: 4 at 14x14 "
                            "cost 1 at 28x28)"),
    ),
)
epochs, big_epochs = args.epochs, args.big_epochs

# %% [markdown]
# ## The data
#
# A stratified sample of the training split (every class in its share) to train on, and one of
# the held-out validation split to compare the runs on. The test set is not used: this lesson
# compares choices, and the test set is never used to choose.

# %%
data = fashion_data(args)
# every class in its share (uint8 (N, 1, 28, 28)); a slice x[:n] need not hold every class
x_train, y_train = stratified_subset(data["x_train"], data["y_train"], args.n_train,
                                     seed=args.seed)
x_valid, y_valid = stratified_subset(data["x_valid"], data["y_valid"], args.n_valid,
                                     seed=args.seed)
print(f"Fashion-MNIST: {len(x_train)} train, {len(x_valid)} valid images; "
      f"{args.device} ({threads_note()})")
started = time.perf_counter()

# %% [markdown]
# ## What each augmentation does to one image
#
# One ankle boot (its toe shows a flip at a glance), copied 8 times, and each row draws new
# random numbers for every copy. Each copy is flipped with probability 0.5; the rotations stay
# within 10 degrees, the zoom within 1.1x; the lighting row is exaggerated so you can see it.
# The last row, `side_on`, is fastai's preset for photos taken from the side: all of them at
# once, each applied to some copies and not others. Every copy is still plainly a boot: that
# is the test an augmentation must pass.

# %%
boot = x_train[(y_train == 9).nonzero()[0, 0]][None].float() / 255  # (1, 1, 28, 28)
boots = boot.expand(8, -1, -1, -1)  # (8, C, H, W): one image, 8 draws
g = torch.Generator().manual_seed(args.seed)
rows = {"original": boot,
        "flip p=0.5": random_affine(boots, generator=g, flip=0.5, p_affine=0),
        "rotate +-10": random_affine(boots, generator=g, flip=0, max_rotate=10, max_zoom=1,
                                     p_affine=1),
        "zoom 1-1.1": random_affine(boots, generator=g, flip=0, max_rotate=0, max_zoom=1.1,
                                    p_affine=1),
        "lighting 0.2": lighting(boots, generator=g, max_brightness=0.2, max_contrast=0.2, p=1),
        "side_on": side_on(generator=g)(boots)}
show(plot_augmented(rows, args.out / "augmented.png",
                    title="one image, 8 random draws of each augmentation"))

# %% [markdown]
# ## Side-on or top-down
#
# Which changes are allowed depends on how the pictures were taken. Clothes, cats and cars are
# seen from the side: a mirror image is still a plausible picture, an upside-down one is not.
# Satellite and microscope images are seen from above, where any of the 8 turns and flips of a
# square is as likely as any other. Compare the two rows: `top_down` turns boots on their heads,
# which the test set never shows, so this lesson uses `side_on`.

# %%
show(plot_augmented({"side_on": side_on(generator=g)(boots),
                     "top_down": top_down(generator=g)(boots)},
                    args.out / "side_on_vs_top_down.png",
                    title="side_on: flips left-right only; top_down: 8 symmetries"))

# %% [markdown]
# ## Three runs from the same start
#
# To measure what a technique buys, everything else must be equal: each run starts from the
# SAME initial weights, sees the batches in the same order, and follows one cosine schedule over
# its whole budget. `run` trains one arm. Progressive resizing needs nothing new: the network
# ends in adaptive pooling, so the same weights take 14x14 and 28x28 images, and the second
# stage is just `fit` called again with batches of bigger images while the schedule runs on.
#
# Each run records an extra training loss, measured in eval mode and without augmentation on
# 1,000 training images, so that it can be compared fairly with the validation loss.

# %%
def sized(size):
    """Train, valid and train-eval Batches of images size x size (resized once, as uint8)."""
    xt, xv = (x_train, x_valid) if size == 28 else (resize(x_train, size), resize(x_valid, size))
    return (Batches(xt, y_train, args.batch_size, shuffle=True, device=args.device,
                    generator=torch.Generator().manual_seed(args.seed)),  # same order in every run
            Batches(xv, y_valid, 512, shuffle=False, device=args.device),
            Batches(xt[:1000], y_train[:1000], 500, shuffle=False, device=args.device))


def run(initial, stages, lr, device, augment):
    """Train a copy of `initial` through stages [(train, valid, train_eval, epochs), ...] under one
    cosine schedule across all of them -> (model, History of the stages joined, seconds)."""
    model = simple_resnet(10).to(device)
    model.load_state_dict(initial)  # every arm starts from the same weights
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    total = sum(len(train) * epochs for train, _, _, epochs in stages)
    histories, done = [], 0
    for train, valid, train_eval, epochs in stages:
        def lr_at(step, offset=done):  # the cosine runs on from stage to stage
            return cosine_lr(offset + step, total_steps=total, lr_max=lr)
        # Same model, same optimizer; only the size of the images in the batches changes.
        if len(stages) > 1:
            print(f"  {train.x.shape[-2]}x{train.x.shape[-1]} images, {epochs} epochs")
        histories.append(fit(model, train, valid, opt, lr_at, epochs, augment=augment,
                             train_eval=train_eval))
        done += len(train) * epochs
    joined = join_histories(histories)
    return model, joined, sum(joined.seconds)


full, small = sized(28), sized(args.small)
initial = copy.deepcopy(simple_resnet(10).state_dict())
aug = side_on(generator=torch.Generator().manual_seed(args.seed))

# %% [markdown]
# ## Run 1: plain images
#
# No augmentation: the network sees the same pixels every epoch. In the figure, follow the
# eval-mode training loss and the validation loss to the end of training: the space between
# them is the overfitting that augmentation is meant to shrink.

# %%
print(f"\nplain: {epochs} epochs at 28x28, no augmentation")
plain, h_plain, t_plain = run(initial, [(*full, epochs)], args.lr, args.device, None)
show(plot_losses(h_plain, args.out / "losses_plain.png",
                 title=f"plain: valid accuracy {h_plain.valid_acc[-1]:.4f}"))

# %% [markdown]
# ## Run 2: augmented images
#
# The same run, but every training batch goes through `side_on` first, with new random numbers
# each time. Compare with the figure above: the training and validation losses should stay
# closer together. Watch where the training loss ends, too: the augmented task is harder, so
# the gap often closes partly because the training loss stays higher, and a short run may stop
# while the augmented model is still learning.

# %%
print(f"\naugmented: {epochs} epochs at 28x28 through side_on")
augmented, h_aug, t_aug = run(initial, [(*full, epochs)], args.lr, args.device, aug)
show(plot_losses(h_aug, args.out / "losses_augmented.png",
                 title=f"augmented: valid accuracy {h_aug.valid_acc[-1]:.4f}"))

# %% [markdown]
# ## Run 3: progressive resizing
#
# Augmented as well, but the first `--small-epochs` epochs use images shrunk to `--small`
# pixels a side, and the rest full size, for the same pixel budget as run 2. Early on a
# network learns coarse shapes, which small images show as well as big ones, for a fraction of
# the cost. In the figure, look at the epoch where the image size changes: the network meets a
# new scale, and its loss jumps up before it falls again.

# %%
print(f"\nprogressive: {args.small_epochs} epochs at {args.small}x{args.small}, "
      f"then {big_epochs} at 28x28, side_on")
progressive, h_prog, t_prog = run(initial, [(*small, args.small_epochs), (*full, big_epochs)],
                                  args.lr, args.device, aug)
show(plot_losses(h_prog, args.out / "losses_progressive.png",
                 title=f"progressive: valid accuracy {h_prog.valid_acc[-1]:.4f}"))

# %% [markdown]
# ## Test-time augmentation
#
# The augmented model learned that a slightly turned or mirrored boot is still a boot, so at
# test time we can show it several such views of each image and average its probabilities
# (not its logits: one confident view must not veto a class). Three ways are measured: the
# course's equal mean of the plain view and 4 `side_on` views; fastai 2's mix, which gives the
# plain view a weight of 0.25 and the 4 views the rest; and the plain view with its mirror image.
#
# The figure picks a validation image that the plain view got wrong and TTA got right (or
# the first image, when there is none) and shows the views with the model's probability of the
# true class for each: some views are more convincing than others, and the mean decides.

# %%
valid = full[1]
p_plain = predict(augmented, valid)
p_tta = predict_tta(augmented, valid, augment="side_on",
                    generator=torch.Generator().manual_seed(args.seed))
p_beta = predict_tta(augmented, valid, augment="side_on",
                     generator=torch.Generator().manual_seed(args.seed), beta=0.25)
# Flip only: the plain view and its mirror image, an exact view (no resampling blur).
p_flip = predict_tta(augmented, valid, augment=lambda x: x.flip(-1), n_aug=1)
acc_plain, acc_tta = accuracy(p_plain, y_valid), accuracy(p_tta, y_valid)
acc_beta, acc_flip = accuracy(p_beta, y_valid), accuracy(p_flip, y_valid)

# The views of one image: the plain view and 4 side_on views, fresh draws like TTA's.
fixed = ((p_plain.argmax(1) != y_valid) & (p_tta.argmax(1) == y_valid)).nonzero()
i = int(fixed[0, 0]) if len(fixed) else 0
image = x_valid[i][None].float().to(args.device) / 255  # (1, 1, 28, 28)
views = torch.cat([image, side_on(generator=torch.Generator().manual_seed(args.seed))(
    image.expand(4, -1, -1, -1))])  # (5, 1, 28, 28)
probs = predict(augmented, [(views, None)])[:, y_valid[i]]  # (5,) p(true class) per view
show(plot_augmented({"TTA views": views.cpu()}, args.out / "tta_views.png",
                    title=f"{data['classes'][y_valid[i]]}: p(true class) per view "
                          + " ".join(f"{p:.2f}" for p in probs)
                          + f" -> mean {probs.mean():.2f} (plain view first)"))

# %% [markdown]
# ## What each technique bought
#
# The table puts the three runs side by side. `gap` is the validation loss minus the eval-mode
# training loss: the smaller it is, the less the model has memorised its training images.
# Then the differences: augmentation's effect on the gap and on accuracy, TTA's gain on the
# augmented model, and progressive resizing against full size for the same pixel budget. The
# quick run has only 102 validation images, where one image is about a point of accuracy: read
# its differences as noise. The default run's are the ones that tell.

# %%
gap = {name: h.valid_loss[-1] - h.train_eval_loss[-1]
       for name, h in [("plain", h_plain), ("augmented", h_aug)]}
print(f"\n{'run':12} {'train loss*':>11} {'valid loss':>10} {'gap':>7} {'valid acc':>9} "
      f"{'train time':>10}")
for name, h, seconds in [("plain", h_plain, t_plain), ("augmented", h_aug, t_aug),
                         ("progressive", h_prog, t_prog)]:
    print(f"{name:12} {h.train_eval_loss[-1]:11.4f} {h.valid_loss[-1]:10.4f} "
          f"{h.valid_loss[-1] - h.train_eval_loss[-1]:7.4f} {h.valid_acc[-1]:9.4f} "
          f"{seconds:9.0f}s")
print("* eval mode, no augmentation, on 1,000 training images; gap = valid loss - train loss")
print(f"\naugmentation: gap {gap['plain']:.4f} -> {gap['augmented']:.4f}; "
      f"accuracy {h_plain.valid_acc[-1]:.4f} -> {h_aug.valid_acc[-1]:.4f}")
print(f"TTA on the augmented model: {acc_plain:.4f} -> {acc_tta:.4f} "
      f"(gain {acc_tta - acc_plain:+.4f}); "
      f"fastai 2's beta=0.25 mix: {acc_beta:.4f} ({acc_beta - acc_plain:+.4f}); "
      f"flip only: {acc_flip:.4f} ({acc_flip - acc_plain:+.4f})")
print(f"progressive resizing vs full size, same pixel budget: accuracy "
      f"{h_prog.valid_acc[-1]:.4f} vs {h_aug.valid_acc[-1]:.4f}, "
      f"training time {t_prog:.0f}s vs {t_aug:.0f}s")
print(f"\ntotal {time.perf_counter() - started:.0f}s; figures in {args.out}")

# %% [markdown]
# ## The model, kept
#
# `model.pt` keeps the augmented run's weights (trained at full size) with all a prediction
# needs: the architecture, the class names, the image size and channels, and the augmentation
# it was trained with, `side_on`, so that a prediction can use TTA's views.
# `python -m minicnn.predict runs/lesson2_augment/model.pt IMAGES... --tta` predicts new images
# with it, and `minicnn.export.load_model` rebuilds it without any training code.

# %%
# no test accuracy: this lesson measures none
export_model(args.out / "model.pt", augmented, arch="simple_resnet",
             arch_kwargs={"widths": (16, 32, 64)},  # simple_resnet's default, as built above
             classes=data["classes"], size=28, channels=1, preset="side_on")
print(f"the augmented run's model in {args.out / 'model.pt'}")

# %% [markdown]
# ## Self-check
#
# Always: TTA gives one row of probabilities per image, each summing to 1, and every run beats
# a floor, the most common class's share and what guessing could reach by luck, on a
# validation sample that holds every class; a network that learned nothing cannot pass. The
# default run must also show what the lesson claims: augmentation narrows the gap, and neither
# TTA nor progressive resizing is worse beyond the noise of 2,000 validation images (about 2
# points: a difference smaller than that is luck either way). The quick run is too small to
# test those claims, so it does not.

# %%
check(p_tta.shape == p_plain.shape
      and torch.allclose(p_tta.sum(1), torch.ones(len(p_tta)), atol=1e-5),
      f"TTA gives {len(p_tta)} probability rows summing to 1")
for name, history in [("plain", h_plain), ("augmented", h_aug), ("progressive", h_prog)]:
    check_accuracy(history.valid_acc[-1], y_valid, floor=QUICK_FLOOR if args.quick else 0.8,
                   what=f"{name}: validation accuracy")
if not args.quick:
    check(gap["augmented"] < gap["plain"],
          f"augmentation narrows the train/valid gap: {gap['plain']:.4f} -> "
          f"{gap['augmented']:.4f}")
    # TTA and progressive resizing: not worse beyond the noise of the validation images (2
    # standard errors of a difference: one image is 0.0005 of 2,000, 2 SE about 0.022)
    won, noise = winner(acc_plain, acc_tta, len(y_valid), ("plain", "TTA"))
    check(won != "plain", f"TTA is not worse than the plain view beyond the noise {noise:.4f}: "
                          f"{acc_plain:.4f} -> {acc_tta:.4f}")
    won, noise = winner(h_aug.valid_acc[-1], h_prog.valid_acc[-1], len(y_valid),
                        ("full size", "progressive"))
    check(won != "full size", "progressive resizing is not worse than full size beyond the "
                              f"noise {noise:.4f}: {h_prog.valid_acc[-1]:.4f} vs "
                              f"{h_aug.valid_acc[-1]:.4f}")
