"""Lesson 2, fine-tuning: an ImageNet network (EfficientNet-Lite0) learns Fashion-MNIST, step by step.

The recipe's steps on a pretrained body, each followed by the validation accuracy and
what that step bought:
  1. precompute: the frozen body's activations for every image, once (cached on disk);
  2. LR range test on the head (cheap: it runs on the features);
  3. train the new head on the features, SGDR with cycle_len=1;
  4. precompute off: the frozen body in the loop, so augmentation (side_on) can act;
  5. unfreeze all layer groups (the body's BatchNorm kept on its running statistics:
     bn_freeze, see minicnn/freeze.py), 6. with differential LRs (each group 10x lower);
  7. (--full, or --lr-find-again) the LR range test again, now on the whole network;
  8. SGDR with growing cycles (cycle_mult=2) over the whole network.
The 28x28 grey images are resized once (bilinear, antialiased) to --size; the grey channel
goes through the stem's weights summed over RGB (minicnn/efficientnet.py, grey_stem).

Run:
    python lessons/lesson2_fine_tune.py            # CPU: a subset at 48x48, ~4-5 minutes on 2 cores
    python lessons/lesson2_fine_tune.py --quick    # a smoke run, under 30 seconds
    python lessons/lesson2_fine_tune.py --full     # meant for a GPU: all 50,000 images at 64x64
CPU default: 12,000 training images (--limit; 1,200 held out for validation) at 48x48, batch 64,
one unfrozen epoch, 2,000 test images. On 2 CPU cores an unfrozen epoch costs about 11 ms an
image at 48x48 (1 ms for the frozen body's forward pass alone): EfficientNet-Lite0 is a
network for 224x224 photos, and this lesson shows its steps rather than its best accuracy
on a CPU (lesson2.py's small ResNet is the one that reaches 91% there).
Common options (lessons/common.py): --device, --out (runs/lesson2_fine_tune), --seed,
--threads, --batch-size (CPU 64, --full 128), --limit. Own options (RUN_SETTINGS below gives the
CPU, --full and --quick values): --size, --head-epochs, --frozen-epochs, --cycles (1, 2, 4..
epochs), --lr-ratio (10), --n-test, --n-train, --lr-find-again, --train-body-bn.
Writes lr_find_head.png (and lr_find_unfrozen.png), losses_{head,frozen,unfrozen}.png and
steps.png (accuracy after each step; seconds per epoch on features vs through the body); caches
features under --out/features.
"""
import time
from functools import partial

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import (N_FASHION_TEST, check, check_accuracy, check_size, fashion_data, float_above, int_in, load_or_exit,
                    parse_args, split_sizes, threads_note)
from minicnn.augment import resize, side_on
from minicnn.data import Batches, stratified_subset
from minicnn.fashion_mnist import load_fashion_mnist
from minicnn.freeze import bn_freeze, differential_lrs, freeze, param_groups, unfreeze
from minicnn.lr_find import lr_find
from minicnn.models import pretrained_classifier
from minicnn.optim import SGD
from minicnn.plots import plot_losses, plot_lr_find, save_png
from minicnn.precompute import body_and_head, precompute_features
from minicnn.schedule import sgdr_lrs, total_steps
from minicnn.train import evaluate, fit

MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4
QUICK_FLOOR = 0.3  # test accuracy (200 images) 0.500-0.570 over seeds 0-2 x 1-2 threads
MIN_SIZE = 28  # Fashion-MNIST's own size: a network made for 224px photos gets the images enlarged, never shrunk
# What each setting leaves to the command line; an option given there wins.
RUN_SETTINGS = {"cpu": dict(limit=12_000, size=48, head_epochs=3, frozen_epochs=1, cycles=1, n_test=2000, batch_size=64),
           "full": dict(limit=None, size=64, head_epochs=3, frozen_epochs=2, cycles=3, n_test=10_000, batch_size=128),
           "quick": dict(n_train=256, size=32, head_epochs=1, frozen_epochs=1, cycles=1, n_test=200, batch_size=64)}


