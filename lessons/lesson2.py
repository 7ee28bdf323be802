"""Lesson 2 end to end: the fast.ai recipe's 8 steps, on a pretrained body and few labels.

Run:
    python lessons/lesson2.py                # the CPU default (`make lesson`): minutes
    python lessons/lesson2.py --quick        # a smoke run: seconds
    python lessons/lesson2.py --labelled 4000    # more labels: where does the body stop paying?
    python lessons/lesson2.py --accuracy     # from scratch on all 50,000 images, 10 classes
    python lessons/lesson2.py --full         # --accuracy's GPU setting: a wider network
    python lessons/lesson2.py --data PATH  # your images: PATH/train/<class>/*, PATH/valid/<class>/*
    python lessons/notebooks.py lesson2      # this file as an executed notebook
    torchrun --standalone --nproc_per_node=2 lessons/lesson2.py --quick   # 2 processes
Writes report.md, results.json, model.pt and the figures into --out (default:
runs/lesson2/<data>-<mode>, e.g. runs/lesson2/fashion-mnist-cpu).
"""

import atexit
import functools
import os
import time

import torch

import lesson2_io as io  # loading, the body's cache, figures, report.md: no decisions
from common import check, check_accuracy, command_line, setup, show, threads_note, winner
from lesson2_settings import MODES
import minicnn.distributed as distributed
import minicnn.speed as speed
from minicnn.augment import side_on, top_down
from minicnn.data import stratified_subset, train_valid_split
from minicnn.diagnose import diagnose
from minicnn.export import export_model
from minicnn.freeze import bn_freeze, differential_lrs, freeze, param_groups, unfreeze
from minicnn.lr_find import lr_find
from minicnn.models import pretrained_classifier, simple_resnet
from minicnn.optim import SGD
from minicnn.precompute import body_and_head, precompute_features
from minicnn.schedule import cosine_lr, cycle_end_steps, sgdr_lr, sgdr_lrs, total_steps
from minicnn.snapshot import Snapshots, predict_each
from minicnn.train import accuracy, evaluate, fit, join_histories, predict
from minicnn.tta import predict_tta

# %% [markdown]
# # Lesson 2: the fast.ai recipe for a world-class image classifier
#
# The course's setting: a body pretrained on many labelled images (ImageNet), and a new task
# with a few hundred labels. Here the body is a small ResNet pretrained on 5 Fashion-MNIST
# classes (step 0, cached), and the new task is the other 5 classes from 250 labelled images.
# Then the recipe's 8 steps:
#
# 1. augmentation; the frozen body's activations computed once
# 2. an LR range test: the highest rate at which the loss still clearly falls
# 3. the head trained on those activations
# 4. the head again, on augmented images, SGDR with cycles of 1 epoch
# 5. every layer group unfrozen; 6. differential learning rates (earlier groups lower)
# 7. an LR range test on the whole network
# 8. the whole network, SGDR with cycles of 1, 2, 4 epochs, a snapshot at each cycle's end
#
# Each step prints the validation accuracy before and after: what it bought. At the end the
# same labelled images train a network from scratch for the same seconds, and the report
# says which won. The test images are predicted once, at the end, and choose nothing.

# %% tags=["parameters"]
# The options of a notebook run (a script takes its command line instead), e.g. ["--quick"].
ARGV = []

# %% [markdown]
# ## Settings
#
# One row of lessons/lesson2_settings.py per mode: the CPU default, `--quick` (seconds),
# `--accuracy` (all 50,000 images, from scratch), `--full` (its GPU setting). A value given on
# the command line wins.

