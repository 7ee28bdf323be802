"""Time of one SGD.step() against torch.optim.SGD on a ResNet-18-sized parameter list.

Run it alone on the machine (it is a heavy run):
    flock /tmp/minicnn_heavy.lock .venv/bin/python benchmarks/bench_optim.py

Setting: torchvision's resnet18 parameter list (62 tensors, 11.7 M numbers), momentum 0.9,
Nesterov, weight decay 5e-4, fixed random gradients. Four optimizers, each on its own copy of
the parameters, are stepped in turn (A B C D A B C D ...) so that a slow patch of a shared
machine hits all of them alike; the median over --steps rounds is reported, with the ratio of
each to torch's foreach and single-tensor paths. Target: minicnn's default (foreach
on CUDA, the loop on the CPU) <= 1.2x torch foreach.
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch
import torchvision

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout, no install
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lessons"))
from common import device, int_in  # noqa: E402  (lessons/common.py: the argument checks)
from minicnn.optim import SGD


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int_in(1), default=200, help="timed rounds (after --warmup)")
    parser.add_argument("--warmup", type=int_in(0), default=10, help="untimed rounds first")
    parser.add_argument("--threads", type=int_in(1), default=torch.get_num_threads())
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    reference = [p.detach().to(args.device) for p in model.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in reference]
    hyper = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)

    def make(build):
        params = [p.clone() for p in reference]
        for p, g in zip(params, grads):
            p.grad = g  # the same gradient every step; no optimizer writes into it
        return params, build(params)

    arms = {
        "torch foreach": make(lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=True, **hyper)),
        "torch single-tensor": make(lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False, **hyper)),
        "minicnn foreach=True": make(lambda ps: SGD(ps, 0.1, foreach=True, **hyper)),
        "minicnn loop, foreach=False": make(lambda ps: SGD(ps, 0.1, foreach=False, **hyper)),
    }
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {name: [] for name in arms}
    for round_ in range(args.warmup + args.steps):
        for name, (_, opt) in arms.items():
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)

    # All four must still hold the same weights, or the timing compares different work.
    base = arms["torch foreach"][0]
    for name, (params, _) in arms.items():
        err = max((p - q).abs().max().item() for p, q in zip(params, base))
        assert err < 1e-5, f"{name} drifted from torch foreach by {err}"

    n = sum(p.numel() for p in reference)
    print(f"{len(reference)} tensors, {n / 1e6:.1f} M parameters, {args.device}, "
          f"{args.threads} threads, median of {args.steps} steps")
    foreach = statistics.median(times["torch foreach"])
    single = statistics.median(times["torch single-tensor"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:29s} {m * 1e3:8.2f} ms   {m / foreach:5.2f}x torch foreach   "
              f"{m / single:5.2f}x torch single-tensor")
    # minicnn's default (foreach=None) is the foreach path on CUDA and the loop elsewhere.
    default = "minicnn foreach=True" if args.device.startswith("cuda") else "minicnn loop, foreach=False"
    ratio = statistics.median(times[default]) / foreach
    print(f"minicnn's default here is '{default}'; target <= 1.20x torch foreach: "
          f"{'met' if ratio <= 1.2 else 'MISSED'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
