"""Samples as tensors: stratified splits of them, and shuffled minibatches on a device.

Stratified split: class c of n_c samples gets n * n_c / N of the n (largest remainder), at
least 1 in each part. Batches: epoch e's order is randperm(N) seeded with seed + e, the same
after a resume; x travels as uint8 and becomes x / 255 on the device. normalize:
(x - mean) / std per channel. The images come from fashion_mnist.py or image_folder.py
(each imported on its own; their names here still work, with a DeprecationWarning).

Source: fast.ai 2018 lesson 2 (its DataLoader and validation split). docs/data.md.
"""
import importlib
import operator
import warnings

import torch

MOVED = {**dict.fromkeys(["FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
                          "DEBIAN_FASHION_MNIST", "USER_CACHE", "IDX_FILES", "read_idx",
                          "fashion_mnist_folders", "load_fashion_mnist", "download_fashion_mnist"],
                         "fashion_mnist"),
         **dict.fromkeys(["IMAGE_SUFFIXES", "ImageFolder", "load_image_folder"], "image_folder")}


def __getattr__(name):
    """minicnn.data.load_fashion_mnist and the other moved names: the new module's, with a
    warning."""
    if name not in MOVED:
        raise AttributeError(f"module 'minicnn.data' has no attribute {name!r}")
    warnings.warn(f"minicnn.data.{name} moved to minicnn.{MOVED[name]}.{name}: "
                  "import it from there", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f"minicnn.{MOVED[name]}"), name)


def _count(n, name, low=None):
    """n as an int (>= low when given), or a ValueError naming the argument."""
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {n!r} ({type(n).__name__})") from None
    if low is not None and n < low:
        raise ValueError(f"{name} must be >= {low}, got {n}")
    return n


def _labels(y, name="y"):
    """y as a 1-D integer tensor of class labels, or a ValueError that says what to do."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor of class labels, got {type(y).__name__}: "
                         "convert it with torch.as_tensor")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class labels, got {y.dtype}: "
                         "if they are whole numbers 0..n_classes-1, pass y.long()")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(y.shape)}: "
                         "one label per sample")
    return y


def _pair(x, y):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of samples (N, ...), got {type(x).__name__}")
    y = _labels(y)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels: x and y must pair up, "
                         "one label per image")
    return y


def _per_class(counts, n, low, high):
    """n split over classes in proportion to counts (largest remainder), class c in
    [low[c], high[c]]. Exact in integers: class c's quota n * counts[c] / total is compared as
    n * counts[c] vs take * total."""
    total = sum(counts)
    take = [min(max(n * c // total, lo), hi) for c, lo, hi in zip(counts, low, high)]
    while sum(take) < n:  # the largest shortfall quota - take first
        c = max((c for c in range(len(counts)) if take[c] < high[c]),
                key=lambda c: n * counts[c] - take[c] * total)
        take[c] += 1
    while sum(take) > n:  # the largest excess take - quota first
        c = max((c for c in range(len(counts)) if take[c] > low[c]),
                key=lambda c: take[c] * total - n * counts[c])
        take[c] -= 1
    return take


def _stratified(y, n, *, seed, keep_rest, what):
    """Indices of n samples, every class in proportion (largest remainder) and at least once,
    and (keep_rest) at least one of each class left over -> (chosen, rest), both in a random
    order."""
    y, n, seed = _labels(y), _count(n, what), _count(seed, "seed", low=0)
    if len(y) == 0:
        raise ValueError("y holds no labels: there is nothing to split")
    classes, counts = torch.unique(y, return_counts=True)
    classes, counts = classes.tolist(), counts.tolist()
    single = [k for k, c in zip(classes, counts) if c == 1]
    if keep_rest and single:
        raise ValueError(f"class(es) {single} have a single sample, which cannot be in both parts: "
                         "add samples of them or remove those classes")
    low, high = [1] * len(counts), [c - 1 if keep_rest else c for c in counts]
    if not sum(low) <= n <= sum(high):
        raise ValueError(f"{what}={n}: cannot take {n} of {len(y)} samples with all "
                         f"{len(counts)} classes in it" + (" and in the rest" if keep_rest else "")
                         + f": choose {what} between {sum(low)} and {sum(high)}")
    take = dict(zip(classes, _per_class(counts, n, low, high)))
    seen = dict.fromkeys(take, 0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    chosen = torch.zeros(len(y), dtype=torch.bool)
    # chosen: the first take[c] of class c in the random order
    for i, c in zip(order.tolist(), y[order].tolist()):
        chosen[i] = seen[c] < take[c]
        seen[c] += 1
    chosen = chosen[order]  # in the random order
    return order[chosen], order[~chosen]


def train_valid_split(x, y, n_valid, *, seed=0):
    """Hold out n_valid samples, stratified: every class in both parts, in its share of the data
    (largest remainder), each part in a random order -> (x_train, y_train), (x_valid, y_valid)."""
    y = _pair(x, y)
    valid, train = _stratified(y, n_valid, seed=seed, keep_rest=True, what="n_valid")
    return (x[train], y[train]), (x[valid], y[valid])


def stratified_subset(x, y, n, *, seed=0):
    """n of the samples, every class present and in its share of the data, in a random order
    -> (x, y); all of them, as given, when n >= len(y). A slice x[:n] of class-sorted data
    holds few classes."""
    y, n = _pair(x, y), _count(n, "n")
    if n >= len(y):
        return x, y
    chosen, _ = _stratified(y, n, seed=seed, keep_rest=False, what="n")
    return x[chosen], y[chosen]


def normalize(x, mean, std):
    """(x - mean) / std per channel; x float (N, C, H, W), mean and std 1 or C numbers, std > 0."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError("normalize: x must be a float tensor (N, C, H, W), got "
                         + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                            else type(x).__name__)
                         + ("; for uint8 images divide by 255 first, x.float() / 255 "
                            "(Batches does it)"
                            if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 else ""))
    stats = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"normalize: {name}={value!r} is not a number or a sequence of "
                             "numbers") from e
        if len(t) not in (1, x.shape[1]):
            raise ValueError(f"normalize: {name} has {len(t)} values but x has {x.shape[1]} "
                             f"channel(s): give 1 value or {x.shape[1]}, the statistics of these "
                             "images' channels")
        if not torch.isfinite(t).all() or (name == "std" and (t <= 0).any()):
            raise ValueError(f"normalize: {name}={t.tolist()} must be finite"
                             + (" and > 0" if name == "std" else ""))
        stats.append(t.to(dtype=x.dtype, device=x.device).view(1, -1, 1, 1))
    mean, std = stats
    return (x - mean) / std