# %%
args = io.parse_args(command_line(ARGV))
MODE = args.mode  # "cpu" (the default), "quick", "accuracy" or "full"
row = MODES[MODE]
TRANSFER = MODE in ("cpu", "quick") and not args.accuracy  # else one network from scratch
SOURCE_CLASSES = [0, 2, 5, 7, 8]  # T-shirt/top, Pullover, Sandal, Sneaker, Bag: the "ImageNet"
TARGET_CLASSES = [1, 3, 4, 6, 9]  # Trouser, Dress, Coat, Shirt, Ankle boot: the new task
ARCH = args.arch or ("efficientnet_lite0" if args.data else "simple_resnet")
WIDTHS = row["widths"]
N_LABELLED = args.labelled or row["n_labelled"]
N_VALID = row["n_valid"]
PRETRAIN_EPOCHS, PRETRAIN_LR = row["pretrain_epochs"], 0.2
BATCH_SIZE = args.batch_size or row["batch_size"]
SIZES = (args.size,) if args.size else (row["data_size"],) if args.data else row["sizes"]
HEAD_EPOCHS = row["head_epochs"]
FROZEN_CYCLES = 2  # step 4: SGDR cycles of 1 epoch, augmented, body frozen
CYCLES = args.cycles or row["cycles"]
MIN_CYCLE_STEPS = row["min_cycle_steps"]
LR_RATIO = args.lr_ratio or (10 if ARCH != "simple_resnet" else 3)  # between layer groups
FALLBACK_LR = 0.01  # when a range test shows no clear fall (said out loud)
LR_FIND_STEPS = row["lr_find_steps"]
WEIGHT_DECAY = 5e-4
TRAIN_EVAL = 2000  # training images the diagnosis evaluates in eval mode (half of fewer)
TTA_VIEWS = row["tta_views"]
TTA_NAME = f"TTA ({TTA_VIEWS} views + plain)" if TTA_VIEWS else "TTA (plain + mirror image)"
AUGMENT = top_down if args.preset == "top_down" else side_on
# fp32, channels_last or bf16 autocast: the fastest of a few timed steps (the cell before step 0)
PRECISION, CHANNELS_LAST = args.precision, args.channels_last  # auto, or forced on the command line
FLOOR = row["floor_from_scratch"] if MODE == "quick" and args.accuracy else row["floor"]

# %% [markdown]
# ## Several processes (torchrun): the only cell that knows about them
#
# Skip it on a first read: with one process it changes nothing. Under `torchrun` each process
# trains on its share of every batch, and `fit`'s one hook averages the gradients after
# backward, so every process takes the same step (docs/distributed.md). The range tests run
# on process 0, which sends its result; predictions are gathered; process 0 alone writes.

