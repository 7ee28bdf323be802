"""Samples as tensors: stratified splits of them, and shuffled minibatches on a device.

Stratified split: class c of n_c samples gets n * n_c / N of the n (largest remainder), at
least 1 in each part. Batches: epoch e's order is randperm(N) seeded with seed + e, the same
after a resume; x travels as uint8 and becomes x / 255 on the device. normalize:
(x - mean) / std per channel. The images come from fashion_mnist.py or image_folder.py.

Source: fast.ai 2018 lesson 2 (its DataLoader and validation split). docs/data.md.
"""
import operator

import torch

SAMPLE_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)


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
    classes, counts = torch.unique(y, return_counts=True)
    classes, counts = classes.tolist(), counts.tolist()
    single = [k for k, c in zip(classes, counts) if c == 1]
    if keep_rest and single:
        raise ValueError(f"class(es) {single} have a single sample: it cannot be in both parts")
    low, high = [1] * len(counts), [c - 1 if keep_rest else c for c in counts]
    if not sum(low) <= n <= sum(high):  # every class in it (and in the rest)
        raise ValueError(f"{what}={n}: give {sum(low)} to {sum(high)}, every class in each part")
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
    _check_labels(x, y)
    n_valid = operator.index(n_valid)  # an int (numpy's and torch's too): the quotas are exact
    valid, train = _stratified(y, n_valid, seed=seed, keep_rest=True, what="n_valid")
    return (x[train], y[train]), (x[valid], y[valid])


def stratified_subset(x, y, n, *, seed=0):
    """n of the samples, every class present and in its share of the data, in a random order
    -> (x, y); all of them, as given, when n >= len(y). A slice x[:n] of class-sorted data
    holds few classes."""
    _check_labels(x, y)
    n = operator.index(n)
    if n >= len(y):
        return x, y
    chosen, _ = _stratified(y, n, seed=seed, keep_rest=False, what="n")
    return x[chosen], y[chosen]


def normalize(x, mean, std):
    """(x - mean) / std per channel; x float (N, C, H, W), mean and std 1 or C numbers, std > 0."""
    if not x.is_floating_point() or x.dim() != 4:  # uint8 x: 255 times too large, no error
        raise ValueError(f"normalize: x is {x.dtype} {tuple(x.shape)}; give float (N, C, H, W)")
    channels = x.shape[1]
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(-1)
                 for v in (mean, std))
    for name, t in (("mean", mean), ("std", std)):  # 3 values on 1 channel would broadcast to 3
        if len(t) not in (1, channels) or not t.isfinite().all() or name == "std" and t.min() <= 0:
            raise ValueError(f"normalize: {name}={t.tolist()}: need 1 or {channels} finite "
                             "values (std > 0)")
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # (N, C, H, W)


class Batches:
    """Minibatches of (x, y) on a device; len() = batches per epoch; iterate for one epoch.
    x: (N, ...) uint8 images (x / 255 on the device) or float features; y: (N,) integer
    labels (as int64) or None."""

    def __init__(self, x, y, batch_size, *, shuffle, generator=None, device="cpu",
                 drop_last=False):
        # N = 0 would give no batches; an int64 or float64 x would fail deep inside the model
        if x.dim() < 2 or len(x) == 0 or x.dtype not in SAMPLE_DTYPES:
            raise ValueError(f"x is {x.dtype} {tuple(x.shape)}; give N >= 1, uint8 or float32")
        if y is not None:
            _check_labels(x, y)
            y = y.long()
        if batch_size < 1:  # 0: no batches at all
            raise ValueError(f"Batches: batch_size={batch_size}; give 1 or more")
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
        if not self.shuffle:
            return torch.arange(len(self.x))
        return torch.randperm(len(self.x),
                              generator=torch.Generator().manual_seed(self.seed + epoch))

    def epoch(self, epoch, *, skip=0):
        """Yield epoch `epoch`'s minibatches, the first `skip` of them left out."""
        order = self.order(epoch)
        if not 0 <= skip <= len(self):  # past the end: a silently empty epoch
            raise ValueError(f"skip={skip}; give 0 to {len(self)}, the batches of an epoch")
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
        raise ValueError(f"device {spec!r}: {torch.cuda.device_count()} CUDA GPU(s) here; use cpu")
    return device


def _check_labels(x, y):
    """One integer label per sample: float labels would be truncated, (N, 1) ones broadcast."""
    if y.is_floating_point() or y.shape != (len(x),):
        raise ValueError(f"y is {y.dtype} {tuple(y.shape)} for {len(x)} samples; give (N,) ints")
