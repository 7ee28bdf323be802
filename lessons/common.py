"""What every lesson script shares: its command-line options and its Fashion-MNIST splits.

Not part of the library: lessons are scripts to read top to bottom, and this file
keeps the set-up (seeds, threads, the output folder, the validation split) out of
the way of the step each lesson teaches.
"""
import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minicnn.data import Batches, load_fashion_mnist, train_valid_split  # noqa: E402

N_VALID = 10_000  # held out of the 60,000 training images; the test set is never used to choose


def add_common_args(parser, *, out, auto_batch=False):
    """--quick, --device, --out, --seed, --threads, --limit, --batch-size (auto_batch: an int or 'auto')."""
    parser.add_argument("--quick", action="store_true", help="a smoke run on a small slice (seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=f"runs/{out}", help="folder for figures and reports")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only this many training images (and a tenth as many for valid/test)")
    if auto_batch:
        parser.add_argument("--batch-size", default=None,
                            help="an int, or 'auto': the largest batch that fits (minicnn.batch_size)")
    else:
        parser.add_argument("--batch-size", type=int, default=128)
    return parser


def parse_args(description, *, out, extra=None, argv=None):
    """Build the parser (extra(parser) adds a lesson's own options), parse, and set everything up."""
    parser = add_common_args(argparse.ArgumentParser(description=description), out=out)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.quick and args.limit is None:
        args.limit = 1024
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


def fashion_data(args, *, batch_size=None):
    """Fashion-MNIST split into train / valid (held out of train) / test Batches on args.device.

    -> dict(train, valid, test: Batches; train_eval: a 2,000-image training sample for the
    eval-mode training loss; x_train, y_train, x_valid, y_valid, x_test, y_test: uint8/int64
    tensors on the CPU; classes).
    """
    batch_size = batch_size or args.batch_size
    (x_all, y_all), (x_test, y_test), classes = load_fashion_mnist()
    n_valid = N_VALID
    if args.limit:
        x_all, y_all = x_all[:args.limit + args.limit // 10], y_all[:args.limit + args.limit // 10]
        x_test, y_test = x_test[:max(args.limit // 10, 100)], y_test[:max(args.limit // 10, 100)]
        n_valid = args.limit // 10
    (x_train, y_train), (x_valid, y_valid) = train_valid_split(x_all, y_all, n_valid, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    sample = torch.randperm(len(x_train), generator=generator)[:2000]
    return dict(
        train=Batches(x_train, y_train, batch_size, shuffle=True, generator=generator, device=args.device),
        valid=Batches(x_valid, y_valid, 512, shuffle=False, device=args.device),
        test=Batches(x_test, y_test, 512, shuffle=False, device=args.device),
        train_eval=Batches(x_train[sample], y_train[sample], 512, shuffle=False, device=args.device),
        x_train=x_train, y_train=y_train, x_valid=x_valid, y_valid=y_valid,
        x_test=x_test, y_test=y_test, classes=classes)


def check(condition, message):
    """A lesson's closing self-check: fail loudly, with the numbers, when a result is off."""
    if not condition:
        print(f"SELF-CHECK FAILED: {message}", file=sys.stderr)
        sys.exit(1)
    print(f"self-check passed: {message}")


def threads_note():
    return f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() else torch.cuda.get_device_name()


if __name__ == "__main__":
    print("lessons/common.py is imported by the lesson scripts; run one of them, e.g. "
          f"python lessons/lesson1_baseline.py ({os.path.basename(__file__)})")
