"""Lesson 2 end to end: the fast.ai recipe's 8 steps, on a pretrained body and few labels.

The course's setting is a body pretrained on many labelled images (ImageNet) and a new task
with a few thousand labels. Here the body is a small ResNet pretrained on 5 Fashion-MNIST
classes (step 0, cached), and the new task is the other 5 classes from 250 labelled images.
The same report trains a network from scratch on the same images for the same seconds and
says which won. The test images are predicted once, at the end, and choose nothing.

Run:
    python lessons/lesson2.py               # the CPU default (`make lesson`): a few minutes
    python lessons/lesson2.py --labelled 4000   # more labels: where does the body stop paying?
    python lessons/lesson2.py --accuracy    # from scratch on all 50,000 images, 10 classes
    python lessons/lesson2.py --full        # the GPU setting of --accuracy (a wider network)
    python lessons/lesson2.py --quick       # a smoke run, seconds (--accuracy --quick: of the accuracy run)
    python lessons/lesson2.py --data PATH   # your images (train/<class>/*, valid/<class>/*),
                                            # on EfficientNet-Lite0's ImageNet body
    torchrun --standalone --nproc_per_node=2 lessons/lesson2.py --quick   # 2 processes (docs/distributed.md)
Everything lands in --out (default runs/lesson2): report.md, results.json and the figures.
The `# %%` lines are cells: the file opens as a notebook in VS Code or Jupyter (jupytext).
"""
# %% Settings: plain constants; the modes change the values beside them
import functools
import os
import sys
import time

import torch

import lesson2_io as io  # input and output only: loading, the body's cache, figures, report.md
from common import check, check_accuracy, setup, threads_note
import minicnn.distributed as distributed
from minicnn.augment import side_on, top_down
from minicnn.data import Batches
from minicnn.diagnose import diagnose
from minicnn.freeze import bn_freeze, differential_lrs, freeze, param_groups, unfreeze
from minicnn.lr_find import lr_find
from minicnn.models import pretrained_classifier, simple_resnet
from minicnn.optim import SGD
from minicnn.precompute import body_and_head, precompute_features
from minicnn.schedule import cosine_lr, cycle_end_steps, sgdr_lr, sgdr_lrs, total_steps
from minicnn.snapshot import Snapshots, predict_each
from minicnn.train import accuracy, evaluate, fit, join_histories, predict
from minicnn.tta import predict_tta