class Batches:
    """Minibatches of (x, y) on a device; len() = batches per epoch; iterate for one epoch.
    x: (N, ...) uint8 images (x / 255 on the device) or float features; y: (N,) integer
    labels (as int64) or None."""

    def __init__(self, x, y, batch_size, *, shuffle, generator=None, device="cpu",
                 drop_last=False):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(x) == 0:
            raise ValueError("Batches: x must be a tensor of N >= 1 samples, (N, C, H, W) images "
                             "or (N, F) features, got "
                             + (f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                                else type(x).__name__))
        if x.dtype != torch.uint8 and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"Batches: x is {x.dtype}; pass uint8 images in 0..255 or float32 in "
                             "[0, 1] (x.float(); models here are float32)")
        if y is not None:
            y = _pair(x, y).long()
        batch_size = _count(batch_size, "batch_size", low=1)
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise ValueError(f"Batches: {name} must be True or False, got {flag!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError("Batches: generator must be a torch.Generator or None, got "
                             f"{generator!r}; for a seed, pass torch.Generator().manual_seed(seed)")
        device = parse_device(device)
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.device, self.drop_last = device, drop_last
        # One seed drawn now; epoch e's order is randperm seeded with (seed, e).
        self.seed = int(torch.randint(2**62, (1,), generator=generator))
        self.epochs_seen = 0

    def __len__(self):
        full, rest = divmod(len(self.x), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self, epoch):
        epoch = _count(epoch, "epoch", low=0)
        if not self.shuffle:
            return torch.arange(len(self.x))
        return torch.randperm(len(self.x),
                              generator=torch.Generator().manual_seed(self.seed + epoch))

    def epoch(self, epoch, *, skip=0):
        """Yield epoch `epoch`'s minibatches, the first `skip` of them left out."""
        order, skip = self.order(epoch), _count(skip, "skip", low=0)
        if skip > len(self):
            raise ValueError(f"skip={skip} is past the {len(self)} batches of an epoch")
        for i in range(skip, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self.x[index].to(self.device, non_blocking=True)
            if xb.dtype == torch.uint8:
                xb = xb.float().div_(255)  # (B, C, H, W) in [0, 1]
            yb = None if self.y is None else self.y[index].to(self.device, non_blocking=True)
            yield xb, yb

    def __iter__(self):
        self.epochs_seen += 1
        return self.epoch(self.epochs_seen - 1)


def parse_device(spec):
    """'cpu', 'cuda', 'cuda:1' or a torch.device -> a torch.device this machine has; else a
    ValueError naming it and what to give instead (the one device check of minicnn and lessons)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {spec!r} is not a device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA "
                         "GPU(s); use cpu" + (f" or cuda:0 to cuda:{torch.cuda.device_count() - 1}"
                                              if torch.cuda.device_count() else ""))
    return device


# the old `python -m minicnn.data [--download]`: the same, from its new place
if __name__ == "__main__":
    print("python -m minicnn.data is now python -m minicnn.fashion_mnist",
          file=__import__("sys").stderr)
    importlib.import_module("minicnn.fashion_mnist").main()
