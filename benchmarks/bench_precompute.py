"""One epoch of head training on cached features against one epoch through the frozen body.

Run it alone on the machine (it is a heavy run):
    flock /tmp/minicnn_heavy.lock .venv/bin/python benchmarks/bench_precompute.py [--n 1024] [--size 32]

Both arms train the same head (fastai's, on a frozen EfficientNet-Lite0 body, grey stem)
from the same starting weights, on the same Fashion-MNIST images in the same order, with
train.fit, the same SGD settings and the same dropout masks, so their
losses agree; the frozen arm runs the body (eval-mode BatchNorm,
train_bn=False) in every step, the precomputed arm reads its output from a tensor. The
one-off cost of precomputing is printed too, with the number of epochs after which it has
paid for itself. The ratio is the per-epoch speed-up; the target is >= 30x.

The ratio grows with the image size: the body's cost grows with H x W, the head's does not
(it sees 2560 numbers an image whatever the size). Measured on 2 shared CPU cores, 1,024
images, batch 128: 6x at 32x32, 18x at 64x64, 118x at 128x128 (the default here; the
course used 224x224). At 32x32 the body's forward pass costs about 1 ms an image on this
CPU, close to what a training step of the 1.3M-parameter head costs per image.
"""
import argparse
import copy
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout, no install
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "lessons"))
from common import int_in, load_or_exit  # noqa: E402  (lessons/common.py: the argument and data checks)
from minicnn.data import Batches  # noqa: E402
from minicnn.fashion_mnist import load_fashion_mnist  # noqa: E402
from minicnn.freeze import freeze  # noqa: E402
from minicnn.models import pretrained_classifier  # noqa: E402
from minicnn.precompute import body_and_head, precompute_features  # noqa: E402
from minicnn.train import fit  # noqa: E402


def one_epoch(model, train, head):
    """Time one epoch of fit training `head`'s weights; -> (seconds, mean train loss).

    Reseeded, so that both arms draw the same dropout masks.
    """
    torch.manual_seed(1)
    opt = torch.optim.SGD(head.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
    start = time.perf_counter()
    history = fit(model, train, None, opt, lambda step: 1e-2, 1, verbose=False)
    return time.perf_counter() - start, history.train_loss[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int_in(2), default=1024, help="training images")
    parser.add_argument("--size", type=int_in(8, 1024), default=128, help="image side after resizing the 28x28 images")
    parser.add_argument("--batch-size", type=int_in(1), default=128)
    parser.add_argument("--threads", type=int_in(1), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (x, y), _, _ = load_or_exit(load_fashion_mnist)
    x = F.interpolate(x[:args.n].float(), size=args.size, mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    y = y[:args.n]
    model = pretrained_classifier("efficientnet_lite0", 10, in_channels=1)
    freeze(model, train_bn=False)
    body, head = body_and_head(model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.n} images {args.size}x{args.size}, "
          f"batch {args.batch_size}; head {sum(p.numel() for p in head.parameters()):,} parameters")

    start = time.perf_counter()
    features = precompute_features(body, x, batch_size=256)  # (N, 2560), no cache: timed every run
    precompute_s = time.perf_counter() - start

    head_start = copy.deepcopy(model.layer_groups[2].state_dict())
    order = torch.Generator().manual_seed(0)
    # frozen body in the loop: every step runs the body's forward pass (no backward through it)
    through_body = Batches(x, y, args.batch_size, shuffle=True, generator=copy.deepcopy(order))
    frozen_s, frozen_loss = one_epoch(model, through_body, head)
    # precomputed: the same head, from the same weights, on the same batches of features
    model.layer_groups[2].load_state_dict(head_start)
    on_features = Batches(features, y, args.batch_size, shuffle=True, generator=copy.deepcopy(order))
    one_epoch(head, on_features, head)  # warm-up (the arm is short enough for one-off costs to show)
    model.layer_groups[2].load_state_dict(head_start)
    features_s, features_loss = one_epoch(head, on_features, head)

    print(f"precompute once:            {precompute_s:8.3f} s")
    print(f"one epoch, frozen body:     {frozen_s:8.3f} s   (mean loss {frozen_loss:.4f})")
    print(f"one epoch, cached features: {features_s:8.3f} s   (mean loss {features_loss:.4f})")
    print(f"ratio: {frozen_s / features_s:.0f}x faster per epoch (target >= 30x); precomputing pays for "
          f"itself after {precompute_s / max(frozen_s - features_s, 1e-9):.1f} epochs")


if __name__ == "__main__":
    main()