def options(parser):
    parser.add_argument("--full", action="store_true", help="all images, 64x64, longer: meant for a GPU")
    parser.add_argument("--size", type=int_in(MIN_SIZE, 512), help="image side after resizing (CPU: 48)")
    parser.add_argument("--head-epochs", type=int_in(1), help="step 3 (3)")
    parser.add_argument("--frozen-epochs", type=int_in(1), help="step 4 (CPU: 1)")
    parser.add_argument("--cycles", type=int_in(1, 8), help="step 8: SGDR cycles of 1, 2, 4.. epochs (CPU: 1)")
    # 10 as in the course ([1e-4, 1e-3, 1e-2]); on the CPU default, 3 lost 3 points in the unfrozen epoch.
    # --lr-ratio as in lesson2.py; --ratio, its old name, still works.
    parser.add_argument("--lr-ratio", "--ratio", type=float_above(1, or_equal=True), default=10.0,
                        help="LR ratio between layer groups, >= 1: earlier groups that much lower (10)")
    parser.add_argument("--n-test", type=int_in(1), help="test images (CPU: 2,000)")
    parser.add_argument("--n-train", type=int_in(1), help="use only N of the training images after the split")
    parser.add_argument("--lr-find-again", action="store_true", help="step 7 on the CPU too (slow there)")
    parser.add_argument("--train-body-bn", action="store_true",
                        help="after unfreezing, let the body's BatchNorm use batch statistics (no bn_freeze)")


def apply_preset(args):
    run = RUN_SETTINGS["quick" if args.quick else "full" if args.full else "cpu"]
    for name, value in run.items():
        if name == "limit":
            args.limit = args.limit if args.limit is not None else value  # --quick: common's 1,024
        elif getattr(args, name) is None:
            setattr(args, name, value)


def check_options(args, error):
    """The run's settings (RUN_SETTINGS, then the command line), checked against the data's sizes."""
    apply_preset(args)
    train = split_sizes(args)["train"]
    check_size(error, "--n-train", args.n_train, high=train,
               what=f"the training split holds {train:,} images; a bigger --limit gives more")
    check_size(error, "--n-test", args.n_test, high=N_FASHION_TEST, what="Fashion-MNIST's test set")
    n_train = args.n_train or train
    # The head's BatchNorm1d cannot train on a batch of one image ("Expected more than 1 value per channel").
    if n_train % args.batch_size == 1:
        error(f"argument --batch-size: {n_train} training images in batches of {args.batch_size} leave a last "
              f"batch of 1 image, and the head's BatchNorm cannot train on one; choose another --batch-size")


