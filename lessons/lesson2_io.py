"""Input and output of lessons/lesson2.py, kept out of its way: the command line, loading the
images and making batches of them, the pretrained body's cache, the figures, report.md and
results.json. Under torchrun, process 0 alone reads the cache and writes files. The recipe
itself (every step, every choice: which images, which rates, who won) is in lesson2.py.
"""
import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import (N_FASHION_TRAIN, ROOT, add_common_args, add_speed_args, float_above, int_in,
                    load_or_exit, out_folder)
import minicnn.distributed as distributed
from minicnn.augment import resize
from minicnn.atomic import atomic_write
from minicnn.checkpoint import load_checked, save_checked
from minicnn.data import Batches
from minicnn.fashion_mnist import load_fashion_mnist
from minicnn.image_folder import load_image_folder
from minicnn.models import PRETRAINED_ARCHS
from minicnn.plots import (plot_augmented, plot_confusion, plot_losses, plot_schedule,
                           plot_top_losses, save_png)
from minicnn.plots import plot_lr_find as _plot_lr_find
from minicnn.precompute import data_hash
from minicnn.speed import seconds_per_step

BODY_FORMAT = "minicnn-lesson2-body-1"


def parse_args(argv):
    """lesson2.py's options, every one checked (alone and together) before any work -> args.

    args.mode is "quick", "accuracy", "full" or "cpu" (the default)."""
    parser = argparse.ArgumentParser(description=(
        "Lesson 2 end to end: the fast.ai recipe's 8 steps, on a pretrained body and few labels, "
        "against a network trained from scratch for the same seconds."))
    add_common_args(parser, out="lesson2", limit=False,
                    batch_help="default 64; --quick 32, --accuracy 128, --full 256",
                    out_help="folder for the report, figures and model.pt (default: runs/lesson2/"
                             "<data>-<mode> in the checkout, e.g. runs/lesson2/fashion-mnist-cpu)")
    parser.set_defaults(out=None)
    parser.add_argument("--overwrite", action="store_true",
                        help="let --out replace a folder that holds another run (another --data "
                             "or mode) or other files")
    parser.add_argument("--accuracy", action="store_true",
                        help="from scratch on all 50,000 images and 10 classes (the accuracy run)")
    parser.add_argument("--full", action="store_true",
                        help="the GPU setting of --accuracy: a wider network")
    parser.add_argument("--labelled", type=int_in(10), default=None,
                        help="labelled training images of the new task (default 250; --quick 200)")
    parser.add_argument("--data", type=Path, default=None,
                        help="your image folder: DATA/train/<class>/*, DATA/valid/<class>/* "
                             "(valid/ is the test set; a tenth of train/ validates)")
    parser.add_argument("--arch", choices=("simple_resnet",) + PRETRAINED_ARCHS, default=None,
                        help="the body: simple_resnet pretrained on 5 classes (Fashion-MNIST's "
                             "default), or an ImageNet one (--data's default: efficientnet_lite0)")
    parser.add_argument("--size", type=int_in(8, 1024), default=None,
                        help="image size, no progressive resizing (default: 28, --quick 20, "
                             "--accuracy 20 then 28, --full 28 then 32; --data 128, with "
                             "--quick 32)")
    parser.add_argument("--cycles", type=int_in(1, 8), default=None,
                        help="SGDR cycles in step 8, of 1, 2, 4, ... epochs (default 3; --quick 2, "
                             "--accuracy and --full 5)")
    parser.add_argument("--preset", choices=("side_on", "top_down"), default="side_on",
                        help="augmentation: side_on (photos from the side, the default), top_down "
                             "(from above: all 8 flips)")
    parser.add_argument("--lr-ratio", type=float_above(1, or_equal=True), default=None,
                        help="LR ratio between layer groups (>= 1; default: simple_resnet 3, an "
                             "ImageNet body 10)")
    add_speed_args(parser)
    parser.add_argument("--cache", type=out_folder, default=None,
                        help="folder for the pretrained body and the activations "
                             "(default: OUT/cache)")
    args = parser.parse_args(argv)
    modes = [name for name in ("quick", "accuracy", "full") if getattr(args, name)]
    if len(modes) > 1 and modes != ["quick", "accuracy"]:  # --accuracy --quick: its smoke run
        parser.error(f"--{' and --'.join(modes)}: choose one mode "
                     "(only --accuracy takes --quick too)")
    args.mode = modes[0] if modes else "cpu"
    if args.data is not None and not args.data.is_dir():
        parser.error(f"argument --data: {args.data} is not a folder (it should hold "
                     "train/<class>/* and valid/<class>/*)")
    # which run this is: the data and the mode; its folder may hold no other run
    kind = "quick-accuracy" if args.quick and args.accuracy else args.mode
    args.run = dict(data=str(args.data.resolve()) if args.data else "fashion-mnist", mode=kind)
    if args.out is None:
        name = args.data.resolve().name if args.data else "fashion-mnist"
        args.out = out_folder(str(ROOT / "runs" / "lesson2" / f"{name}-{kind}"))
    other = other_run(args.out, args.run)
    if other and not args.overwrite:
        parser.error(f"argument --out: {args.out} {other}; give another --out, or --overwrite to "
                     "replace it")
    args.cache = args.cache or args.out / "cache"
    scratch = args.mode in ("accuracy", "full")
    if args.data is not None:
        if scratch:
            parser.error(f"argument --data: --{args.mode} trains Fashion-MNIST from scratch; "
                         "leave it out")
        if args.arch == "simple_resnet":
            parser.error("argument --arch: with --data the body is an ImageNet one (its source "
                         "classes are Fashion-MNIST's); choose one of "
                         + ", ".join(PRETRAINED_ARCHS))
    elif args.arch not in (None, "simple_resnet") and scratch:
        parser.error(f"argument --arch: --{args.mode} trains simple_resnet from scratch")
    if args.labelled is not None and scratch:
        parser.error(f"argument --labelled: --{args.mode} uses all 50,000 training images")
    most = N_FASHION_TRAIN // 2 - 1000  # the 5 new classes' images less the validation images
    if args.labelled is not None and args.data is None and args.labelled > most:
        parser.error(f"argument --labelled: {args.labelled} is more than the {most:,} images of "
                     "the 5 new classes left after the validation images")
    return args


