"""What every lesson script shares: its command-line options, checked before any work starts,
and its Fashion-MNIST splits, each holding every class.

Not part of the library: lessons are scripts to read top to bottom, and this file
keeps the set-up (seeds, threads, the output folder, the validation split) out of
the way of the step each lesson teaches.
"""
import argparse
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from minicnn.data import Batches, parse_device, stratified_subset, train_valid_split  # noqa: E402
from minicnn.fashion_mnist import load_fashion_mnist  # noqa: E402

N_VALID = 10_000  # held out of the 60,000 training images; the test set is never used to choose
N_CLASSES, N_FASHION_TRAIN, N_FASHION_TEST = 10, 60_000, 10_000
QUICK_LIMIT = 1024  # --quick's --limit
MIN_LIMIT = 100  # a tenth of --limit is held out for validation and must hold all 10 classes
MAX_LIMIT = N_FASHION_TRAIN * 10 // 11  # --limit plus the tenth held out fit in the 60,000 (54,545)
CHANCE = 0.01  # check_accuracy: an accuracy that guessing reaches this often or more fails


# ---- Argument types. argparse turns an ArgumentTypeError into "argument --x: <message>", exit 2,
# before a lesson does anything.

def int_in(low, high=None, hint=""):
    """An argparse type: a whole number in low..high (no upper bound when high is None)."""
    def whole_number(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: give a whole number {span}{hint}")
        return value
    return whole_number


def float_above(low, *, or_equal=False):
    """An argparse type: a finite number > low (>= low with or_equal)."""
    def number(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (value == low and not or_equal):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a finite number "
                                             f"{'>=' if or_equal else '>'} {low:g}")
        return value
    return number


def out_folder(text):
    """--out: a folder (made if missing), so neither it nor a folder above it may be a file."""
    path = Path(text)
    for above in (path, *path.parents):
        if above.exists():
            if not above.is_dir():
                raise argparse.ArgumentTypeError(
                    f"{above} is a file; give a folder for the figures (a missing one is created)")
            if not os.access(above, os.W_OK | os.X_OK):
                raise argparse.ArgumentTypeError(
                    f"cannot write in {above}; give a folder you can write to")
            break
    return path


def device(text):
    """--device: cpu, or cuda (cuda:N) where there is such a GPU (minicnn.data.parse_device)."""
    try:
        d = parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the lessons run on cpu or cuda")
    return str(d)


def add_common_args(parser, *, out, batch_help="default 128", limit=True, limit_help=None,
                    out_help=None):
    """--quick, --device, --out, --seed, --threads, --limit (unless limit=False), --batch-size."""
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run on a small slice (seconds)")
    parser.add_argument("--device", type=device,
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--out", type=out_folder, default=str(ROOT / "runs" / out),
                        help=out_help or f"folder for figures and reports (runs/{out} in "
                                                 "the checkout)")
    parser.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,  # numpy's seed range
                        help="seed of every random number: weights, splits, batches (0)")
    parser.add_argument("--threads", type=int_in(1), default=None,
                        help="CPU threads for torch (default: all)")
    if limit:
        parser.add_argument(
            "--limit", type=int_in(MIN_LIMIT, hint=" (a tenth is held out for validation and "
                                   "must hold every class)"), default=None,
            help=limit_help or "use only this many training images (and a tenth as many "
                               f"for valid/test); default all, --quick: {QUICK_LIMIT}")
    parser.add_argument("--batch-size", type=int_in(1), default=None, help=batch_help)
    return parser


def add_speed_args(parser):
    """--precision and --channels-last: auto (a few timed steps of each way, minicnn/speed.py) or
    forced."""
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="arithmetic of training and predicting: auto (the default) times a "
                             "few steps of each and takes the faster; bf16 is tried only where "
                             "the CPU or GPU computes it")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="memory layout of the images: auto (the default) times a few steps "
                             "of each and takes the faster")
    return parser


def in_notebook():
    """True inside a running Jupyter kernel (a lesson opened or executed as a notebook); not in a
    script that merely imported ipykernel or IPython (a test runner that executes notebooks)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"  # the kernel's shell; None elsewhere


def command_line(notebook_argv):
    """A lesson's options: the command line when it runs as a script; in a notebook (whose kernel
    was started with its own -f kernel.json), the list ARGV of the lesson's parameters cell."""
    return list(notebook_argv) if in_notebook() else sys.argv[1:]


