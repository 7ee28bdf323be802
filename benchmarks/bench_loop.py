"""fit() against a plain hand-written PyTorch loop: same model, data, optimizer and LRs.

Both arms start from the same weights and see the same minibatches; they are
alternated several times in one run and the median time of each is compared.
Target: fit <= 1.03x the plain loop (the loop's bookkeeping -- setting LRs per
group, recording losses, the NaN check -- must cost next to nothing).

Run:  python benchmarks/bench_loop.py [--repeats 5] [--n 6400] [--device cpu]
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
from minicnn.data import batches, load_fashion_mnist  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=6400, help="training images per epoch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    (x, y), _, _ = load_fashion_mnist()
    train = batches(x[:args.n], y[:args.n], 128, shuffle=True, device=args.device,
                    generator=torch.Generator().manual_seed(0))
    initial = simple_resnet(10).to(args.device)
    times = {"fit": [], "plain": []}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for arm in ("plain", "fit") if repeat % 2 else ("fit", "plain"):
            model = copy.deepcopy(initial)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            if arm == "fit":
                fit(model, train, None, opt, lambda step: 0.05, 1, verbose=False,
                    mixed_precision=False, channels_last=False)
            else:
                plain_loop(model, train, opt, 0.05, 0)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat:
                times[arm].append(time.perf_counter() - started)
    fit_s, plain_s = statistics.median(times["fit"]), statistics.median(times["plain"])
    print(f"one epoch of {args.n} images on {args.device}, median of {args.repeats}: "
          f"fit {fit_s:.2f}s, plain loop {plain_s:.2f}s, ratio fit/plain {fit_s / plain_s:.3f}")
    ratios = [f / p for f, p in zip(times["fit"], times["plain"])]
    print("per-round ratios: " + " ".join(f"{r:.3f}" for r in ratios))


if __name__ == "__main__":
    main()
