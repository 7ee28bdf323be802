"""Steps per second of fit in 1 process and in 2 (torch.distributed), on the same global batches.

Arms, each in fresh processes spawned by this script, the same model and the same global batches:
  1 process      fit on the whole batch, with every thread (--threads, default all cores)
  1 thread       the same in 1 thread: what each of the 2 processes has on a 2-core machine
  2 processes    fit on distributed.Shard: each rank half of every batch, fit's explicit all-reduce
                 of the gradients; each process gets half the threads, so the cores are the same
  2 DDP          the same 2 processes, DistributedDataParallel in a plain loop (the road not taken,
                 docs/distributed.md): what the explicit all-reduce costs against DDP's overlap
The arms take turns in each round (the order rotates); printed: the median of the rounds and the
ratios. On a 2-core CPU no speed-up is expected: 2 processes share the cores one process had, and
add the all-reduce, so the ratios there measure the overhead. The speed-up is for several GPUs.

Run:  python benchmarks/bench_distributed.py [--quick] [--rounds 5] [--steps 20] [--batch 128]
      [--device cuda]  (on CUDA each process takes one GPU and nccl; needs 2 GPUs)
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lessons"))
from common import int_in  # noqa: E402  (lessons/common.py: the argument checks)
from minicnn import distributed  # noqa: E402
from minicnn.data import Batches  # noqa: E402
from minicnn.fashion_mnist import load_fashion_mnist  # noqa: E402
from minicnn.models import simple_resnet  # noqa: E402
from minicnn.train import fit  # noqa: E402

ARMS = {"1 process": (1, "fit"), "1 thread": (1, "fit"), "2 processes": (2, "fit"), "2 DDP": (2, "ddp")}


def images(n, real=True):
    """n Fashion-MNIST training images (uint8 (n, 1, 28, 28)), or random ones (--quick, or not found)."""
    if real:
        try:
            (x, y), _, _ = load_fashion_mnist()
            return x[:n], y[:n], "Fashion-MNIST"
        except (FileNotFoundError, ValueError):
            pass
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g), "random images" + (" (Fashion-MNIST not found)" if real else ""))


def arm(rank, world_size, port, how, threads, settings, out):
    """One arm in one of its processes: a warm-up epoch, then one timed epoch of settings["steps"] steps."""
    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    me = distributed.setup(backend="gloo" if settings["device"] == "cpu" else None)
    device = torch.device("cpu") if settings["device"] == "cpu" else me.device
    x, y, _ = images(settings["steps"] * settings["batch"], settings["real"])
    batches = Batches(x, y, settings["batch"], shuffle=True, drop_last=True, device=device,
                      generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = simple_resnet(10, widths=tuple(settings["widths"])).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = distributed.Shard(batches)  # one process: the whole batch
    ddp = torch.nn.parallel.DistributedDataParallel(model) if how == "ddp" else None

    def epoch(e):
        if how == "fit":
            fit(model, train, None, opt, lambda step: 0.05, e + 1, start_step=e * len(train), verbose=False)
            return
        model.train()
        for xb, yb in train.epoch(e):  # what a DDP tutorial writes
            F.cross_entropy(ddp(xb), yb).backward()  # DDP all-reduces in buckets during backward
            opt.step()
            opt.zero_grad()

    def wait():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if me.world_size > 1:
            torch.distributed.barrier()

    epoch(0)  # warm-up: first-call costs, buffers allocated
    wait()
    started = time.perf_counter()
    epoch(1)
    wait()
    seconds = time.perf_counter() - started
    if distributed.is_main():
        Path(out).write_text(json.dumps({"steps_per_second": len(train) / seconds}))
    distributed.teardown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(name, settings):
    world_size, how = ARMS[name]
    threads = 1 if name == "1 thread" else max(1, settings["threads"] // world_size)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        # spawn, not fork: a fork after this process ran a parallel torch op (loading the data) hung in OpenMP
        mp.start_processes(arm, args=(world_size, free_port(), how, threads, settings, str(out)),
                           nprocs=world_size, start_method="spawn")
        return json.loads(out.read_text())["steps_per_second"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny network, 1 round (seconds)")
    parser.add_argument("--rounds", type=int_in(1), default=5)
    parser.add_argument("--steps", type=int_in(1), default=20, help="timed steps per arm and round")
    parser.add_argument("--batch", type=int_in(2, hint=" (split over 2 processes)"), default=128,
                        help="the global batch, the same in every arm")
    parser.add_argument("--threads", type=int_in(1), default=os.cpu_count(), help="threads of the 1-process arm")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"--device cuda needs 2 GPUs, one per process; this machine has {torch.cuda.device_count()}")
    settings = dict(steps=args.steps, batch=args.batch, threads=args.threads, device=args.device, widths=(16, 32, 64),
                    real=True)
    rounds = args.rounds
    if args.quick:
        settings.update(steps=5, batch=32, widths=(8, 16), real=False)
        rounds = 1
    print(f"simple_resnet{tuple(settings['widths'])} on {images(1, settings['real'])[2]}, global batch "
          f"{settings['batch']}, {settings['steps']} timed steps an arm, {rounds} round(s), {args.device}; "
          f"{settings['threads']} thread(s) for 1 process, {max(1, settings['threads'] // 2)} each for 2; "
          f"{os.cpu_count()} core(s)")
    speeds = {name: [] for name in ARMS}
    names = list(ARMS)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # the order rotates each round
            speeds[name].append(run_arm(name, settings))
        print(f"  round {r}: " + ", ".join(f"{name} {speeds[name][-1]:.2f}" for name in names) + " steps/s")
    median = {name: statistics.median(s) for name, s in speeds.items()}
    for name in names:
        print(f"{name:12s} {median[name]:7.2f} steps/s  ({median[name] * settings['batch']:.0f} images/s)")
    print(f"2 processes / 1 process: {median['2 processes'] / median['1 process']:.2f} (> 1: a speed-up on the "
          "same cores; on a CPU, below 1 is the overhead)")
    print(f"2 processes / (2 x 1 thread): {median['2 processes'] / (2 * median['1 thread']):.2f} (1: each "
          "process as fast as one alone; the rest: the all-reduce, the split batch, a shared machine)")
    print(f"2 DDP / 2 processes (fit's all-reduce): {median['2 DDP'] / median['2 processes']:.2f}")


if __name__ == "__main__":
    main()