def show(fig):
    """Show a figure inline in a notebook; as a script it is only saved (plots save as they draw).
    None (no figure: under torchrun only process 0 draws) shows nothing."""
    if fig is not None and in_notebook():
        import io
        from IPython.display import Image, display
        png = io.BytesIO()
        fig.savefig(png, format="png")
        display(Image(png.getvalue()))


def parse_args(description, *, out, extra=None, check_options=None, argv=None, batch_size=128,
               quick_batch_size=None, batch_help=None, limit_help=None):
    """Build the parser (extra(parser) adds a lesson's own options), parse, check, set everything
    up.

    --batch-size, when not given: batch_size, or quick_batch_size with --quick (batch_help and
    limit_help: the help texts of --batch-size and --limit where a lesson's defaults differ).
    check_options(args, error) fills in the lesson's own defaults and checks the options against
    each other and the data's sizes (split_sizes); error(message) exits with status 2. It runs
    before setup, so a bad combination costs no work.
    """
    batch_help = batch_help or f"default {batch_size}" + (
        f" (--quick: {quick_batch_size})" if quick_batch_size else "")
    parser = add_common_args(argparse.ArgumentParser(description=description), out=out,
                             batch_help=batch_help, limit_help=limit_help)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.quick and args.limit is None:
        args.limit = QUICK_LIMIT
    if args.batch_size is None:
        args.batch_size = quick_batch_size if args.quick and quick_batch_size else batch_size
    if args.limit is not None and args.limit > MAX_LIMIT:
        parser.error(f"argument --limit: {args.limit} is more than the {MAX_LIMIT:,} that fit, "
                     f"with a tenth more held out for validation, in Fashion-MNIST's "
                     f"{N_FASHION_TRAIN:,} training images; leave --limit out to use them all")
    if check_options is not None:
        check_options(args, parser.error)
    setup(args)
    return args


def setup(args):
    """Seeds every RNG, sets the thread count, makes the output folder."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)


def split_sizes(limit):
    """How many images fashion_splits gives each split with --limit (known before loading, to
    check options)."""
    if not limit:
        return dict(train=N_FASHION_TRAIN - N_VALID, valid=N_VALID, test=N_FASHION_TEST)
    return dict(train=limit, valid=limit // 10, test=max(limit // 10, 100))


def check_size(error, name, value, *, low=N_CLASSES, high, what):
    """error() unless low <= value <= high: `what` says where `high` comes from."""
    if value is not None and not low <= value <= high:
        error(f"argument {name}: {value} is out of range: give {low} to {high} ({what}; "
              f"at least {low} so that every class is in it)")


def load_or_exit(load, *args, argument=None, **kwargs):
    """load(*args, **kwargs), or exit 1 with its message and no traceback.

    A missing or damaged dataset is the user's to fix, and the loaders' messages say how (the
    package to install, the file to replace); a traceback above them hides that. `argument`
    (e.g. "--data") is named first when the data came from one."""
    try:
        return load(*args, **kwargs)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"argument {argument}: {error}" if argument else str(error)) from None


def fashion_splits(seed, limit=None):
    """Fashion-MNIST as uint8/int64 (x, y) pairs on the CPU: train, valid (N_VALID held out of
    the 60,000 training images) and the 10,000 test images; the one split every lesson and
    benchmark trains on. With limit: a stratified subset of split_sizes' sizes, every class in
    its share (a slice x[:n] of class-sorted images would hold few classes)."""
    (x_all, y_all), (x_test, y_test), classes = load_or_exit(load_fashion_mnist)
    sizes = split_sizes(limit)
    if limit:
        x_all, y_all = stratified_subset(x_all, y_all, sizes["train"] + sizes["valid"], seed=seed)
        x_test, y_test = stratified_subset(x_test, y_test, sizes["test"], seed=seed)
    train, valid = train_valid_split(x_all, y_all, sizes["valid"], seed=seed)
    return train, valid, (x_test, y_test), classes


def fashion_data(args, *, batch_size=None):
    """fashion_splits as train / valid / test Batches on args.device (--limit or --quick: subsets).

    -> dict(train, valid, test: Batches; train_eval: a 2,000-image training sample for the
    eval-mode training loss; x_train, y_train, x_valid, y_valid, x_test, y_test: uint8/int64
    tensors on the CPU; classes).
    """
    batch_size = batch_size or args.batch_size
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test), classes = fashion_splits(
        args.seed, args.limit)
    generator = torch.Generator().manual_seed(args.seed)
    sample = torch.randperm(len(x_train), generator=generator)[:2000]
    return dict(
        train=Batches(x_train, y_train, batch_size, shuffle=True, generator=generator,
                      device=args.device),
        valid=Batches(x_valid, y_valid, 512, shuffle=False, device=args.device),
        test=Batches(x_test, y_test, 512, shuffle=False, device=args.device),
        train_eval=Batches(x_train[sample], y_train[sample], 512, shuffle=False,
                           device=args.device),
        x_train=x_train, y_train=y_train, x_valid=x_valid, y_valid=y_valid,
        x_test=x_test, y_test=y_test, classes=classes)


def seconds_to(curve, threshold):
    """The seconds at the first epoch whose validation accuracy is at or above threshold, else
    None. curve: [(seconds since training began, validation accuracy)] in epoch order."""
    return next((seconds for seconds, accuracy in curve if accuracy >= threshold), None)


def check(condition, message):
    """A lesson's closing self-check: fail loudly, with the numbers, when a result is off."""
    if not condition:
        print(f"SELF-CHECK FAILED: {message}", file=sys.stderr)
        sys.exit(1)
    print(f"self-check passed: {message}")