def other_run(out, run):
    """What stops a run from writing into `out`, in words, or None: a run of other data or
    another mode (its run.json says which), or files that are no lesson2 run's."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    try:
        theirs = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return "holds files that are not a lesson2 run (no readable run.json)"
    if theirs != run:
        return (f"holds a run of {theirs.get('data')} in mode {theirs.get('mode')}, and this one "
                f"is of {run['data']} in mode {run['mode']}")
    return None


def load_folder(path, size):
    """An image folder (minicnn.image_folder) at size x size; every class of train/ needs 2 images
    (one to train on, one held out for validation): refused by name otherwise."""
    folder = load_or_exit(load_image_folder, path, size, argument="--data")
    counts = torch.bincount(folder.train[1], minlength=len(folder.classes)).tolist()
    few = [f"{Path(path) / 'train' / c} ({n})" for c, n in zip(folder.classes, counts) if n < 2]
    if few:
        raise SystemExit("argument --data: every class needs at least 2 images in train/, one to "
                         "train on and one held out for validation; too few in: " + ", ".join(few))
    return folder


def load_fashion():
    """Fashion-MNIST -> (x, y) of the 60,000 training images, (x, y) of the 10,000 test images,
    the class names; a missing copy is said without a traceback."""
    return load_or_exit(load_fashion_mnist)


def fit_seconds(model, stage, steps, way):
    """About how long fit takes for `steps` steps of stage["train"] run `way` (speed.ways) with,
    after each epoch, an evaluation (forward passes only) of every image of stage["valid"] and
    stage["train_eval"]."""
    step = seconds_per_step(model, stage["train"], **way)
    image = seconds_per_step(model, stage["valid"], **way, backward=False, per_image=True)
    evaluated = sum(len(b.x) for b in (stage["valid"], stage["train_eval"]))
    return step * steps + image * evaluated * steps / len(stage["train"])


def at_size(x, size):
    """uint8 images (N, C, H, W) at size x size (resized once, 4,096 at a time)."""
    if x.shape[-2:] == (size, size):
        return x
    return torch.cat([resize(x[i:i + 4096], size) for i in range(0, len(x), 4096)])


def batches_at(data, size, batch_size, args):
    """Batches of every split at one size -> dict(train: this rank's share of each global batch,
    global_train: the whole batches (for lr_find on rank 0), valid, test, train_eval: this rank's
    part). The training order depends on the seed only, so every size and every rank visits the
    images in the same order; training drops its last short batch. One process: all of each."""
    x_train, y_train = data["train"]
    if len(x_train) < batch_size:
        raise SystemExit(f"--batch-size {batch_size} is more than the {len(x_train)} training "
                         "images; give a smaller one")
    train = _training_batches(at_size(x_train, size), y_train, batch_size, args)
    return dict(train=distributed.Shard(train), global_train=train,
                **{split: _rank_part(*data[split], args, size)
                   for split in ("valid", "test", "train_eval")})


def training_batches(x, y, batch_size, args):
    """This rank's share of shuffled batches of (x, y), in the seed's order (step 0's)."""
    return distributed.Shard(_training_batches(x, y, batch_size, args))


def feature_batches(features, data, batch_size, args):
    """The body's activations as batches for the head: dict(train: this rank's share,
    global_train, valid: part)."""
    train = _training_batches(features["train"], data["train"][1], batch_size, args)
    return dict(train=distributed.Shard(train), global_train=train,
                valid=_rank_part(features["valid"], data["valid"][1], args))


def _training_batches(x, y, batch_size, args):
    """Shuffled in the seed's order (the same at every size and on every rank), the last short
    batch dropped."""
    return Batches(x, y, batch_size, shuffle=True, drop_last=True, device=args.device,
                   generator=torch.Generator().manual_seed(args.seed))


def _rank_part(x, y, args, size=None):
    """This rank's part of an evaluation set, in order, 512 at a time (images resized to `size`).
    Seeded like the training batches: a Batches without a generator draws its seed from torch's
    global RNG, which would move every later random number (the network's initial weights)."""
    s = distributed.rank_slice(len(y))
    return Batches(x[s] if size is None else at_size(x[s], size), y[s], 512, shuffle=False,
                   device=args.device, generator=torch.Generator().manual_seed(args.seed))


def body_cache(args, x_source, classes, widths, epochs, lr, size):
    """Where the body pretrained in step 0 is kept: a file named by everything it depends on."""
    settings = f"{classes} {widths} {epochs} {lr} {size} {args.seed} {data_hash(x_source)}"
    return (Path(args.cache)
            / f"body-{hashlib.blake2b(settings.encode(), digest_size=8).hexdigest()}.pt")


def load_body(model, path):
    """The cached weights into model -> True; False when there are none yet (a damaged file:
    said). Under torchrun process 0 reads the file and sends the weights to every process."""
    cached = distributed.run_on_main(_load_body, model, path)
    if cached:
        distributed.broadcast_weights(model)
    return cached


def _load_body(model, path):
    if not path.is_file():
        return False
    try:
        model.load_state_dict(load_checked(path, BODY_FORMAT, "pretrained body"))
    except ValueError as error:
        print(f"not using the cached body: {error}; training it again")
        return False
    return True


def save_body(model, path):
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    distributed.run_on_main(save_checked, path, BODY_FORMAT, state)


def plot_augmentation(valid, preset, args):
    """8 validation images and 3 augmented versions of each -> the Figure (process 0; else None)."""
    if not distributed.is_main():
        return None
    sample = next(iter(valid))[0][:8].cpu()  # (8, C, H, W) in [0, 1]
    draw = preset(generator=torch.Generator().manual_seed(1))
    rows = {"original": sample, **{f"{args.preset} #{i}": draw(sample) for i in (1, 2, 3)}}
    return plot_augmented(rows, args.out / "augmentation.png", title=f"{args.preset} augmentation")


def plot_lr_find(found, path):
    """The range test's curve -> the Figure (process 0; else None)."""
    return _plot_lr_find(found, path) if distributed.is_main() else None


def plot_steps(rows, path):
    """Validation accuracy before the first measured step, then after each step of the recipe
    that measured one, the change written on each bar -> the Figure."""
    measured = [r for r in rows if r["after"] is not None]
    labels = ["before"] + [f"step {r['step']}" for r in measured]
    cycle = 0
    for i, r in enumerate(measured, start=1):  # step 8 once per cycle
        cycle += r["step"] == 8
        labels[i] += f"\ncycle {cycle}" if r["step"] == 8 else ""
    values = [measured[0]["before"] or 0.0] + [r["after"] for r in measured]
    fig = Figure(figsize=(0.9 * len(values) + 1.5, 3.6), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color=["0.7"] + ["C0"] * (len(values) - 1))
    for i, value in enumerate(values):
        change = f"\n{value - values[i - 1]:+.3f}" if i else ""
        ax.text(i, value + 0.01, f"{value:.3f}{change}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("validation accuracy")
    ax.set_title("what each step bought: validation accuracy after it")
    save_png(fig, path)
    return fig


def figures(out, rows, history, restarts, x_test, y_test, test_probs, classes):
    """The report's figures, drawn and saved -> the Figures, in the report's order."""
    out = Path(out)
    return [
        plot_steps(rows, out / "steps.png"),
        plot_losses(history, out / "losses.png", restarts=restarts,
                    title="step 8: the whole network, SGDR cycle_mult=2"),
        plot_schedule([lrs[-1] for lrs in history.batch_lr], out / "schedule.png",
                      title="step 8: the last group's LR, as used"),
        plot_confusion(y_test, test_probs.argmax(1), classes, out / "confusion.png"),
        plot_top_losses(x_test.float() / 255, y_test, test_probs, classes, out / "top_losses.png"),
    ]


FIGURES = ("steps", "augmentation", "lr_find_head", "lr_find_unfrozen", "schedule", "losses",
           "confusion", "top_losses")


class Report:
    """report.md and results.json: a row per step (what, seconds, validation accuracy before and
    after), the predictions, the from-scratch comparison, the diagnosis."""

    def __init__(self, out, mode, settings, *, main=True, run=None, device="cpu"):
        self.out, self.mode, self.settings, self.main = Path(out), mode, settings, main
        self.rows, self.begun, self.last_accuracy = [], time.perf_counter(), None
        self.results, self.scratch = {}, None
        self.where = "this GPU" if str(device).startswith("cuda") else "this CPU"
        if main and run is not None:  # the folder is this run's now (parse_args' other_run)
            atomic_write(self.out / "run.json", json.dumps(run))

    def estimate(self, what, seconds):
        """Say beforehand how long `what` will take, from a few timed batches."""
        words = ("under a second" if seconds < 1 else f"about {seconds:.0f} seconds"
                 if seconds < 90 else f"about {seconds / 60:.0f} minutes" if seconds < 5400
                 else f"about {seconds / 3600:.1f} hours")
        self.say(f"  {what}: {words} on {self.where}")

    def say(self, text):
        if self.main:  # under torchrun, rank 0 alone
            print(text, flush=True)

    def step(self, number, what, started, before=None, after=None):
        seconds = time.perf_counter() - started
        self.rows.append(dict(step=number, what=what, seconds=seconds, before=before, after=after))
        self.last_accuracy = after if after is not None else self.last_accuracy
        change = "" if after is None else (
            f", validation accuracy {'' if before is None else f'{before:.4f} -> '}{after:.4f}")
        self.say(f"[step {number}] {what}: {seconds:.0f}s{change}")

    def seconds_since(self, step):
        return sum(row["seconds"] for row in self.rows if row["step"] >= step)

    def gain(self, step):
        return sum(row["after"] - row["before"] for row in self.rows
                   if row["step"] == step and row["after"] is not None
                   and row["before"] is not None)

    def curve(self, offset, history):
        """(seconds since the recipe's training began, validation accuracy) after each epoch of
        step 8."""
        elapsed = [offset + sum(history.seconds[:k + 1]) for k in range(len(history.seconds))]
        self.valid_curve = list(zip(elapsed, history.valid_acc))

    def predictions(self, results, chosen, seconds):
        self.results, self.chosen, self.prediction_seconds = results, chosen, seconds

    def comparison(self, recipe_seconds, recipe_test, seconds, epochs, lr, results, chosen, n_test,
                   *, won, noise):
        self.scratch = dict(recipe_seconds=recipe_seconds, recipe_test=recipe_test, seconds=seconds,
                            epochs=epochs, lr=lr, results=results, chosen=chosen,
                            test=results[chosen]["test"], n_test=n_test, won=won, noise=noise)
        self.say(f"[from scratch] {epochs} epochs at lr {lr:.2g} in {seconds:.0f}s: "
                 f"test {self.scratch['test']:.4f} ({chosen}); "
                 f"the recipe: {recipe_test:.4f} in {recipe_seconds:.0f}s")

    def _comparison_lines(self):
        s = self.scratch
        gap, n, noise, won = abs(s["recipe_test"] - s["test"]), s["n_test"], s["noise"], s["won"]
        lines = ["## From scratch, on the same labelled images for the same time", "",
                 "| | seconds | validation accuracy | test accuracy |", "|---|---|---|---|",
                 f"| the recipe (steps 1-8, {self.chosen}) | {s['recipe_seconds']:.0f} | "
                 f"{self.results[self.chosen]['valid']:.4f} | {s['recipe_test']:.4f} |"]
        lines += [f"| from scratch: {s['epochs']} epochs, one cosine from lr {s['lr']:.2g}, "
                  f"{way} | {s['seconds']:.0f} | {r['valid']:.4f} | {r['test']:.4f} |"
                  for way, r in s["results"].items()]
        return lines + ["", f"Won: **{won}**, {gap * 100:.1f} points of test accuracy apart "
                            f"({s['recipe_test']:.4f} against {s['test']:.4f}; the noise of {n:,} "
                            f"test images, 2 standard errors: {noise * 100:.1f} points). Seconds "
                            "are training, range tests included, for both; predicting is not "
                            "counted.", ""]

    def finish(self, verdict, stopped, chosen, results):
        """Write report.md and results.json, print the tables -> the chosen way's test accuracy."""
        total = time.perf_counter() - self.begun
        test = results[chosen]["test"]
        acc = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        lines = ["# Lesson 2 report", "", f"Mode: {self.mode}. Settings: `{self.settings}`", "",
                 "| step | what was done | seconds | validation accuracy before | after |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['what']} | {r['seconds']:.0f} | {acc(r['before'])} | "
                  f"{acc(r['after'])} |" for r in self.rows]
        lines += ["", "| predictions | validation accuracy | test accuracy |", "|---|---|---|"]
        lines += [f"| {name}{' (chosen on validation)' if name == chosen else ''} | "
                  f"{r['valid']:.4f} | {r['test']:.4f} |" for name, r in results.items()]
        lines += ["", f"Predicting took {self.prediction_seconds:.0f}s (each snapshot predicts "
                      "each split once, plain and with TTA; an ensemble is a mean of those).", ""]
        if self.scratch:
            lines += self._comparison_lines()
        lines += [f"Diagnosis of step 8: **{verdict.verdict}**: {verdict.advice} (training loss "
                  f"measured as {verdict.train_source}).", ""]
        if stopped:
            lines += [stopped, ""]
        lines += [f"Test accuracy: **{test:.4f}** ({chosen}); total time {total:.0f}s.", ""]
        lines += [f"![{name}]({name}.png)" for name in FIGURES
                  if (self.out / f"{name}.png").is_file()]
        atomic_write(self.out / "report.md", "\n".join(lines) + "\n")
        atomic_write(self.out / "results.json", json.dumps(dict(
            mode=self.mode, settings={k: repr(v) for k, v in self.settings.items()},
            steps=self.rows, predictions=results, chosen=chosen, test=test, scratch=self.scratch,
            seconds=total, valid_curve=getattr(self, "valid_curve", []),
            diagnosis=verdict.verdict), indent=1))
        print("\n".join(lines[4:-len(FIGURES) - 1]))
        print(f"test accuracy {test:.4f} ({chosen}), total {total:.0f}s; "
              f"report in {self.out / 'report.md'}")
        return test
