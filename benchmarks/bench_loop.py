"""fit() against a plain hand-written PyTorch loop: same model, data, optimizer and LRs.

Two measurements, both alternating the arms in one run (the order flips every round):
1. one epoch of simple_resnet on Fashion-MNIST through fit and through the plain loop,
   from the same weights over the same minibatches. Target: fit <= 1.03x the plain loop.
   The ratio printed is the median of the per-round ratios (each round pairs two runs
   taken a few seconds apart, so a slow spell on a shared machine hits both arms).
2. the loop's own bookkeeping in microseconds per step -- setting the LRs per group, the
   NaN check, recording the loss -- measured on a model so tiny that the bookkeeping is
   all there is, then set against one real step of (1).

Run:  python benchmarks/bench_loop.py [--repeats 11] [--n 3200] [--device cpu]
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lessons"))
from common import device, int_in, load_or_exit  # noqa: E402  (lessons/common.py: the argument and data checks)
from minicnn.data import Batches  # noqa: E402
from minicnn.fashion_mnist import load_fashion_mnist  # noqa: E402
from minicnn.models import simple_resnet  # noqa: E402
from minicnn.train import fit  # noqa: E402


def plain_loop(model, train, opt, lr, epoch):
    """What a PyTorch tutorial writes: the same steps, no bookkeeping but .item() for the loss."""
    model.train()
    for x, y in train.epoch(epoch):
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss.item()  # a plain loop logs its loss too; fit records every one


def fit_loop(model, train, opt, lr, epoch):
    fit(model, train, None, opt, lambda step: lr, epoch + 1, start_step=epoch * len(train),
        verbose=False, mixed_precision=False, channels_last=False)


def alternate(initial, train, device, rounds):
    """-> {arm: [seconds per round]}; round 0 warms up and is dropped."""
    times = {"fit": [], "plain": []}
    for repeat in range(rounds + 1):
        for arm in ("plain", "fit") if repeat % 2 else ("fit", "plain"):
            model = copy.deepcopy(initial)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            (fit_loop if arm == "fit" else plain_loop)(model, train, opt, 0.05, 0)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat:
                times[arm].append(time.perf_counter() - started)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int_in(1), default=11)
    parser.add_argument("--n", type=int_in(128, hint=" (one batch of 128 at least)"), default=3200,
                        help="training images per epoch")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    (x, y), _, _ = load_or_exit(load_fashion_mnist)
    train = Batches(x[:args.n], y[:args.n], 128, shuffle=True, device=args.device,
                    generator=torch.Generator().manual_seed(0))
    times = alternate(simple_resnet(10).to(args.device), train, args.device, args.repeats)
    ratios = [f / p for f, p in zip(times["fit"], times["plain"])]
    fit_s, plain_s = statistics.median(times["fit"]), statistics.median(times["plain"])
    print(f"1. one epoch of {args.n} images on {args.device}, {args.repeats} rounds: median fit {fit_s:.2f}s, "
          f"plain loop {plain_s:.2f}s; median per-round ratio fit/plain {statistics.median(ratios):.3f} "
          f"(target <= 1.03)")
    print("   per-round ratios: " + " ".join(f"{r:.3f}" for r in ratios))

    tiny_x = torch.randint(0, 256, (64 * 500, 1, 2, 2), dtype=torch.uint8)
    tiny = Batches(tiny_x, torch.randint(0, 10, (len(tiny_x),)), 64, shuffle=True, device=args.device,
                   generator=torch.Generator().manual_seed(0))
    tiny_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10)).to(args.device)
    tiny_times = alternate(tiny_model, tiny, args.device, args.repeats)
    per_step = {arm: statistics.median(t) / len(tiny) * 1e6 for arm, t in tiny_times.items()}
    overhead = per_step["fit"] - per_step["plain"]
    real_step = plain_s / len(train) * 1e6
    print(f"2. bookkeeping on a 4->10 linear model: fit {per_step['fit']:.0f} us/step, plain "
          f"{per_step['plain']:.0f} us/step: {overhead:.0f} us more per step, "
          f"{100 * overhead / real_step:.3f}% of one real step ({real_step / 1000:.0f} ms)")


if __name__ == "__main__":
    main()
