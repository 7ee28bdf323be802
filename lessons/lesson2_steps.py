"""The plumbing of lessons/lesson2.py, kept out of its way: settings, data at a size, the
report, the final predictions and figures. lesson2.py holds the recipe; read it first.
"""
import time
from pathlib import Path

import torch

from common import N_VALID
from minicnn.augment import resize
from minicnn.batch_size import find_batch_size
from minicnn.data import Batches, load_fashion_mnist, load_image_folder, train_valid_split
from minicnn.models import pretrained_classifier, simple_resnet
from minicnn.plots import plot_confusion, plot_losses, plot_schedule, plot_top_losses
from minicnn.snapshot import ensemble_predict
from minicnn.train import History, predict
from minicnn.tta import predict_tta

# The three settings. cpu: what `make lesson` runs on 2 cores; full: a GPU; quick: a smoke run.
# Why the CPU default is the from-scratch simple_resnet: EfficientNet-Lite0's depthwise
# convolutions train slowly on a CPU (measured on 2 cores, forward and backward: 6 ms an image at
# 32px, 7-9 ms at 48px, so one epoch of 50,000 images takes 5-8 minutes of a 15-minute budget),
# while simple_resnet does an epoch in 20-55 s.
# With a body that starts random, steps 1-4 show the mechanics (precompute, freeze, head first)
# rather than their gain; `--arch efficientnet_lite0` or `--full` show the gain.
SETTINGS = {
    "cpu": dict(arch="simple_resnet", small_size=20, size=28, batch_size=128, limit=None,
                head_epochs=1, frozen_cycles=1, cycles=4, lr_find_iter=100, lr_ratio=3,
                weight_decay=1e-4, tta_n_aug=4, expected_test_acc=0.91),
    "full": dict(arch="efficientnet_lite0", small_size=64, size=128, batch_size=256, limit=None,
                 head_epochs=2, frozen_cycles=2, cycles=4, lr_find_iter=100, lr_ratio=10,
                 weight_decay=1e-4, tta_n_aug=4, expected_test_acc=0.955),
    "quick": dict(arch="simple_resnet", small_size=20, size=28, batch_size=64, limit=640,
                  head_epochs=1, frozen_cycles=1, cycles=2, lr_find_iter=20, lr_ratio=3,
                  weight_decay=1e-4, tta_n_aug=2, expected_test_acc=0.25),
}


def add_lesson2_args(parser):
    parser.add_argument("--full", action="store_true", help="the GPU setting (bigger images, more cycles)")
    parser.add_argument("--data", default=None, help="an image folder: train/<class>/*, valid/<class>/*")
    parser.add_argument("--arch", default=None, help="efficientnet_lite0, resnet18/34/50 or simple_resnet")
    parser.add_argument("--size", type=int, default=None, help="final image size (progressive resizing ends here)")
    parser.add_argument("--small-size", type=int, default=None, help="image size before the last cycle")
    parser.add_argument("--cycles", type=int, default=None, help="SGDR cycles in step 8 (1, 2, 4, ... epochs)")
    parser.add_argument("--preset", choices=("side_on", "top_down"), default="side_on")
    parser.add_argument("--lr-ratio", type=float, default=None,
                        help="LR ratio between layer groups (simple_resnet 3, a pretrained body 10)")


