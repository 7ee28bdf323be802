"""Images per second: minicnn's batched side_on against torchvision.transforms.v2 image by image.

Run it alone on the machine (it is a heavy run):
    flock /tmp/minicnn_heavy.lock .venv/bin/python benchmarks/bench_augment.py [--reps 9] [--threads N]

Both pipelines do the same kinds of ops with the same ranges on a batch of 256 float images:
a horizontal flip (p 0.5), rotation +-10 degrees and zoom 1..1.1 (p 0.75, bilinear), brightness
and contrast +-0.05 (p 0.75). minicnn draws one matrix per image and resamples the whole batch
with one grid_sample; torchvision.transforms.v2 is called once per image (what a Dataset's
__getitem__ does). Differences the numbers do not hide: torchvision's RandomAffine fills with
zeros (no reflection padding) and its ColorJitter brightness multiplies where ours adds.
The two are timed alternately, one batch each per round, and the medians compared.
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch
from torchvision.transforms import InterpolationMode, v2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout, no install
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lessons"))
from common import device as device_arg, int_in  # noqa: E402  (lessons/common.py: the argument checks)
from minicnn.augment import side_on


def torchvision_pipeline():
    return v2.Compose([
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=10, scale=(1.0, 1.1), interpolation=InterpolationMode.BILINEAR)], p=0.75),
        v2.RandomApply([v2.ColorJitter(brightness=0.05, contrast=0.05)], p=0.75),
    ])


def seconds(fn, x, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int_in(1), default=9, help="timed rounds per shape (median reported)")
    parser.add_argument("--batch-size", type=int_in(1), default=256)
    parser.add_argument("--threads", type=int_in(1), default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", type=device_arg, default="cpu",
                        help="device of minicnn's batch (torchvision runs on the CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.reps} rounds, minicnn on {device}")
    ours = side_on(generator=torch.Generator().manual_seed(0))
    theirs = torchvision_pipeline()
    torch.manual_seed(0)                                   # torchvision draws from the global RNG

    def per_image(x):
        return torch.stack([theirs(image) for image in x])

    ratios = []
    for shape in [(1, 28, 28), (3, 64, 64)]:
        x = torch.rand(args.batch_size, *shape)
        x_device = x.to(device)
        ours(x_device), per_image(x[:8])                      # warm-up
        times_ours, times_theirs = [], []
        for _ in range(args.reps):                            # alternate, so load hits both alike
            times_ours.append(seconds(ours, x_device, device))
            times_theirs.append(seconds(per_image, x, torch.device("cpu")))
        rate_ours = args.batch_size / statistics.median(times_ours)
        rate_theirs = args.batch_size / statistics.median(times_theirs)
        ratios.append(rate_ours / rate_theirs)
        print(f"{'x'.join(map(str, shape)):>8}: minicnn side_on {rate_ours:10.0f} images/s   "
              f"torchvision v2 per image {rate_theirs:8.0f} images/s   ratio {ratios[-1]:6.1f}x")
    print(f"target >= 5x on the CPU: {'met' if min(ratios) >= 5 else 'NOT met'} (lowest ratio {min(ratios):.1f}x)")


if __name__ == "__main__":
    main()