args = io.parse_args(sys.argv[1:] if __name__ == "__main__" else [])
me = distributed.setup()  # under torchrun: this process's rank and device; else one process
if me.world_size > 1:  # each process its share of the cores and its own GPU
    args.device = str(me.device)
    args.threads = args.threads or max(1, os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", me.world_size)))
MODE = args.mode  # "cpu" (the default), "quick", "accuracy" or "full"


def by_mode(cpu, *, quick=None, accuracy=None, full=None):
    """The value of a setting in this run's mode (a mode not given takes the CPU default's)."""
    value = {"quick": quick, "accuracy": accuracy, "full": full}.get(MODE)
    return cpu if value is None else value


TRANSFER = MODE in ("cpu", "quick") and not args.accuracy  # --accuracy / --full: one network from scratch
SOURCE_CLASSES = [0, 2, 5, 7, 8]      # T-shirt/top, Pullover, Sandal, Sneaker, Bag: the body's "ImageNet"
TARGET_CLASSES = [1, 3, 4, 6, 9]      # Trouser, Dress, Coat, Shirt, Ankle boot: the new task
ARCH = args.arch or ("efficientnet_lite0" if args.data else "simple_resnet")
WIDTHS = by_mode((16, 32, 64), accuracy=(16, 32, 64, 128), full=(32, 64, 128, 256))  # channels per stage
N_LABELLED = args.labelled or by_mode(250, quick=200, accuracy=50_000, full=50_000)
N_VALID = by_mode(500, quick=200, accuracy=10_000, full=10_000)
PRETRAIN_EPOCHS, PRETRAIN_LR = by_mode(4, quick=2), 0.2  # step 0, on the source classes (cached)
BATCH_SIZE = args.batch_size or by_mode(64, quick=32, accuracy=128, full=256)
SIZES = (args.size,) if args.size else (128,) if args.data else by_mode((28,), quick=(20,), accuracy=(20, 28), full=(28, 32))
HEAD_EPOCHS = by_mode(30, quick=5)    # step 3, on cached activations: seconds, not minutes
FROZEN_CYCLES = 2                     # step 4: SGDR cycles of 1 epoch, augmented, body frozen
CYCLES = args.cycles or by_mode(3, quick=2, accuracy=5, full=5)    # step 8: cycles of 1, 2, 4, ... epochs
MIN_CYCLE_STEPS = by_mode(30, quick=12)  # few labels: a cycle of 1 "epoch" is at least this many steps
LR_RATIO = args.lr_ratio or (10 if ARCH != "simple_resnet" else 3)  # between layer groups
FALLBACK_LR = 0.01                    # when a range test shows no clear fall (said out loud)
LR_FIND_STEPS = by_mode(100, quick=50)
WEIGHT_DECAY = 5e-4
TTA_VIEWS = by_mode(4, quick=2, accuracy=0, full=0)  # random views besides the plain one; 0: its mirror image
TTA_NAME = f"TTA ({TTA_VIEWS} views + plain)" if TTA_VIEWS else "TTA (plain + mirror image)"
AUGMENT = top_down if args.preset == "top_down" else side_on
# bf16 autocast and channels_last: on CUDA, and on a CPU that computes bf16 itself (avx512_bf16 or
# AMX), where together they made a training step 1.8x faster (docs/speed.md); elsewhere off.
BF16 = args.device.startswith("cuda") or io.cpu_computes_bf16()
# Floors of the closing self-check, well below what was measured (another CPU or thread count gives
# other numbers): the CPU default 0.8716, --accuracy 0.9434 (seed 0; docs/recipe.md).
QUICK_FLOOR = 0.55  # --quick test accuracy, seeds 0-2 x 1 and 2 threads: 0.736-0.824
QUICK_ACCURACY_FLOOR = 0.2  # --accuracy --quick (10 classes, 200 images, from scratch): 0.332-0.562
EXPECTED_TEST = by_mode(0.83, quick=QUICK_ACCURACY_FLOOR if args.accuracy else QUICK_FLOOR, accuracy=0.925, full=0.95)
setup(args)
hyper = dict(momentum=0.9, weight_decay=WEIGHT_DECAY)
fast = dict(mixed_precision=BF16, channels_last=BF16)  # for fit on images
report = io.Report(args.out, MODE, settings={k: v for k, v in globals().items() if k.isupper()},
                   main=distributed.is_main())  # rank 0 alone prints and writes

# %% How a learning rate is read off a range test (steps 2, 7 and the from-scratch arm)
def choose_lr(found, *, floor=0.0):
    """The LR after a range test: the course's "highest rate where the loss is still clearly falling"
    (lr_find's suggestion). A trained network's loss is flat until the rate is too high, and a short
    run of noise on that flat part can look like a fall: a suggestion below `floor` is not taken.
    Without a usable suggestion: a tenth of the rate where the loss blew up, else FALLBACK_LR."""
    if found.loss_fell and found.suggested_lr >= floor:
        return found.suggested_lr, found.reason
    blew_up = len(found.lrs) < LR_FIND_STEPS  # the sweep stopped early: past that rate the loss diverged
    lr = found.lrs[-1] / 10 if blew_up else FALLBACK_LR
    return lr, f"no usable suggestion ({found.reason}); " + (
        f"a tenth of the rate where the loss blew up: {lr:.2g}" if blew_up else f"{FALLBACK_LR} (FALLBACK_LR)")


# %% The data: uint8 images (N, C, H, W), labels 0..n-1; valid is held out of the labelled images
data = io.load_data(args, transfer=TRANSFER, source=SOURCE_CLASSES, target=TARGET_CLASSES,
                    n_labelled=N_LABELLED, n_valid=N_VALID)
n_classes, channels = len(data["classes"]), data["train"][0].shape[1]
report.say(f"{data['name']}: {len(data['train'][0])} labelled training, {len(data['valid'][0])} validation, "
           f"{len(data['test'][0])} test images of {n_classes} classes; {ARCH} on {args.device} ({threads_note()}"
           f"{f', {me.world_size} processes' if me.world_size > 1 else ''})")
# train: this rank's share of each global batch (fit); global_train: the whole batches (lr_find);
# valid, test, train_eval: this rank's part (fit and evaluate add the parts' sums up)
batches = {size: io.batches_at(data, size, BATCH_SIZE, args) for size in SIZES}
small, full = batches[SIZES[0]], batches[SIZES[-1]]
aug_generator = torch.Generator().manual_seed(args.seed + me.rank)  # each rank its own augmentations
augment = AUGMENT(generator=aug_generator)
# The SGDR cycle unit ("an epoch"): a whole number of epochs, at least MIN_CYCLE_STEPS steps.
steps_per_epoch = -(-MIN_CYCLE_STEPS // len(small["train"])) * len(small["train"])

# %% Step 0: the pretrained body
started = time.perf_counter()
if ARCH == "simple_resnet" and TRANSFER:
    # A small ResNet trained on the 5 source classes, whose first two layer groups become the body.
    pretrained = simple_resnet(len(SOURCE_CLASSES), channels, WIDTHS)
    cache = io.body_cache(args, data["source"][0], SOURCE_CLASSES, WIDTHS, PRETRAIN_EPOCHS, PRETRAIN_LR, SIZES[-1])
    cached = distributed.run_on_main(io.load_body, pretrained, cache)  # rank 0 reads it, then sends it
    if cached:
        distributed.broadcast_weights(pretrained)
    else:
        source = distributed.Shard(Batches(*data["source"], 128, shuffle=True, drop_last=True, device=args.device,
                                           generator=torch.Generator().manual_seed(args.seed)))
        opt = SGD(pretrained.parameters(), PRETRAIN_LR, **hyper)
        lr_at = functools.partial(cosine_lr, total_steps=PRETRAIN_EPOCHS * len(source), lr_max=PRETRAIN_LR)
        pretrain_augment = AUGMENT(generator=torch.Generator().manual_seed(args.seed + 1000 + me.rank))  # its own:
        fit(pretrained.to(args.device), source, None, opt, lr_at, PRETRAIN_EPOCHS, augment=pretrain_augment,
            verbose=False, **fast)  # a cached body leaves every later random number as a trained one does
        distributed.run_on_main(io.save_body, pretrained, cache)
    model = simple_resnet(n_classes, channels, WIDTHS)  # a new head (pool, linear) for the new classes
    model.layer_groups[:2].load_state_dict(pretrained.layer_groups[:2].state_dict())
    what = (f"body pretrained on {len(data['source'][0])} images of the source classes, {PRETRAIN_EPOCHS} "
            f"epoch(s) ({'cached' if cached else 'trained now, then cached'})")
elif TRANSFER:
    model = pretrained_classifier(ARCH, n_classes, in_channels=channels)  # ImageNet weights, new head
    what = f"{ARCH} with its ImageNet weights, a new head"
else:
    model = simple_resnet(n_classes, channels, WIDTHS)  # random weights: steps 1-6 have no body to keep
    what = f"no pretrained body: {ARCH} from random weights, so steps 1-6 (a body to keep) do not apply"
model = distributed.broadcast_weights(model.to(args.device))  # the new head: rank 0's on every rank
report.step(0, what, started)

if TRANSFER:
    # %% Step 1: augmentation; the frozen body's activations computed once
    started = time.perf_counter()
    distributed.run_on_main(io.plot_augmentation, small["valid"], AUGMENT, args)
    freeze(model, train_bn=False)  # the body is a fixed function (BatchNorm on its statistics)
    body, head = body_and_head(model)
    features = {split: precompute_features(body, io.at_size(data[split][0], SIZES[-1]), batch_size=256,
                                           cache=args.cache if me.rank == 0 else None, arch=ARCH, device=args.device)
                for split in ("train", "valid")}  # every rank computes them; rank 0 alone caches them
    on_features = io.feature_batches(features, data, BATCH_SIZE, args)  # train, global_train, valid
    report.step(1, f"{args.preset} augmentation; the body's activations precomputed "
                   f"({tuple(features['train'].shape[1:])} per image)", started)

    # %% Step 2: LR range test on the head, over the activations
    started = time.perf_counter()
    head_opt = SGD(head.parameters(), FALLBACK_LR, **hyper)
    found = distributed.run_on_main(lr_find, head, on_features["global_train"], head_opt, num_iter=LR_FIND_STEPS,
                                    end_lr=10.0)  # rank 0 sweeps (and puts everything back); all get the result
    lr, why = choose_lr(found)
    distributed.run_on_main(io.plot_lr_find, found, args.out / "lr_find_head.png")
    report.step(2, f"LR range test on the head: lr {lr:.2g} ({why})", started)

    # %% Step 3: the body frozen, the head trained on the activations (one SGDR cycle)
    started, before = time.perf_counter(), evaluate(head, on_features["valid"])[1]
    head_steps = HEAD_EPOCHS * len(on_features["train"])
    fit(head, on_features["train"], None, head_opt, functools.partial(sgdr_lr, steps_per_cycle=head_steps, lr_max=lr),
        HEAD_EPOCHS, verbose=False)
    report.step(3, f"head trained {HEAD_EPOCHS} epochs on the activations at lr {lr:.2g}", started,
                before, evaluate(model, small["valid"], mixed_precision=BF16)[1])  # the model's own head, on images

    # %% Step 4: precompute off: the head again, on augmented images, SGDR with cycle_len=1
    # The body stays frozen but its BatchNorm layers now train (fastai 2's train_bn): their statistics
    # and scales follow the new classes' images. Kept on the source's statistics, step 4 lost 2.1
    # points where it gained 1.8 with them training (docs/recipe.md).
    started, before = time.perf_counter(), report.last_accuracy
    freeze(model, train_bn=True)
    opt = SGD(param_groups(model, lr, **hyper), lr, **hyper)  # one group per layer group, frozen ones too
    frozen_steps = total_steps(FROZEN_CYCLES, steps_per_cycle=steps_per_epoch)
    fit(model, small["train"], None, opt, functools.partial(sgdr_lr, steps_per_cycle=steps_per_epoch, lr_max=lr),
        frozen_steps // len(small["train"]), augment=augment, verbose=False, **fast)
    report.step(4, f"frozen body (its BatchNorm trains), augmented images: {FROZEN_CYCLES} SGDR cycles of 1 "
                   f"epoch at lr {lr:.2g}",
                started, before, evaluate(model, small["valid"], mixed_precision=BF16)[1])

    # %% Steps 5 and 6: unfreeze every layer group; differential learning rates
    unfreeze(model)
    if ARCH != "simple_resnet":
        bn_freeze(model)  # an ImageNet body keeps its BatchNorm statistics (docs/fine_tuning.md)
    lrs = differential_lrs(lr, len(model.layer_groups), ratio=LR_RATIO)
    report.step(5, "unfrozen: every layer group trains" + (", the body's BatchNorm on its ImageNet statistics"
                                                           if ARCH != "simple_resnet" else ""), time.perf_counter())
    report.step(6, f"differential learning rates: each group {LR_RATIO}x below the next (the last group's "
                   "rate comes from step 7)", time.perf_counter())
    head_lr = lr
else:
    lrs, head_lr = [FALLBACK_LR] * len(model.layer_groups), None

# %% Step 7: LR range test on the whole network, the groups keeping their ratios
started = time.perf_counter()
opt = SGD(param_groups(model, lrs, **hyper), lrs[-1], **hyper)
found = distributed.run_on_main(lr_find, model, small["global_train"], opt, num_iter=LR_FIND_STEPS, end_lr=10.0)
distributed.run_on_main(io.plot_lr_find, found, args.out / "lr_find_unfrozen.png")
if head_lr:  # the course keeps the head's rate for the last group; the range test checks that it is
    # safe: the loss must not blow up within a decade above it (Smith: a tenth of the blow-up rate)
    blew_up = found.lrs[-1] if len(found.lrs) < LR_FIND_STEPS else None  # the sweep stopped early there
    lr = head_lr if blew_up is None or head_lr <= blew_up / 10 else blew_up / 10
    why = (f"the head's rate {head_lr:.2g} kept: " if lr == head_lr else "a tenth of the rate where the loss "
           f"blew up, below the head's {head_lr:.2g}: ") + found.stop_reason
else:
    lr, why = choose_lr(found)
lrs = [x * lr / lrs[-1] for x in lrs]
report.step(7, f"LR range test on the whole network: last group lr {lr:.2g}; {why}", started)

# %% Step 8: the whole network, SGDR with cycle_mult=2, a snapshot at each cycle's end
# Progressive resizing: every cycle but the last at SIZES[0], the last at SIZES[-1]. Stop when a
# cycle ends with a higher validation loss than the cycle before: it has started to overfit.
snapshots, histories, stopped = Snapshots(), [], None
schedule = dict(steps_per_cycle=steps_per_epoch, cycle_mult=2)
ends = cycle_end_steps(CYCLES, **schedule)
lr_at = functools.partial(sgdr_lrs, lr_maxes=lrs, **schedule)
for cycle in range(CYCLES):
    started, before = time.perf_counter(), report.last_accuracy
    stage = full if cycle == CYCLES - 1 else small
    first = ends[cycle - 1] + 1 if cycle else 0  # the step after the previous cycle's last
    history = fit(model, stage["train"], stage["valid"], opt, lr_at, (ends[cycle] + 1) // len(stage["train"]),
                  start_step=first, augment=augment, cycle_ends=ends, on_cycle_end=snapshots,
                  train_eval=stage["train_eval"], verbose=MODE != "quick" and distributed.is_main(), **fast)
    histories.append(history)
    size = SIZES[-1] if stage is full else SIZES[0]
    report.step(8, f"cycle {cycle + 1}/{CYCLES}: {(ends[cycle] + 1 - first) // len(stage['train'])} epoch(s) at "
                   f"{size}px, snapshot taken", started, before, history.valid_acc[-1])
    if cycle and history.valid_loss[-1] > histories[-2].valid_loss[-1]:
        stopped = f"the validation loss rose at the end of cycle {cycle + 1}" + (
            ": stopped there (overfitting)" if cycle < CYCLES - 1 else ", the last: it has started to overfit")
        break
history = join_histories(histories)  # per step: the losses and LRs of the whole of step 8
recipe_seconds = report.seconds_since(1 if TRANSFER else 7)
report.curve(recipe_seconds - sum(history.seconds), history)  # validation accuracy against seconds

# %% Predictions: the last weights, TTA, the ensemble of the last M snapshots, both; chosen on validation
started = time.perf_counter()


def tta(m, b):  # a new seeded generator each call: every snapshot sees the same augmented views
    views = AUGMENT(generator=torch.Generator().manual_seed(args.seed)) if TTA_VIEWS else lambda x: x.flip(3)
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=BF16):
        return predict_tta(m, b, augment=views, n_aug=TTA_VIEWS or 1)  # the mirror: exact, no resampling


plain = functools.partial(predict, mixed_precision=BF16)
# each snapshot's probabilities (N, C) on each split; each rank predicts its part, gather joins them
each = {(split, name): [distributed.gather(p) for p in predict_each(model, snapshots, full[split], predict_fn=fn)]
        for split in ("valid", "test") for name, fn in (("plain", plain), ("tta", tta))}
y = {split: distributed.gather(full[split].y) for split in ("valid", "test")}
sizes = range(2, len(snapshots) + 1) or [1]
m = max(sizes, key=lambda k: accuracy(sum(each["valid", "plain"][-k:]) / k, y["valid"]))  # ensemble size
ways = {"last weights": (1, "plain"), TTA_NAME: (1, "tta"),
        f"ensemble of the last {m} snapshots": (m, "plain"), f"ensemble of the last {m} + TTA": (m, "tta")}
results = {name: {split: accuracy(sum(each[split, views][-k:]) / k, y[split]) for split in ("valid", "test")}
           for name, (k, views) in ways.items()}
chosen = max(results, key=lambda name: results[name]["valid"])  # on validation only
k, views = ways[chosen]
test_probs = sum(each["test", views][-k:]) / k
report.predictions(results, chosen, time.perf_counter() - started)
verdict = diagnose(history)

# %% From scratch: the same labelled images, the same seconds, no pretrained body
if TRANSFER:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    scratch = simple_resnet(n_classes, channels, WIDTHS).to(args.device)
    opt = SGD(scratch.parameters(), FALLBACK_LR, **hyper)
    found = distributed.run_on_main(lr_find, scratch, small["global_train"], opt, num_iter=LR_FIND_STEPS, end_lr=10.0)
    scratch_lr = choose_lr(found)[0]
    seconds_per_epoch = sum(history.seconds) / len(history.seconds)  # step 8's epochs: same images, same net
    # the epochs that fill the recipe's seconds, as rank 0 measured them (every rank must train as long)
    epochs = distributed.run_on_main(lambda: max(1, round((recipe_seconds - (time.perf_counter() - started))
                                                          / seconds_per_epoch)))
    lr_at = functools.partial(cosine_lr, total_steps=epochs * len(small["train"]), lr_max=scratch_lr)
    fit(scratch, small["train"], small["valid"], opt, lr_at, epochs, augment=augment,
        train_eval=small["train_eval"], verbose=False, **fast)  # evaluated as often as step 8
    scratch_seconds = time.perf_counter() - started  # its range test and training: the recipe's seconds count the same
    scratch_results = {way: {split: accuracy(distributed.gather(fn(scratch, full[split])), y[split])
                             for split in ("valid", "test")}
                       for way, fn in (("last weights", plain), (TTA_NAME, tta))}
    scratch_chosen = max(scratch_results, key=lambda way: scratch_results[way]["valid"])
    report.comparison(recipe_seconds, results[chosen]["test"], scratch_seconds, epochs,
                      scratch_lr, scratch_results, scratch_chosen, len(y["test"]))

# %% The report, the figures, and a self-check that a degenerate result cannot pass
if distributed.is_main():
    io.figures(args.out, history, io.at_size(data["test"][0], SIZES[-1]), y["test"], test_probs, data["classes"])
    test_acc = report.finish(verdict, stopped, chosen, results)
    check_accuracy(test_acc, y["test"], floor=EXPECTED_TEST, n_classes=n_classes, what=f"test accuracy ({chosen})")
    if TRANSFER and MODE == "cpu":
        check(report.gain(3) > 0.2, f"step 3 (the head on the pretrained activations) gained {report.gain(3):.3f} > 0.2")
distributed.teardown()