def settings_for(args):
    """The mode's settings, overridden by whatever the command line gave."""
    settings = dict(SETTINGS["quick" if args.quick else "full" if args.full else "cpu"])
    for key in ("arch", "size", "small_size", "cycles", "limit", "preset", "lr_ratio"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    # A pretrained body (not simple_resnet, which starts random): the course's ratio of 10 between
    # groups, and the body's BatchNorm kept on its ImageNet statistics after unfreezing (bn_freeze).
    # lesson2_fine_tune.py measured both on EfficientNet-Lite0 (docs/fine_tuning.md): batch
    # statistics cost 11-19 points after an unfrozen epoch, bn_freeze gained 1.4; ratio 3 lost 3.3.
    pretrained = settings["arch"] != "simple_resnet"
    settings["bn_freeze"] = pretrained
    if pretrained and args.lr_ratio is None:
        settings["lr_ratio"] = 10
    if args.size is not None and args.small_size is None:
        settings["small_size"] = args.size
    if args.batch_size not in (None, "auto"):
        settings["batch_size"] = int(args.batch_size)
    settings["auto_batch"] = args.batch_size == "auto"
    if settings["small_size"] > settings["size"]:
        raise SystemExit(f"--small-size {settings['small_size']} is above --size {settings['size']}; "
                         "progressive resizing goes from small to big")
    return settings


def load_data(args, settings):
    """-> dict(train, valid, test: (x uint8, y), classes, name). valid is held out of train."""
    if args.data:
        folder = load_image_folder(args.data, settings["size"])
        (x_all, y_all), test, classes, name = folder.train, folder.valid, folder.classes, args.data
        n_valid = max(len(x_all) // 10, 1)
    else:
        (x_all, y_all), test, classes = load_fashion_mnist()
        name, n_valid = "Fashion-MNIST", N_VALID
    if settings["limit"]:
        keep = settings["limit"] + settings["limit"] // 5
        x_all, y_all, n_valid = x_all[:keep], y_all[:keep], settings["limit"] // 5
        test = (test[0][:settings["limit"] // 2], test[1][:settings["limit"] // 2])
    train, valid = train_valid_split(x_all, y_all, n_valid, seed=args.seed)
    return dict(train=train, valid=valid, test=test, classes=classes, name=name)


def build_model(settings, data):
    channels, n_classes = data["train"][0].shape[1], len(data["classes"])
    if settings["arch"] == "simple_resnet":
        return simple_resnet(n_classes, in_channels=channels)
    return pretrained_classifier(settings["arch"], n_classes, in_channels=channels)


def at_size(x, size):
    """uint8 images (N, C, H, W) resized to size x size, 4096 at a time (memory stays small)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.cat([resize(x[i:i + 4096], size) for i in range(0, len(x), 4096)])


def image_batches(data, size, settings, args):
    """Batches of every split at one size; the training order depends on the seed alone, so the
    small and the full-size training batches visit the images in the same order."""
    if settings["auto_batch"]:
        settings["batch_size"] = largest_batch(data, size, settings, args)
        settings["auto_batch"] = False
    x_train, y_train = data["train"]
    sample = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))[:2000]
    make = lambda x, y, b, shuffle: Batches(at_size(x, size), y, b, shuffle=shuffle, device=args.device,  # noqa: E731
                                            generator=torch.Generator().manual_seed(args.seed))
    return dict(train=make(x_train, y_train, settings["batch_size"], True),
                valid=make(*data["valid"], 512, False), test=make(*data["test"], 512, False),
                train_eval=make(x_train[sample], y_train[sample], 512, False))


def largest_batch(data, size, settings, args):
    """--batch-size auto: minicnn.batch_size's search with 3 real training steps per size."""
    model = build_model(settings, data).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = at_size(data["train"][0][:4096], size)

    def try_step(batch_size):
        xb = x[torch.arange(batch_size) % len(x)].to(args.device).float() / 255
        yb = torch.zeros(batch_size, dtype=torch.long, device=args.device)
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()

    # On a CPU memory rarely runs out before the batch is far larger than useful: cap it there.
    limit = len(data["train"][0]) if str(args.device).startswith("cuda") else min(len(data["train"][0]), 512)
    found = find_batch_size(try_step, limit=limit, device=args.device, model=model, optimizer=opt)
    print(f"largest batch that fits at {size}px: {found} (doubling, then bisection, margin 0.9, limit {limit})")
    return found


def feature_batches(features, data, settings, args):
    generator = torch.Generator().manual_seed(args.seed)
    return (Batches(features["train"], data["train"][1], settings["batch_size"], shuffle=True,
                    generator=generator, device=args.device),
            Batches(features["valid"], data["valid"][1], 512, shuffle=False, device=args.device))


def chosen_lr(found, *, fallback, floor=0.0):
    """The LR finder's suggestion, or `fallback` (said out loud) when the loss never clearly fell
    or the suggestion is below `floor`. Step 7 sets floor = the head's LR / 100: on a trained
    network the sweep's low end is flat and noisy, and a short run of noise there can look like a
    steep fall (a 20-step sweep on EfficientNet-Lite0 suggested 2.6e-07 after a head at 0.03)."""
    if found.loss_fell and found.suggested_lr and found.suggested_lr >= floor:
        return found.suggested_lr
    why = found.reason if not found.loss_fell else f"{found.suggested_lr:.2g} is below {floor:.2g}"
    print(f"LR finder: no usable suggestion ({why}); using {fallback:.2g}")
    return fallback


def join(histories):
    """One History from the consecutive fits of step 8 (lists appended in order)."""
    joined = History()
    for history in histories:
        for name, values in vars(history).items():
            getattr(joined, name).extend(values)
    return joined


def accuracy(probs, y):
    return float((probs.argmax(1) == y.cpu()).float().mean())


def final_predictions(model, snapshots, stage, *, augment_preset, args, n_aug):
    """Validation and test probabilities of: the last weights, TTA, the snapshot ensemble, both.

    Each snapshot predicts each split at most once plainly and once with TTA (kept in `cache`);
    an ensemble is the mean of its snapshots' probabilities, as minicnn/snapshot.py defines it.
    The last snapshot holds the weights training ended with. The ensemble's size M (the last
    M snapshots) is chosen on the validation set."""
    def tta(m, b):  # a fresh seeded generator per call: every snapshot sees the same views
        return predict_tta(m, b, augment=augment_preset(generator=torch.Generator().manual_seed(args.seed)),
                           n_aug=n_aug)
    cache = {}

    def ensemble(m, split, with_tta=False):  # mean probabilities of the last m snapshots
        for i in range(len(snapshots) - m, len(snapshots)):
            if (i, split, with_tta) not in cache:
                cache[i, split, with_tta] = ensemble_predict(model, [snapshots[i]], stage[split],
                                                             predict_fn=tta if with_tta else predict)
        return sum(cache[i, split, with_tta] for i in range(len(snapshots) - m, len(snapshots))) / m
    valid_y = stage["valid"].y
    sizes = range(2, len(snapshots) + 1) or [1]
    last = max(sizes, key=lambda m: accuracy(ensemble(m, "valid"), valid_y))
    ways = {"last weights": (1, False), f"TTA ({n_aug} views + plain)": (1, True),
            f"ensemble of last {last} snapshots": (last, False), f"ensemble of last {last} + TTA": (last, True)}
    results = {}
    for name, (m, with_tta) in ways.items():
        started = time.perf_counter()  # the time added by this way: what is cached costs nothing
        valid_probs, test_probs = ensemble(m, "valid", with_tta), ensemble(m, "test", with_tta)
        results[name] = dict(valid=accuracy(valid_probs, valid_y), test=accuracy(test_probs, stage["test"].y),
                             test_probs=test_probs, seconds=time.perf_counter() - started)
    return results


def figures(out, model, history, stage, data, results):
    chosen = max(results, key=lambda name: results[name]["valid"])  # chosen on validation only
    probs = results[chosen]["test_probs"]
    plot_losses(history, Path(out) / "losses.png", title="step 8: the whole network, SGDR cycle_mult=2")
    plot_schedule([lrs[-1] for lrs in history.batch_lr], Path(out) / "schedule.png",
                  title="step 8: the last group's LR, as used")
    x_test = stage["test"].x.float() / 255
    plot_confusion(stage["test"].y, probs.argmax(1), data["classes"], Path(out) / "confusion.png")
    plot_top_losses(x_test, stage["test"].y, probs, data["classes"], Path(out) / "top_losses.png")


class Report:
    """report.md: one row per step (what, seconds, validation accuracy), then the final table."""

    def __init__(self, out, settings):
        self.out, self.settings, self.rows, self.begun = Path(out), settings, [], time.perf_counter()

    def step(self, number, what, started, valid_acc, history=None):
        seconds = time.perf_counter() - started
        acc = "" if valid_acc is None else f"{valid_acc:.4f}"
        self.rows.append((number, what, seconds, acc))
        print(f"[step {number}] {what}: {seconds:.0f}s" + (f", validation accuracy {acc}" if acc else ""), flush=True)

    def finish(self, results, verdict, stopped):
        chosen = max(results, key=lambda name: results[name]["valid"])
        total = time.perf_counter() - self.begun
        lines = ["# Lesson 2 report", "", f"Settings: `{self.settings}`", "",
                 "| step | what was done | seconds | validation accuracy |", "|---|---|---|---|"]
        lines += [f"| {n} | {what} | {s:.0f} | {acc} |" for n, what, s, acc in self.rows]
        lines += ["", "| predictions | validation accuracy | test accuracy | seconds |", "|---|---|---|---|"]
        lines += [f"| {name}{' (chosen on validation)' if name == chosen else ''} | {r['valid']:.4f} | "
                  f"{r['test']:.4f} | {r['seconds']:.0f} |" for name, r in results.items()]
        lines += ["", f"Diagnosis of step 8: **{verdict.verdict}**: {verdict.advice} "
                      f"(training loss measured as {verdict.train_source}).", ""]
        if stopped:
            lines += [stopped, ""]
        lines += [f"Test accuracy: **{results[chosen]['test']:.4f}** ({chosen}); total time {total:.0f}s.", ""]
        lines += [f"![{name}]({name}.png)" for name in ("augmentation", "lr_find_head", "lr_find_unfrozen",
                                                        "schedule", "losses", "confusion", "top_losses")]
        (self.out / "report.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines[4:-8]))
        print(f"diagnosis: {verdict}\ntest accuracy {results[chosen]['test']:.4f} ({chosen}), total {total:.0f}s; "
              f"report in {self.out / 'report.md'}")
        return results[chosen]["test"]