# %%
me = distributed.setup()  # under torchrun: this process's rank and device; else one process
MAIN = me.rank == 0
feature_cache = args.cache if MAIN else None  # the activations: process 0 alone writes them
if me.world_size > 1:
    args.device = str(me.device)  # each process its own GPU, or its share of the cores
    args.threads = args.threads or max(1, os.cpu_count() // int(os.environ["LOCAL_WORLD_SIZE"]))
    fit = functools.partial(fit, after_backward=distributed.average_gradients,
                            all_sum=distributed.all_sum)
    evaluate = functools.partial(evaluate, all_sum=distributed.all_sum)
    lr_find = functools.partial(distributed.run_on_main, lr_find)  # process 0 sweeps for all
    _predict, _predict_tta = predict, predict_tta  # each process predicts its part: gathered

    def predict(*a, **k):
        return distributed.gather(_predict(*a, **k))

    def predict_tta(*a, **k):
        return distributed.gather(_predict_tta(*a, **k))
    atexit.register(distributed.teardown)


def agreed(value):
    """A value from process 0's clock, the same on every process (one process: as it is)."""
    return distributed.run_on_main(lambda: value) if me.world_size > 1 else value


setup(args)  # seeds, threads, the output folder
hyper = dict(momentum=0.9, weight_decay=WEIGHT_DECAY)
settings = {k: v for k, v in globals().items()
            if k.isupper() and k not in ("ARGV", "MAIN", "MODES", "SGD")}  # this run's constants
report = io.Report(args.out, MODE, settings=settings, main=MAIN, run=args.run, device=args.device)


# %% [markdown]
# ## How a learning rate is read off a range test (steps 2, 7 and the from-scratch arm)
#
# The course: "the highest rate where the loss is still clearly falling". `lr_find` suggests
# one and says why; when it finds no clear fall, this lesson says so and falls back.


# %%
def choose_lr(found, *, floor=0.0):
    """The LR after a range test: lr_find's suggestion. A trained network's loss is flat until
    the rate is too high, and noise on that flat part can look like a fall: a suggestion below
    `floor` is not taken. Else a tenth of the rate where the loss blew up, else FALLBACK_LR."""
    if found.loss_fell and found.suggested_lr >= floor:
        return found.suggested_lr, found.reason
    blew_up = len(found.lrs) < LR_FIND_STEPS  # the sweep stopped early: past it the loss diverged
    lr = found.lrs[-1] / 10 if blew_up else FALLBACK_LR
    fallback = f"a tenth of the rate where the loss blew up: {lr:.2g}" if blew_up else (
        f"{FALLBACK_LR} (FALLBACK_LR)")
    return lr, f"no usable suggestion ({found.reason}); {fallback}"


# %% [markdown]
# ## The data
#
# uint8 images (N, C, H, W) and labels 0..n-1. The validation images are held out of the
# labelled ones and choose everything (LRs, when to stop, the way to predict); the test
# images are predicted once, at the end. An image folder: `train/` split into training and a
# tenth for validation, and its `valid/` is the test set.


# %%
def classes_of(x, y, classes):
    """The images of the given classes, labelled 0..len(classes)-1 in that order."""
    keep = torch.isin(y, torch.tensor(classes))
    new_label = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    new_label[torch.tensor(classes)] = torch.arange(len(classes))
    return x[keep], new_label[y[keep]]


def subset(xy, n):  # a stratified sample of n, or all of them
    return xy if n is None or n >= len(xy[1]) else stratified_subset(*xy, n, seed=args.seed)


source = None
if args.data is not None:
    folder = io.load_folder(args.data, SIZES[-1])  # at the size it trains at, as predict reads it
    n_valid = max(len(folder.train[1]) // 10, len(folder.classes))
    train, valid = train_valid_split(*folder.train, n_valid, seed=args.seed)
    test, classes, name = folder.valid, folder.classes, str(args.data)
    if MODE == "quick":  # seconds: a few of your images
        train, test = subset(train, N_LABELLED), subset(test, row["n_test"])
else:
    (x_all, y_all), test, names = io.load_fashion()
    if TRANSFER:  # the source classes for step 0; of the target classes a labelled sample
        source = subset(classes_of(x_all, y_all, SOURCE_CLASSES), row["n_source"])
        labelled = subset(classes_of(x_all, y_all, TARGET_CLASSES), N_LABELLED + N_VALID)
        train, valid = train_valid_split(*labelled, N_VALID, seed=args.seed)
        test = subset(classes_of(*test, TARGET_CLASSES), row["n_test"])
        classes, name = [names[c] for c in TARGET_CLASSES], "Fashion-MNIST, 5 new classes"
    else:  # all 10 classes, N_VALID held out of the 60,000
        train, valid = train_valid_split(x_all, y_all, N_VALID, seed=args.seed)
        if MODE == "quick":
            train = subset(train, N_LABELLED)
        test, classes, name = subset(test, row["n_test"]), names, "Fashion-MNIST"
# a training sample for the eval-mode training loss (the diagnosis): TRAIN_EVAL, or half of few
pick = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(args.seed))
pick = pick[: min(TRAIN_EVAL, len(train[1]) // 2)]
data = dict(train=train, valid=valid, test=test, train_eval=(train[0][pick], train[1][pick]))
n_classes, channels = len(classes), train[0].shape[1]
report.say(
    f"{name}: {len(train[0])} labelled training, {len(valid[0])} validation, {len(test[0])} "
    f"test images of {n_classes} classes; {ARCH} on {args.device} ({threads_note()}"
    f"{f', {me.world_size} processes' if me.world_size > 1 else ''})"
)
# batches at each size: train, valid, test, train_eval (under torchrun: this process's share)
batches = {size: io.batches_at(data, size, BATCH_SIZE, args) for size in SIZES}
small, full = batches[SIZES[0]], batches[SIZES[-1]]
augment = AUGMENT(generator=torch.Generator().manual_seed(args.seed + me.rank))
# The SGDR cycle unit ("an epoch"): a whole number of epochs, at least MIN_CYCLE_STEPS steps.
steps_per_epoch = -(-MIN_CYCLE_STEPS // len(small["train"])) * len(small["train"])

# %% [markdown]
# ## How fast can this machine train?
#
# A training step can run in fp32, on channels_last tensors (pixels stored channel by channel
# last, as fast kernels like them), or in bf16 autocast where the processor or GPU computes
# bf16 itself. Which is fastest depends on the machine, so a few timed steps of each decide
# (`minicnn/speed.py`); `--precision` and `--channels-last` force one.

# %%
with torch.random.fork_rng():  # a network for the trial only: no random number used here
    trial_net = (simple_resnet(n_classes, channels, WIDTHS) if ARCH == "simple_resnet" else
                 pretrained_classifier(ARCH, n_classes, pretrained=False, in_channels=channels))
way, fast, step_times = agreed(speed.fastest(trial_net.to(args.device), full["train"],
                                             speed.ways(args.device, PRECISION, CHANNELS_LAST)))
del trial_net
bf16 = fast["mixed_precision"]  # evaluate and predict too
settings["WAY"] = way  # results.json says which way this run trained
report.say(f"speed trial, seconds a training step at {SIZES[-1]}px: "
           + ", ".join(f"{name} {seconds:.3f}" for name, seconds in step_times.items())
           + f"; training in {way}")

# %% [markdown]
# ## Step 0: the pretrained body
#
# Fashion-MNIST: a small ResNet trained on the 5 source classes; its first two layer groups
# become the body, and a new head (pooling, linear) is made for the 5 new classes. The body is
# cached, so a second run skips this. Your images: EfficientNet-Lite0 with its ImageNet weights.

# %%
started = time.perf_counter()
if ARCH == "simple_resnet" and TRANSFER:
    pretrained = simple_resnet(len(SOURCE_CLASSES), channels, WIDTHS)
    cache = io.body_cache(args, source[0], SOURCE_CLASSES, WIDTHS, PRETRAIN_EPOCHS, PRETRAIN_LR,
                          SIZES[-1])
    cached = io.load_body(pretrained, cache)
    if not cached:
        source_batches = io.training_batches(*source, 128, args)
        pretrained.to(args.device)
        step_seconds = speed.seconds_per_step(pretrained, source_batches, **fast)
        report.estimate("step 0", step_seconds * PRETRAIN_EPOCHS * len(source_batches))
        opt = SGD(pretrained.parameters(), PRETRAIN_LR, **hyper)
        lr_at = functools.partial(cosine_lr, total_steps=PRETRAIN_EPOCHS * len(source_batches),
                                  lr_max=PRETRAIN_LR)
        # its own augmentation stream: a cached body leaves every later random number as it was
        pretrain_augment = AUGMENT(
            generator=torch.Generator().manual_seed(args.seed + 1000 + me.rank))
        fit(pretrained.to(args.device), source_batches, None, opt, lr_at, PRETRAIN_EPOCHS,
            augment=pretrain_augment, verbose=False, **fast)
        io.save_body(pretrained, cache)
    model = simple_resnet(n_classes, channels, WIDTHS)  # a new head for the new classes
    model.layer_groups[:2].load_state_dict(pretrained.layer_groups[:2].state_dict())
    what = (f"body pretrained on {len(source[0])} images of the source classes, "
            f"{PRETRAIN_EPOCHS} epoch(s) ({'cached' if cached else 'trained now, then cached'})")
elif TRANSFER:
    model = pretrained_classifier(ARCH, n_classes, in_channels=channels)  # ImageNet weights
    what = f"{ARCH} with its ImageNet weights, a new head"
else:
    model = simple_resnet(n_classes, channels, WIDTHS)  # random weights: no body to keep
    what = f"no pretrained body: {ARCH} from random weights, so steps 1-6 do not apply"
model = model.to(args.device)  # every process seeds alike: the same new head on each
report.step(0, what, started)

# %% [markdown]
# ## Step 1: augmentation; the frozen body's activations computed once
#
# Augmentation shows the network new versions of each image (flips, small rotations and
# zooms, lighting) so it learns what a class looks like, not the pixels of 250 photos. Look at
# the figure: each row is one image and three random versions of it. Then, with the body
# frozen, its output for each image never changes: computed once, the head trains on it in
# seconds (precompute=True in fastai 0.7).

# %%
if TRANSFER:
    started = time.perf_counter()
    show(io.plot_augmentation(small["valid"], AUGMENT, args))
    freeze(model, train_bn=False)  # the body is a fixed function (BatchNorm on its statistics)
    body, head = body_and_head(model)
    features = {split: precompute_features(body, io.at_size(data[split][0], SIZES[-1]),
                                           batch_size=256, cache=feature_cache, arch=ARCH,
                                           device=args.device)
                for split in ("train", "valid")}
    on_features = io.feature_batches(features, data, BATCH_SIZE, args)
    report.step(1, f"{args.preset} augmentation; the body's activations precomputed "
                   f"({tuple(features['train'].shape[1:])} per image)", started)

# %% [markdown]
# ## Step 2: an LR range test on the head
#
# A short run whose learning rate grows exponentially each step, from 1e-7 to 10, recording the
# smoothed loss. In the figure, pick the rate where the loss falls fastest, well before it
# turns up: that is the suggestion (the red dot), and the reason is printed.

# %%
if TRANSFER:
    started = time.perf_counter()
    head_opt = SGD(head.parameters(), FALLBACK_LR, **hyper)
    found = lr_find(head, on_features["global_train"], head_opt, num_iter=LR_FIND_STEPS,
                    end_lr=10.0)  # everything is put back afterwards
    lr, why = choose_lr(found)
    show(io.plot_lr_find(found, args.out / "lr_find_head.png"))
    report.step(2, f"LR range test on the head: lr {lr:.2g} ({why})", started)

# %% [markdown]
# ## Step 3: the body frozen, the head trained on the activations
#
# One SGDR cycle (a cosine from the chosen rate down to 0) over the cached activations. The
# first big jump in validation accuracy comes from here: a new head on a good body.

# %%
if TRANSFER:
    started, before = time.perf_counter(), evaluate(head, on_features["valid"])[1]
    head_steps = HEAD_EPOCHS * len(on_features["train"])
    head_lr_at = functools.partial(sgdr_lr, steps_per_cycle=head_steps, lr_max=lr)
    fit(head, on_features["train"], None, head_opt, head_lr_at, HEAD_EPOCHS, verbose=False)
    after = evaluate(model, small["valid"], mixed_precision=bf16)[1]  # the model's own head
    report.step(3, f"head trained {HEAD_EPOCHS} epochs on the activations at lr {lr:.2g}",
                started, before, after)

# %% [markdown]
# ## Step 4: the head again, on augmented images, SGDR with cycle_len=1
#
# Precompute off: now every image is augmented afresh, so the head sees new versions. The body
# stays frozen but its BatchNorm layers train (fastai 2's `train_bn`): their statistics follow
# the new classes' images (kept on the source's, this step lost accuracy: docs/recipe.md).

# %%
if TRANSFER:
    started, before = time.perf_counter(), report.last_accuracy
    freeze(model, train_bn=True)
    opt = SGD(param_groups(model, lr, **hyper), lr, **hyper)  # one group per layer group
    frozen_steps = total_steps(FROZEN_CYCLES, steps_per_cycle=steps_per_epoch)
    frozen_lr_at = functools.partial(sgdr_lr, steps_per_cycle=steps_per_epoch, lr_max=lr)
    step_seconds = speed.seconds_per_step(model, small["train"], **fast)
    report.estimate("step 4", step_seconds * frozen_steps)
    fit(model, small["train"], None, opt, frozen_lr_at, frozen_steps // len(small["train"]),
        augment=augment, verbose=False, **fast)
    after = evaluate(model, small["valid"], mixed_precision=bf16)[1]
    report.step(4, f"frozen body (its BatchNorm trains), augmented images: {FROZEN_CYCLES} SGDR "
                   f"cycles of 1 epoch at lr {lr:.2g}", started, before, after)

# %% [markdown]
# ## Steps 5 and 6: unfreeze every layer group; differential learning rates
#
# The body may now change, but gently: each earlier layer group learns at a rate LR_RATIO times
# below the next, since early layers (edges, textures) need the least change.

# %%
if TRANSFER:
    unfreeze(model)
    if ARCH != "simple_resnet":
        bn_freeze(model)  # an ImageNet body keeps its BatchNorm statistics (docs/fine_tuning.md)
    lrs = differential_lrs(lr, len(model.layer_groups), ratio=LR_RATIO)
    bn_note = ", the body's BatchNorm on its ImageNet statistics" if ARCH != "simple_resnet" else ""
    report.step(5, "unfrozen: every layer group trains" + bn_note, time.perf_counter())
    report.step(6, f"differential learning rates: each group {LR_RATIO}x below the next (the "
                   "last group's rate comes from step 7)", time.perf_counter())
    head_lr = lr
else:
    lrs, head_lr = [FALLBACK_LR] * len(model.layer_groups), None

# %% [markdown]
# ## Step 7: an LR range test on the whole network
#
# The groups keep their ratios while the sweep scales them all. The course keeps the head's
# rate for the last group; the range test checks it is safe: the loss must not blow up within
# a decade above it (else a tenth of the rate where it blew up).

# %%
started = time.perf_counter()
step_seconds = speed.seconds_per_step(model, small["global_train"], **fast)
report.estimate("step 7", step_seconds * LR_FIND_STEPS)  # at most: a loss that blows up stops it
opt = SGD(param_groups(model, lrs, **hyper), lrs[-1], **hyper)
found = lr_find(model, small["global_train"], opt, num_iter=LR_FIND_STEPS, end_lr=10.0)
show(io.plot_lr_find(found, args.out / "lr_find_unfrozen.png"))
if head_lr:
    blew_up = found.lrs[-1] if len(found.lrs) < LR_FIND_STEPS else None  # stopped early there
    lr = head_lr if blew_up is None or head_lr <= blew_up / 10 else blew_up / 10
    why = (f"the head's rate {head_lr:.2g} kept: " if lr == head_lr else "a tenth of the rate "
           f"where the loss blew up, below the head's {head_lr:.2g}: ") + found.stop_reason
else:
    lr, why = choose_lr(found)
lrs = [x * lr / lrs[-1] for x in lrs]
report.step(7, f"LR range test on the whole network: last group lr {lr:.2g}; {why}", started)

# %% [markdown]
# ## Step 8: the whole network, SGDR with cycle_mult=2, a snapshot at each cycle's end
#
# Cycles of 1, 2, 4 epochs: the rate restarts high (to leave a narrow minimum) and anneals to
# 0 (to settle in a wide one). At each cycle's end the weights are kept: a snapshot. With
# progressive resizing every cycle but the last trains at the small size. When a cycle ends
# with a higher validation loss than the one before, the network has started to overfit: stop.

# %%
snapshots, histories, stopped = Snapshots(), [], None
schedule = dict(steps_per_cycle=steps_per_epoch, cycle_mult=2)
ends = cycle_end_steps(CYCLES, **schedule)
lr_at = functools.partial(sgdr_lrs, lr_maxes=lrs, **schedule)
small_steps = ends[-2] + 1 if CYCLES > 1 else 0  # every cycle but the last: the small size
report.estimate("step 8", io.fit_seconds(model, small, small_steps, fast)
                + io.fit_seconds(model, full, ends[-1] + 1 - small_steps, fast))
for cycle in range(CYCLES):
    started, before = time.perf_counter(), report.last_accuracy
    stage = full if cycle == CYCLES - 1 else small
    first = ends[cycle - 1] + 1 if cycle else 0  # the step after the previous cycle's last
    history = fit(model, stage["train"], stage["valid"], opt, lr_at,
                  (ends[cycle] + 1) // len(stage["train"]), start_step=first, augment=augment,
                  cycle_ends=ends, on_cycle_end=snapshots, train_eval=stage["train_eval"],
                  verbose=MODE != "quick" and MAIN, **fast)
    histories.append(history)
    size = SIZES[-1] if stage is full else SIZES[0]
    epochs = (ends[cycle] + 1 - first) // len(stage["train"])
    report.step(8, f"cycle {cycle + 1}/{CYCLES}: {epochs} epoch(s) at {size}px, snapshot taken",
                started, before, history.valid_acc[-1])
    if cycle and history.valid_loss[-1] > histories[-2].valid_loss[-1]:
        stopped = f"the validation loss rose at the end of cycle {cycle + 1}" + (
            ": stopped there (overfitting)" if cycle < CYCLES - 1
            else ", the last: it has started to overfit")
        break
history = join_histories(histories)  # per step: the losses and LRs of the whole of step 8
recipe_seconds = report.seconds_since(1 if TRANSFER else 7)
report.curve(recipe_seconds - sum(history.seconds), history)  # validation accuracy by seconds

# %% [markdown]
# ## Predictions: the last weights, TTA, the ensemble of the last snapshots, both
#
# Test-time augmentation averages the probabilities of the plain image and a few augmented
# views; a snapshot ensemble averages those of the last M snapshots. Which way to predict is
# chosen on the validation images only; the test column is for reading, not choosing.


# %%
def tta(m, b):  # a new seeded generator each call: every snapshot sees the same views
    views = (AUGMENT(generator=torch.Generator().manual_seed(args.seed)) if TTA_VIEWS
             else lambda x: x.flip(3))  # the mirror: exact, no resampling
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        return predict_tta(m, b, augment=views, n_aug=TTA_VIEWS or 1)


started = time.perf_counter()
image_seconds = speed.seconds_per_step(model, full["valid"], **fast, backward=False,
                                       per_image=True)
passes = len(snapshots) * (2 + (TTA_VIEWS or 1))  # plain, and TTA's plain + views, each snapshot
report.estimate("predicting", image_seconds * passes * (len(full["valid"].x) + len(full["test"].x)))
plain = functools.partial(predict, mixed_precision=bf16)
# each snapshot's probabilities (N, C) on each split, plain and with TTA
each = {(split, how): predict_each(model, snapshots, full[split], predict_fn=fn)
        for split in ("valid", "test") for how, fn in (("plain", plain), ("tta", tta))}
y = {split: data[split][1] for split in ("valid", "test")}
sizes = range(2, len(snapshots) + 1) or [1]
m = max(sizes, key=lambda k: accuracy(sum(each["valid", "plain"][-k:]) / k, y["valid"]))
ways = {"last weights": (1, "plain"), TTA_NAME: (1, "tta"),
        f"ensemble of the last {m} snapshots": (m, "plain"),
        f"ensemble of the last {m} + TTA": (m, "tta")}
results = {way: {split: accuracy(sum(each[split, how][-k:]) / k, y[split])
                 for split in ("valid", "test")}
           for way, (k, how) in ways.items()}
chosen = max(results, key=lambda way: results[way]["valid"])  # on validation only
k, how = ways[chosen]
test_probs = sum(each["test", how][-k:]) / k
report.predictions(results, chosen, time.perf_counter() - started)
verdict = diagnose(history)

# %% [markdown]
# ## From scratch: the same labelled images, the same seconds, no pretrained body
#
# Does the pretrained body pay? A network from random weights gets its own range test and as
# many epochs as fill the recipe's seconds, one cosine. A winner is named only when the gap
# is beyond the noise of the test set (`winner`): 2 standard errors of a difference of two
# accuracies, 2 sqrt((p1 (1 - p1) + p2 (1 - p2)) / n).

# %%
if TRANSFER:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    scratch = simple_resnet(n_classes, channels, WIDTHS).to(args.device)
    opt = SGD(scratch.parameters(), FALLBACK_LR, **hyper)
    found = lr_find(scratch, small["global_train"], opt, num_iter=LR_FIND_STEPS, end_lr=10.0)
    scratch_lr = choose_lr(found)[0]
    if ARCH == "simple_resnet":  # the recipe's network: step 8's epochs, measured, same images
        seconds_per_epoch = sum(history.seconds) / len(history.seconds)
    else:  # another network than the recipe's: its own epoch, timed on a few batches
        seconds_per_epoch = io.fit_seconds(scratch, small, len(small["train"]), fast)
    left = recipe_seconds - (time.perf_counter() - started)
    epochs = agreed(max(1, round(left / seconds_per_epoch)))  # the epochs that fill the seconds
    lr_at = functools.partial(cosine_lr, total_steps=epochs * len(small["train"]),
                              lr_max=scratch_lr)
    fit(scratch, small["train"], small["valid"], opt, lr_at, epochs, augment=augment,
        train_eval=small["train_eval"], verbose=False, **fast)  # evaluated as often as step 8
    scratch_seconds = time.perf_counter() - started  # range test and training, as the recipe's
    scratch_results = {way: {split: accuracy(fn(scratch, full[split]), y[split])
                             for split in ("valid", "test")}
                       for way, fn in (("last weights", plain), (TTA_NAME, tta))}
    scratch_way = max(scratch_results, key=lambda way: scratch_results[way]["valid"])
    p1, p2, n = results[chosen]["test"], scratch_results[scratch_way]["test"], len(y["test"])
    won, noise = winner(p1, p2, n, ("the pretrained recipe", "training from scratch"))
    report.comparison(recipe_seconds, p1, scratch_seconds, epochs, scratch_lr, scratch_results,
                      scratch_way, n, won=won, noise=noise)

# %% [markdown]
# ## The model, kept
#
# `model.pt` holds the last weights with all a prediction needs: the architecture, the class
# names, the image size and channels, the augmentation preset (for TTA) and their test
# accuracy. `python -m minicnn.predict runs/.../model.pt IMAGES...` predicts new images with
# it, and `minicnn.export.load_model` rebuilds it without any training code.

# %%
if MAIN:
    export_model(args.out / "model.pt", model, arch=ARCH,
                 arch_kwargs={"widths": WIDTHS} if ARCH == "simple_resnet" else {},
                 classes=list(classes), size=SIZES[-1], channels=channels, preset=args.preset,
                 test_accuracy=results["last weights"]["test"])  # the last weights, plain
    report.say(f"the model (last weights, test accuracy {results['last weights']['test']:.4f}) "
               f"in {args.out / 'model.pt'}")

# %% [markdown]
# ## The report, the figures, and a self-check
#
# The first figure is what each step bought: validation accuracy after each step. Then step
# 8's losses (dotted lines: the SGDR restarts): the diagnosis says whether the run under- or
# over-fits. The confusion matrix and the test images the network got most wrong come last.
# The self-check fails a run whose test accuracy is below a floor, the most common class's
# share, or what guessing would reach by luck.

# %%
if MAIN:
    restarts = [end + 1 for end in ends[: len(histories) - 1]]
    for fig in io.figures(args.out, report.rows, history, restarts,
                          io.at_size(data["test"][0], SIZES[-1]), y["test"], test_probs, classes):
        show(fig)
    test_acc = report.finish(verdict, stopped, chosen, results)
    check_accuracy(test_acc, y["test"], floor=FLOOR, n_classes=n_classes,
                   what=f"test accuracy ({chosen})")
    if TRANSFER and MODE == "cpu":
        check(report.gain(3) > 0.2,
              f"step 3 (the head on the pretrained activations) gained {report.gain(3):.3f} > 0.2")