def winner(p1, p2, n, names):
    """Which of two accuracies on the same n test images won -> (words, noise): a name only when
    the gap passes the noise, 2 standard errors of a difference of two accuracies,
    noise = 2 sqrt((p1 (1 - p1) + p2 (1 - p2)) / n), taken as if the two were independent (the
    same images make it smaller: this errs towards "neither")."""
    noise = 2 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
    if abs(p1 - p2) <= noise:
        return "neither: the gap is within the noise", noise
    return names[0] if p1 > p2 else names[1], noise


def chance_of_at_least(k, n, p):
    """P(X >= k) for X ~ Binomial(n, p): how often a guess that is right with probability p on each
    image gets k or more of n right. Summed in logs (lgamma), so exact for a test set of any
    size."""
    if k <= 0 or p >= 1:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p)
            for i in range(k, n + 1)]  # log of C(n, i) p^i (1-p)^(n-i)
    top = max(logs)
    return math.exp(top) * sum(math.exp(x - top) for x in logs)


def check_accuracy(acc, y, *, floor, what, n_classes=N_CLASSES, margin=0.05, chance=CHANCE):
    """Self-check an accuracy measured on labels y: every class is in y; the accuracy beats both
    `floor` and, by `margin`, what always answering y's most common class would score (on a
    one-class test set that is 1.0); and a guess right as often as that class is common would
    score it with probability under `chance` (on 6 images 4 right is luck one time in three):
    a degenerate result cannot pass."""
    counts = torch.bincount(y.cpu(), minlength=n_classes)
    check(bool((counts > 0).all()), f"{what}: all {n_classes} classes among its {len(y)} images "
                                    f"(images per class {counts.tolist()})")
    majority = counts.max().item() / len(y)
    bar = max(floor, majority + margin)
    check(acc >= bar, f"{what} {acc:.4f} >= {bar:.3f}: the floor {floor} and the most common "
                      f"class's share {majority:.3f} + {margin}")
    right = round(acc * len(y))
    luck = chance_of_at_least(right, len(y), majority)
    too_few = chance_of_at_least(len(y), len(y), majority) >= chance  # even all right could be luck
    check(luck < chance, f"{what}: a guess right {majority:.3f} of the time (the most common "
                         f"class's share) gets {right} of {len(y)} with probability {luck:.2g} "
                         f"< {chance}" + ("; too few images to tell any accuracy from luck: "
                                          "add images" if too_few else ""))


def threads_note():
    return (f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available()
            else torch.cuda.get_device_name())


if __name__ == "__main__":
    print("lessons/common.py is imported by the lesson scripts; run one of them, e.g. "
          f"python lessons/lesson1_baseline.py ({os.path.basename(__file__)})")