def plot_steps(results, epoch_seconds, path):
    """Left: validation accuracy after each step. Right: one head epoch on features vs through the body."""
    fig = Figure(figsize=(11, 3.6), layout="tight")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=(2, 1))
    labels = [step for step, _, _ in results]
    accs = [acc for _, acc, _ in results]
    left.barh(range(len(accs)), accs, color="tab:blue")
    for i, acc in enumerate(accs):
        left.text(acc, i, f" {acc:.3f}", va="center")
    left.set(yticks=range(len(labels)), yticklabels=labels, xlim=(min(accs) - 0.05, max(accs) + 0.03),
             xlabel="validation accuracy after the step")
    left.invert_yaxis()
    names, seconds = list(epoch_seconds), list(epoch_seconds.values())
    right.bar(range(len(names)), seconds, color=["tab:green", "tab:gray"])
    for i, value in enumerate(seconds):
        right.text(i, value, f"{value:.1f}s", ha="center", va="bottom")
    right.set(xticks=range(len(names)), xticklabels=names, ylabel="seconds per epoch",
              ylim=(0, 1.15 * max(seconds)), title=f"a head epoch: {seconds[1] / seconds[0]:.0f}x\nfaster on features")
    save_png(fig, path)


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], out="lesson2_fine_tune", argv=argv, extra=options,
                      check_options=check_options, batch_size=None)  # RUN_SETTINGS gives it
    data = fashion_data(args)
    _, (x_test, y_test), _ = load_or_exit(load_fashion_mnist)
    x_test, y_test = stratified_subset(x_test, y_test, args.n_test, seed=args.seed)  # never used to choose anything
    x_train, y_train = stratified_subset(data["x_train"], data["y_train"], args.n_train or len(data["x_train"]),
                                         seed=args.seed)
    # 28x28 -> size x size once, kept as uint8 (a quarter of the memory of floats)
    x_train, x_valid, x_test = (resize(x, args.size) for x in (x_train, data["x_valid"], x_test))
    y_valid = data["y_valid"]
    generator = torch.Generator().manual_seed(args.seed)
    train = Batches(x_train, y_train, args.batch_size, shuffle=True, generator=generator, device=args.device)
    valid = Batches(x_valid, y_valid, 256, shuffle=False, device=args.device)
    test = Batches(x_test, y_test, 256, shuffle=False, device=args.device)
    print(f"Fashion-MNIST: {len(x_train)} train, {len(x_valid)} valid, {len(x_test)} test images at "
          f"{args.size}x{args.size}; {args.device} ({threads_note()})")
    started, results = time.perf_counter(), []

    def report(step):
        _, acc = evaluate(model, valid)
        seconds = time.perf_counter() - started
        gain = acc - results[-1][1] if results else acc
        results.append((step, acc, seconds))
        print(f"--> {step}: valid accuracy {acc:.4f} ({gain:+.4f}), {seconds:.0f}s so far\n")

    model = pretrained_classifier("efficientnet_lite0", 10, in_channels=1).to(args.device)
    freeze(model, train_bn=False)  # body frozen, its BatchNorm on ImageNet's statistics
    body, head = body_and_head(model)  # body ends with the concat pooling: features (N, 2560)
    pretrained = {k: v.clone() for k, v in body.state_dict().items()}  # to check steps 1-4 left it alone

    # 1. Precompute: run the frozen body once over train and valid (cached: a rerun skips this).
    cache = args.out / "features"
    f_train, f_valid = (precompute_features(body, x, batch_size=256, cache=cache, arch="efficientnet_lite0")
                        for x in (x_train, x_valid))
    f_train_b = Batches(f_train, y_train, train.batch_size, shuffle=True, generator=generator, device=args.device)
    f_valid_b = Batches(f_valid, y_valid, 256, shuffle=False, device=args.device)
    print(f"1. precomputed {tuple(f_train.shape)} training features in {time.perf_counter() - started:.0f}s")

    # 2. LR range test on the head alone, on the features.
    head_opt = SGD(head.parameters(), lr=1e-2, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    found = lr_find(head, f_train_b, head_opt, num_iter=30 if args.quick else 100)
    plot_lr_find(found, args.out / "lr_find_head.png")
    lr = found.suggested_lr if found.loss_fell else 1e-2
    print(f"2. LR range test on the head: {found.reason}\n   -> lr {lr:.3g}")

    # 3. The head on the features: SGDR, cycle_len=1 (a restart every epoch).
    head_lr_at = partial(sgdr_lrs, lr_maxes=[lr], steps_per_cycle=len(f_train_b))
    history = fit(head, f_train_b, f_valid_b, head_opt, head_lr_at, args.head_epochs,
                  channels_last=False)  # features are (N, 2560), not images
    epoch_on_features = sum(history.seconds) / len(history.seconds)
    plot_losses(history, args.out / "losses_head.png", title="head on precomputed features")
    report("3. head on precomputed features")
    # the head now lives in the model: on plain images it is as accurate as on the features
    # (float32 for both: bf16 autocast on a GPU could flip a near tie)
    on_features, on_images = (evaluate(m, b, mixed_precision=False)[1] for m, b in [(head, f_valid_b), (model, valid)])

    # 4. Precompute off: the frozen body runs every step, so augmentation now changes what the head sees.
    opt = SGD(param_groups(model, lr), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    augment = side_on(generator=torch.Generator().manual_seed(args.seed))
    history = fit(model, train, valid, opt, partial(sgdr_lrs, lr_maxes=[lr] * 3, steps_per_cycle=len(train)),
                  args.frozen_epochs, augment=augment)
    plot_losses(history, args.out / "losses_frozen.png", title="frozen body, augmented images")
    epoch_through_body = sum(history.seconds) / len(history.seconds)
    print(f"   an epoch through the frozen body took {epoch_through_body:.1f}s, "
          f"one on the precomputed features {epoch_on_features:.2f}s")
    report("4. + augmentation, body frozen")

    body_unchanged = all(torch.equal(v, body.state_dict()[k]) for k, v in pretrained.items())

    # 5-6. Unfreeze; each layer group `ratio` x lower than the next (course: lr/100, lr/10, lr).
    unfreeze(model)
    # The body's BatchNorm stays on its running statistics (fastai 0.7's bn_freeze(True)): grey
    # 48x48 clothes are far from ImageNet, and batch statistics would change the very features
    # the head was trained on (measured: -11 to -20 points after an epoch; with bn_freeze +1.4).
    if not args.train_body_bn:
        bn_freeze(model)
    lrs = differential_lrs(lr, 3, ratio=args.lr_ratio)
    # 7. The range test again, on the whole network, keeping the ratios (costly on a CPU).
    if args.full or args.lr_find_again:
        for group, group_lr in zip(opt.param_groups, lrs):
            group["lr"] = group_lr
        found = lr_find(model, train, opt, num_iter=100)
        plot_lr_find(found, args.out / "lr_find_unfrozen.png")
        if found.loss_fell:
            lrs = differential_lrs(found.suggested_lr, 3, ratio=args.lr_ratio)
        print(f"7. LR range test, unfrozen: {found.reason}")
    print("5-6. unfrozen, learning rates " + ", ".join(f"{v:.3g}" for v in lrs))

    # 8. SGDR with growing cycles: 1, 2, 4, ... epochs; every group from its own peak.
    epochs = total_steps(args.cycles, steps_per_cycle=1, cycle_mult=2)
    lr_at = partial(sgdr_lrs, lr_maxes=lrs, steps_per_cycle=len(train), cycle_mult=2)
    history = fit(model, train, valid, opt, lr_at, epochs, augment=augment)
    plot_losses(history, args.out / "losses_unfrozen.png", title="unfrozen, differential LRs, SGDR x2")
    report(f"8. unfrozen, differential LRs, SGDR {args.cycles} cycles ({epochs} epochs)")

    _, test_acc = evaluate(model, test)
    print(f"{'step':58} {'valid acc':>9} {'gain':>7} {'time':>6}")
    previous = 0.0
    for step, acc, seconds in results:
        print(f"{step:58} {acc:9.4f} {acc - previous:+7.4f} {seconds:5.0f}s")
        previous = acc
    plot_steps(results, {"cached\nfeatures": epoch_on_features, "frozen body\n+ augmentation": epoch_through_body},
               args.out / "steps.png")
    print(f"test accuracy ({len(x_test)} images): {test_acc:.4f}; total {time.perf_counter() - started:.0f}s; "
          f"figures in {args.out}")
    check(abs(on_features - on_images) <= 1 / len(y_valid), f"the head trained on features is as accurate "
          f"inside the full model on images: {on_features:.4f} vs {on_images:.4f}")
    check(body_unchanged, "steps 1-4 left the frozen body (weights and BatchNorm statistics) bit for bit as it was")
    # a broken pipeline (weights not loaded, wrong normalisation) lands far below
    check_accuracy(test_acc, y_test, floor=QUICK_FLOOR if args.quick else 0.8, what="test accuracy")
    return results, test_acc


if __name__ == "__main__":
    main()
